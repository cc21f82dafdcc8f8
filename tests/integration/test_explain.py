"""Explanations of flagged cells: overlays, Grad-CAM audits, VLM and GroundingDINO backends
through their real SDK / transformers classes (a local fake Gemini server, tiny random
models saved to a folder), the worker pool, reports, and the pages in headless Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.__main__ import main as client_main
from client.dataset import pair_cells
from client.explain import Case, ExplanationPipeline, overlays
from client.explain.case import View
from client.explain.explainers import CTHeatmap, Grounding, RGBErrorMap, Unavailable, VLMFinding, flagged_sides
from client.explain.gradcam import TorchCAM
from client.explain.grounding import CT_PHRASES, RGB_PHRASES, TransformersGrounding, phrase_class
from client.explain.prompts import FINDING_KEYS, ct_prompt, parse_finding, rgb_prompt
from client.explain.vlm import BackendUnavailable, GeminiBackend, QwenVLBackend
from client.offline import LocalInspector
from core.preprocess import Crop
from tests.support.fake_gemini import FakeGemini, answer, delay, error, prompt_of
from tests.support.tiny_models import make_ct_run, make_grounding_dino, make_qwen_vl, make_rgb_run
from training.synth.plan import SynthConfig
from training.synth.writer import generate

GOOD = {
    "class": "cell_porosity",
    "verdict": "defect",
    "confidence": 0.8,
    "location": "upper left, [3, 4, 20, 22]",
    "cause": "gas trapped during electrolyte filling",
    "action": "reject and check the filling station",
}
KEY = "test-key-5f1e0c9a"


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    """Twelve cells of a small synthetic set, inspected in-process with tiny random models whose
    RGB threshold is 0, so every cell is flagged (external or combined)."""
    root = tmp_path_factory.mktemp("explain")
    data = root / "cells"
    generate(
        data,
        SynthConfig(
            batteries=4,
            seed=3,
            ct_size=96,
            rgb_width=160,
            rgb_height=90,
            slices_per_axis=1,
            photos_per_battery=1,
            rgb_defect_rate=0.5,
        ),
        workers=1,
        progress=False,
    )
    runs = [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64, threshold=0.0)]
    cells, _ = pair_cells(data, progress=False)
    inspector = LocalInspector(runs)
    info = inspector.serving_info()
    cases = []
    for cell, result in zip(cells, inspector.iter_inspect(c.load() for c in cells)):
        assert result.flagged
        cases.append(
            Case(
                result,
                cell.ct_path.read_bytes(),
                cell.meta,
                cell.rgb_path.read_bytes(),
                info["ct"],
                info["rgb"],
                {"ct_path": str(cell.ct_path)},
            )
        )
    return {"root": root, "data": data, "runs": runs, "cases": cases}


# --- overlays -------------------------------------------------------------------------------


def test_hot_regions_box_each_connected_region_over_the_threshold():
    heat = np.zeros((40, 50), np.float32)
    heat[5:10, 8:20] = 0.9  # a region
    heat[30:36, 40:45] = 0.6  # another, weaker
    heat[20, 20] = 1.0  # a single hot pixel: below the minimum area
    boxes = overlays.hot_regions(heat, 0.5)
    assert [(b.x0, b.y0, b.x1, b.y1, b.area) for b in boxes] == [(8, 5, 20, 10, 60), (40, 30, 45, 36, 30)]
    assert boxes[0].peak == pytest.approx(0.9)
    assert overlays.hot_regions(heat, 0.95, min_area=1)[0].area == 1
    assert overlays.hot_regions(heat, 1.5) == []


def test_cam_overlay_boxes_the_hot_region_and_error_overlay_contours_the_threshold():
    image = np.full((32, 32), 0.5, np.float32)
    cam = np.zeros((32, 32), np.float32)
    cam[8:16, 4:12] = 1.0
    im, boxes = overlays.cam_overlay(image, cam, threshold=0.5)
    assert im.size == (256, 256) and [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(4, 8, 12, 16)]
    px = np.asarray(im)
    assert tuple(px[8 * 8, 4 * 8 + 20]) == overlays.BOX_COLOUR  # the box's top edge, at 8x
    assert tuple(px[200, 200]) != overlays.BOX_COLOUR
    emap = np.zeros((32, 32), np.float32)
    emap[20:28, 20:28] = 0.2
    im, boxes = overlays.error_overlay(np.zeros((32, 32, 3), np.float32), emap, threshold=0.1)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(20, 20, 28, 28)]
    px = np.asarray(im)
    assert (px == overlays.CONTOUR_COLOUR).all(axis=2).sum() > 100
    _, none = overlays.error_overlay(
        np.zeros((32, 32, 3), np.float32), emap, threshold=0.1, border=0.4
    )  # outside the scored area
    assert none == []
    with pytest.raises(ValueError, match="model's input size"):
        overlays.cam_overlay(image, cam[:16])


def test_a_view_maps_boxes_back_to_the_station_image():
    view = View(np.zeros((64, 64)), Crop(x0=100, y0=-20, width=320, height=160))
    assert view.to_source((0, 0, 64, 64)) == [100, -20, 420, 140]
    assert view.to_source((32, 16, 48, 32)) == [260, 20, 340, 60]


def test_case_views_are_what_the_models_saw(flagged):
    case = flagged["cases"][0]
    assert case.ct_view.image.shape == (64, 64) and case.rgb_view.image.shape == (64, 64, 3)
    assert case.ct_view.image.min() >= 0 and case.ct_view.image.max() <= 1
    norm = case.ct_facts.normalization
    np.testing.assert_allclose((case.ct_tensor[0] * norm.std + norm.mean).clip(0, 1), case.ct_view.image, atol=1e-6)


# --- Grad-CAM ------------------------------------------------------------------------------


def test_pytorch_grad_cam_audit_matches_the_service_cam(flagged, tmp_path):

    cam = TorchCAM(flagged["runs"][0], "gradcam")
    compared = 0
    for case in flagged["cases"][:6]:
        ours = cam(case.ct_tensor, case.meta)
        served = case.inspection.ct_cam
        assert ours.shape == served.shape
        if served.max() > 0:
            assert np.corrcoef(ours.ravel(), served.ravel())[0, 1] >= 0.99
            compared += 1
    assert compared >= 3
    data, files = CTHeatmap(cam).explain(flagged["cases"][0], tmp_path)
    assert data["source"] == "pytorch-grad-cam gradcam" and (tmp_path / files["overlay"]).is_file()


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "eigencam"])
def test_other_pytorch_grad_cam_methods_give_a_map_per_cell(flagged, method):

    case = flagged["cases"][1]
    m = TorchCAM(flagged["runs"][0], method)(case.ct_tensor, case.meta)
    assert m.shape == (64, 64) and m.min() >= 0 and m.max() <= 1 + 1e-6 and m.std() > 0


def test_unknown_grad_cam_method_is_refused(flagged):

    with pytest.raises(ValueError, match="unknown Grad-CAM method 'nope'.*gradcam\\+\\+"):
        TorchCAM(flagged["runs"][0], "nope")


# --- prompts and answers -------------------------------------------------------------------


def test_prompts_ground_the_vlm_in_the_cnn_result_in_english_and_korean(flagged):
    case = flagged["cases"][0]
    boxes = overlays.hot_regions(case.inspection.ct_cam, 0.5)
    i = case.inspection
    for lang, word in (("en", "probability"), ("ko", "확률")):
        text = ct_prompt(i, case.meta, boxes, 64, lang)
        assert word in text and i.ct_class in text and f"{i.ct_probs[i.ct_class]:.3f}" in text
        assert str(boxes[0].to_dict()["box"]) in text and all(f'"{k}"' in text for k in FINDING_KEYS)
        text = rgb_prompt(i, case.meta, [], 64, lang)
        assert f"{i.rgb_threshold:.5f}" in text and f"{i.rgb_score:.5f}" in text
    with pytest.raises(ValueError, match="prompt language"):
        ct_prompt(i, case.meta, boxes, 64, "fr")


def test_answers_are_parsed_robustly_and_malformed_ones_are_kept_raw():
    good = json.dumps(GOOD)
    for text in (good, f"```json\n{good}\n```", f"Here is my finding: {good} Hope it helps."):
        out = parse_finding(text)
        assert out["malformed"] is False and out["finding"] == GOOD and out["raw"] == text
    partial = parse_finding('{"class": "cell_normal", "verdict": "normal"}')
    assert partial["malformed"] and partial["problem"] == "missing keys: confidence, location, cause, action"
    assert partial["finding"]["class"] == "cell_normal"
    assert parse_finding("the cell looks fine") == {
        "raw": "the cell looks fine",
        "malformed": True,
        "problem": "the answer holds no JSON object",
    }
    assert "a list" in parse_finding("[1, 2]")["problem"]


# --- Gemini through google-genai against a local fake server ---------------------------------


def _gemini(url, **kw):
    return GeminiBackend(
        model="gemini-test", base_url=url, **{"timeout": 5.0, "attempts": 3, "initial_delay": 0.05, **kw}
    )


def test_gemini_answer_becomes_a_finding_and_the_key_only_travels_in_the_header(flagged, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    case = next(c for c in flagged["cases"] if c.inspection.verdict_code == 3)  # combined: CT and RGB are both asked
    with FakeGemini([answer(json.dumps(GOOD))]) as g:
        data, _ = VLMFinding(_gemini(g.url)).explain(case, tmp_path)
    assert len(g.requests) == 2 and flagged_sides(case) == ["ct", "rgb"]
    for side in ("ct", "rgb"):
        assert data[side]["finding"] == GOOD and data[side]["malformed"] is False
    path, headers, body = g.requests[0]
    assert re.fullmatch(r"/v1(beta)?/models/gemini-test:generateContent", path)
    assert headers.get("x-goog-api-key") == KEY and KEY not in path
    parts = body["contents"][0]["parts"]
    assert [p["inlineData"].get("mimeType", p["inlineData"].get("mime_type")) for p in parts[:2]] == [
        "image/png",
        "image/png",
    ] and "CNN" in parts[2]["text"]
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert KEY not in caplog.text and KEY not in json.dumps(data)


def test_gemini_malformed_answer_is_kept_as_raw_text_and_flagged(flagged, tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with FakeGemini([answer("Porosity near the top, reject it.")]) as g:
        data, _ = VLMFinding(_gemini(g.url)).explain(flagged["cases"][0], tmp_path)
    side = flagged_sides(flagged["cases"][0])[0]
    assert data[side]["malformed"] and data[side]["raw"] == "Porosity near the top, reject it."


def test_gemini_429_is_retried_with_backoff_then_succeeds(flagged, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    case = next(c for c in flagged["cases"] if c.inspection.verdict_code == 2)  # external: one question
    with FakeGemini(
        [error(429, "RESOURCE_EXHAUSTED", "quota"), error(503, "UNAVAILABLE", "busy"), answer(json.dumps(GOOD))]
    ) as g:
        data, _ = VLMFinding(_gemini(g.url)).explain(case, tmp_path)
    assert len(g.requests) == 3 and data["rgb"]["finding"] == GOOD and "ct" not in data


def test_gemini_gives_up_after_its_attempts_with_the_reason(flagged, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    case = next(c for c in flagged["cases"] if c.inspection.verdict_code == 2)
    with (
        FakeGemini([error(429, "RESOURCE_EXHAUSTED", "quota exceeded")]) as g,
        pytest.raises(
            RuntimeError, match="Gemini answered 429 RESOURCE_EXHAUSTED after up to 2 attempts: quota exceeded"
        ),
    ):
        VLMFinding(_gemini(g.url, attempts=2)).explain(case, tmp_path)
    assert len(g.requests) == 2


def test_gemini_timeout_marks_the_part_unavailable_and_the_report_is_still_written(flagged, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    case = next(c for c in flagged["cases"] if c.inspection.verdict_code == 2)
    with FakeGemini([delay(3.0, answer(json.dumps(GOOD)))]) as g:
        pipeline = ExplanationPipeline(
            [CTHeatmap(), RGBErrorMap(), VLMFinding(_gemini(g.url, timeout=0.5, attempts=2))], tmp_path
        )
        entry = pipeline.submit(case).result(timeout=60)
        pipeline.close()
    assert len(g.requests) == 2  # the timeout was retried once
    assert entry["parts"] == {"ct_heatmap": "ok", "rgb_error_map": "ok", "vlm": "unavailable"}
    assert "Gemini did not answer within 0.5 s (2 attempts)" in entry["reasons"]["vlm"]
    report = json.loads((tmp_path / entry["json"]).read_text())
    assert report["explanations"]["rgb_error_map"]["status"] == "ok" and (tmp_path / entry["report"]).is_file()


def test_gemini_without_a_key_says_which_variables_to_set(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(BackendUnavailable, match="set GEMINI_API_KEY or GOOGLE_API_KEY"):
        GeminiBackend()


# --- Qwen-VL and GroundingDINO through transformers, tiny random weights ----------------------


@pytest.mark.parametrize("generation", [3, 2])
def test_qwen_vl_from_a_local_folder_answers_through_the_chat_template(flagged, tmp_path, generation):
    backend = QwenVLBackend(make_qwen_vl(tmp_path / "qwen", generation), max_new_tokens=8)
    assert backend.device == "cpu" and f"Qwen{generation}VLForConditionalGeneration" in backend.description
    case = next(c for c in flagged["cases"] if c.inspection.verdict_code == 3)
    data, _ = VLMFinding(backend, lang="ko").explain(case, tmp_path / "out")
    assert data["lang"] == "ko" and "확률" in data["ct"]["prompt"] and "임계값" in data["rgb"]["prompt"]
    for side in ("ct", "rgb"):
        raw = data[side]["raw"]
        assert isinstance(raw, str) and raw  # random weights: some text, kept raw and flagged as not the JSON asked for
        assert data[side]["malformed"]
    again, _ = VLMFinding(backend, lang="ko").explain(case, tmp_path / "out")
    assert again == data  # greedy decoding: the same answer for the same cell


def test_qwen_vl_needs_a_weights_folder(tmp_path):
    with pytest.raises(BackendUnavailable, match="no config.json"):
        QwenVLBackend(tmp_path)


def test_grounding_dino_boxes_are_mapped_back_to_classes(flagged, tmp_path):
    backend = TransformersGrounding(make_grounding_dino(tmp_path / "gdino"))
    case = flagged["cases"][0]
    data, files = Grounding(backend, box_threshold=0.0, text_threshold=0.0).explain(case, tmp_path / "out")
    assert data["ct"]["prompt"] == "porosity . void . pore . resin overflow ." and data["rgb"]["prompt"].startswith(
        "scratch"
    )
    for side, view in (("ct", case.ct_view), ("rgb", case.rgb_view)):
        dets = data[side]["detections"]
        assert dets and all(
            0 <= d["box"][0] <= d["box"][2] <= view.size and 0 <= d["box"][1] <= d["box"][3] <= view.size for d in dets
        )
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        assert Image.open(tmp_path / "out" / files[f"{side}_boxes"]).size == (256, 256)
    porosity = "cell_porosity" if case.meta[0] == 0 else "module_porosity"
    assert {d["class"] for d in data["ct"]["detections"]} <= {porosity, "module_resin_overflow", "unknown"}
    none, _ = Grounding(backend, box_threshold=1.01).explain(case, tmp_path / "out")
    assert none["ct"]["detections"] == [] and none["rgb"]["detections"] == []


def test_phrase_labels_map_to_classes():

    assert phrase_class("void", CT_PHRASES, 0) == ("void", "cell_porosity")
    assert phrase_class("porosity", CT_PHRASES, 1) == ("porosity", "module_porosity")
    assert phrase_class("resin  overflow", CT_PHRASES, 1) == ("resin overflow", "module_resin_overflow")
    assert phrase_class("dent scratch", RGB_PHRASES, 0)[1] in ("dent", "scratch")
    assert phrase_class("bubble", CT_PHRASES, 0) == ("bubble", "unknown")


# --- the pipeline ----------------------------------------------------------------------------


class _Blocked:
    name, description = "slow", "waits for a signal"

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def explain(self, case, folder):
        self.started.set()
        assert self.release.wait(30)
        return {"waited": True}, {}


class _Broken:
    name, description = "broken", "always fails"

    def explain(self, case, folder):
        raise KeyError("no such field")


def test_submit_never_waits_for_explainers_and_a_full_backlog_skips_with_the_reason(flagged, tmp_path):
    slow = _Blocked()
    pipeline = ExplanationPipeline([slow], tmp_path, workers=1, max_backlog=2)
    cases = flagged["cases"]
    first = pipeline.submit(cases[0])
    assert slow.started.wait(30)
    second = pipeline.submit(cases[1])  # waits in the queue
    assert pipeline.backlog == 2 and not first.done() and not second.done()
    third = pipeline.submit(cases[2]).result(timeout=1)  # backlog full: answered at once
    assert third["parts"] == {"slow": "skipped"} and "backlog full" in third["reasons"]["slow"]
    slow.release.set()
    entries = pipeline.close()
    assert first.result()["parts"] == {"slow": "ok"} and len(entries) == 3 and pipeline.backlog == 0


def test_asyncio_code_awaits_explanations_while_it_goes_on(flagged, tmp_path):

    slow = _Blocked()
    pipeline = ExplanationPipeline([slow, CTHeatmap()], tmp_path, workers=2)

    async def line():
        pending = [asyncio.ensure_future(pipeline.explain(c)) for c in flagged["cases"][:2]]
        await asyncio.sleep(0.05)
        answered_meanwhile = not any(p.done() for p in pending)  # the loop was free while explainers waited
        slow.release.set()
        return answered_meanwhile, await asyncio.gather(*pending)

    meanwhile, entries = asyncio.run(line())
    pipeline.close()
    assert meanwhile and [e["parts"] for e in entries] == [{"slow": "ok", "ct_heatmap": "ok"}] * 2


def test_a_long_running_pipeline_keeps_its_index_current_and_a_restart_adds_to_it(flagged, tmp_path):

    def listed():
        return [e["cell_id"] for e in json.loads((tmp_path / "index.json").read_text())["entries"]]

    cases = flagged["cases"]
    slow = _Blocked()
    pipeline = ExplanationPipeline([slow], tmp_path, workers=1, index_every_s=3600, resume=True)
    first, second = pipeline.submit(cases[0]), pipeline.submit(cases[1])
    slow.release.set()
    first.result(timeout=30), second.result(timeout=30)
    # written when the pipeline ran dry, not at close (an hour is not yet due)
    assert sorted(listed()) == sorted(c.cell_id for c in cases[:2])
    assert not list(tmp_path.glob(".*.partial"))
    # "killed": never closed. A new pipeline on the same folder keeps the two and adds one,
    # the same cell again getting a folder of its own
    again = ExplanationPipeline([slow], tmp_path, workers=1, index_every_s=3600, resume=True)
    third = again.submit(cases[0]).result(timeout=30)
    assert sorted(listed()) == sorted([cases[0].cell_id, cases[0].cell_id, cases[1].cell_id])
    assert third["report"] != first.result()["report"] and (tmp_path / first.result()["report"]).exists()
    assert len(again.close()) == 3
    # without resume (a one-off run such as inspect-dir) the folder's index is that run's alone
    ExplanationPipeline([slow], tmp_path, workers=1).close()
    assert listed() == []


def test_a_failing_explainer_loses_only_its_part(flagged, tmp_path):
    setup_failed = Unavailable("vlm", "no Gemini API key: set GEMINI_API_KEY or GOOGLE_API_KEY in the environment")
    with ExplanationPipeline([_Broken(), CTHeatmap(), RGBErrorMap(), setup_failed], tmp_path) as pipeline:
        futures = [pipeline.submit(c) for c in flagged["cases"][:3]]
    for f in futures:
        entry = f.result()
        assert entry["parts"] == {
            "broken": "unavailable",
            "ct_heatmap": "ok",
            "rgb_error_map": "ok",
            "vlm": "unavailable",
        }
        report = json.loads((tmp_path / entry["json"]).read_text())
        assert report["explanations"]["broken"]["reason"] == "'no such field'"
        assert report["explanations"]["broken"]["data"]["error_type"] == "KeyError"
        assert report["verdict"] == entry["verdict"] and set(report["ct"]["probs"]) == set(
            flagged["cases"][0].inspection.ct_probs
        )
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["cells"] == 3 and {x["name"]: x["unavailable"] for x in index["explainers"]}["broken"] == 3


# --- reports in a real browser and the command line --------------------------------------------

CHROMIUM = shutil.which("chromium")
LAUNCH = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


PHOTO_DEFECT = GOOD | {"class": "scratch", "location": "near the tab, no coordinates"}
CT_NORMAL = GOOD | {"class": "module_normal", "verdict": "normal"}


def by_prompt(body: dict) -> tuple:
    """The fake VLM's answers, so that the run's agreement is known exactly: it calls every
    photo defective (no coordinates); on a cell's CT slice it confirms the defect with a box;
    on a module's it answers prose (malformed) for x-axis slices and "normal" for the others."""
    prompt = prompt_of(body)
    if "CT slice" not in prompt:
        return answer(json.dumps(PHOTO_DEFECT))
    if "lithium-ion cell" in prompt:
        return answer(json.dumps(GOOD))
    return answer("not json at all") if "slice axis x" in prompt else answer(json.dumps(CT_NORMAL))


