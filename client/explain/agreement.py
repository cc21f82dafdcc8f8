"""How far the three systems agree over a run: CNN + autoencoder, the VLM, GroundingDINO.

Per flagged cell (`cell_facts`, from its report record) and summed over a run (`summarise`,
in index.json and index.html):

- **VLM verdict against the CNN/autoencoder verdict.** The VLM is asked about the sides the
  verdict flags (CT for internal, photo for external, both for combined), so its cell
  verdict is built the same way: a side it calls "defect" sets that side's bit, a side it
  was not asked about keeps the service's call (normal). Agreement is the share of cells
  where the two verdicts are equal, with a confusion table (service verdict by VLM verdict).
  A cell whose answer is malformed (not the JSON asked for, or a verdict other than
  "defect"/"normal") or unavailable (no key, timeout, quota, skipped) is counted apart,
  never as a disagreement; so are cells the service refused as not inspectable (no defect
  verdict to agree with).
- **GroundingDINO boxes against the statistical regions.** A box overlaps when its IoU with
  some hot region of the same view (CAM regions on the CT slice, error-map regions on the
  photo) is at least `BOX_IOU`. Boxes of cells whose map is unavailable are counted apart.
- **Recall of the labelled defects**, where the data has labels (inspect-dir on an AI-Hub
  folder copies each cell's polygons into its report): a polygon is found by a system when
  one of its regions covers at least `LABEL_COVER` of the polygon's bounding box, in the
  pixels of the image the station sent. The systems' regions: CAM / error-map regions,
  GroundingDINO boxes, and the box the VLM gives in its "location" (the prompt asks for
  coordinates; an answer without them finds nothing). Polygons a system could not look at
  (its part unavailable, its answer malformed, a side the VLM was not asked about) are
  counted apart. Beside each recall stands the mean share of the view the system's regions
  cover: regions that cover half the view find about half of defects placed at random, so a
  recall means something only above that baseline.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from core.interface import VERDICT_CODES, VERDICT_NAMES

BOX_IOU = 0.25
LABEL_COVER = 0.5
SIDES = ("ct", "rgb")
SIDE_BIT = {"ct": 1, "rgb": 2}
MAP_PART = {"ct": "ct_heatmap", "rgb": "rgb_error_map"}
DEFECT_VERDICTS = ("internal_defect", "external_defect", "combined_defect")
SYSTEMS = ("cnn_ae", "grounding", "vlm")


def iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1), x1 and y1 exclusive."""
    inter = _intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def cover(region, target) -> float:
    """The share of `target`'s area inside `region`."""
    area = _area(target)
    return _intersection(region, target) / area if area > 0 else 0.0


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _intersection(a, b) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def polygon_box(points) -> list[int]:
    """The bounding box of a polygon (x1, y1, x2, y2, ...) in pixels, exclusive on the far side."""
    xs, ys = points[0::2], points[1::2]
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


# --- one cell ---------------------------------------------------------------------------------


def _part(record: dict, name: str) -> dict | None:
    return (record.get("explanations") or {}).get(name)


def _ok(part: dict | None) -> bool:
    return part is not None and part.get("status") == "ok"


def _vlm_side(part: dict, side: str) -> dict:
    answer = (part.get("data") or {}).get(side)
    if not isinstance(answer, dict) or "error" in answer:
        return {"status": "unavailable"}
    verdict = (answer.get("finding") or {}).get("verdict")
    verdict = verdict.strip().lower() if isinstance(verdict, str) else verdict
    if answer.get("malformed") or verdict not in ("defect", "normal"):
        return {"status": "malformed"}
    return {"status": "ok", "verdict": verdict}


def _vlm_facts(part: dict, verdict: str) -> dict:
    if verdict not in DEFECT_VERDICTS:
        return {"status": "refused_by_service", "verdict": verdict}
    if not _ok(part):
        return {"status": "unavailable", "verdict": verdict}
    code = VERDICT_CODES[verdict]
    sides = {side: _vlm_side(part, side) for side in SIDES if code & SIDE_BIT[side]}
    states = {s["status"] for s in sides.values()}
    status = "unavailable" if "unavailable" in states else "malformed" if "malformed" in states else "ok"
    out = {"status": status, "verdict": verdict, "sides": sides}
    if status == "ok":
        vlm_code = sum(SIDE_BIT[side] for side, s in sides.items() if s["verdict"] == "defect")
        out["vlm_verdict"] = VERDICT_NAMES[vlm_code]
    return out


def _region_boxes(part: dict | None, key: str = "box") -> list:
    return [r[key] for r in ((part or {}).get("data") or {}).get("regions", []) if key in r]


def _box_facts(grounding: dict, map_part: dict | None, side: str) -> dict:
    if not _ok(grounding):
        return {"status": "unavailable"}
    boxes = [d["box"] for d in ((grounding.get("data") or {}).get(side) or {}).get("detections", [])]
    if not _ok(map_part):
        return {"status": "no_map", "boxes": len(boxes)}
    regions = _region_boxes(map_part)
    overlapping = sum(1 for b in boxes if max((iou(b, r) for r in regions), default=0.0) >= BOX_IOU)
    return {"status": "ok", "boxes": len(boxes), "overlapping": overlapping}


