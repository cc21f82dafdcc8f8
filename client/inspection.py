"""What the client sends (`Cell`) and gets back (`Inspection`, or `CellError` for a cell that failed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException

from core import interface as api
from core.labels import BATTERY_TYPES, CT_CLASSES, CT_DEFECT_CLASSES, SLICE_AXES

# what the preprocessing's refusals of an input say (core.preprocess.check_frame, _not_blank)
INPUT_REFUSALS = ("not inspectable as placed", "no battery found", "is blank")
ADVICE = {
    "placement": "look at how the cell sits in the fixture and what the camera frames",
    "no battery": "the station sent an image without a cell in it, or not a cell",
    "blank": "the camera or the reconstruction sent a blank image",
    "distribution": "the image does not look like the ones the models were trained on: another station setting, "
    "a swapped cable, or a kind of cell the models do not know",
}


def is_input_refusal(message: str) -> bool:
    """Whether a server error is the preprocessing refusing an image (not a fault of the request)."""
    return any(marker in message for marker in INPUT_REFUSALS)


def _cause(message: str) -> str:
    if "no battery found" in message:
        return "no battery"
    if "is blank" in message:
        return "blank"
    if "out of distribution" in message:
        return "distribution"
    return "placement"


def in_words(message: str) -> str:
    """A refusal with what to do about it: the server's sentence and the advice for its cause."""
    message = message.strip()
    if message.startswith("cell ") and ": " in message:  # the server names the request's cell: "cell 0: ..."
        message = message.split(": ", 1)[1]
    return f"{message}; {ADVICE[_cause(message)]}"


