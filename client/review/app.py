"""The review station (Streamlit). Start it with `python -m client review` or `make review`.

Three pages, all talking to Triton only through the project's client:
- Inspect: upload a CT slice and a photo, see the verdict and the three ways of seeing the
  cell side by side (CNN + autoencoder heatmaps; on request the VLM's finding and
  GroundingDINO's boxes);
- Review: a run folder of `inspect-dir`, filtered, paged, with each flagged cell's report
  and buttons to mark it confirmed or a false alarm (saved in the run folder);
- Service status: Triton reachable, models ready, recent throughput from the metrics port.

Configuration comes from the environment (the launcher sets it): BATTERY_REVIEW_URL,
BATTERY_REVIEW_METRICS, BATTERY_REVIEW_RUN, BATTERY_REVIEW_TLS_CA, BATTERY_REVIEW_EXPLAIN
(explanation options as on the command line, e.g. "--vlm gemini").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import tempfile
import time
import urllib.request
from pathlib import Path

import streamlit as st

from client.explain.agreement import describe, label_rows
from client.explain.case import Case
from client.explain.cli import add_arguments as add_explain_arguments
from client.explain.cli import build_explainers
from client.explain.pipeline import ExplanationPipeline
from client.inspection import InspectionFailed
from client.review.runs import filter_rows, load_run, placement_table, refused_rows
from client.service import Backoff, InspectionClient
from core import interface as api
from core.aihub import meta_from_name
from core.labels import BATTERY_TYPES, CT_CLASSES, SLICE_AXES
from core.reviewed import ReviewedLabel, append_review, read_reviewed_labels

PAGES = ("Inspect", "Review", "Service status")
PER_PAGE = 5
MODELS = (
    api.INSPECT,
    api.INSPECT_CT,
    api.INSPECT_RGB,
    api.PREPROCESS,
    api.CT_CLASSIFIER,
    api.RGB_AUTOENCODER,
    api.VERDICT_MODEL,
)


def config() -> dict:
    return {
        "url": os.environ.get("BATTERY_REVIEW_URL", "localhost:8001"),
        "metrics": os.environ.get("BATTERY_REVIEW_METRICS", "http://localhost:8002/metrics"),
        "run": os.environ.get("BATTERY_REVIEW_RUN", "results"),
        "tls_ca": os.environ.get("BATTERY_REVIEW_TLS_CA") or None,
        "explain": os.environ.get("BATTERY_REVIEW_EXPLAIN", ""),
    }


def client(cfg: dict):

    return InspectionClient(
        cfg["url"],
        timeout=60.0,
        heatmaps=True,
        ssl=cfg["tls_ca"] is not None,
        root_certificates=cfg["tls_ca"],
        backoff=Backoff(retries=1, first=0.5, longest=1.0),
    )


def explain_options(cfg: dict) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    add_explain_arguments(p, "unused")
    return p.parse_args(shlex.split(cfg["explain"]))


def explain(case, options: argparse.Namespace, vlm: bool, boxes: bool, folder: Path) -> dict:
    """The cell's explanation report, written by the same pipeline as `--explain`."""

    chosen = argparse.Namespace(**vars(options))
    if not vlm:
        chosen.vlm = "none"
    if not boxes:
        chosen.grounding = "none"
    with ExplanationPipeline(build_explainers(chosen), folder, workers=1) as pipeline:
        entry = pipeline.submit(case).result(timeout=600)
    return json.loads((folder / entry["json"]).read_text()) | {"_folder": str((folder / entry["json"]).parent)}


