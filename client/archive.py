"""The line archive: the cells the service judged, kept as the next training data.

    ARCHIVE/
      results.jsonl                 one row per kept cell, as `inspect-dir` writes them (the review
                                    station opens the archive as a run), plus when, which station,
                                    why kept, and the release that answered (model_versions)
      reviewed_labels.jsonl         the review station's decisions (core/reviewed.py)
      YYYY-MM-DD/<cell>/ct.<ext>    the encoded images exactly as the service got them
      YYYY-MM-DD/<cell>/rgb.<ext>

Kept: every flagged cell (any verdict but normal) and a random `sample` of the normal ones
(the only way training sees what the service passes). Retention: beyond `max_days`, or
while the archive is over `max_gb`, the oldest unreviewed cells go first; reviewed cells
are labels and go only when the archive would otherwise stay over `max_gb`. Training reads
the reviewed cells (`python -m training.train --reviewed ARCHIVE`); `python -m client models
compare --replay ARCHIVE` replays the recent ones against a staged release.

Writes are atomic per cell (a folder renamed into place, then its row appended), so a crash
leaves no half cell; one archive per writing process.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client.inspection import Cell, Inspection
from core.decode import sniff
from core.reviewed import RESULTS_FILE, REVIEWED_FILE, read_reviewed_labels

EXTENSIONS = {"png": "png", "jpeg": "jpg", "tiff": "tif", "dicom": "dcm"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Retention:
    sample: float = 0.05  # share of normal cells kept beside every flagged one
    max_gb: float = 50.0
    max_days: float = 365.0

    def __post_init__(self):
        if not 0.0 <= self.sample <= 1.0:
            raise ValueError(f"archive sample must be within 0..1, got {self.sample}")
        if self.max_gb <= 0 or self.max_days <= 0:
            raise ValueError(f"archive max_gb and max_days must be positive, got {self.max_gb}, {self.max_days}")


def folder_name(cell_id: str) -> str:
    """A cell id as one safe folder name ("cell_pouch_0003/CT_..." -> "cell_pouch_0003_CT_...")."""
    return _UNSAFE.sub("_", cell_id).strip("._")[:120] or "cell"


class LineArchive:
    def __init__(self, root: str | Path, retention: Retention = Retention(), seed: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._bytes = sum(p.stat().st_size for p in self.root.glob("*/*/*") if p.is_file())
        self._kept_since_prune = 0

    def wants(self, result: Inspection) -> str | None:
        """Why this answer's cell is kept ('flagged', 'sample'), or None."""
        if result.flagged:
            return "flagged"
        if self._random.random() < self.retention.sample:
            return "sample"
        return None

    def keep(
        self,
        cell: Cell,
        result: Inspection,
        reason: str,
        station: str = "",
        source: dict | None = None,
        extra: dict | None = None,
    ) -> Path:
        """Store the cell's images and the answer (and `extra` fields, a shadow's answer say); returns its folder."""
        now = time.time()
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        name = folder_name(cell.cell_id or f"cell-{now:.6f}")
        with self._lock:
            folder = self.root / day / name
            n = 1
            while folder.exists():  # the same cell id again (a re-inspection): kept beside, not over
                n += 1
                folder = self.root / day / f"{name}~{n}"
            tmp = self.root / day / f".{folder.name}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            paths = {}
            for side, data in (("ct", cell.ct), ("rgb", cell.rgb)):
                path = tmp / f"{side}.{EXTENSIONS.get(sniff(data) or '', 'bin')}"
                path.write_bytes(data)
                paths[side] = str((folder / path.name).relative_to(self.root))
            tmp.replace(folder)
            self._bytes += len(cell.ct) + len(cell.rgb)
            row = {
                "cell_id": cell.cell_id,
                "ct_path": paths["ct"],
                "rgb_path": paths["rgb"],
                "meta": list(cell.meta),
                **result.to_dict(),
                "kept": reason,
                "station": station,
                "judged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                **({"source": source} if source else {}),
                **(extra or {}),
            }
            with open(self.root / RESULTS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            self._kept_since_prune += 1
            if self._kept_since_prune >= 100 or self._bytes > self.retention.max_gb * 2**30:
                self._prune_locked(now)
        return folder

    def offer(self, cell: Cell, result: Inspection, station: str = "", source: dict | None = None) -> Path | None:
        """Keep the cell if the archive wants it; returns its folder or None."""
        reason = self.wants(result)
        return None if reason is None else self.keep(cell, result, reason, station, source)

    def prune(self, now: float | None = None) -> int:
        """Apply the retention now; returns the cells removed."""
        with self._lock:
            return self._prune_locked(now or time.time())

    def _prune_locked(self, now: float) -> int:
        self._kept_since_prune = 0
        reviewed = read_reviewed_labels(self.root)
        rows = _rows(self.root / RESULTS_FILE)
        cutoff = time.strftime("%Y-%m-%d", time.localtime(now - self.retention.max_days * 86400))
        limit = self.retention.max_gb * 2**30
        folders = sorted(p for d in self.root.iterdir() if DAY.match(d.name) for p in d.iterdir() if p.is_dir())
        gone: set[str] = set()

        def remove(folder: Path) -> None:
            self._bytes -= sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            shutil.rmtree(folder)
            gone.add(str(folder.relative_to(self.root)))

        owner = {str(Path(r["ct_path"]).parent): r["cell_id"] for r in rows}
        unreviewed = [f for f in folders if owner.get(str(f.relative_to(self.root))) not in reviewed]
        for folder in unreviewed:  # oldest first
            if folder.parent.name < cutoff or self._bytes > limit:
                remove(folder)
        if self._bytes > limit:
            for folder in [f for f in folders if str(f.relative_to(self.root)) not in gone]:
                if self._bytes <= limit:
                    break
                remove(folder)
        for day in self.root.iterdir():
            if DAY.match(day.name) and day.is_dir() and not any(day.iterdir()):
                day.rmdir()
        if gone:  # the index keeps only the cells still there
            kept = [r for r in rows if str(Path(r["ct_path"]).parent) not in gone]
            tmp = self.root / f".{RESULTS_FILE}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.root / RESULTS_FILE)
        return len(gone)

    @property
    def size_bytes(self) -> int:
        return self._bytes


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["LineArchive", "Retention", "REVIEWED_FILE", "folder_name"]
