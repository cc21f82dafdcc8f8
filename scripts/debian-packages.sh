#!/usr/bin/env bash
# The Debian packages the project runs with beyond Python: installs the missing ones when it
# can (as root, with apt-get), otherwise says in one line what to install. Used by `make setup`
# (so `make serve` and `make test` have them) and by .ci/run.
#
#   scripts/debian-packages.sh          install what is missing if root, else print the command
#   scripts/debian-packages.sh --check  only print what is missing (exit 0 either way)
set -euo pipefail

lib=/usr/lib/x86_64-linux-gnu
need=()
command -v make >/dev/null || need+=(make)
python3.11 -c "import venv, ensurepip" 2>/dev/null || need+=(python3.11-venv)
# the Python-backend stub of tritonserver embeds the system libpython3.11 (without it no model loads)
test -e $lib/libpython3.11.so.1.0 || test -e /lib/x86_64-linux-gnu/libpython3.11.so.1.0 || need+=(libpython3.11)
# tests only: without them, `skipped` tests are skipped and `reduced` check less
skipped=0 reduced=0
command -v chromium >/dev/null || { need+=(chromium); skipped=$((skipped + 2)); }  # report pages in a browser
command -v prometheus >/dev/null && command -v promtool >/dev/null || { need+=(prometheus); skipped=$((skipped + 2)); }
test -e $lib/libb64.so.0d || { need+=(libb64-0d); skipped=$((skipped + 1)); }         # perf_analyzer
test -e $lib/libjemalloc.so.2 || { need+=(libjemalloc2); skipped=$((skipped + 1)); }  # tritonserver's allocator
command -v qemu-x86_64 >/dev/null || { need+=(qemu-user); reduced=2; }  # INT8/FP16 on an emulated AVX2-only CPU

((${#need[@]})) || exit 0
if [[ "${1:-}" != --check && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "note: missing Debian packages (${need[*]}): run 'sudo apt-get install -y ${need[*]}' (or make as root);" \
       "until then $skipped test(s) are skipped and $reduced check less" >&2
fi