def show_parts(report: dict) -> None:
    """The three systems side by side: CNN + autoencoder | VLM | GroundingDINO."""
    folder = Path(report["_folder"])
    parts = report["explanations"]
    cols = st.columns(3)
    with cols[0]:
        st.markdown("**CNN + autoencoder**")
        for name, role, caption in (
            ("ct_heatmap", "overlay", "CT: Grad-CAM of the top class"),
            ("rgb_error_map", "overlay", "Photo: autoencoder error, threshold contour"),
        ):
            part = parts.get(name, {})
            if part.get("status") == "ok" and role in part.get("files", {}):
                st.image((folder / part["files"][role]).read_bytes(), caption=caption)
            else:
                st.warning(f"{name}: {part.get('reason') or 'not available'}")
    with cols[1]:
        st.markdown("**VLM finding**")
        part = parts.get("vlm")
        if part is None:
            st.caption("not asked (tick 'Ask the VLM')")
        elif part["status"] != "ok":
            st.warning(f"unavailable: {part['reason']}")
        else:
            st.caption(part["data"].get("backend", ""))
            for side in ("ct", "rgb"):
                answer = part["data"].get(side)
                if answer is None:
                    continue
                st.markdown(f"*{side.upper()}*")
                if "error" in answer:
                    st.warning(answer["error"])
                elif answer.get("malformed"):
                    st.warning(f"not the JSON asked for ({answer.get('problem', '')}); the answer as given:")
                    st.text(answer.get("raw", ""))
                else:
                    st.json(answer.get("finding", {}), expanded=True)
    with cols[2]:
        st.markdown("**GroundingDINO boxes**")
        part = parts.get("grounding")
        if part is None:
            st.caption("not asked (tick 'GroundingDINO boxes')")
        elif part["status"] != "ok":
            st.warning(f"unavailable: {part['reason']}")
        else:
            for role, name in part.get("files", {}).items():
                if role.endswith("_boxes"):
                    st.image((folder / name).read_bytes(), caption=role.replace("_", " "))


def inspect_page(cfg: dict) -> None:
    st.header("Inspect a cell")
    left, right = st.columns(2)
    ct_file = left.file_uploader(
        "CT slice (PNG, JPEG, TIFF, DICOM)", type=["png", "jpg", "jpeg", "tif", "tiff", "dcm"], key="ct_file"
    )
    named = meta_from_name(ct_file.name) if ct_file is not None else None
    if ct_file is not None and st.session_state.get("meta_from") != ct_file.name:
        # a new slice: its file name says its battery type and axis (AI Hub's CT_module_..._z_004.jpg);
        # the form follows it once, and stays as the user sets it afterwards
        st.session_state["meta_from"] = ct_file.name
        if named:
            st.session_state["battery"], st.session_state["axis"] = named
    battery = left.selectbox("Battery type", BATTERY_TYPES, key="battery")
    axis = left.selectbox("Slice axis", SLICE_AXES, index=2, key="axis")
    if named:
        left.caption(f"Read from the file name: {named[0]}, slice axis {named[1]}. Change them if the name is wrong.")
    elif ct_file is not None:
        left.caption("The file name does not say the battery type and axis: check them before inspecting.")
    rgb_file = right.file_uploader("Photo (PNG, JPEG)", type=["png", "jpg", "jpeg"], key="rgb_file")
    options = explain_options(cfg)
    ask_vlm = right.checkbox("Ask the VLM", key="ask_vlm", help=f"backend: {options.vlm}")
    ask_boxes = right.checkbox("GroundingDINO boxes", key="ask_boxes", help=f"backend: {options.grounding}")
    if st.button("Inspect", key="inspect", type="primary"):
        if ct_file is None or rgb_file is None:
            st.error("Upload both a CT slice and a photo of the cell.")
            return
        meta = (float(BATTERY_TYPES.index(battery)), float(SLICE_AXES.index(axis)))
        try:
            with client(cfg) as c:
                if not c.ready():
                    st.error(
                        f"The inspection service at {cfg['url']} is not reachable or not ready; start it with 'make "
                        "serve'."
                    )
                    return
                result = c.inspect(ct_file.getvalue(), meta, rgb_file.getvalue(), cell_id=Path(ct_file.name).stem)
                info = c.serving_info()
        except InspectionFailed as e:
            st.error(f"The service refused this cell: {e.error.message}")
            return

        case = Case(
            result,
            ct_file.getvalue(),
            meta,
            rgb_file.getvalue(),
            info["ct"],
            info["rgb"],
            {"ct_file": ct_file.name, "rgb_file": rgb_file.name},
        )
        folder = Path(tempfile.mkdtemp(prefix="review-"))
        with st.spinner("explaining ..."):
            report = explain(case, options, ask_vlm, ask_boxes, folder)
        st.session_state["inspection"] = {"result": result.to_dict(), "report": report}
    shown = st.session_state.get("inspection")
    if shown:
        r = shown["result"]
        a, b, c = st.columns(3)
        a.metric("Verdict", r["verdict"])
        b.metric("Confidence", f"{r['confidence']:.3f}")
        c.metric(
            "RGB anomaly score",
            f"{r['rgb_score']:.4f}",
            delta=f"{'above' if r['rgb_anomalous'] else 'below'} threshold {r['rgb_threshold']:.4f}",
            delta_color="inverse" if r["rgb_anomalous"] else "normal",
        )
        if r.get("refusal"):
            st.warning(
                f"Not inspectable: {r['refusal']}. Send the cell to a person; below is what the models would have said."
            )
        st.caption(
            f"Out-of-distribution scores (1.0 or more: not inspectable): CT {r.get('ct_ood', 0.0):.2f}, "
            f"photo {r.get('rgb_ood', 0.0):.2f}"
        )
        st.dataframe(
            {"CT class": list(r["ct_probs"]), "probability": [round(p, 4) for p in r["ct_probs"].values()]},
            hide_index=True,
        )
        show_parts(shown["report"])


