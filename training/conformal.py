"""The gate's false-refusal rate, set by construction: split conformal calibration.

A cell the line sends is refused when either input fails one of its checks: the network's
out-of-distribution distance (`CT_OOD`, `RGB_OOD`) or one of the five placement facts of the
battery search (`core.preprocess.check_frame`). Fitted on the training data alone, those
thresholds say nothing about the next line's cells: training photos share one resolution, one
configuration of the scene, and the network has seen them. So after fitting, each input's gate
is calibrated on images no network trained on, drawn the way the line draws them (several
image sizes; the generator's default configuration and the preset's), for a stated rate:

1. **One score per image** (its nonconformity): how far outside the training data's own
   spread the image lies on its worst check, in units of that spread. For the distance d,
   (d - median) / (q99 - median) of the validation distances; for a placement fact v with
   training percentiles q01, median m, q99: (v - m) / (q99 - m) above the median and
   (m - v) / (m - q01) below it (each spread at least `FLOOR`, one step for the border share).
   1.0 is where the training data's own 1st or 99th percentile lies; no battery found is
   infinitely far.
2. **One threshold tau per input** from the n calibration images' scores: the k-th smallest,
   with k the smallest order statistic for which the promise holds: a new image of the same
   kind is refused with probability at most `rate`, with confidence `confidence` over the
   draw of the calibration set (a tolerance bound: the share of new images at or below the
   k-th smallest of n exchangeable scores is Beta(k, n + 1 - k) distributed). A calibration
   set too small for the rate gets k = n and the weaker promise it can give, said in words.
3. **The served gate is that tau**: the distance threshold becomes median + tau (q99 -
   median) (`CT_OOD` = d / that, so 1.0 is still the line), and each placement range
   m -/+ tau times the fact's spread. An image is refused by the served checks exactly when
   its score exceeds tau.

Both inputs at `rate` each refuse at most about 2 `rate` of the cells (a cell is refused when
either is). The promise holds for cells drawn like the calibration set; cells of another kind
(another camera, another bench) need their own calibration set: `python -m training.ood RUN
--calibration DIR`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from core.preprocess import FRAME_FACTS, FRAME_STEPS

DEFAULTS = {"rate": 0.005, "confidence": 0.95}
METHOD = "split conformal, tolerance bound"
# the least spread of a placement fact in its own units (a share of the frame, a log ratio), so a
# fact that never moved in training does not refuse the smallest change
FLOOR = 0.02


def promised_rate(n: int, k: int, confidence: float) -> float:
    """The refusal rate that refusing above the k-th smallest of n calibration scores promises at
    `confidence`: the share of new scores above it is 1 - Beta(k, n + 1 - k)."""
    if not 1 <= k <= n:
        raise ValueError(f"order statistic {k} of {n} scores")
    return float(1.0 - beta.ppf(1.0 - confidence, k, n + 1 - k))


def order_statistic(n: int, rate: float, confidence: float) -> int | None:
    """The smallest k whose promise is `rate` or better at `confidence`; None when n is too small."""
    if n < 1 or promised_rate(n, n, confidence) > rate:
        return None
    lo, hi = 1, n  # the promise falls as k grows
    while lo < hi:
        mid = (lo + hi) // 2
        if promised_rate(n, mid, confidence) <= rate:
            hi = mid
        else:
            lo = mid + 1
    return lo


def images_needed(rate: float, confidence: float) -> int:
    """The fewest calibration images for which even the largest score promises `rate`."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log(1.0 - rate)))


def _fact_spread(frame: dict, name: str) -> tuple[float, float, float]:
    """(median, spread below, spread above) of a placement fact over the training images."""
    q01, m, q99 = frame["spread"][name]
    floor = max(FLOOR, FRAME_STEPS.get(name, 0.0))
    return m, max(m - q01, floor), max(q99 - m, floor)


def _distance_spread(gate: dict) -> tuple[float, float]:
    v = gate["validation"]
    return v["median"], max(v["q99"] - v["median"], 1e-6)


def nonconformity(distances: np.ndarray, facts: list, gate: dict, frame: dict) -> tuple[np.ndarray, list[str]]:
    """(N,) scores of the module docstring, and for each image the check that decided it
    ("distance", a fact's name, or "no battery")."""
    med, up = _distance_spread(gate)
    out = np.empty(len(facts))
    worst = []
    for i, (d, f) in enumerate(zip(distances, facts)):
        if f is None:
            out[i], w = np.inf, "no battery"
        else:
            out[i], w = (float(d) - med) / up, "distance"
            for name in FRAME_FACTS:
                m, below, above = _fact_spread(frame, name)
                dev = max((m - f[name]) / below, (f[name] - m) / above)
                if dev > out[i]:
                    out[i], w = dev, name
        worst.append(w)
    return out, worst


def calibrated(gate: dict, frame: dict, scores: np.ndarray, worst: list[str], cfg: dict, data: list[str]) -> tuple:
    """(gate, frame) with the threshold and ranges of the calibrated tau, and the calibration's record."""
    cfg = DEFAULTS | dict(cfg or {})
    rate, confidence = float(cfg["rate"]), float(cfg["confidence"])
    if not (0 < rate < 1 and 0 < confidence < 1):
        raise ValueError(f"calibration needs 0 < rate < 1 and 0 < confidence < 1, got {cfg}")
    n = len(scores)
    if n == 0:
        raise ValueError("no calibration images")
    finite = np.sort(scores[np.isfinite(scores)])
    if not len(finite):
        raise ValueError(f"the battery search found nothing in any of the {n} calibration images")
    wanted = order_statistic(n, rate, confidence)
    k = min(wanted or n, len(finite))  # images without a battery are refused whatever tau is
    tau = float(finite[k - 1]) * (1 + 1e-9) + 1e-12
    promise = promised_rate(n, k, confidence)
    refused = scores > tau
    counts: dict[str, int] = {}
    for w, r in zip(worst, refused):
        if r:
            counts[w] = counts.get(w, 0) + 1
    record = {
        "method": METHOD,
        "rate": rate,
        "confidence": confidence,
        "promised_rate": promise,
        "met": promise <= rate,
        "images": n,
        "images_needed": images_needed(rate, confidence),
        "order_statistic": k,
        "tau": tau,
        "refused_in_calibration": int(refused.sum()),
        "refused_by": counts,
        "data": list(data),
    }
    med, up = _distance_spread(gate)
    gate = gate | {"threshold": med + tau * up, "calibration": record}
    ranges = {}
    for name in FRAME_FACTS:
        m, below, above = _fact_spread(frame, name)
        ranges[name] = [m - tau * below, m + tau * above]
    frame = frame | {"ranges": ranges, "calibration": record}
    return gate, frame


def describe(record: dict, what: str) -> str:
    """One line on what a calibration promises."""
    text = (
        f"{what} gate calibrated on {record['images']} held-out images: tau {record['tau']:.2f} "
        f"(order statistic {record['order_statistic']}), promises at most {record['promised_rate']:.2%} of new "
        f"images refused with {record['confidence']:.0%} confidence; {record['refused_in_calibration']} refused "
        f"in calibration"
    )
    if record["refused_by"]:
        text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(record["refused_by"].items())) + ")"
    if not record["met"]:
        text += (
            f"; the target {record['rate']:.2%} needs at least {record['images_needed']} calibration images, "
            "so the promise is the weaker one"
        )
    return text
