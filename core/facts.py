"""The serving facts of an exported network: what serving and explanations must know of it.

Export takes them from a training checkpoint, stores them in the ONNX file (metadata
`serving_info`) and beside it (`<model>.json`), and the repository generator hands them to
the preprocessing models as the config parameter `serving_info`. One class, one JSON form:
`ServingFacts.from_dict` (a checkpoint's info) on the way in, `to_json` / `from_json` through the model
config, `InspectionClient.serving_info()` to read them back from a running server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

CT_CLASSIFIER = "ct_classifier"
RGB_AUTOENCODER = "rgb_autoencoder"
KINDS = (CT_CLASSIFIER, RGB_AUTOENCODER)
CONFIG_KEY = "serving_info"  # the model-config parameter (and ONNX metadata key) that holds them


@dataclass(frozen=True)
class Normalization:
    """CT intensities are standardised as (x - mean) / std after scaling to 0..1."""

    mean: float
    std: float


@dataclass(frozen=True)
class ServingFacts:
    """One network's serving facts; `kind` says which network (`ct_classifier`, `rgb_autoencoder`)."""

    kind: str
    input_size: int  # the square crop side the network takes
    in_chans: int
    normalization: Normalization | None = None  # CT only; photos go in as 0..1
    class_names: tuple[str, ...] = ()  # CT only, in logit order
    temperature: float = 1.0  # CT only: calibration of the probabilities
    score: dict[str, Any] | None = None  # RGB only: the anomaly score's definition
    threshold: float | None = None  # RGB only: the threshold stored with the model
    threshold_method: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # RGB only: every calibrated threshold by method
    ood_gate: dict[str, Any] | None = None  # the out-of-distribution gate's threshold and calibration; None: no gate
    frame: dict[str, Any] | None = None  # where training saw the battery in the frame (fit_frame); None: no check
    arch: str = ""
    arch_args: dict[str, Any] = field(default_factory=dict)
    meta_spec: dict[str, Any] | None = None
    source_run: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"serving facts of an unknown network kind {self.kind!r}; expected one of {KINDS}")
        if self.input_size <= 0:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.kind == CT_CLASSIFIER and (self.normalization is None or not self.class_names):
            raise ValueError("the CT classifier's serving facts need its normalization and class names")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServingFacts:
        """From a checkpoint's info or the JSON form; keys this class does not know are ignored."""
        kind = d.get("kind")
        norm = d.get("normalization")
        return cls(
            kind=kind,
            input_size=int(d["input_size"]),
            in_chans=int(d.get("in_chans", 1 if kind == CT_CLASSIFIER else 3)),
            normalization=Normalization(float(norm["mean"]), float(norm["std"])) if norm else None,
            class_names=tuple(d.get("class_names") or ()),
            temperature=float(d.get("temperature", 1.0)),
            score=d.get("score"),
            threshold=None if d.get("threshold") is None else float(d["threshold"]),
            threshold_method=d.get("threshold_method"),
            thresholds={k: float(v) for k, v in (d.get("thresholds") or {}).items()},
            ood_gate=d.get("ood_gate"),
            frame=d.get("frame"),
            arch=d.get("arch", ""),
            arch_args=dict(d.get("arch_args") or {}),
            meta_spec=d.get("meta_spec"),
            source_run=str(d.get("source_run", "")),
            inputs=tuple(d.get("inputs") or ()),
            outputs=tuple(d.get("outputs") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"], d["inputs"], d["outputs"] = list(self.class_names), list(self.inputs), list(self.outputs)
        return d

    def to_json(self) -> str:
        """The form stored in the model config (`serving_info`) and in the ONNX metadata."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ServingFacts:
        return cls.from_dict(json.loads(text))
