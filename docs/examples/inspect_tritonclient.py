"""One cell through `inspect` with tritonclient alone (no project code): what a line PLC
gateway of your own would send over gRPC.

    python docs/examples/inspect_tritonclient.py CT_FILE BATTERY_TYPE SLICE_AXIS PHOTO_FILE [HOST:PORT]
"""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

VERDICTS = ("normal", "internal_defect", "external_defect", "combined_defect", "not_inspectable")


def main(ct_path: str, battery_type: str, slice_axis: str, rgb_path: str, url: str = "localhost:8001") -> int:
    inputs = [
        grpcclient.InferInput("CT_IMAGE", [1, 1], "BYTES"),
        grpcclient.InferInput("CT_META", [1, 2], "FP32"),
        grpcclient.InferInput("RGB_IMAGE", [1, 1], "BYTES"),
    ]
    with open(ct_path, "rb") as f:
        inputs[0].set_data_from_numpy(np.array([[f.read()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[float(battery_type), float(slice_axis)]], dtype=np.float32))
    with open(rgb_path, "rb") as f:
        inputs[2].set_data_from_numpy(np.array([[f.read()]], dtype=object))
    names = ("VERDICT", "CONFIDENCE", "CT_PROBS", "RGB_SCORE", "RGB_THRESHOLD", "CT_OOD", "RGB_OOD")
    with grpcclient.InferenceServerClient(url) as client:
        try:
            result = client.infer("inspect", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        except InferenceServerException as e:  # e.g. INVALID_ARGUMENT: the reason the cell was refused
            print(f"refused: {e.status()}: {e.message()}", file=sys.stderr)
            return 1
    verdict = int(result.as_numpy("VERDICT")[0, 0])
    print(f"verdict {verdict} {VERDICTS[verdict]}, confidence {result.as_numpy('CONFIDENCE')[0, 0]:.3f}")
    print(f"CT_PROBS {[round(float(p), 3) for p in result.as_numpy('CT_PROBS')[0]]}")
    print(
        f"RGB_SCORE {result.as_numpy('RGB_SCORE')[0, 0]:.4f} (threshold {result.as_numpy('RGB_THRESHOLD')[0, 0]:.4f})"
    )
    print(f"CT_OOD {result.as_numpy('CT_OOD')[0, 0]:.2f}, RGB_OOD {result.as_numpy('RGB_OOD')[0, 0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
