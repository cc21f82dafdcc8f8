"""Cells of an AI-Hub-layout folder: each CT slice paired with a photo of the same battery.

The data set images a battery several times (CT slices along three axes, several
photos), not cell by cell; a line cell is one CT slice and one photo. Slice i of a
battery is paired with its photo i mod (number of photos), so every slice is inspected
and every photo is used. Where labels are present, the expected verdict follows the rule:
CT defective when the battery's class is a defect class (labels are per battery), RGB
anomalous when the photo's label has a defect.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from client.inspection import Cell
from core.aihub import DefectPolygon, scan
from ensemble.rule import read_rule_file, verdict_code


@dataclass(frozen=True)
class LabelledCell:
    cell_id: str
    ct_path: Path
    rgb_path: Path
    meta: tuple[float, float]
    ct_label: str
    rgb_anomalous: bool
    expected_verdict: int
    ct_defects: tuple[DefectPolygon, ...] = ()  # what the slice's label outlines, in its pixels
    rgb_defects: tuple[DefectPolygon, ...] = ()  # what the photo's label outlines

    def labels(self) -> dict:
        """The labelled defect polygons of both images, as reports keep them."""
        return {
            side: [{"name": d.name, "points": list(d.points)} for d in defects]
            for side, defects in (("ct", self.ct_defects), ("rgb", self.rgb_defects))
        }

    def load(self) -> Cell:
        return Cell(self.ct_path.read_bytes(), self.meta, self.rgb_path.read_bytes(), self.cell_id)


def pair_cells(
    root: str | Path, progress: bool = True, rule_path: str | Path | None = None
) -> tuple[list[LabelledCell], dict]:
    """(cells, report) for a data set folder; the report counts what could not be paired."""
    ds = scan(root, progress=progress)
    rule = read_rule_file(rule_path)
    defect_classes = set(rule.get("ct_defect_classes") or ())
    policy = rule.get("policy", "or")
    photos = defaultdict(list)
    for r in ds.rgb:
        photos[r.battery_key].append(r)
    cells, unpaired, seen = [], 0, defaultdict(int)
    for ct in sorted(ds.ct, key=lambda r: (r.battery_key, r.axis, r.slice_index)):
        group = sorted(photos.get(ct.battery_key, ()), key=lambda r: r.index)
        if not group:
            unpaired += 1
            continue
        photo = group[seen[ct.battery_key] % len(group)]
        seen[ct.battery_key] += 1
        ct_bad, rgb_bad = ct.label in defect_classes, not photo.is_normal
        cells.append(
            LabelledCell(
                f"{ct.battery_key}/{ct.path.stem}",
                ct.path,
                photo.path,
                ct.meta,
                ct.label,
                rgb_bad,
                int(verdict_code([ct_bad], [rgb_bad], policy)[0]),
                ct.defects,
                photo.defects,
            )
        )
    report = {
        "ct_slices": len(ds.ct),
        "photos": len(ds.rgb),
        "cells": len(cells),
        "slices_without_photo": unpaired,
        "problems": len(ds.report.problems),
    }
    return cells, report


def load_cells(cells: list[LabelledCell]) -> Iterator[Cell]:
    """Read the images lazily, one cell at a time."""
    for c in cells:
        yield c.load()
