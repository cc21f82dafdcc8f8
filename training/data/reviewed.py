"""Reviewed labels: what a quality engineer decided about flagged cells in the review station.

`python -m client review` appends one JSON line per decision to `reviewed_labels.jsonl` in a
run folder (the folder of `inspect-dir --out`); the last decision about a cell wins. Training
reads them back with `read_reviewed_labels`: a confirmed cell keeps the service's verdict, a
false alarm is normal on the side(s) it was flagged for.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REVIEWED_FILE = "reviewed_labels.jsonl"
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
