"""The verdict rule: CT class probabilities + RGB anomaly score -> verdict and confidence.

| code | verdict | (policy `or`) |
|---|---|---|
| 0 | normal | CT not defective and RGB not anomalous |
| 1 | internal_defect | CT defective and RGB not anomalous |
| 2 | external_defect | CT not defective and RGB anomalous |
| 3 | combined_defect | CT defective and RGB anomalous |
| 4 | not_inspectable | either input out of distribution: CT_OOD >= 1 or RGB_OOD >= 1 |

Verdict 4 takes precedence over 0-3 under either policy: a slice or photo the models do not
know (not a battery cell of a known kind, the wrong modality, an unusable image) is sent to
a person, whatever the models would have said; their outputs are still reported.

With policy `and`, only a cell both models find defective is flagged (code 3); a one-sided
finding is reported as normal.

Confidence, as in the original system:
- `rgb_conf` grows linearly from 0.6 at the threshold to 1.0 at a score twice as far from
  zero as the threshold (relative distance 1), on either side: above the threshold it is
  the confidence that the photo is anomalous, below it that the photo is normal;
- normal: (1 - ct_defect_prob + rgb_conf) / 2; internal: ct_defect_prob;
  external: rgb_conf; combined: (ct_defect_prob + rgb_conf) / 2;
- not inspectable: how far the worse out-of-distribution score is past its threshold 1.0,
  the same ramp as `rgb_conf` (0.6 at 1.0, 1.0 at 2.0 and beyond).

Everything here is vectorised over a batch of cells (numpy), so the Triton `verdict`
model decides a whole dynamic batch in one call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from core.facts import ServingFacts
from core.interface import NOT_INSPECTABLE, VERDICT_NAMES

RULE_FILE = Path(__file__).with_name("rule.yaml")
POLICIES = ("or", "and")
CT_DECISIONS = ("argmax", "probability")
RGB_CONF_AT_THRESHOLD, RGB_CONF_MAX = 0.6, 1.0


@dataclass(frozen=True)
class VerdictRule:
    """A resolved rule: every threshold is a number (the RGB one from the checkpoint)."""

    class_names: tuple[str, ...]
    ct_defect_classes: tuple[str, ...]
    rgb_threshold: float
    policy: str = "or"
    ct_decision: str = "argmax"
    ct_threshold: float = 0.5
    defect_index: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"verdict policy must be one of {POLICIES}, got {self.policy!r}")
        if self.ct_decision not in CT_DECISIONS:
            raise ValueError(f"ct_decision must be one of {CT_DECISIONS}, got {self.ct_decision!r}")
        unknown = [c for c in self.ct_defect_classes if c not in self.class_names]
        if unknown or not self.ct_defect_classes:
            raise ValueError(
                f"ct_defect_classes {list(self.ct_defect_classes)} must be a non-empty subset of "
                f"{list(self.class_names)}"
            )
        if not np.isfinite(self.rgb_threshold):
            raise ValueError(f"rgb_threshold must be a finite number, got {self.rgb_threshold}")
        if not 0.0 <= self.ct_threshold <= 1.0:
            raise ValueError(f"ct_threshold must be within 0..1, got {self.ct_threshold}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "ct_defect_classes", tuple(self.ct_defect_classes))
        object.__setattr__(self, "defect_index", tuple(self.class_names.index(c) for c in self.ct_defect_classes))

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("defect_index")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VerdictRule:
        return cls(**json.loads(text))


RULE_KEYS = {"policy", "ct_defect_classes", "ct_decision", "ct_threshold", "rgb_threshold", "rgb_threshold_method"}


def read_rule_file(path: str | Path | None = None, **overrides) -> dict:
    """The rule file's settings (ensemble/rule.yaml by default), with `overrides` that are not None."""
    cfg = yaml.safe_load(Path(path or RULE_FILE).read_text()) or {}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if set(cfg) - RULE_KEYS:
        raise ValueError(
            f"unknown keys in the verdict rule: {sorted(set(cfg) - RULE_KEYS)}; known: {sorted(RULE_KEYS)}"
        )
    return cfg


def load_rule(rgb: ServingFacts, class_names, path: str | Path | None = None, **overrides) -> VerdictRule:
    """Resolve the rule file against the autoencoder: the RGB threshold comes from its serving
    facts (`rgb`) unless the file or `overrides` set a number."""
    cfg = read_rule_file(path, **overrides)
    threshold = cfg.get("rgb_threshold")
    if threshold is None:
        method = cfg.get("rgb_threshold_method")
        if method is None:
            threshold = rgb.threshold
        elif method in rgb.thresholds:
            threshold = rgb.thresholds[method]
        else:
            raise ValueError(
                f"rgb_threshold_method {method!r} is not in the checkpoint; it has {sorted(rgb.thresholds)}"
            )
    if threshold is None:
        raise ValueError("the autoencoder has no calibrated threshold and the rule file sets none")
    return VerdictRule(
        class_names=tuple(class_names),
        ct_defect_classes=tuple(cfg.get("ct_defect_classes") or ()),
        rgb_threshold=float(threshold),
        policy=cfg.get("policy", "or"),
        ct_decision=cfg.get("ct_decision", "argmax"),
        ct_threshold=float(cfg.get("ct_threshold", 0.5)),
    )