@pytest.fixture(scope="module")
def explained_run(flagged, tmp_path_factory):
    """`python -m client inspect-dir --local ... --explain` with Gemini answering from a fake
    server and GroundingDINO from tiny random weights (boxes at every score)."""
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMINI_API_KEY", KEY)
    try:
        with FakeGemini([by_prompt]) as g:
            rc = client_main(
                [
                    "inspect-dir",
                    str(flagged["data"]),
                    "--local",
                    *map(str, flagged["runs"]),
                    "--out",
                    str(out / "results.jsonl"),
                    "--quiet",
                    "--explain",
                    "--vlm",
                    "gemini",
                    "--vlm-model",
                    "gemini-test",
                    "--gemini-url",
                    g.url,
                    "--vlm-attempts",
                    "1",
                    "--grounding",
                    "transformers",
                    "--grounding-weights",
                    str(make_grounding_dino(out / "gdino")),
                    "--box-threshold",
                    "0.0",
                    "--text-threshold",
                    "0.0",
                ]
            )
    finally:
        mp.undo()
    assert rc == 0
    return out


def test_inspect_dir_explain_writes_a_report_per_flagged_cell_and_an_index(explained_run, flagged):
    rows = [json.loads(line) for line in (explained_run / "results.jsonl").read_text().splitlines()]
    index = json.loads((explained_run / "explain" / "index.json").read_text())
    assert index["cells"] == len(rows) == len(flagged["cases"])
    assert sum(index["verdicts"].values()) == index["cells"]
    by_id = {e["cell_id"]: e for e in index["entries"]}
    for row in rows:
        entry = by_id[row["cell_id"]]
        assert entry["verdict"] == row["verdict"] and entry["parts"] == {
            "ct_heatmap": "ok",
            "rgb_error_map": "ok",
            "vlm": "ok",
            "grounding": "ok",
        }
        report = json.loads((explained_run / "explain" / entry["json"]).read_text())
        assert report["confidence"] == pytest.approx(row["confidence"], abs=1e-6)
        # what judged the cell, in the results and the report (and shown on its page): here the
        # in-process run (--local) of the fixture's checkpoints, named by their digests
        versions = row["model_versions"]
        assert report["model_versions"] == versions and versions["release"] == "local"
        assert (
            versions["ct_classifier"]
            == hashlib.sha256((flagged["runs"][0] / "checkpoint.pt").read_bytes()).hexdigest()[:12]
        )
        page = (explained_run / "explain" / entry["report"]).read_text()
        assert f"release local</span> (CT {versions['ct_classifier']}" in page
        vlm = report["explanations"]["vlm"]["data"]
        answers = [vlm[s] for s in ("ct", "rgb") if s in vlm]
        assert answers and all(a["malformed"] or a["finding"] in (GOOD, PHOTO_DEFECT, CT_NORMAL) for a in answers)
        for a in answers:  # the box in the location of GOOD and CT_NORMAL is kept, in the view and in the image sent
            assert ("region" in a) == (a.get("finding") in (GOOD, CT_NORMAL))
            if "region" in a:
                assert a["region"]["box"] == [3, 4, 20, 22] and len(a["region"]["source_box"]) == 4
                page = (explained_run / "explain" / entry["report"]).read_text()
                assert "its box: [3, 4, 20, 22] in the view" in page
        for name in ("ct_heatmap", "rgb_error_map"):
            for f in report["explanations"][name]["files"].values():
                assert Image.open(explained_run / "explain" / Path(entry["report"]).parent / f).size == (256, 256)


