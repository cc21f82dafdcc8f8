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
MODEL_VERSIONS = "MODEL_VERSIONS"  # BYTES [1]: JSON, the release and the networks that gave the answer

# internal tensors between the preprocessing models and the networks
CT_TENSOR = "CT_TENSOR"  # FP32 [1, S, S], normalised crop
RGB_TENSOR = "RGB_TENSOR"  # FP32 [3, S, S], crop in 0..1

# why the service refused a request (`battery_refused_total{reason}`, docs/interface.md): every
# refusal of the preprocessing, the metadata check or a network has exactly one of these
REFUSAL_REASONS = (
    "empty",  # an image of 0 bytes
    "not_bytes",  # an image sent as a text string
    "not_an_image",  # bytes that are no PNG, JPEG, TIFF or DICOM, or that do not decode
    "too_large",  # over the byte or pixel limit, or a decompression bomb
    "too_small",  # a side under the minimum
    "multi_frame",  # several frames or slices in one image
    "not_monochrome",  # a colour DICOM sent as the CT slice
    "blank",  # every pixel equal
    "no_battery",  # the battery search found nothing
    "placement",  # a battery placed where no training image had it
    "metadata",  # CT_META of a wrong dtype or shape, NaN, or out of range
    "inference",  # a network could not run the request
)

# the networks' results on their way to `verdict`, which hands them on as the public outputs:
# an ensemble output that another step also reads makes Triton 2.51 prune the step that
# produces it when a client asks for a subset of the outputs (the request then fails with
# "unexpected deadlock"); so every public output of `inspect` and `inspect_rgb` comes from
# `verdict`, and every subset of them works
PASSED_THROUGH = ("CT_PROBS", "RGB_SCORE", "CT_CAM", "RGB_ERROR_MAP", "CT_OOD", "RGB_OOD")


def internal(name: str) -> str:
    """The internal tensor that carries a network's output `name` to `verdict` ("ct_probs")."""
    return name.lower()


INSPECT_CT_OUTPUTS = (CT_PROBS, CT_CAM, CT_OOD, MODEL_VERSIONS)
INSPECT_RGB_OUTPUTS = (RGB_SCORE, RGB_THRESHOLD, RGB_ERROR_MAP, RGB_OOD, MODEL_VERSIONS)
INSPECT_OUTPUTS = (
    VERDICT,
    CONFIDENCE,
    CT_PROBS,
    RGB_SCORE,
    RGB_THRESHOLD,
    CT_CAM,
    RGB_ERROR_MAP,
    CT_OOD,
    RGB_OOD,
    MODEL_VERSIONS,
)
NUMERIC_OUTPUTS = tuple(n for n in INSPECT_OUTPUTS if n != MODEL_VERSIONS)

VERDICT_NAMES: tuple[str, ...] = ("normal", "internal_defect", "external_defect", "combined_defect", "not_inspectable")
NOT_INSPECTABLE = 4  # either input out of distribution (CT_OOD or RGB_OOD >= 1): the cell goes to a person
VERDICT_CODES = {name: code for code, name in enumerate(VERDICT_NAMES)}


# Releases (docs/operations.md, "Changing the model"): release R is version R of every model inside
# the ensembles; the ensembles pin the release they serve (`inspect_staged` the one under trial).
# What differs between releases (serving facts, the rule, the release's own description) is a
# config parameter per release, `name@R`; each adapter reads the view of its own version.
STAGED_SUFFIX = "_staged"  # inspect_staged: the staged release, for comparison and shadow traffic
RELEASE_PARAMETER = "release"  # the verdict model's `release@R`: what MODEL_VERSIONS answers


def release_key(name: str, release: int) -> str:
    """The config parameter that holds `name` for release `release` ("rule@2")."""
    return f"{name}@{int(release)}"


def release_view(parameters: dict[str, str], release: int | str) -> dict[str, str]:
    """The parameters as release `release` sees them: `name@R` of its own release as `name`,
    other releases' left out, unversioned ones (a repository of one release) as they are."""
    own = f"@{int(release)}"
    out = {k: v for k, v in parameters.items() if "@" not in k}
    out.update({k[: -len(own)]: v for k, v in parameters.items() if k.endswith(own)})
    return out