@dataclass(frozen=True)
class Decision:
    """Per-cell arrays for a batch of N cells."""

    verdict: np.ndarray  # (N,) int32, 0..4
    confidence: np.ndarray  # (N,) float32, 0..1
    ct_defect_probability: np.ndarray  # (N,) float32
    ct_defective: np.ndarray  # (N,) bool
    rgb_anomalous: np.ndarray  # (N,) bool
    rgb_confidence: np.ndarray  # (N,) float32, 0.6..1
    out_of_distribution: np.ndarray  # (N,) bool: verdict 4

    @property
    def names(self) -> list[str]:
        return [VERDICT_NAMES[int(v)] for v in self.verdict]


def rgb_confidence(score: np.ndarray, threshold: float) -> np.ndarray:
    """0.6 at the threshold, rising to 1.0 with the relative distance from it (either side)."""
    scale = max(abs(float(threshold)), 1e-12)
    distance = np.abs(np.asarray(score, np.float64) - threshold) / scale
    span = RGB_CONF_MAX - RGB_CONF_AT_THRESHOLD
    return np.clip(RGB_CONF_AT_THRESHOLD + span * distance, RGB_CONF_AT_THRESHOLD, RGB_CONF_MAX).astype(np.float32)


def ct_defect(rule: VerdictRule, ct_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(defect probability (N,), defective (N,) bool) from class probabilities (N, C)."""
    probs = np.asarray(ct_probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(rule.class_names):
        raise ValueError(f"CT probabilities must be (N, {len(rule.class_names)}), got {probs.shape}")
    defect_prob = probs[:, list(rule.defect_index)].sum(axis=1)
    if rule.ct_decision == "argmax":
        defective = np.isin(probs.argmax(axis=1), rule.defect_index)
    else:
        defective = defect_prob >= rule.ct_threshold
    return defect_prob.astype(np.float32), defective


def rgb_anomalous(rule: VerdictRule, rgb_score: np.ndarray) -> np.ndarray:
    """Score above the threshold, compared in float32: the precision of RGB_SCORE and of the
    RGB_THRESHOLD the service reports, so a client comparing the two agrees with the verdict."""
    return np.asarray(rgb_score, np.float32).reshape(-1) > np.float32(rule.rgb_threshold)


def verdict_code(ct_defective, rgb_anomalous, policy: str = "or") -> np.ndarray:
    """Verdict codes (N,) int32 from the two findings: 1 for CT, 2 for RGB, 3 for both."""
    ct_bad, rgb_bad = np.asarray(ct_defective, bool), np.asarray(rgb_anomalous, bool)
    if policy == "and":
        ct_bad = rgb_bad = ct_bad & rgb_bad
    elif policy != "or":
        raise ValueError(f"verdict policy must be one of {POLICIES}, got {policy!r}")
    return (ct_bad.astype(np.int32) + 2 * rgb_bad.astype(np.int32)).astype(np.int32)


def worst_ood(n: int, *scores) -> np.ndarray:
    """(N,) float32: the larger of the given out-of-distribution scores per cell (None: not given, 0)."""
    worst = np.zeros(n, np.float32)
    for s in scores:
        if s is not None:
            s = np.asarray(s, np.float32).reshape(-1)
            if len(s) != n:
                raise ValueError(f"{n} cells but {len(s)} out-of-distribution scores")
            worst = np.maximum(worst, np.where(np.isnan(s), np.float32(np.inf), s))  # NaN: nothing known, refuse
    return worst


def apply_ood(
    verdict: np.ndarray, confidence: np.ndarray, worst: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verdict 4 where the worst score is >= 1, with its confidence; (verdict, confidence, refused)."""
    refused = worst >= np.float32(1.0)
    verdict = np.where(refused, np.int32(NOT_INSPECTABLE), verdict).astype(np.int32)
    confidence = np.where(refused, rgb_confidence(np.minimum(worst, 1e6), 1.0), confidence).astype(np.float32)
    return verdict, confidence, refused


def decide(
    rule: VerdictRule,
    ct_probs: np.ndarray,
    rgb_score: np.ndarray,
    ct_ood: np.ndarray | None = None,
    rgb_ood: np.ndarray | None = None,
) -> Decision:
    """Verdicts for N cells from their CT probabilities (N, C), RGB scores (N,) and, when given,
    the out-of-distribution scores (N,) of each input."""
    defect_prob, ct_bad = ct_defect(rule, ct_probs)
    score = np.asarray(rgb_score, np.float64).reshape(-1)
    if len(score) != len(defect_prob):
        raise ValueError(f"{len(defect_prob)} CT results but {len(score)} RGB scores")
    rgb_bad = rgb_anomalous(rule, score)
    verdict = verdict_code(ct_bad, rgb_bad, rule.policy)
    conf_rgb = rgb_confidence(score, rule.rgb_threshold)
    confidence = np.select(
        [verdict == 0, verdict == 1, verdict == 2],
        [(1.0 - defect_prob + conf_rgb) / 2.0, defect_prob, conf_rgb],
        (defect_prob + conf_rgb) / 2.0,
    )
    verdict, confidence, refused = apply_ood(
        verdict, np.clip(confidence, 0.0, 1.0), worst_ood(len(score), ct_ood, rgb_ood)
    )
    return Decision(
        verdict=verdict,
        confidence=confidence,
        ct_defect_probability=defect_prob,
        ct_defective=ct_bad,
        rgb_anomalous=rgb_bad,
        rgb_confidence=conf_rgb,
        out_of_distribution=refused,
    )