def _view_share(boxes: list, size: int | None) -> float | None:
    """The share of the view inside the union of the boxes (view pixels): what a system's regions
    would find of defects placed at random, the baseline its recall is read against."""
    if not boxes:
        return 0.0
    if not size:
        return None
    mask = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return float(mask.mean())


def _system_regions(record: dict, system: str, side: str) -> tuple[str, list, float | None]:
    """(status, regions in the station image's pixels, share of the view they cover) of one system on one side."""
    if system == "cnn_ae":
        part = _part(record, MAP_PART[side])
        if not _ok(part):
            return "unavailable", [], None
        data = part.get("data") or {}
        return "ok", _region_boxes(part, "source_box"), _view_share(_region_boxes(part), data.get("view_size"))
    if system == "grounding":
        part = _part(record, "grounding")
        if not _ok(part):
            return "unavailable", [], None
        found = (part.get("data") or {}).get(side) or {}
        detections = found.get("detections", [])
        share = _view_share([d["box"] for d in detections], found.get("view_size"))
        return "ok", [d["source_box"] for d in detections if "source_box" in d], share
    part = _part(record, "vlm")
    if not record["verdict_code"] & SIDE_BIT[side] or record["verdict"] not in DEFECT_VERDICTS:
        return "not_asked", [], None
    if not _ok(part):
        return "unavailable", [], None
    state = _vlm_side(part, side)["status"]
    if state != "ok":
        return state, [], None
    region = (part["data"][side] or {}).get("region")
    if not region:
        return "ok", [], 0.0
    return "ok", [region["source_box"]], _view_share([region["box"]], region.get("view_size"))


def _label_facts(record: dict, polygons: list, side: str) -> dict:
    targets = [polygon_box(p["points"]) for p in polygons if len(p.get("points") or ()) >= 2]
    systems = {}
    for system in SYSTEMS:
        if system != "cnn_ae" and _part(record, system) is None:
            continue  # not requested for this run
        status, regions, share = _system_regions(record, system, side)
        found = sum(1 for t in targets if any(cover(r, t) >= LABEL_COVER for r in regions))
        systems[system] = {"status": status, "found": found if status == "ok" else 0, "view_share": share}
    return {"polygons": len(targets), "systems": systems}


def cell_facts(record: dict) -> dict:
    """What one cell's report says about the three systems' agreement (kept in its index entry)."""
    facts: dict = {"verdict": record["verdict"]}
    vlm = _part(record, "vlm")
    if vlm is not None:
        facts["vlm"] = _vlm_facts(vlm, record["verdict"])
    grounding = _part(record, "grounding")
    if grounding is not None:
        facts["boxes"] = {side: _box_facts(grounding, _part(record, MAP_PART[side]), side) for side in SIDES}
    labels = (record.get("source") or {}).get("labels")
    if isinstance(labels, dict):
        facts["labels"] = {side: _label_facts(record, labels.get(side) or [], side) for side in SIDES}
    return facts


# --- a run ------------------------------------------------------------------------------------


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _vlm_summary(facts: list[dict]) -> dict:
    states = Counter(f["status"] for f in facts)
    ok = [f for f in facts if f["status"] == "ok"]
    agree = sum(1 for f in ok if f["vlm_verdict"] == f["verdict"])
    confusion = {v: dict.fromkeys(("normal", *DEFECT_VERDICTS), 0) for v in DEFECT_VERDICTS}
    for f in ok:
        confusion[f["verdict"]][f["vlm_verdict"]] += 1
    sides = {}
    for side in SIDES:
        asked = [f["sides"][side] for f in facts if side in f.get("sides", {})]
        kinds = Counter(s["status"] for s in asked)
        answered = [s for s in asked if s["status"] == "ok"]
        confirmed = sum(1 for s in answered if s["verdict"] == "defect")
        sides[side] = {
            "asked": len(asked),
            "answered": len(answered),
            "confirmed": confirmed,
            "confirmed_share": _share(confirmed, len(answered)),
            "malformed": kinds["malformed"],
            "unavailable": kinds["unavailable"],
        }
    return {
        "cells": len(ok),
        "agree": agree,
        "agreement": _share(agree, len(ok)),
        "malformed": states["malformed"],
        "unavailable": states["unavailable"],
        "refused_by_service": states["refused_by_service"],
        "confusion": confusion,
        "sides": sides,
    }


def _boxes_summary(facts: list[dict]) -> dict:
    out = {}
    for side in (*SIDES, "all"):
        chosen = [f[s] for f in facts for s in SIDES if side in (s, "all")]
        ok = [f for f in chosen if f["status"] == "ok"]
        boxes, overlapping = sum(f["boxes"] for f in ok), sum(f["overlapping"] for f in ok)
        out[side] = {
            "boxes": boxes,
            "overlapping": overlapping,
            "share": _share(overlapping, boxes),
            "boxes_without_map": sum(f["boxes"] for f in chosen if f["status"] == "no_map"),
        }
    out["cells_unavailable"] = sum(1 for f in facts if f["ct"]["status"] == "unavailable")
    return out


