#!/usr/bin/env bash
# One cell through `inspect` over Triton's HTTP/REST endpoint (KServe v2 with Triton's binary
# data extension), with nothing but bash and curl:
#
#   docs/examples/inspect_http.sh CT_FILE BATTERY_TYPE SLICE_AXIS PHOTO_FILE [HOST:PORT]
#   docs/examples/inspect_http.sh slice.jpg 0 2 photo.png localhost:8000
#
# BATTERY_TYPE 0 cell / 1 module, SLICE_AXIS 0 x / 1 y / 2 z. Prints Triton's JSON answer.
set -euo pipefail
ct=$1 type=$2 axis=$3 rgb=$4 url=${5:-localhost:8000}

# A BYTES element travels as its length (4 bytes, little endian) followed by its bytes.
element() {
  local n
  n=$(stat -c %s "$1")
  printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((n & 255)) $((n >> 8 & 255)) $((n >> 16 & 255)) $((n >> 24 & 255)))"
  cat "$1"
}
ct_size=$(($(stat -c %s "$ct") + 4)) rgb_size=$(($(stat -c %s "$rgb") + 4))
header=$(cat <<JSON
{"inputs": [
  {"name": "CT_IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": $ct_size}},
  {"name": "CT_META", "datatype": "FP32", "shape": [1, 2], "data": [$type, $axis]},
  {"name": "RGB_IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": $rgb_size}}],
 "outputs": [{"name": "VERDICT"}, {"name": "CONFIDENCE"}, {"name": "CT_PROBS"}, {"name": "RGB_SCORE"},
             {"name": "RGB_THRESHOLD"}, {"name": "CT_OOD"}, {"name": "RGB_OOD"}]}
JSON
)
# A refused cell: HTTP 400 with {"error": "<the reason>"}, and this script exits non-zero.
if ! { printf '%s' "$header"; element "$ct"; element "$rgb"; } |
  curl -sS --fail-with-body -X POST "http://$url/v2/models/inspect/infer" \
    -H "Content-Type: application/octet-stream" -H "Inference-Header-Content-Length: ${#header}" --data-binary @-; then
  echo
  exit 1
fi
echo
