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
# tests only, skipped without them:
command -v chromium >/dev/null || need+=(chromium)                                        # report pages in a browser: 2 tests
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)  # monitoring: 2 tests
test -e $lib/libb64.so.0d || need+=(libb64-0d)                                            # perf_analyzer: 1 test
test -e $lib/libjemalloc.so.2 || need+=(libjemalloc2)                                     # tritonserver's allocator: 1 test
command -v qemu-x86_64 >/dev/null || need+=(qemu-user)   # INT8/FP16 on an emulated AVX2-only CPU: 2 tests check less

((${#need[@]})) || exit 0
if [[ "${1:-}" != --check && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "note: missing Debian packages (${need[*]}): run 'sudo apt-get install -y ${need[*]}' (or make as root);" \
       "until then the tests that need them are skipped (6 tests, and 2 check less)" >&2
fi