def show_agreement(agreement: dict | None) -> None:
    """The explanation index's three-way agreement over the run, as index.html shows it."""
    if not agreement or not agreement.get("cells"):
        return
    words = describe(agreement)
    with st.expander(f"Agreement of the three systems over {agreement['cells']} explained cells", expanded=True):
        st.markdown(words["vlm"])
        if agreement.get("vlm"):
            confusion = agreement["vlm"]["confusion"]
            st.dataframe(
                [{"service verdict": v} | row for v, row in confusion.items()], hide_index=True, key="agreement_vlm"
            )
            st.caption(words["sides"])
        st.markdown(words["boxes"])
        st.markdown(words["labels"])
        if agreement.get("labels"):
            st.dataframe(label_rows(agreement), hide_index=True, key="agreement_labels")


def _release_note(r: dict) -> str:
    """Which release judged the cell, and for a comparison's flipped cell what the other release said."""
    note = ""
    release = (r.get("model_versions") or {}).get("release")
    if r.get("flip"):  # a row of `python -m client models compare`: the staged release's answer
        before = (r.get("serving") or {}).get("verdict", "?")
        note += f" · **flip** {r['flip']} (release in service: {before}, staged release {release or '?'})"
        if r.get("expected"):
            note += f"; label: {r['expected']}"
    elif release is not None:
        note += f" · release {release}"
    if r.get("shadow"):  # kept by the gateway because a shadowed release would judge it otherwise
        note += f" · staged release would say **{r['shadow'].get('verdict')}**"
    return note


