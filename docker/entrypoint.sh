#!/usr/bin/env bash
# Start Triton on the baked repository, with the same access rules as `python -m export serve`:
# administrative APIs (model repository, shared memory, trace, logging) need $TRITON_ADMIN_KEY
# (a random key nobody knows when it is unset), models load once at start and later only
# through that API, gRPC over TLS when $TLS_CERT and $TLS_KEY name mounted files.
# TensorRT engines are built first where they are missing. Extra arguments go to tritonserver.
# jemalloc (shipped in NGC Triton images) is preloaded so that memory freed after a rush goes
# back to the system; BATTERY_MALLOC=system keeps glibc's malloc, a path picks another library.
set -euo pipefail
MODELS=${MODELS:-/models}
# Preprocessing instances and network threads follow the cores this container is given
# (its CPU quota and affinity), not those of the machine the image was built on.
python3 -m export fit-cores "$MODELS"
if [ "${RUNTIME:-onnxruntime}" = tensorrt ]; then
  python3 -m export tensorrt "$MODELS"   # a no-op when every model.plan exists
fi
KEY=${TRITON_ADMIN_KEY:-$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')}
RESTRICTED=model-repository,shared-memory,trace,logging
TLS=()
if [ -n "${TLS_CERT:-}" ]; then
  TLS=(--grpc-use-ssl=true "--grpc-server-cert=$TLS_CERT" "--grpc-server-key=${TLS_KEY:?TLS_CERT needs TLS_KEY}")
fi
MALLOC=${BATTERY_MALLOC:-}
if [ -z "$MALLOC" ]; then
  for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2; do
    if [ -f "$lib" ]; then MALLOC=$lib; break; fi
  done
fi
if [ -n "$MALLOC" ] && [ "$MALLOC" != system ]; then
  export LD_PRELOAD="$MALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
fi
# the adapters compiled by this Python (the backend's) now: a __pycache__ written by the first load
# looks to Triton like a changed model, and the next load of an ensemble (a promotion, a rollback)
# would reload every model in it instead of swapping the ensemble in milliseconds
python3 -m compileall -q "$MODELS"
# exactly the repository's models (the folders with a config.pbtxt): with --load-model='*' a folder
# that is not a model (a person's backup, an old comparisons folder) stops tritonserver from starting
LOAD=()
for config in "$MODELS"/*/config.pbtxt; do
  LOAD+=("--load-model=$(basename "$(dirname "$config")")")
done
# the line's gRPC port is served by serving.front, which sheds overload (a request it could not answer
# within $TAKT seconds is refused at once with UNAVAILABLE, for a client to send elsewhere) and forwards
# the rest to tritonserver on loopback; TAKT=0 serves tritonserver's own gRPC endpoint on 8001 instead.
# FRONT_ARGS: more options of python -m serving.front (--max-connection-age SECONDS)
TAKT=${TAKT:-2}
if [ "$TAKT" != 0 ]; then
  GRPC=(--grpc-address=127.0.0.1 --grpc-port=8011)
  FRONT_TLS=()
  if [ -n "${TLS_CERT:-}" ]; then FRONT_TLS=(--tls-cert "$TLS_CERT" --tls-key "$TLS_KEY"); TLS=(); fi
  python3 -m serving.front --listen 0.0.0.0:8001 --backend 127.0.0.1:8011 --takt "$TAKT" --metrics-port 8003 \
    --backend-pid $$ ${FRONT_ARGS:-} "${FRONT_TLS[@]}" &   # $$: the PID tritonserver keeps after exec
else
  GRPC=(--grpc-port=8001)
fi
exec tritonserver \
  --model-repository="$MODELS" \
  --model-control-mode=explicit "${LOAD[@]}" \
  "--grpc-restricted-protocol=$RESTRICTED:admin-key=$KEY" \
  "--http-restricted-api=$RESTRICTED:admin-key=$KEY" \
  --strict-readiness=true \
  --allow-metrics=true --allow-gpu-metrics=true --allow-cpu-metrics=true \
  --http-port=8000 "${GRPC[@]}" --metrics-port=8002 \
  "${TLS[@]}" "$@"
