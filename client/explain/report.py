"""Reports: per flagged cell a JSON and an HTML page (the three systems side by side), and
an index page per run with counts and links. Pages are static files with relative links,
so a run folder can be copied, zipped or served as it is."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from client.explain.agreement import cell_facts, describe, label_rows, summarise
from core.interface import VERDICT_NAMES
from core.labels import BATTERY_TYPES, SLICE_AXES

_env = Environment(
    loader=PackageLoader("client.explain", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt(value, digits: int = 3):
    return f"{value:.{digits}f}" if isinstance(value, float) else value


_env.filters["fmt"] = _fmt


def cell_record(case, parts) -> dict:
    inspection = case.inspection
    return {
        "cell_id": case.cell_id,
        "verdict": inspection.verdict,
        "verdict_code": inspection.verdict_code,
        "confidence": round(inspection.confidence, 6),
        "meta": {"battery_type": BATTERY_TYPES[int(case.meta[0])], "slice_axis": SLICE_AXES[int(case.meta[1])]},
        "ct": {
            "class": inspection.ct_class,
            "probs": {k: round(v, 6) for k, v in inspection.ct_probs.items()},
            "defect_probability": round(inspection.ct_defect_probability, 6),
        },
        "rgb": {
            "score": inspection.rgb_score,
            "threshold": inspection.rgb_threshold,
            "anomalous": inspection.rgb_anomalous,
        },
        "ood": {
            "ct": round(inspection.ct_ood, 6),
            "rgb": round(inspection.rgb_ood, 6),
            "inspectable": inspection.inspectable,
            "refusal": inspection.refusal,
        },
        "explanations": {p.name: p.to_dict() for p in parts},
        "model_versions": inspection.model_versions,  # the release and networks that judged the cell
        "source": case.extra,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_cell_report(case, parts, folder: Path, root: Path) -> dict:
    """report.json and report.html in the cell's folder; the cell's index entry."""
    folder.mkdir(parents=True, exist_ok=True)
    record = cell_record(case, parts)
    (folder / "report.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    html = _env.get_template("cell.html").render(
        r=record, parts={p.name: p for p in parts}, index=os.path.relpath(root / "index.html", folder)
    )
    (folder / "report.html").write_text(html)
    rel = folder.relative_to(root).as_posix()
    return {
        "cell_id": case.cell_id,
        "verdict": record["verdict"],
        "confidence": record["confidence"],
        "ct_class": record["ct"]["class"],
        "rgb_score": record["rgb"]["score"],
        "rgb_anomalous": record["rgb"]["anomalous"],
        "refusal": record["ood"]["refusal"],
        "report": f"{rel}/report.html",
        "json": f"{rel}/report.json",
        "parts": {p.name: p.status for p in parts},
        "reasons": {p.name: p.reason for p in parts if p.status != "ok"},
        "agreement": cell_facts(record),
    }


def write_index(out_dir: Path, entries: list[dict], explainers, title: str = "") -> Path:
    cells = sorted((e for e in entries if "report" in e), key=lambda e: e["cell_id"])
    counts = Counter(e["verdict"] for e in cells)
    status = Counter((name, s) for e in cells for name, s in e["parts"].items())
    summary = {
        "title": title,
        "cells": len(cells),
        "verdicts": {v: counts[v] for v in VERDICT_NAMES if v != "normal"},
        "explainers": [
            {
                "name": x.name,
                "description": getattr(x, "description", ""),
                "ok": status[(x.name, "ok")],
                "unavailable": status[(x.name, "unavailable")],
                "skipped": status[(x.name, "skipped")],
            }
            for x in explainers
        ],
        "failed_reports": [e for e in entries if "report" not in e],
        "agreement": summarise(cells),
    }
    # replaced whole, never seen half-written by a reader (the review station, a browser) while a gateway runs
    _replace(out_dir / "index.json", json.dumps({**summary, "entries": cells}, indent=1, ensure_ascii=False))
    path = out_dir / "index.html"
    agreement = {"words": describe(summary["agreement"]), "labels": label_rows(summary["agreement"])}
    _replace(path, _env.get_template("index.html").render(s=summary, cells=cells, agreement=agreement))
    return path


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
