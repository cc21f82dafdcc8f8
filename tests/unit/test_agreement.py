"""Three-way agreement over a run, on hand-made reports whose numbers are known exactly."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import pytest

from client.explain.agreement import BOX_IOU, cell_facts, cover, iou, polygon_box, summarise
from client.explain.prompts import location_box
from client.explain.report import write_index
from core.interface import VERDICT_CODES


def _regions(boxes):
    return {"view_size": 100, "regions": [{"box": b, "source_box": [2 * v for v in b]} for b in boxes]}


def _map(boxes, status="ok"):
    return {"status": status, "data": _regions(boxes) if status == "ok" else {}}


def _answer(verdict=None, region=None, malformed=False):
    if malformed:
        return {"raw": "porosity, reject", "malformed": True}
    out = {"finding": {"verdict": verdict, "class": "x", "location": "", "confidence": 1, "cause": "", "action": ""}}
    if region:
        out["region"] = {"box": region, "source_box": [2 * v for v in region], "view_size": 100}
    return out | {"malformed": False}


def _grounding(ct=(), rgb=(), status="ok"):
    if status != "ok":
        return {"status": status, "data": {}}
    side = lambda boxes: {  # noqa: E731
        "view_size": 100,
        "detections": [{"box": b, "source_box": [2 * v for v in b]} for b in boxes],
    }
    return {"status": "ok", "data": {"ct": side(ct), "rgb": side(rgb)}}


def _poly(x0, y0, x1, y1):
    return {"name": "Porosity", "points": [x0, y0, x1, y0, x1, y1, x0, y1]}


def _record(verdict, parts, labels=None):
    return {
        "verdict": verdict,
        "verdict_code": VERDICT_CODES[verdict],
        "explanations": parts,
        "source": {"labels": labels} if labels is not None else {},
    }


RECORDS = [
    _record(  # 1: the VLM confirms; boxes on both views; labels on both
        "internal_defect",
        {
            "ct_heatmap": _map([[0, 0, 10, 10], [40, 0, 60, 10]]),
            "rgb_error_map": _map([[0, 0, 10, 10]]),
            "vlm": {"status": "ok", "data": {"ct": _answer("defect", region=[50, 50, 60, 60])}},
            # IoU 1, 0, exactly the bound (50 / 200), just under it (40 / 200); photo 64 / 100
            "grounding": _grounding(
                ct=[[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 45, 10], [40, 0, 44, 10]], rgb=[[0, 0, 8, 8]]
            ),
        },
        labels={"ct": [_poly(0, 0, 9, 9), _poly(200, 200, 209, 209)], "rgb": [_poly(0, 0, 4, 4)]},
    ),
    _record(  # 2: the VLM calls the photo normal; the detector was unavailable; labels on the photo
        "external_defect",
        {
            "ct_heatmap": _map([]),
            "rgb_error_map": _map([[0, 0, 10, 10]]),
            "vlm": {"status": "ok", "data": {"rgb": _answer("normal")}},
            "grounding": _grounding(status="unavailable"),
        },
        labels={"ct": [], "rgb": [_poly(0, 0, 4, 4)]},
    ),
    _record(  # 3: combined, the VLM sees the CT defect only; the CT map was unavailable
        "combined_defect",
        {
            "ct_heatmap": _map([], status="unavailable"),
            "rgb_error_map": _map([[0, 0, 10, 10]]),
            "vlm": {"status": "ok", "data": {"ct": _answer("defect"), "rgb": _answer("normal")}},
            "grounding": _grounding(ct=[[0, 0, 5, 5], [1, 1, 6, 6]]),
        },
    ),
    _record(  # 4: one side malformed: the cell is counted apart
        "combined_defect",
        {
            "ct_heatmap": _map([]),
            "rgb_error_map": _map([]),
            "vlm": {"status": "ok", "data": {"ct": _answer(malformed=True), "rgb": _answer("defect")}},
        },
    ),
    _record(  # 5: the VLM part unavailable (quota, no key...)
        "internal_defect",
        {"ct_heatmap": _map([]), "rgb_error_map": _map([]), "vlm": {"status": "unavailable", "data": {}}},
    ),
    _record(  # 6: refused by the service: no defect verdict to agree with
        "not_inspectable",
        {
            "ct_heatmap": _map([]),
            "rgb_error_map": _map([]),
            "vlm": {"status": "ok", "data": {"ct": _answer("defect"), "rgb": _answer("defect")}},
        },
    ),
]


@pytest.fixture(scope="module")
def summary():
    return summarise([{"agreement": cell_facts(r)} for r in RECORDS])


def test_boxes_overlap_and_polygons_are_covered_by_the_stated_bounds():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0 and iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert iou([40, 0, 45, 10], [40, 0, 60, 10]) == BOX_IOU
    assert cover([0, 0, 20, 20], [5, 5, 10, 10]) == 1.0 and cover([0, 0, 5, 10], [0, 0, 10, 10]) == 0.5
    assert polygon_box([3, 4, 9, 4, 9, 8]) == [3, 4, 10, 9]
    assert location_box("upper left, [3, 4, 20, 22]", 64) == [3, 4, 20, 22]
    assert location_box("(1.5, 2, 300, 9) in the view", 64) == [2, 2, 64, 9]  # clipped to the image
    assert location_box("near the tab", 64) is None and location_box(None, 64) is None
    assert location_box("[5, 5, 5, 9] then [1, 2, 3, 4]", 64) == [1, 2, 3, 4]  # an empty box is no box


def test_vlm_agreement_counts_malformed_unavailable_and_refused_cells_apart(summary):
    v = summary["vlm"]
    assert (v["cells"], v["agree"], v["agreement"]) == (3, 1, pytest.approx(1 / 3, abs=1e-6))
    assert (v["malformed"], v["unavailable"], v["refused_by_service"]) == (1, 1, 1)
    assert v["confusion"]["internal_defect"] == {
        "normal": 0,
        "internal_defect": 1,
        "external_defect": 0,
        "combined_defect": 0,
    }
    assert v["confusion"]["external_defect"]["normal"] == 1
    assert v["confusion"]["combined_defect"]["internal_defect"] == 1
    assert sum(n for row in v["confusion"].values() for n in row.values()) == v["cells"]
    assert v["sides"]["ct"] == {
        "asked": 3,
        "answered": 2,
        "confirmed": 2,
        "confirmed_share": 1.0,
        "malformed": 1,
        "unavailable": 0,
    }
    assert (v["sides"]["rgb"]["asked"], v["sides"]["rgb"]["answered"], v["sides"]["rgb"]["confirmed"]) == (3, 3, 1)


def test_grounding_boxes_overlap_the_statistical_regions_at_the_bound(summary):
    b = summary["boxes"]
    assert (b["ct"]["boxes"], b["ct"]["overlapping"]) == (4, 2)  # IoU 1 and exactly 0.25; not 0 or 0.2
    assert (b["rgb"]["boxes"], b["rgb"]["overlapping"]) == (1, 1)
    assert (b["all"]["boxes"], b["all"]["overlapping"], b["all"]["share"]) == (5, 3, 0.6)
    assert b["ct"]["boxes_without_map"] == 2 and b["cells_unavailable"] == 1


def test_labelled_polygons_are_recalled_per_system_and_unlooked_ones_counted_apart(summary):
    labels = summary["labels"]
    assert labels["cells"] == 2 and labels["ct"]["polygons"] == 2 and labels["rgb"]["polygons"] == 2
    ct, rgb = labels["ct"]["systems"], labels["rgb"]["systems"]
    # beside each recall, the share of the 100 x 100 view its regions cover (mean over the views with polygons)
    assert ct["cnn_ae"] == {"polygons": 2, "found": 1, "recall": 0.5, "view_share": 0.03}  # 100 + 200 px
    assert ct["grounding"] == {"polygons": 2, "found": 1, "recall": 0.5, "view_share": 0.025}  # overlaps once
    assert ct["vlm"] == {"polygons": 2, "found": 0, "recall": 0.0, "view_share": 0.01}  # its box is elsewhere
    assert rgb["cnn_ae"] == {"polygons": 2, "found": 2, "recall": 1.0, "view_share": 0.01}
    assert rgb["grounding"] == {"polygons": 1, "found": 1, "recall": 1.0, "view_share": 0.0064, "unavailable": 1}
    # no box in its answer: nothing found, nothing covered
    assert rgb["vlm"] == {"polygons": 1, "found": 0, "recall": 0.0, "view_share": 0.0, "not_asked": 1}


def test_a_run_without_vlm_detector_or_labels_says_so(tmp_path):
    plain = [{"agreement": cell_facts(_record("internal_defect", {"ct_heatmap": _map([])}))}]
    assert summarise(plain) | {"bounds": None} == {
        "cells": 1,
        "bounds": None,
        "vlm": None,
        "boxes": None,
        "labels": None,
    }
    assert summarise([{"cell_id": "old entry without facts"}])["cells"] == 0


def test_the_index_page_and_json_carry_the_agreement(tmp_path):
    entries = [
        {
            "cell_id": f"c{i}",
            "verdict": r["verdict"],
            "confidence": 0.9,
            "ct_class": "cell_porosity",
            "rgb_score": 0.1,
            "report": f"cells/c{i}/report.html",
            "json": f"cells/c{i}/report.json",
            "parts": {},
            "reasons": {},
            "agreement": cell_facts(r),
        }
        for i, r in enumerate(RECORDS)
    ]
    write_index(tmp_path, entries, [SimpleNamespace(name="vlm", description="fake")])
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["agreement"]["vlm"]["agree"] == 1 and index["agreement"]["boxes"]["all"]["share"] == 0.6
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", (tmp_path / "index.html").read_text())).split())
    assert "VLM verdict = CNN/autoencoder verdict on 1 of 3 cells (33%)" in text
    assert "internal_defect 0 1 0 0 external_defect 1 0 0 0 combined_defect 0 1 0 0" in text  # the confusion table
    assert "1 malformed, 1 unavailable, 1 not inspectable" in text
    assert "(IoU ≥ 0.25): 3 of 5 (60%)" in text
    assert "GroundingDINO 1 of 2 (50%); regions cover 2% of the view 1 of 1 (100%); regions cover 1% of" in text
    assert (
        "VLM location 0 of 2 (0%); regions cover 1% of the view 0 of 1 (0%); regions cover 0% of the view; 1 not"
        in text
    )