def _mask(box, size: int = 256) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def _check_labelled_defects_are_drawn(report_json: Path, report: dict, cell) -> None:
    """The cell report names the labelled defects and outlines them on the heatmap overlays (in white,
    a colour no colour map or box uses), instead of printing the label as data."""
    html = report_json.with_name("report.html").read_text()
    assert "{&#39;ct&#39;" not in html and "{'ct'" not in html  # not the label dict as text
    for side, name, defects in (("ct", "ct_heatmap", cell.ct_defects), ("rgb", "rgb_error_map", cell.rgb_defects)):
        part = report["explanations"][name]
        assert part["data"]["labelled_defects"] == [d.name for d in defects]
        overlay = np.asarray(Image.open(report_json.parent / part["files"]["overlay"]).convert("RGB"))
        white = np.all(overlay == 255, axis=2).sum()
        assert (white > 20) == bool(defects), (side, white, len(defects))
        for d in defects:
            assert d.name in html


def test_the_index_says_how_far_the_three_systems_agree(explained_run, flagged):
    """The fake VLM's answers (`by_prompt`) fix the VLM numbers exactly; the box overlaps are
    recounted here on pixel masks; the polygons come from the data set's labels."""
    rows = {r["cell_id"]: r for r in map(json.loads, (explained_run / "results.jsonl").read_text().splitlines())}
    cells = {c.cell_id: c for c in pair_cells(flagged["data"], progress=False)[0]}
    index = json.loads((explained_run / "explain" / "index.json").read_text())
    a = index["agreement"]

    def kind(r: dict) -> str:
        if r["verdict"] == "external_defect":
            return "external"  # photo only: the VLM agrees
        if r["meta"][0] == 0:
            return "combined cell"  # both sides confirmed: agrees
        return "combined module x" if r["meta"][1] == 0 else "combined module"  # malformed; CT called normal

    n = {k: sum(1 for r in rows.values() if kind(r) == k) for k in ("external", "combined cell", "combined module x")}
    n["combined module"] = len(rows) - sum(n.values())
    assert a["cells"] == len(rows) == 12 and min(n.values()) > 0, n  # every kind of answer occurs
    v = a["vlm"]
    assert v["cells"] == 12 - n["combined module x"] and v["agree"] == n["external"] + n["combined cell"]
    assert (v["malformed"], v["unavailable"], v["refused_by_service"]) == (n["combined module x"], 0, 0)
    assert v["confusion"] == {
        "internal_defect": {"normal": 0, "internal_defect": 0, "external_defect": 0, "combined_defect": 0},
        "external_defect": {"normal": 0, "internal_defect": 0, "external_defect": n["external"], "combined_defect": 0},
        "combined_defect": {
            "normal": 0,
            "internal_defect": 0,
            "external_defect": n["combined module"],
            "combined_defect": n["combined cell"],
        },
    }
    combined = 12 - n["external"]
    assert v["sides"]["ct"] | {"confirmed_share": None} == {
        "asked": combined,
        "answered": combined - n["combined module x"],
        "confirmed": n["combined cell"],
        "confirmed_share": None,
        "malformed": n["combined module x"],
        "unavailable": 0,
    }
    assert v["sides"]["rgb"]["answered"] == v["sides"]["rgb"]["confirmed"] == 12

    boxes = {"ct": [0, 0], "rgb": [0, 0]}
    polygons = {"ct": 0, "rgb": 0}
    vlm_ct_apart = {"not_asked": 0, "malformed": 0}
    for entry in index["entries"]:
        report = json.loads((explained_run / "explain" / entry["json"]).read_text())
        cell = cells[entry["cell_id"]]
        assert report["source"]["labels"] == cell.labels()
        _check_labelled_defects_are_drawn(explained_run / "explain" / entry["json"], report, cell)
        polygons["ct"] += len(cell.ct_defects)
        polygons["rgb"] += len(cell.rgb_defects)
        if entry["verdict"] == "external_defect":
            vlm_ct_apart["not_asked"] += len(cell.ct_defects)
        elif kind(rows[entry["cell_id"]]) == "combined module x":
            vlm_ct_apart["malformed"] += len(cell.ct_defects)
        parts = report["explanations"]
        for side, name in (("ct", "ct_heatmap"), ("rgb", "rgb_error_map")):
            regions = [_mask(r["box"]) for r in parts[name]["data"]["regions"]]
            for d in parts["grounding"]["data"][side]["detections"]:
                box = _mask(d["box"])
                best = max(((box & r).sum() / (box | r).sum() for r in regions if (box | r).any()), default=0)
                boxes[side][0] += 1
                boxes[side][1] += bool(best >= a["bounds"]["box_iou"])
    assert a["bounds"] == {"box_iou": 0.25, "label_cover": 0.5}
    for side in ("ct", "rgb"):
        assert [a["boxes"][side]["boxes"], a["boxes"][side]["overlapping"]] == boxes[side]
    assert a["boxes"]["ct"]["boxes"] > 0 and a["boxes"]["cells_unavailable"] == 0
    labels = a["labels"]
    assert labels["cells"] == 12 and {s: labels[s]["polygons"] for s in ("ct", "rgb")} == polygons
    assert polygons["ct"] > 0 and polygons["rgb"] > 0
    for side in ("ct", "rgb"):
        for system in ("cnn_ae", "grounding", "vlm"):
            x = labels[side]["systems"][system]
            assert 0 <= x["found"] <= x["polygons"] <= polygons[side]
    assert labels["ct"]["systems"]["cnn_ae"]["polygons"] == labels["ct"]["systems"]["grounding"]["polygons"]
    vlm_ct = labels["ct"]["systems"]["vlm"]
    assert vlm_ct["polygons"] + vlm_ct.get("not_asked", 0) + vlm_ct.get("malformed", 0) == polygons["ct"]
    assert {k: vlm_ct.get(k, 0) for k in vlm_ct_apart} == vlm_ct_apart
    assert labels["rgb"]["systems"]["vlm"]["found"] == 0  # its photo answers give no coordinates


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it as root)")
def test_report_pages_show_the_three_systems_in_headless_chromium(explained_run, tmp_path):
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional, drives a browser

    index = explained_run / "explain" / "index.html"
    entries = json.loads((explained_run / "explain" / "index.json").read_text())["entries"]
    malformed = next(
        e
        for e in entries
        if json.dumps(json.loads((explained_run / "explain" / e["json"]).read_text())).count('"malformed": true')
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(index.as_uri())
        assert page.locator("#cells a").count() == len(entries)
        page.click(f"text={malformed['cell_id']}")
        page.wait_for_load_state()
        assert page.url.endswith(malformed["report"])
        assert page.inner_text("#verdict") == malformed["verdict"]
        assert page.inner_text("#cell-id") == malformed["cell_id"]
        images = page.eval_on_selector_all("#statistical img", "els => els.map(e => [e.alt, e.naturalWidth])")
        assert [a for a, _ in images] == ["CT slice", "CT Grad-CAM overlay", "RGB photo", "RGB error overlay"]
        assert all(w == 256 for _, w in images)  # every image loaded
        vlm = page.inner_text("#vlm")
        assert "not the JSON asked for" in vlm and "not json at all" in vlm or GOOD["cause"] in vlm
        assert "no box above the thresholds" not in page.inner_text("#grounding")
        page.go_back()
        agreement = page.inner_text("#agreement")
        vlm = json.loads(index.with_suffix(".json").read_text())["agreement"]["vlm"]
        assert f"verdict on {vlm['agree']} of {vlm['cells']} cells" in agreement and "IoU ≥ 0.25" in agreement
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert Image.open(tmp_path / "report.png").size[0] == 1400