def review_page(cfg: dict) -> None:

    st.header("Review a run")
    folder = st.text_input("Run folder (where inspect-dir wrote results.jsonl)", value=cfg["run"], key="run_folder")
    try:
        run = load_run(folder)
    except (FileNotFoundError, ValueError) as e:
        st.info(str(e))
        return
    refused = refused_rows(run.rows)
    if refused:
        with st.expander(f"{len(refused)} cells refused as not inspectable: why"):
            for r in refused:
                st.markdown(f"**{r['cell_id']}**: {r['refusal']}")
                if r.get("placement"):
                    st.dataframe(placement_table(r["placement"]), hide_index=True)
    rows = run.answered
    if not rows:
        st.warning(f"No answered cells in {run.folder}.")
        return
    show_agreement(run.agreement)
    reviews = read_reviewed_labels(run.folder)
    flagged_names = [v for v in api.VERDICT_NAMES if v != "normal"]
    c1, c2, c3 = st.columns(3)
    verdicts = c1.multiselect("Verdict", api.VERDICT_NAMES, default=flagged_names, key="f_verdict")
    classes = c2.multiselect("CT class", CT_CLASSES, key="f_class")
    scores = [r["rgb_score"] for r in rows]
    low, high = float(min(scores)), float(max(scores))
    score_range = c3.slider("RGB score", low, max(high, low + 1e-6), (low, max(high, low + 1e-6)), key="f_score")
    unreviewed = st.checkbox("Only cells not reviewed yet", key="f_unreviewed")
    chosen = filter_rows(rows, verdicts, classes, score_range)
    if unreviewed:
        chosen = [r for r in chosen if r["cell_id"] not in reviews]
    pages = max(1, math.ceil(len(chosen) / PER_PAGE))
    page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, key="page")
    st.caption(
        f"{len(chosen)} of {len(rows)} cells; {len(reviews)} reviewed (saved in {run.folder / 'reviewed_labels.jsonl'})"
    )
    for r in chosen[(page - 1) * PER_PAGE : page * PER_PAGE]:
        cell = r["cell_id"]
        with st.container(border=True):
            done = reviews.get(cell)
            st.markdown(
                f"**{cell}**: {r['verdict']} (confidence {r['confidence']:.3f}); CT {r['ct_class']}, "
                f"RGB score {r['rgb_score']:.4f} vs {r['rgb_threshold']:.4f}"
                + (f" · **not inspectable**: {r['refusal']}" if r.get("refusal") else "")
                + (f" · reviewed: **{done.decision.replace('_', ' ')}**" if done else "")
                + _release_note(r)
            )
            report = run.reports.get(cell)
            if report and report.exists():
                show_parts(json.loads(report.read_text()) | {"_folder": str(report.parent)})
            else:
                st.caption("no explanation report (run inspect-dir with --explain)")
            b1, b2, _ = st.columns([1, 1, 4])
            for column, decision, label in ((b1, "confirmed", "Confirmed"), (b2, "false_alarm", "False alarm")):
                if column.button(label, key=f"{decision}:{cell}"):
                    append_review(
                        run.folder,
                        ReviewedLabel(cell, decision, r["verdict"], r.get("ct_path", ""), r.get("rgb_path", "")),
                    )
                    st.rerun()


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(nv_inference_count|battery_verdicts_total)\{([^}]*)\} ([0-9.eE+-]+)$", line)
        if m:
            out[f"{m.group(1)}{{{m.group(2)}}}"] = out.get(f"{m.group(1)}{{{m.group(2)}}}", 0.0) + float(m.group(3))
    return out


def status_page(cfg: dict) -> None:
    st.header("Service status")
    with client(cfg) as c:
        live = c.ready()
        st.metric("Triton", "ready" if live else "not reachable", help=cfg["url"])
        if not live:
            st.error(
                f"The inspection service at {cfg['url']} is not reachable or not ready; start it with 'make serve'."
            )
            return
        ready = c.models_ready(MODELS)
    st.dataframe({"model": list(ready), "ready": ["yes" if v else "NO" for v in ready.values()]}, hide_index=True)
    try:
        first = _scrape(cfg["metrics"])
        time.sleep(1.0)
        second = _scrape(cfg["metrics"])
    except OSError as e:
        st.warning(f"Metrics port {cfg['metrics']} not reachable: {e}")
        return
    key = f'nv_inference_count{{model="{api.INSPECT}",version="1"}}'
    rate = second.get(key, 0.0) - first.get(key, 0.0)
    st.metric("Recent throughput", f"{rate:.1f} cells/s", help="inspect, over the last second")
    st.metric("Cells inspected since start", f"{second.get(key, 0.0):.0f}")
    verdicts = {k: v for k, v in second.items() if k.startswith("battery_verdicts_total")}
    if verdicts:
        st.dataframe({"series": list(verdicts), "cells": [int(v) for v in verdicts.values()]}, hide_index=True)


def main() -> None:
    st.set_page_config(page_title="Battery-cell review station", layout="wide")
    cfg = config()
    st.sidebar.title("Battery-cell review")
    page = st.sidebar.radio("Page", PAGES, key="page_choice")
    st.sidebar.caption(f"service {cfg['url']}")
    {"Inspect": inspect_page, "Review": review_page, "Service status": status_page}[page](cfg)


main()
