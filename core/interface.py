"""Names of the public gRPC interface (docs/interface.md): models, tensors, verdicts.

Defined once here; the repository generator, the Triton models and the client import them.
"""

from __future__ import annotations

# ensembles a client calls
INSPECT = "inspect"
INSPECT_CT = "inspect_ct"
INSPECT_RGB = "inspect_rgb"

# models inside the ensembles
PREPROCESS = "preprocess"  # both images of a cell, the first step of `inspect`
CT_PREPROCESS = "ct_preprocess"
CT_CLASSIFIER = "ct_classifier"
RGB_PREPROCESS = "rgb_preprocess"
RGB_AUTOENCODER = "rgb_autoencoder"
VERDICT_MODEL = "verdict"

# public tensors
CT_IMAGE = "CT_IMAGE"  # BYTES [1]: encoded CT slice
CT_META = "CT_META"  # FP32 [2]: [battery_type, slice_axis]
RGB_IMAGE = "RGB_IMAGE"  # BYTES [1]: encoded photo
VERDICT = "VERDICT"  # INT32 [1]
CONFIDENCE = "CONFIDENCE"  # FP32 [1]
CT_PROBS = "CT_PROBS"  # FP32 [5]
RGB_SCORE = "RGB_SCORE"  # FP32 [1]
RGB_THRESHOLD = "RGB_THRESHOLD"  # FP32 [1]
CT_CAM = "CT_CAM"  # FP32 [h, w], 0..1
RGB_ERROR_MAP = "RGB_ERROR_MAP"  # FP32 [h, w]
CT_OOD = "CT_OOD"  # FP32 [1]: out-of-distribution score of the CT slice, >= 1 not inspectable
RGB_OOD = "RGB_OOD"  # FP32 [1]: out-of-distribution score of the photo, >= 1 not inspectable

# internal tensors between the preprocessing models and the networks
CT_TENSOR = "CT_TENSOR"  # FP32 [1, S, S], normalised crop
RGB_TENSOR = "RGB_TENSOR"  # FP32 [3, S, S], crop in 0..1

INSPECT_CT_OUTPUTS = (CT_PROBS, CT_CAM, CT_OOD)
INSPECT_RGB_OUTPUTS = (RGB_SCORE, RGB_THRESHOLD, RGB_ERROR_MAP, RGB_OOD)
INSPECT_OUTPUTS = (VERDICT, CONFIDENCE, CT_PROBS, RGB_SCORE, RGB_THRESHOLD, CT_CAM, RGB_ERROR_MAP, CT_OOD, RGB_OOD)

VERDICT_NAMES: tuple[str, ...] = ("normal", "internal_defect", "external_defect", "combined_defect", "not_inspectable")
NOT_INSPECTABLE = 4  # either input out of distribution (CT_OOD or RGB_OOD >= 1): the cell goes to a person
VERDICT_CODES = {name: code for code, name in enumerate(VERDICT_NAMES)}
