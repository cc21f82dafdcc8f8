#!/usr/bin/env bash
# Start Triton on the baked repository; build TensorRT engines first where they are missing.
# Extra arguments go to tritonserver (e.g. --log-verbose=1).
set -euo pipefail
MODELS=${MODELS:-/models}
if [ "${RUNTIME:-onnxruntime}" = tensorrt ]; then
  python3 -m export tensorrt "$MODELS"   # a no-op when every model.plan exists
fi
exec tritonserver \
  --model-repository="$MODELS" \
  --model-control-mode=none \
  --strict-readiness=true \
  --allow-metrics=true --allow-gpu-metrics=true --allow-cpu-metrics=true \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  "$@"
