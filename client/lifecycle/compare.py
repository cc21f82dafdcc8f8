"""A staged release against the release in service, on the same cells, through the running server.

Every cell goes to `inspect` (the release in service) and to `inspect_staged`; three sets:

- **test**: a fresh labelled data set (AI Hub layout). Figures per release, with 95% intervals
  from a bootstrap that resamples batteries (a battery's slices are not independent), and the
  difference staged - serving on the same resamples (a paired interval);
- **reviewed**: the reviewed line cells the staged release was not trained on (its runs'
  `reviewed.json` names the ones it was); labels as training reads them (core/reviewed.py);
- **replay**: recent cells of a line archive, unlabelled: how many verdicts would change.

A refused cell (verdict 4, or a request the service refused) counts as wrong wherever a label
says what it should have been. Every cell whose verdict differs between the two releases is a
flip, listed cell by cell in `results.jsonl` (the review station opens the folder as a run).
The promotion rule (client/lifecycle/rule.py) reads the figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.dataset import pair_cells
from client.inspection import Cell, CellError, Inspection
from core.interface import NOT_INSPECTABLE, VERDICT_CODES, VERDICT_NAMES
from core.labels import CT_CLASSES
from core.reviewed import RESULTS_FILE, read_results, reviewed_cells

BOOTSTRAP = 1000
SIDES = ("serving", "staged")


@dataclass
class Case:
    """One cell of a comparison set: what it is and what each release answered."""

    cell_id: str
    group: str  # the battery (resampling unit); the cell itself where no battery is known
    ct_path: Path
    rgb_path: Path
    meta: tuple[float, float]
    expected: int | None = None  # expected verdict code (None: unlabelled)
    ct_label: str | None = None
    rgb_anomalous: bool | None = None
    decision: str = ""  # reviewed cells: confirmed | false_alarm
    answers: dict = field(default_factory=dict)  # side -> Inspection | CellError

    def verdict(self, side: str) -> int:
        a = self.answers[side]
        return a.verdict_code if isinstance(a, Inspection) else -1  # -1: refused request

    def load(self) -> Cell:
        return Cell(self.ct_path.read_bytes(), self.meta, self.rgb_path.read_bytes(), self.cell_id)


def test_cases(folder: str | Path) -> list[Case]:
    cells, _ = pair_cells(folder, progress=False)
    if not cells or not all(c.ct_label for c in cells):
        raise ValueError(f"{folder}: a labelled data set (AI Hub layout with label JSON) is needed for --test")
    return [
        Case(
            c.cell_id,
            c.cell_id.split("/", 1)[0],
            c.ct_path,
            c.rgb_path,
            c.meta,
            c.expected_verdict,
            c.ct_label,
            c.rgb_anomalous,
        )
        for c in cells
    ]


def reviewed_cases(folders, exclude: set[str]) -> list[Case]:
    out = []
    for folder in folders:
        for c in reviewed_cells(folder):
            if c.cell_id in exclude:
                continue
            expected = VERDICT_CODES["normal"] if c.decision == "false_alarm" else VERDICT_CODES[c.verdict]
            out.append(Case(c.cell_id, c.cell_id, c.ct_path, c.rgb_path, c.meta, expected, decision=c.decision))
    return out


def replay_cases(folder: str | Path, limit: int) -> list[Case]:
    rows = sorted(read_results(folder).values(), key=lambda r: r.get("judged_at", ""))[-limit:]
    out = []
    for r in rows:
        ct, rgb = (Path(folder) / r[k] if not Path(r[k]).is_absolute() else Path(r[k]) for k in ("ct_path", "rgb_path"))
        if ct.is_file() and rgb.is_file():
            out.append(Case(r["cell_id"], r["cell_id"], ct, rgb, tuple(r["meta"])))
    return out


# ----------------------------------------------------------------------------- figures
def _macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    f1s = []
    for k in range(len(CT_CLASSES)):
        tp = np.sum((pred == k) & (truth == k))
        fp, fn = np.sum((pred == k) & (truth != k)), np.sum((pred != k) & (truth == k))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # ties share their mean rank
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _share(mask: np.ndarray, of: np.ndarray) -> float:
    return float(mask[of].mean()) if of.any() else float("nan")


# name -> (higher is better, function of the per-cell arrays of one side)
LABELLED: dict[str, tuple[bool, Callable]] = {
    "verdict_accuracy": (True, lambda a: float(np.mean(a["verdict"] == a["expected"]))),
    "ct_macro_f1": (True, lambda a: _macro_f1(a["ct_label"], np.where(a["refused"], -1, a["ct_pred"]))),
    "rgb_auroc": (True, lambda a: _auroc(a["rgb_anomalous"], a["rgb_score"])),
    "false_alarm_rate": (False, lambda a: _share(a["verdict"] != 0, a["expected"] == 0)),
    "miss_rate": (False, lambda a: _share(a["verdict"] == 0, a["expected"] != 0)),
    "refusal_rate": (False, lambda a: float(np.mean(a["refused"]))),
}


def _class_f1(k: int) -> Callable:
    def f1(a: dict) -> float:
        pred = np.where(a["refused"], -1, a["ct_pred"])
        tp = np.sum((pred == k) & (a["ct_label"] == k))
        wrong = np.sum((pred == k) & (a["ct_label"] != k)) + np.sum((pred != k) & (a["ct_label"] == k))
        return float(2 * tp / (2 * tp + wrong)) if tp + wrong else float("nan")

    return f1


def _verdict_recall(code: int) -> Callable:
    return lambda a: _share(a["verdict"] == code, a["expected"] == code)


# per class, reported beside the overall figures (the rule reads the overall ones): each CT class's
# F1 and each expected verdict's recall (the share of its cells that get it)
PER_CLASS: dict[str, tuple[bool, Callable]] = {
    **{f"ct_f1 {name}": (True, _class_f1(k)) for k, name in enumerate(CT_CLASSES)},
    **{f"recall {name}": (True, _verdict_recall(code)) for code, name in enumerate(VERDICT_NAMES[:NOT_INSPECTABLE])},
}

REVIEWED: dict[str, tuple[bool, Callable]] = {
    "false_alarms_repeated": (False, lambda a: _share(a["verdict"] != 0, a["expected"] == 0)),
    "confirmed_still_flagged": (True, lambda a: _share((a["verdict"] != 0) & ~a["refused"], a["expected"] != 0)),
    "verdict_accuracy": (True, lambda a: float(np.mean(a["verdict"] == a["expected"]))),
}


def _arrays(cases: list[Case], side: str) -> dict[str, np.ndarray]:
    answers = [c.answers[side] for c in cases]
    ok = [isinstance(a, Inspection) for a in answers]
    verdict = np.array([c.verdict(side) for c in cases])
    return {
        "verdict": verdict,
        "refused": (verdict == NOT_INSPECTABLE) | (verdict < 0),
        "expected": np.array([-2 if c.expected is None else c.expected for c in cases]),
        "ct_label": np.array([CT_CLASSES.index(c.ct_label) if c.ct_label else -2 for c in cases]),
        "ct_pred": np.array([CT_CLASSES.index(a.ct_class) if o else -1 for a, o in zip(answers, ok)]),
        "rgb_anomalous": np.array([bool(c.rgb_anomalous) for c in cases]),
        "rgb_score": np.array([a.rgb_score if o else np.inf for a, o in zip(answers, ok)]),
    }


def figures(cases: list[Case], metrics: dict, seed: int = 0, rounds: int = BOOTSTRAP) -> dict:
    """Per metric: each side's value and 95% interval, and the paired difference staged - serving."""
    if not cases:
        return {}
    sides = {s: _arrays(cases, s) for s in SIDES}
    groups = sorted({c.group for c in cases})
    members = {g: [] for g in groups}
    for i, c in enumerate(cases):
        members[c.group].append(i)
    rng = np.random.default_rng(seed)
    draws = [
        np.concatenate([members[groups[g]] for g in rng.integers(0, len(groups), len(groups))]) for _ in range(rounds)
    ]
    out = {}
    for name, (higher, fn) in metrics.items():
        row = {"higher_is_better": higher}
        boot = {}
        for s in SIDES:
            row[s] = fn(sides[s])
            boot[s] = np.array([fn({k: v[idx] for k, v in sides[s].items()}) for idx in draws])
        diff = boot["staged"] - boot["serving"]
        for s in SIDES:
            row[f"{s}_ci95"] = _interval(boot[s])
        row["difference"] = row["staged"] - row["serving"]
        row["difference_ci95"] = _interval(diff)
        out[name] = row
    return out


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def flips(cases: list[Case], set_name: str) -> list[dict]:
    """The cells whose verdict differs between the releases, with what each said (and the label)."""
    out = []
    for c in cases:
        v = {s: c.verdict(s) for s in SIDES}
        if v["serving"] == v["staged"]:
            continue
        names = {s: VERDICT_NAMES[v[s]] if v[s] >= 0 else "error" for s in SIDES}
        row = {
            "set": set_name,
            "cell_id": c.cell_id,
            "flip": f"{names['serving']} -> {names['staged']}",
            "serving_verdict": names["serving"],
            "staged_verdict": names["staged"],
        }
        if c.expected is not None:
            row["expected"] = VERDICT_NAMES[c.expected]
            row["better"] = (v["staged"] == c.expected) and (v["serving"] != c.expected)
            row["worse"] = (v["serving"] == c.expected) and (v["staged"] != c.expected)
        out.append(row)
    return out


