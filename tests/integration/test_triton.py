"""End to end: a real tritonserver (from the nvidia-pytriton wheel) serving a built repository over gRPC.

The models are small random networks whose CT head bias and RGB threshold are set from
the in-process answers on the test cells, so that the crafted cell set produces all
four verdicts; everything else (decoding, preprocessing, ONNX Runtime in the Python
backend, dynamic batching, ensembles, the verdict model) is the real serving path.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.dataset import pair_cells
from client.explain.overlays import hot_regions
from client.inspection import Cell, CellError, Inspection, InspectionFailed
from client.service import AsyncInspectionClient, InspectionClient
from core import interface as api
from core.decode import decode_ct
from core.preprocess import encoded_ct_input, encoded_rgb_input
from export.local import TorchPipeline
from export.repository import build_repository
from serving.server import MALLOC_ENV, Ports, TritonServer, busy_ports, free_ports, malloc_library, server_command
from tests.support.tiny_models import ct_gate, gap_threshold, make_ct_run, make_rgb_run, rgb_gate
from tests.unit.test_decode import dicom
from training.checkpoint import load_checkpoint, save_checkpoint
from training.synth.plan import SynthConfig
from training.synth.writer import generate

SIZE = 64
NOISE = 1e-4  # answers this close to a decision boundary may flip between float implementations


def _craft_runs(root, cells):
    """Random networks whose decisions split the cell set: the CT head's bias puts the
    cell_porosity/cell_normal boundary in a gap of the cells' logit differences, and the
    RGB threshold sits in a gap of their scores."""
    ct_x = np.stack([encoded_ct_input(c.ct_path.read_bytes(), SIZE)[0] for c in cells])
    meta = np.array([c.meta for c in cells], np.float32)
    rgb_x = np.stack([encoded_rgb_input(c.rgb_path.read_bytes(), SIZE)[0] for c in cells])
    ct_run = make_ct_run(root / "ct", size=SIZE, images=torch.from_numpy(ct_x[:48]), meta=torch.from_numpy(meta[:48]))
    model, info = load_checkpoint(ct_run)
    with torch.no_grad():
        logits = model(torch.from_numpy(ct_x), torch.from_numpy(meta)).numpy()
        boundary, _ = gap_threshold(logits[:, 1] - logits[:, 0])
        bias = model.head[-1].bias
        bias[1] = bias[0] + 0.0
        bias[0] = bias[0] + boundary  # porosity wins where l1 - l0 > boundary
        bias[2:] -= 50.0
    info["ood"] = ct_gate(model, ct_x, meta)  # every fixture cell is in distribution; noise is not
    save_checkpoint(ct_run, model, info)
    rgb_run = make_rgb_run(root / "rgb", size=SIZE, images=torch.from_numpy(rgb_x[:16]))
    pipeline = TorchPipeline([ct_run, rgb_run])
    with torch.no_grad():
        scores = pipeline.rgb_graph(torch.from_numpy(rgb_x))[0].numpy()[:, 0]
    model, info = load_checkpoint(rgb_run)
    threshold, _ = gap_threshold(scores)
    info["threshold"] = info["thresholds"]["f1"] = threshold
    info["ood"] = rgb_gate(model, rgb_x, info["score"])
    save_checkpoint(rgb_run, model, info)
    return ct_run, rgb_run


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    data = root / "cells"
    generate(
        data,
        SynthConfig(
            batteries=25,
            seed=5,
            ct_size=96,
            rgb_width=160,
            rgb_height=90,
            slices_per_axis=3,
            photos_per_battery=2,
            rgb_defect_rate=0.5,
        ),
        workers=1,
        progress=False,
    )
    cells, _ = pair_cells(data, progress=False)
    ct_run, rgb_run = _craft_runs(root, cells)
    repo = root / "model_repository"
    build_repository([ct_run, rgb_run], "python-ort", repo, progress=lambda *_: None)
    ports = Ports(*free_ports(3))
    server = TritonServer(repo, ports, log_path=root / "tritonserver.log")
    server.start(timeout=180)
    try:
        yield {
            "url": server.grpc_url,
            "cells": cells,
            "data": data,
            "runs": [ct_run, rgb_run],
            "server": server,
            "repo": repo,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(service):
    """In-process PyTorch answers for every cell."""
    pipeline = TorchPipeline(service["runs"])
    cells = service["cells"]
    out = [pipeline.run([c.ct_path.read_bytes()], [c.meta], [c.rgb_path.read_bytes()]) for c in cells]
    return pipeline, {k: np.concatenate([o[k] for o in out]) for k in out[0]}


@pytest.fixture()
def client(service):
    with InspectionClient(service["url"]) as c:
        yield c


def _infer(url, model, inputs: dict[str, np.ndarray]):
    c = grpcclient.InferenceServerClient(url)
    tensors = []
    for name, array in inputs.items():
        dtype = (
            "BYTES"
            if array.dtype == object
            else {np.float32: "FP32", np.int32: "INT32", np.float64: "FP64"}[array.dtype.type]
        )
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return c.infer(model, tensors)


def _bytes(paths) -> np.ndarray:
    return np.array([[p.read_bytes()] for p in paths], dtype=object)


def test_every_ensemble_answers_real_encoded_images_batched_and_unbatched(service):
    cells = service["cells"][:4]
    ct, rgb = _bytes(c.ct_path for c in cells), _bytes(c.rgb_path for c in cells)
    meta = np.array([c.meta for c in cells], np.float32)
    batched = _infer(service["url"], api.INSPECT, {api.CT_IMAGE: ct, api.CT_META: meta, api.RGB_IMAGE: rgb})
    for i in range(4):
        single = _infer(
            service["url"],
            api.INSPECT,
            {api.CT_IMAGE: ct[i : i + 1], api.CT_META: meta[i : i + 1], api.RGB_IMAGE: rgb[i : i + 1]},
        )
        for name in api.NUMERIC_OUTPUTS:
            np.testing.assert_allclose(single.as_numpy(name)[0], batched.as_numpy(name)[i], atol=1e-5, err_msg=name)
        assert single.as_numpy(api.MODEL_VERSIONS)[0] == batched.as_numpy(api.MODEL_VERSIONS)[i]
    ct_only = _infer(service["url"], api.INSPECT_CT, {api.CT_IMAGE: ct, api.CT_META: meta})
    rgb_only = _infer(service["url"], api.INSPECT_RGB, {api.RGB_IMAGE: rgb})
    for name in (n for n in api.INSPECT_CT_OUTPUTS if n in api.NUMERIC_OUTPUTS):
        np.testing.assert_allclose(ct_only.as_numpy(name), batched.as_numpy(name), atol=1e-5)
    for name in (n for n in api.INSPECT_RGB_OUTPUTS if n in api.NUMERIC_OUTPUTS):
        np.testing.assert_allclose(rgb_only.as_numpy(name), batched.as_numpy(name), atol=1e-5)
    for answer in (ct_only, rgb_only):  # the same release answers through every ensemble
        assert answer.as_numpy(api.MODEL_VERSIONS).tolist() == batched.as_numpy(api.MODEL_VERSIONS).tolist()
    assert {
        o.name for o in grpcclient.InferenceServerClient(service["url"]).get_model_metadata(api.INSPECT_CT).outputs
    } == set(api.INSPECT_CT_OUTPUTS)


def test_all_four_verdicts_occur_and_heatmaps_have_the_documented_shapes_and_ranges(service, client):
    results = client.inspect_many([c.load() for c in service["cells"]], concurrency=6)
    assert all(isinstance(r, Inspection) for r in results)
    assert {r.verdict for r in results} == set(
        api.VERDICT_NAMES[: api.NOT_INSPECTABLE]
    )  # every cell here is inspectable
    assert all(r.ct_ood < 1 and r.rgb_ood < 1 and r.refusal == "" for r in results)
    for r in results:
        assert r.ct_cam.shape == (SIZE, SIZE) and r.rgb_error_map.shape == (SIZE, SIZE)
        assert r.ct_cam.min() >= 0.0 and r.ct_cam.max() <= 1.0 + 1e-6
        assert r.rgb_error_map.min() >= 0.0 and r.rgb_error_map.max() <= 1.0 + 1e-6  # segmentation probability
        assert 0.0 <= r.confidence <= 1.0
        assert abs(sum(r.ct_probs.values()) - 1.0) < 1e-5
        assert r.rgb_anomalous == (r.verdict in ("external_defect", "combined_defect"))
    # concurrent requests were batched: the networks ran batches of more than one cell
    stats = grpcclient.InferenceServerClient(service["url"]).get_inference_statistics(api.CT_CLASSIFIER, as_json=True)
    sizes = [int(b["batch_size"]) for b in stats["model_stats"][0]["batch_stats"]]
    assert max(sizes) > 1, sizes


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_what_is_not_a_cell_is_refused_as_not_inspectable_with_the_input_named(service, reference, client):
    rng = np.random.default_rng(0)
    cell = service["cells"][0].load()
    noise_ct = _png(rng.integers(0, 256, (96, 96), dtype=np.uint8))
    noise_photo = _png(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8))
    cases = {
        "noise as the CT slice": (noise_ct, cell.rgb, "CT slice"),
        "noise as the photo": (cell.ct, noise_photo, "photo"),
    }
    pipeline, _ = reference
    for what, (ct, rgb, refused) in cases.items():
        r = client.inspect(ct, cell.meta, rgb, cell_id=what)
        assert r.verdict == "not_inspectable" and r.verdict_code == 4 and not r.inspectable, (what, r.to_dict())
        assert refused in r.refusal and r.flagged
        score = r.ct_ood if refused == "CT slice" else r.rgb_ood
        assert score >= 1.0 and r.confidence == pytest.approx(
            min(1.0, 0.6 + 0.4 * (max(r.ct_ood, r.rgb_ood) - 1.0)), abs=1e-5
        )
        assert (
            abs(sum(r.ct_probs.values()) - 1.0) < 1e-5 and r.ct_cam is not None
        )  # what the models would have said is still there
        expected = pipeline.run([ct], [cell.meta], [rgb])
        assert int(expected[api.VERDICT][0, 0]) == 4
        np.testing.assert_allclose(
            [r.ct_ood, r.rgb_ood], [expected[api.CT_OOD][0, 0], expected[api.RGB_OOD][0, 0]], rtol=1e-4
        )
    # the halves refuse on their own input
    ct_only = _infer(
        service["url"],
        api.INSPECT_CT,
        {api.CT_IMAGE: np.array([[noise_ct]], dtype=object), api.CT_META: np.array([cell.meta], np.float32)},
    )
    assert ct_only.as_numpy(api.CT_OOD)[0, 0] >= 1.0
    rgb_only = _infer(service["url"], api.INSPECT_RGB, {api.RGB_IMAGE: np.array([[noise_photo]], dtype=object)})
    assert rgb_only.as_numpy(api.RGB_OOD)[0, 0] >= 1.0


def test_triton_gives_the_verdicts_of_the_in_process_pytorch_pipeline_over_200_cells(service, reference, client):
    cells = service["cells"]
    assert len(cells) >= 200
    pipeline, expected = reference
    results = client.inspect_many([c.load() for c in cells], concurrency=8)
    got = np.array([r.verdict_code for r in results])
    top2 = np.sort(expected[api.CT_PROBS], axis=1)[:, -2:]
    near = (top2[:, 1] - top2[:, 0] < NOISE) | (
        np.abs(expected[api.RGB_SCORE][:, 0] - pipeline.rule.rgb_threshold) < NOISE
    )
    assert near.sum() <= 2, f"{near.sum()} cells within float noise of a threshold"
    mismatched = np.nonzero((got != expected[api.VERDICT][:, 0]) & ~near)[0]
    assert len(mismatched) == 0, [cells[i].cell_id for i in mismatched]
    np.testing.assert_allclose([list(r.ct_probs.values()) for r in results], expected[api.CT_PROBS], atol=1e-4)
    np.testing.assert_allclose([r.rgb_score for r in results], expected[api.RGB_SCORE][:, 0], atol=1e-4)
    np.testing.assert_allclose([r.confidence for r in results], expected[api.CONFIDENCE][:, 0], atol=1e-4)
    np.testing.assert_allclose(np.stack([r.ct_cam for r in results]), expected[api.CT_CAM], atol=1e-3)
    np.testing.assert_allclose(
        [[r.ct_ood, r.rgb_ood] for r in results], np.c_[expected[api.CT_OOD], expected[api.RGB_OOD]], atol=1e-4
    )


def test_the_asyncio_client_gives_the_same_answers_in_order(service, client):
    cells = [c.load() for c in service["cells"][:12]]

    async def run():
        async with AsyncInspectionClient(service["url"], heatmaps=False) as ac:
            assert await ac.ready()
            return await ac.inspect_many(cells, concurrency=4)

    results = asyncio.run(run())
    sync = client.inspect_many(cells, concurrency=4)
    assert [r.cell_id for r in results] == [c.cell_id for c in cells]
    assert [r.verdict for r in results] == [r.verdict for r in sync]
    assert results[0].ct_cam is None  # heatmaps not requested


def _encode(array, fmt) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_a_16_bit_tiff_and_a_dicom_of_the_same_slice_get_the_same_answer_as_the_png(service, client):

    cell = service["cells"][0]
    pixels = decode_ct(cell.ct_path.read_bytes())
    if pixels.ndim == 3:
        pixels = pixels[..., :3].mean(axis=2).astype(np.uint8)
    sixteen = pixels.astype(np.uint16) * 257
    rgb = cell.rgb_path.read_bytes()
    answers = [
        client.inspect(data, cell.meta, rgb)
        for data in (_encode(pixels, "PNG"), _encode(sixteen, "TIFF"), dicom(sixteen))
    ]
    for a in answers[1:]:
        np.testing.assert_allclose(list(a.ct_probs.values()), list(answers[0].ct_probs.values()), atol=1e-5)
        assert a.verdict == answers[0].verdict


BAD_REQUESTS = {
    "undecodable CT bytes": (
        {api.CT_IMAGE: np.array([[b"\x00not an image"]], object)},
        "CT_IMAGE is not a PNG, JPEG, TIFF or DICOM",
    ),
    "undecodable RGB bytes": ({api.RGB_IMAGE: np.array([[b"GIF89a..."]], object)}, "RGB_IMAGE is not a PNG or JPEG"),
    "wrong dtype": ({api.CT_META: np.array([[0, 2]], np.int32)}, "CT_META"),
    "wrong shape": ({api.CT_META: np.array([[0, 2, 1]], np.float32)}, "CT_META"),
    "NaN metadata": ({api.CT_META: np.array([[np.nan, 2]], np.float32)}, "CT_META contains NaN"),
    "out-of-range metadata": ({api.CT_META: np.array([[0, 7]], np.float32)}, "slice_axis must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_clear_error_and_the_next_good_one_is_answered(service, reference, case):
    replace, message = BAD_REQUESTS[case]
    cell = service["cells"][1]
    good = {
        api.CT_IMAGE: _bytes([cell.ct_path]),
        api.CT_META: np.array([cell.meta], np.float32),
        api.RGB_IMAGE: _bytes([cell.rgb_path]),
    }
    with pytest.raises(InferenceServerException) as err:
        _infer(service["url"], api.INSPECT, good | replace)
    assert message in err.value.message()
    answer = _infer(service["url"], api.INSPECT, good)
    _, expected = reference
    np.testing.assert_allclose(answer.as_numpy(api.CT_PROBS)[0], expected[api.CT_PROBS][1], atol=1e-4)
    assert answer.as_numpy(api.VERDICT)[0, 0] == expected[api.VERDICT][1, 0]


def test_refused_cells_sent_alongside_good_ones_never_disturb_them(service, reference):
    """Four clients at once, each alternating a refused request (NaN metadata, then an
    undecodable photo) with a good one: every good one gets its answer. (Refusing a cell in
    one branch of `inspect` while the other branch ran made tritonserver reject about one
    good request in four here, before `inspect` got its single preprocessing step.)"""

    cell = service["cells"][1]
    good = {
        api.CT_IMAGE: _bytes([cell.ct_path]),
        api.CT_META: np.array([cell.meta], np.float32),
        api.RGB_IMAGE: _bytes([cell.rgb_path]),
    }
    bad = [
        good | {api.CT_META: np.array([[np.nan, 2]], np.float32)},
        good | {api.RGB_IMAGE: np.array([[b"GIF89a..."]], object)},
    ]
    _, expected = reference

    def rounds(worker: int) -> list[str]:
        problems = []
        for i in range(12):
            with pytest.raises(InferenceServerException, match="NaN|not a PNG or JPEG"):
                _infer(service["url"], api.INSPECT, bad[(worker + i) % 2])
            try:
                answer = _infer(service["url"], api.INSPECT, good)
                if answer.as_numpy(api.VERDICT)[0, 0] != expected[api.VERDICT][1, 0]:
                    problems.append(f"round {i}: a different verdict")
            except InferenceServerException as e:
                problems.append(f"round {i}: {e.message()}")
        return problems

    with ThreadPoolExecutor(4) as pool:
        problems = [p for found in pool.map(rounds, range(4)) for p in found]
    assert problems == []


def test_inspect_many_returns_one_result_or_one_error_per_cell_in_order(service, client):
    good = [c.load() for c in service["cells"][:6]]
    bad = Cell(b"truncated", (0.0, 2.0), good[0].rgb, "bad-cell")
    results = client.inspect_many(good[:3] + [bad] + good[3:], concurrency=4)
    assert [r.cell_id for r in results] == [c.cell_id for c in good[:3]] + ["bad-cell"] + [c.cell_id for c in good[3:]]
    assert (
        isinstance(results[3], CellError) and results[3].kind == "invalid_argument" and "CT_IMAGE" in results[3].message
    )
    assert all(isinstance(r, Inspection) for i, r in enumerate(results) if i != 3)
    with pytest.raises(InspectionFailed, match="CT_IMAGE is not a PNG"):
        client.inspect(b"truncated", "cell,z", good[0].rgb)


def test_client_commands_print_a_verdict_and_a_summary_with_agreement(service, tmp_path):
    cell = service["cells"][2]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "inspect",
            "--ct",
            str(cell.ct_path),
            "--meta",
            "cell,z",
            "--rgb",
            str(cell.rgb_path),
            "--url",
            service["url"],
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["verdict"] in api.VERDICT_NAMES and 0 <= answer["confidence"] <= 1
    out = tmp_path / "results.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "inspect-dir",
            str(service["data"]),
            "--out",
            str(out),
            "--url",
            service["url"],
            "--limit",
            "30",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and all(r["verdict"] in api.VERDICT_NAMES and "expected_verdict" in r["label"] for r in rows)
    assert "cells/s" in run.stdout and "agreement with the labels" in run.stdout
    offline = tmp_path / "offline.jsonl"  # the same folder in-process, without the server
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "inspect-dir",
            str(service["data"]),
            "--out",
            str(offline),
            "--local",
            *map(str, service["runs"]),
            "--limit",
            "30",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "in-process PyTorch" in run.stdout
    local_rows = [json.loads(line) for line in offline.read_text().splitlines()]
    assert [r["verdict"] for r in local_rows] == [r["verdict"] for r in rows]
    assert [r["cell_id"] for r in local_rows] == [r["cell_id"] for r in rows]
    down = subprocess.run(
        [sys.executable, "-m", "client", "inspect-dir", str(service["data"]), "--url", "localhost:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode != 0 and "no ready inspection service at localhost:1" in down.stderr


def test_flagged_cells_from_the_service_get_reports_drawn_on_the_served_heatmaps(service, client, tmp_path):
    info = client.serving_info()  # read from the repository's preprocessing models
    assert info["ct"].input_size == SIZE and info["rgb"].input_size == SIZE and info["ct"].normalization is not None
    out = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "inspect-dir",
            str(service["data"]),
            "--out",
            str(out),
            "--url",
            service["url"],
            "--limit",
            "24",
            "--quiet",
            "--explain",
            "--vlm",
            "gemini",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "vlm unavailable: no Gemini API key" in run.stderr  # said once at the start, and in every report
    flagged = [json.loads(line) for line in out.read_text().splitlines()]
    flagged = [r for r in flagged if r["verdict"] != "normal"]
    index = json.loads((tmp_path / "explain" / "index.json").read_text())
    assert flagged and index["cells"] == len(flagged)
    assert sorted(e["cell_id"] for e in index["entries"]) == sorted(r["cell_id"] for r in flagged)
    entry = index["entries"][0]
    assert entry["parts"] == {"ct_heatmap": "ok", "rgb_error_map": "ok", "vlm": "unavailable"}
    assert "GEMINI_API_KEY" in entry["reasons"]["vlm"] and "explained" in run.stdout
    report = json.loads((tmp_path / "explain" / entry["json"]).read_text())
    cell = next(c for c in service["cells"] if c.cell_id == entry["cell_id"])
    served = client.inspect(cell.ct_path.read_bytes(), cell.meta, cell.rgb_path.read_bytes())
    regions = report["explanations"]["ct_heatmap"]["data"]["regions"]
    assert [r["box"] for r in regions] == [[b.x0, b.y0, b.x1, b.y1] for b in hot_regions(served.ct_cam, 0.5)]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "inspect",
            "--ct",
            str(cell.ct_path),
            "--meta",
            ",".join(map(str, cell.meta)),
            "--rgb",
            str(cell.rgb_path),
            "--url",
            service["url"],
            "--explain",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    single = json.loads(next((tmp_path / "one" / "cells").glob("*/report.json")).read_text())
    assert single["verdict"] == served.verdict and "report " in one.stdout


def test_serve_reuses_an_up_to_date_repository_and_stops_cleanly_on_ctrl_c(service):
    ports = free_ports(4)
    cmd = [
        sys.executable,
        "-m",
        "export",
        "serve",
        "--runs",
        *map(str, service["runs"]),
        "--repository",
        str(service["repo"]),
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--front-metrics-port",
        str(ports[3]),
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert any("is up to date" in line for line in lines), "".join(lines)
        assert time.monotonic() - start < 60
        assert f"gRPC localhost:{ports[0]}" in lines[-1]
        with InspectionClient(f"localhost:{ports[0]}") as c:
            assert (
                c.inspect(*(lambda x: (x.ct, x.meta, x.rgb))(service["cells"][0].load())).verdict in api.VERDICT_NAMES
            )
    finally:
        proc.send_signal(2)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest[-2000:]


def test_a_port_in_use_is_named_before_the_server_starts(service):

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, metrics = free_ports(2)
        ports = Ports(http, port, metrics)
        assert busy_ports(ports) == [f"{port} (gRPC)"]
        with pytest.raises(RuntimeError, match=f"port {port} \\(gRPC\\) already in use"):
            TritonServer(service["repo"], ports).start(timeout=30)


def test_tritonserver_and_every_backend_process_run_with_jemalloc_where_it_is_installed(service):

    library = malloc_library()
    if library is None:
        pytest.skip("libjemalloc2 is not installed here (make setup installs it as root)")
    pid = service["server"].process.pid
    stubs = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    assert len(stubs) >= 6  # one per Python-backend model instance
    for p in [pid, *map(int, stubs)]:
        with open(f"/proc/{p}/maps") as f:
            assert library.name in f.read(), f"process {p} does not map {library}"


def test_the_allocator_can_be_chosen_or_turned_off_from_the_environment(monkeypatch, tmp_path):

    monkeypatch.setenv(MALLOC_ENV, "system")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert malloc_library() is None
    assert "LD_PRELOAD" not in server_command(tmp_path, Ports(1, 2, 3))[1]
    other = tmp_path / "libother.so"
    other.write_bytes(b"")
    monkeypatch.setenv(MALLOC_ENV, str(other))
    monkeypatch.setenv("LD_PRELOAD", "/opt/libpreloaded.so")
    assert server_command(tmp_path, Ports(1, 2, 3))[1]["LD_PRELOAD"] == f"{other}:/opt/libpreloaded.so"
    monkeypatch.setenv(MALLOC_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="no such allocator library"):
        malloc_library()
