"""Reviewed line cells as training examples (`python -m training.train --reviewed DIR`).

The labels come from core.reviewed (a false alarm is normal for the input it was flagged
for, a confirmed CT defect keeps the service's class, an unreviewed cell is no label). A
fixed share of the reviewed cells, chosen by a hash of the cell id (so the same cell is
always on the same side, whichever run reads it), is held out: training never sees them,
and `python -m client models compare` judges a release on them. The run records both lists
in `reviewed.json` beside its checkpoint.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from core.aihub import CTRecord, RGBRecord
from core.labels import BATTERY_TYPES, SLICE_AXES
from core.reviewed import REVIEWED_RUN_FILE, ReviewedCell, reviewed_cells
HELD_OUT = 0.2  # share of reviewed cells kept for comparing releases


def held_out(cell_id: str, share: float = HELD_OUT) -> bool:
    return zlib.crc32(cell_id.encode()) % 1000 < share * 1000


@dataclass
class ReviewedExamples:
    ct: list[CTRecord] = field(default_factory=list)
    rgb: list[RGBRecord] = field(default_factory=list)  # normal photos (false alarms of the photo)
    trained: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "folders": self.folders,
            "trained": self.trained,
            "held_out": self.held,
            "ct_examples": len(self.ct),
            "rgb_examples": len(self.rgb),
        }

    def write(self, run: Path) -> None:
        (Path(run) / REVIEWED_RUN_FILE).write_text(json.dumps(self.summary(), indent=1) + "\n")


def _ct_record(c: ReviewedCell) -> CTRecord:
    battery_type, axis = BATTERY_TYPES[int(c.meta[0])], SLICE_AXES[int(c.meta[1])]
    return CTRecord(
        c.ct_path, Path(""), 0, battery_type, "pouch", axis, 0, c.ct_label, (), (), None, 0, 0, "reviewed"
    )


def _rgb_record(c: ReviewedCell) -> RGBRecord:
    battery_type = BATTERY_TYPES[int(c.meta[0])]
    return RGBRecord(c.rgb_path, Path(""), 0, battery_type, "pouch", 0, True, (), (), None, None, 0, 0, "reviewed")


def reviewed_examples(folders, share: float = HELD_OUT) -> ReviewedExamples:
    """The training examples of the reviewed cells of `folders` (run folders or line archives)."""
    out = ReviewedExamples(folders=[str(Path(f).resolve()) for f in folders])
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--reviewed {folder}: not a folder")
        for cell in reviewed_cells(folder):
            if held_out(cell.cell_id, share):
                out.held.append(cell.cell_id)
                continue
            if cell.ct_label is None and cell.rgb_normal is not True:
                continue  # nothing this cell can teach the networks (a confirmed photo defect, say)
            out.trained.append(cell.cell_id)
            if cell.ct_label is not None:
                out.ct.append(_ct_record(cell))
            if cell.rgb_normal:
                out.rgb.append(_rgb_record(cell))
    return out


def read_reviewed_run(run: str | Path) -> dict:
    """What a run recorded of the reviewed cells it trained on (empty: none)."""
    path = Path(run) / REVIEWED_RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}