def parse_meta(text: str | tuple | list) -> tuple[float, float]:
    """'cell,z' or '0,2' (or a pair) -> (battery_type, slice_axis) as numbers."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    if len(parts) != 2:
        raise ValueError(f"metadata must be 'battery_type,slice_axis' such as 'cell,z' or '0,2', got {text!r}")
    out = []
    for value, names, what in ((parts[0], BATTERY_TYPES, "battery_type"), (parts[1], SLICE_AXES, "slice_axis")):
        if isinstance(value, str) and value in names:
            out.append(float(names.index(value)))
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if number not in range(len(names)):
            raise ValueError(f"{what} must be one of {', '.join(names)} (or 0..{len(names) - 1}), got {value!r}")
        out.append(number)
    return out[0], out[1]


@dataclass(frozen=True)
class Cell:
    """One battery cell to inspect: its encoded CT slice, metadata and encoded photo."""

    ct: bytes
    meta: tuple[float, float]  # (battery_type, slice_axis)
    rgb: bytes
    cell_id: str = ""

    @classmethod
    def from_files(cls, ct_path, meta, rgb_path, cell_id: str | None = None) -> Cell:
        return cls(
            Path(ct_path).read_bytes(), parse_meta(meta), Path(rgb_path).read_bytes(), cell_id or Path(ct_path).stem
        )


@dataclass
class Inspection:
    """The service's answer for one cell."""

    cell_id: str
    verdict: str
    verdict_code: int
    confidence: float
    ct_probs: dict[str, float]
    rgb_score: float
    rgb_threshold: float
    ct_cam: np.ndarray | None = field(default=None, repr=False)  # (h, w) 0..1 at the CT model input
    rgb_error_map: np.ndarray | None = field(default=None, repr=False)  # (h, w) at the RGB model input
    ct_ood: float = 0.0  # out-of-distribution score of the CT slice; >= 1: not inspectable
    rgb_ood: float = 0.0  # out-of-distribution score of the photo; >= 1: not inspectable
    # which release and networks answered (MODEL_VERSIONS): {"release": 2, "ct_classifier": "1a2b...", ...};
    # empty from a server that does not send it
    model_versions: dict = field(default_factory=dict)

    @property
    def ct_class(self) -> str:
        return max(self.ct_probs, key=self.ct_probs.get)

    @property
    def ct_defect_probability(self) -> float:
        return float(sum(self.ct_probs[c] for c in CT_DEFECT_CLASSES))

    @property
    def rgb_anomalous(self) -> bool:
        return self.rgb_score > self.rgb_threshold

    @property
    def flagged(self) -> bool:
        return self.verdict_code != 0

    @property
    def inspectable(self) -> bool:
        return self.verdict_code != api.NOT_INSPECTABLE

    @property
    def refusal(self) -> str:
        """Why the cell is not inspectable ("" when it is): which input was out of distribution, and
        what that means on the station."""
        parts = [
            f"{what} out of distribution (score {v:.2f} >= 1)"
            for what, v in (("CT slice", self.ct_ood), ("photo", self.rgb_ood))
            if not v < 1.0
        ]
        return in_words("; ".join(parts)) if not self.inspectable and parts else ""

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray], row: int, cell_id: str = "") -> Inspection:
        code = int(outputs[api.VERDICT][row].reshape(-1)[0])
        cam, emap = outputs.get(api.CT_CAM), outputs.get(api.RGB_ERROR_MAP)

        def scalar(name: str) -> float:
            value = outputs.get(name)
            return 0.0 if value is None else float(value[row].reshape(-1)[0])

        return cls(
            cell_id=cell_id,
            verdict=api.VERDICT_NAMES[code],
            verdict_code=code,
            confidence=float(outputs[api.CONFIDENCE][row].reshape(-1)[0]),
            ct_probs={c: float(p) for c, p in zip(CT_CLASSES, outputs[api.CT_PROBS][row])},
            rgb_score=float(outputs[api.RGB_SCORE][row].reshape(-1)[0]),
            rgb_threshold=float(outputs[api.RGB_THRESHOLD][row].reshape(-1)[0]),
            ct_cam=None if cam is None else cam[row],
            rgb_error_map=None if emap is None else emap[row],
            ct_ood=scalar(api.CT_OOD),
            rgb_ood=scalar(api.RGB_OOD),
            model_versions=parse_versions(outputs.get(api.MODEL_VERSIONS), row),
        )

    def to_dict(self) -> dict:
        """JSON-ready, without the heatmaps."""
        return {
            "cell_id": self.cell_id,
            "verdict": self.verdict,
            "verdict_code": self.verdict_code,
            "confidence": round(self.confidence, 6),
            "ct_class": self.ct_class,
            "ct_defect_probability": round(self.ct_defect_probability, 6),
            "ct_probs": {k: round(v, 6) for k, v in self.ct_probs.items()},
            "rgb_score": self.rgb_score,
            "rgb_threshold": self.rgb_threshold,
            "rgb_anomalous": self.rgb_anomalous,
            "ct_ood": round(self.ct_ood, 6),
            "rgb_ood": round(self.rgb_ood, 6),
            "inspectable": self.inspectable,
            "refusal": self.refusal,
            "model_versions": self.model_versions,
        }

    def describe(self) -> str:
        others = ", ".join(f"{c} {p:.3f}" for c, p in sorted(self.ct_probs.items(), key=lambda kv: -kv[1])[1:])
        side = "above" if self.rgb_anomalous else "not above"
        lines = [f"verdict     {self.verdict} (code {self.verdict_code}), confidence {self.confidence:.3f}"]
        if not self.inspectable:
            lines.append(f"refused     {self.refusal}: send the cell to a person; what the models would have said:")
        return "\n".join(
            lines
            + [
                f"CT          {self.ct_class} {self.ct_probs[self.ct_class]:.3f} (then {others}); defect probability "
                f"{self.ct_defect_probability:.3f}",
                f"RGB         anomaly score {self.rgb_score:.4f}, {side} the threshold {self.rgb_threshold:.4f} -> "
                f"{'anomalous' if self.rgb_anomalous else 'normal'}",
                f"in range    CT {self.ct_ood:.2f}, photo {self.rgb_ood:.2f} (out-of-distribution scores; 1.0 or "
                "more is not inspectable)",
            ]
        )


def parse_versions(value: np.ndarray | None, row: int = 0) -> dict:
    """MODEL_VERSIONS of one cell (a JSON string) as a dict; {} where absent or unreadable."""
    if value is None:
        return {}
    raw = value[row].reshape(-1)[0]
    try:
        out = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, UnicodeDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


@dataclass(frozen=True)
class CellError:
    """A cell the service could not answer, with the reason; `inspect_many` returns it in the cell's place."""

    cell_id: str
    kind: str  # invalid_argument, unavailable, deadline_exceeded, internal, ...
    message: str

    flagged = False

    def to_dict(self) -> dict:
        return {"cell_id": self.cell_id, "error": self.kind, "message": self.message}


class InspectionFailed(RuntimeError):
    """Raised by `inspect` / `inspect_batch` when the service answers with an error."""

    def __init__(self, error: CellError):
        super().__init__(f"{error.cell_id + ': ' if error.cell_id else ''}{error.kind}: {error.message}")
        self.error = error


def error_kind(exc: Exception) -> str:
    """A failure's kind: the gRPC status in lower case (invalid_argument, unavailable, ...), else the
    exception's type."""
    if isinstance(exc, InspectionFailed):
        return exc.error.kind
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "StatusCode.UNKNOWN").rsplit(".", 1)[-1].lower()
    return type(exc).__name__