def counts(cases: list[Case]) -> dict:
    out = {"cells": len(cases)}
    for s in SIDES:
        v = np.array([c.verdict(s) for c in cases])
        out[s] = {
            "refused": int(np.sum((v == NOT_INSPECTABLE) | (v < 0))),
            "flagged": int(np.sum(v > 0)),
            "errors": int(np.sum(v < 0)),
        }
    out["flips"] = int(sum(c.verdict("serving") != c.verdict("staged") for c in cases))
    out["flip_rate"] = out["flips"] / len(cases) if cases else 0.0
    return out


def result_rows(cases: list[Case], set_name: str) -> list[dict]:
    """Rows for the review station (one per flipped cell): the staged answer, with the serving one beside it."""
    rows = []
    for c, flip in zip(cases, flips_by_cell(cases, set_name)):
        if flip is None:
            continue
        staged, serving = c.answers["staged"], c.answers["serving"]
        row = {"cell_id": c.cell_id, "ct_path": str(c.ct_path), "rgb_path": str(c.rgb_path), "meta": list(c.meta)}
        row |= staged.to_dict() if isinstance(staged, Inspection) else staged.to_dict()
        row["serving"] = serving.to_dict()
        row |= {k: flip[k] for k in ("set", "flip", "expected") if k in flip}
        rows.append(row)
    return rows


def flips_by_cell(cases: list[Case], set_name: str) -> list[dict | None]:
    found = {f["cell_id"]: f for f in flips(cases, set_name)}
    return [found.get(c.cell_id) for c in cases]


def write_results(folder: Path, sets: dict[str, list[Case]]) -> Path:
    path = folder / RESULTS_FILE
    with open(path, "w") as f:
        for name, cases in sets.items():
            for row in result_rows(cases, name):
                f.write(json.dumps(row) + "\n")
    return path


def answer(cases: list[Case], side: str, client, concurrency: int, progress=None) -> None:
    """Fill `cases[i].answers[side]` from `client` (an InspectionClient on that side's ensemble)."""
    for case, result in zip(cases, client.iter_inspect((c.load() for c in cases), concurrency=concurrency)):
        case.answers[side] = result
        if progress:
            progress()


__all__ = [
    "Case",
    "CellError",
    "LABELLED",
    "PER_CLASS",
    "REVIEWED",
    "answer",
    "counts",
    "figures",
    "flips",
    "replay_cases",
    "reviewed_cases",
    "test_cases",
    "write_results",
]