def _labels_summary(facts: list[dict]) -> dict:
    out: dict = {"cells": len(facts)}
    for side in SIDES:
        per = [f[side] for f in facts]
        systems = {}
        for system in SYSTEMS:
            seen = [(p["polygons"], p["systems"][system]) for p in per if system in p["systems"]]
            if not seen:
                continue
            looked = sum(n for n, s in seen if s["status"] == "ok")
            found = sum(s["found"] for _, s in seen)
            apart = Counter()
            for n, s in seen:
                if s["status"] != "ok" and n:
                    apart[s["status"]] += n
            shares = [s["view_share"] for n, s in seen if n and s["status"] == "ok" and s.get("view_share") is not None]
            systems[system] = {
                "polygons": looked,
                "found": found,
                "recall": _share(found, looked),
                # the chance baseline: the mean share of the view its regions cover, on the views with polygons
                "view_share": round(float(np.mean(shares)), 6) if shares else None,
                **apart,
            }
        out[side] = {"polygons": sum(p["polygons"] for p in per), "systems": systems}
    return out


def summarise(entries: list[dict]) -> dict:
    """The run's agreement from its index entries (each carries its cell's `agreement` facts)."""
    facts = [e["agreement"] for e in entries if isinstance(e.get("agreement"), dict)]
    vlm = [f["vlm"] for f in facts if "vlm" in f]
    boxes = [f["boxes"] for f in facts if "boxes" in f]
    labels = [f["labels"] for f in facts if "labels" in f]
    return {
        "cells": len(facts),
        "bounds": {"box_iou": BOX_IOU, "label_cover": LABEL_COVER},
        "vlm": _vlm_summary(vlm) if vlm else None,
        "boxes": _boxes_summary(boxes) if boxes else None,
        "labels": _labels_summary(labels) if labels else None,
    }


# --- in words (the index page and the review station) ----------------------------------------

SYSTEM_NAMES = {
    "cnn_ae": "CNN Grad-CAM / autoencoder error map",
    "grounding": "GroundingDINO",
    "vlm": "VLM location",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def describe(a: dict) -> dict[str, str]:
    """One sentence per comparison: vlm, sides, boxes, labels."""
    out = {}
    v = a.get("vlm")
    if v:
        out["vlm"] = (
            f"VLM verdict = CNN/autoencoder verdict on {v['agree']} of {v['cells']} cells ({_pct(v['agreement'])}). "
            f"Counted apart, not as disagreement: {v['malformed']} malformed, {v['unavailable']} unavailable, "
            f"{v['refused_by_service']} not inspectable."
        )
        out["sides"] = "Per side, the VLM confirms the flag on: " + "; ".join(
            f"{'CT' if side == 'ct' else 'photo'} {x['confirmed']} of {x['answered']} ({_pct(x['confirmed_share'])}; "
            f"{x['malformed']} malformed, {x['unavailable']} unavailable)"
            for side, x in v["sides"].items()
        )
    else:
        out["vlm"] = "VLM: not requested for this run."
    b = a.get("boxes")
    if b:
        out["boxes"] = (
            f"GroundingDINO boxes overlapping a CAM or error-map region (IoU ≥ {a['bounds']['box_iou']}): "
            f"{b['all']['overlapping']} of {b['all']['boxes']} ({_pct(b['all']['share'])}); CT "
            f"{b['ct']['overlapping']} of {b['ct']['boxes']}, photo {b['rgb']['overlapping']} of {b['rgb']['boxes']}. "
            f"Counted apart: {b['all']['boxes_without_map']} boxes on a view whose map was unavailable, "
            f"{b['cells_unavailable']} cells without boxes (detector unavailable)."
        )
    else:
        out["boxes"] = "GroundingDINO: not requested for this run."
    la = a.get("labels")
    if la:
        out["labels"] = (
            f"Labelled defects found (a region covers ≥ {_pct(a['bounds']['label_cover'])} of the polygon's box), "
            f"over {la['cells']} cells with labels: {la['ct']['polygons']} CT and {la['rgb']['polygons']} photo "
            "polygons."
        )
    else:
        out["labels"] = "Labelled defects: the run's data carries no labels."
    return out


def label_rows(a: dict) -> list[dict[str, str]]:
    """The recall table: per system, found of polygons on each side, with what was counted apart."""
    la = a.get("labels")
    if not la:
        return []
    rows = []
    for system, name in SYSTEM_NAMES.items():
        if system not in la["ct"]["systems"]:
            continue
        row = {"system": name}
        for side, title in (("ct", "CT slice"), ("rgb", "photo")):
            x = la[side]["systems"][system]
            apart = [f"{x[k]} {k.replace('_', ' ')}" for k in ("unavailable", "malformed", "not_asked") if x.get(k)]
            area = f"; regions cover {_pct(x['view_share'])} of the view" if x.get("view_share") is not None else ""
            row[title] = f"{x['found']} of {x['polygons']} ({_pct(x['recall'])}){area}" + "".join(
                f"; {t}" for t in apart
            )
        rows.append(row)
    return rows
