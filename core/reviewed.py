"""Reviewed cells: what a quality engineer decided about the cells the service flagged, as labels.

A run folder (`inspect-dir --out DIR/results.jsonl`) or a line archive (client/archive.py, the
same form) holds `results.jsonl`, one row per cell: where its images are and what the service
answered. The review station appends one JSON line per decision to `reviewed_labels.jsonl`
beside it; the last decision about a cell wins.

What a decision teaches (`labels_of`), per input the service flagged the cell for:

| verdict          | flagged for                         |
|------------------|-------------------------------------|
| internal_defect  | the CT slice                        |
| external_defect  | the photo                           |
| combined_defect  | both                                |
| not_inspectable  | the input(s) with an OOD score >= 1 |

- a false alarm: each flagged input is an example of normal (CT: `<battery type>_normal`;
  photo: a normal photo, which the autoencoder learns from);
- confirmed: a flagged CT slice keeps the service's CT class (a defect class), a flagged photo
  is anomalous (the autoencoder learns normal photos only, so it is not a training photo; the
  comparison counts it); a confirmed `not_inspectable` cell is no label (nothing to learn as a class);
- an input the cell was not flagged for, and an unreviewed cell, are no labels.

Training reads these with `reviewed_cells` (`python -m training.train --reviewed DIR`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.labels import BATTERY_TYPES, CT_CLASSES

REVIEWED_FILE = "reviewed_labels.jsonl"
RESULTS_FILE = "results.jsonl"
REVIEWED_RUN_FILE = "reviewed.json"  # beside a checkpoint: the reviewed cells the run trained on and held out
DECISIONS = ("confirmed", "false_alarm")


@dataclass(frozen=True)
class ReviewedLabel:
    cell_id: str
    decision: str  # confirmed | false_alarm
    verdict: str  # what the service said
    ct_path: str = ""
    rgb_path: str = ""
    note: str = ""
    reviewed_at: str = ""
    reviewer: str = ""

    @property
    def label_verdict(self) -> str:
        """The verdict training should learn: the service's if confirmed, normal if a false alarm."""
        return self.verdict if self.decision == "confirmed" else "normal"


def append_review(folder: str | Path, label: ReviewedLabel) -> Path:
    if label.decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {label.decision!r}")
    path = Path(folder) / REVIEWED_FILE
    stamped = asdict(label) | {"reviewed_at": label.reviewed_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(path, "a") as f:
        f.write(json.dumps(stamped, ensure_ascii=False) + "\n")
    return path


def read_reviewed_labels(path: str | Path) -> dict[str, ReviewedLabel]:
    """cell_id -> its latest decision, from a run folder or its reviewed_labels.jsonl (missing: none)."""
    path = Path(path)
    if path.is_dir():
        path = path / REVIEWED_FILE
    out: dict[str, ReviewedLabel] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["cell_id"]] = ReviewedLabel(**{k: row.get(k, "") for k in ReviewedLabel.__dataclass_fields__})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a reviewed label ({e})") from None
    return out


def read_results(folder: str | Path) -> dict[str, dict]:
    """cell_id -> its row of `results.jsonl` in a run folder or line archive (the last row of a cell wins)."""
    path = Path(folder) / RESULTS_FILE
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows[row["cell_id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a result row ({e})") from None
    return rows


def flagged_inputs(row: dict) -> set[str]:
    """The inputs ('ct', 'rgb') a service answer flagged the cell for."""
    verdict = row.get("verdict")
    if verdict == "internal_defect":
        return {"ct"}
    if verdict == "external_defect":
        return {"rgb"}
    if verdict == "combined_defect":
        return {"ct", "rgb"}
    if verdict == "not_inspectable":
        return {side for side in ("ct", "rgb") if float(row.get(f"{side}_ood", 0.0)) >= 1.0}
    return set()


@dataclass(frozen=True)
class ReviewedCell:
    """A reviewed cell as a training example: its images and what each input is labelled."""

    cell_id: str
    ct_path: Path
    rgb_path: Path
    meta: tuple[float, float]
    ct_label: str | None  # a CT class, or None: the slice is no label
    rgb_normal: bool | None  # True: a normal photo, False: anomalous, None: no label
    decision: str
    verdict: str


def labels_of(row: dict, decision: str) -> tuple[str | None, bool | None]:
    """(CT class, photo normal) that a decision about a service answer teaches (module docstring)."""
    flagged = flagged_inputs(row)
    battery_type = BATTERY_TYPES[int(row["meta"][0])]
    if decision == "false_alarm":
        return (f"{battery_type}_normal" if "ct" in flagged else None), (True if "rgb" in flagged else None)
    if row.get("verdict") == "not_inspectable":
        return None, None
    ct_class = row.get("ct_class")
    ct = ct_class if "ct" in flagged and ct_class in CT_CLASSES and not ct_class.endswith("_normal") else None
    return ct, (False if "rgb" in flagged else None)


def reviewed_cells(folder: str | Path) -> list[ReviewedCell]:
    """The reviewed cells of a run folder or line archive whose images are still there, with their labels."""
    folder = Path(folder)
    rows = read_results(folder)
    out = []
    for cell_id, review in sorted(read_reviewed_labels(folder).items()):
        row = rows.get(cell_id)
        if row is None or "verdict" not in row:
            continue
        ct_path, rgb_path = (_resolve(folder, row.get(k) or getattr(review, k)) for k in ("ct_path", "rgb_path"))
        if not (ct_path.is_file() and rgb_path.is_file()):
            continue  # removed by the archive's retention, or moved
        ct_label, rgb_normal = labels_of(row, review.decision)
        meta = (float(row["meta"][0]), float(row["meta"][1]))
        out.append(
            ReviewedCell(cell_id, ct_path, rgb_path, meta, ct_label, rgb_normal, review.decision, row["verdict"])
        )
    return out


def _resolve(folder: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else folder / p
