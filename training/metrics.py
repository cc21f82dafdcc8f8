"""Evaluation metrics, written out so that each can be checked against hand-computed values."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def confusion_matrix(y_true, y_pred, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = truth)."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0).astype(float), cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def macro_f1(y_true, y_pred, n: int) -> float:
    """Mean F1 over the classes present in y_true (absent classes would count as 0)."""
    cm = confusion_matrix(y_true, y_pred, n)
    prf = per_class_prf(cm)
    present = prf["support"] > 0
    return float(prf["f1"][present].mean()) if present.any() else 0.0


def macro_f1_interval(
    y_true, y_pred, groups, n: int, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of macro-F1 that resamples whole groups (batteries): the
    slices of one battery are not independent, so resampling slices would make it too narrow."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        values.append(macro_f1(y_true[idx], y_pred[idx], n))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def battery_interval(
    statistic, groups, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """The same percentile bootstrap over whole groups (batteries) for any `statistic(indices)`;
    resamples where it is undefined (None or NaN: one class only, say) are skipped."""
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    if not members:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic(np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]))
        if v is not None and np.isfinite(v):
            values.append(v)
    if not values:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true, bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top-class probability."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y_true, grid=None) -> float:
    """The temperature minimising validation NLL (a fine 1-D search: robust, no optimiser state)."""
    y = np.asarray(y_true)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)) if grid is None else grid
    nll = [-np.log(softmax(logits, t)[np.arange(len(y)), y] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def one_vs_rest_auc(probs: np.ndarray, y_true, n: int) -> list[float | None]:
    y = np.asarray(y_true)
    out = []
    for k in range(n):
        positive = y == k
        out.append(float(roc_auc_score(positive, probs[:, k])) if 0 < positive.sum() < len(y) else None)
    return out


def binary_auc(labels, scores) -> float | None:
    labels = np.asarray(labels, bool)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def binary_ap(labels, scores) -> float | None:
    labels = np.asarray(labels, bool)
    return float(average_precision_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def f1_optimal_threshold(labels, scores) -> tuple[float, float]:
    """(threshold, F1) maximising F1 for 'anomalous = score > threshold'."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, float)
    order = np.argsort(-scores)
    s, positive = scores[order], labels[order]
    tp = np.cumsum(positive)
    fp = np.cumsum(~positive)
    f1 = 2 * tp / (tp + fp + labels.sum())
    # only cut between distinct scores
    distinct = np.r_[s[1:] != s[:-1], True]
    i = int(np.argmax(np.where(distinct, f1, -1)))
    nxt = s[i + 1] if i + 1 < len(s) else s[i] - 1e-6
    return float((s[i] + nxt) / 2), float(f1[i])


def roc_optimal_threshold(labels, scores) -> tuple[float, float]:
    """(threshold, Youden J) maximising TPR - FPR."""
    fpr, tpr, thr = roc_curve(np.asarray(labels, bool), np.asarray(scores, float))
    j = tpr - fpr
    i = int(np.argmax(j))
    t = thr[i]
    if not np.isfinite(t):
        t = float(np.max(scores)) + 1e-6
    # roc_curve's threshold is 'score >= t'; nudge below it for 'score > threshold'
    return float(np.nextafter(t, -np.inf)), float(j[i])
