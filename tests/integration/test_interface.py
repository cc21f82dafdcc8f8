"""The interface as an integrator meets it (docs/interface.md), against a real tritonserver.

Any subset of an ensemble's outputs answers, with the values of the whole answer; a bad cell
gets its own message whatever was asked for; the metrics count what happened: every cell
decided, whatever outputs were asked for, and every refusal by its reason.
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.dataset import pair_cells
from client.service import InspectionClient
from core import interface as api
from core.preprocess import encoded_ct_input, encoded_rgb_input, fit_frame
from export.repository import build_repository
from serving.server import Ports, TritonServer, free_ports
from tests.integration.test_monitoring import _scrape
from tests.support.tiny_models import make_ct_run, make_rgb_run

DOC = Path(__file__).resolve().parents[2] / "docs" / "interface.md"
ENSEMBLES = {
    api.INSPECT: ((api.CT_IMAGE, api.CT_META, api.RGB_IMAGE), api.INSPECT_OUTPUTS),
    api.INSPECT_CT: ((api.CT_IMAGE, api.CT_META), api.INSPECT_CT_OUTPUTS),
    api.INSPECT_RGB: ((api.RGB_IMAGE,), api.INSPECT_RGB_OUTPUTS),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("interface")
    cells, _ = pair_cells(small_dataset[0], progress=False)
    ct_facts, rgb_facts = [], []
    ct_x = np.stack([encoded_ct_input(c.ct_path.read_bytes(), 64, facts_out=ct_facts)[0] for c in cells])
    rgb_x = np.stack([encoded_rgb_input(c.rgb_path.read_bytes(), 64, facts_out=rgb_facts)[0] for c in cells])
    meta = np.array([c.meta for c in cells], np.float32)
    # gates calibrated on the data set's cells (so that verdict 4 can happen) and the placement
    # check fitted on them, as training does
    ct_run = make_ct_run(
        root / "ct",
        size=64,
        images=torch.from_numpy(ct_x),
        meta=torch.from_numpy(meta),
        gate=True,
        frame=fit_frame(ct_facts),
    )
    rgb_run = make_rgb_run(
        root / "rgb", size=64, threshold=0.05, images=torch.from_numpy(rgb_x), gate=True, frame=fit_frame(rgb_facts)
    )
    runs = [ct_run, rgb_run]
    repo = root / "model_repository"
    build_repository(runs, "python-ort", repo, progress=lambda *_: None)
    server = TritonServer(repo, Ports(*free_ports(3)), log_path=root / "tritonserver.log")
    server.start(timeout=180)
    try:
        yield {"server": server, "cells": cells}
    finally:
        server.stop()


def _inputs(cells, ct=None, rgb=None, meta=None) -> dict[str, np.ndarray]:
    return {
        api.CT_IMAGE: np.array([[ct if ct is not None else c.ct_path.read_bytes()] for c in cells], object),
        api.CT_META: np.array([meta if meta is not None else c.meta for c in cells], np.float32),
        api.RGB_IMAGE: np.array([[rgb if rgb is not None else c.rgb_path.read_bytes()] for c in cells], object),
    }


def _infer(client, model: str, inputs: dict[str, np.ndarray], outputs) -> dict[str, np.ndarray]:
    tensors = []
    for name in ENSEMBLES[model][0]:
        array = inputs[name]
        t = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def _subsets(names):
    return [s for r in range(1, len(names) + 1) for s in itertools.combinations(names, r)]


def test_every_subset_of_each_ensembles_outputs_answers_with_the_values_of_the_whole_answer(service):
    inputs = _inputs(service["cells"][:2])  # two cells per request: the batch axis too
    with grpcclient.InferenceServerClient(service["server"].grpc_url) as client:
        for model, (_, outputs) in ENSEMBLES.items():
            whole = _infer(client, model, inputs, outputs)
            # every subset of the numeric outputs; MODEL_VERSIONS (the same string in every answer) alone
            # and beside the first output (the pruning of all 1023 subsets is checked in test_export.py)
            numeric = [n for n in outputs if n != api.MODEL_VERSIONS]
            subsets = _subsets(numeric) + [(api.MODEL_VERSIONS,), (numeric[0], api.MODEL_VERSIONS)]
            start = time.perf_counter()
            for subset in subsets:
                got = _infer(client, model, inputs, subset)
                assert set(got) == set(subset), (model, subset, sorted(got))
                for name in subset:
                    if name == api.MODEL_VERSIONS:
                        assert got[name].tolist() == whole[name].tolist(), (model, subset)
                        continue
                    np.testing.assert_allclose(got[name], whole[name], rtol=0, atol=1e-6, err_msg=f"{model} {name}")
            seconds = time.perf_counter() - start
            # what it costs, for the record (-s shows it): 511 requests for inspect
            print(f"{model}: {len(subsets)} subsets in {seconds:.1f} s")
    assert len(_subsets(api.INSPECT_OUTPUTS)) == 2 ** len(api.INSPECT_OUTPUTS) - 1


@pytest.mark.parametrize("model", list(ENSEMBLES))
def test_a_bad_cell_gets_its_own_message_whatever_subset_is_asked(service, model):
    cells = service["cells"][:2]
    names, outputs = ENSEMBLES[model]
    bad = {}
    if api.CT_IMAGE in names:
        bad["CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image"] = _inputs(cells[:1], ct=b"not an image")
        bad["cell 1: CT_META slice_axis must be one of"] = _inputs(cells, meta=(0, 7)) | {
            api.CT_META: np.array([cells[0].meta, (0, 7)], np.float32)
        }
    if api.RGB_IMAGE in names:
        photos = np.array([[cells[0].rgb_path.read_bytes()], [b""]], object)
        bad["cell 1: RGB_IMAGE is empty"] = _inputs(cells) | {api.RGB_IMAGE: photos}
    asked = [(n,) for n in outputs] + [tuple(outputs)]
    if model == api.INSPECT:
        asked.append((api.VERDICT, api.CONFIDENCE))  # what a PLC needs
    with grpcclient.InferenceServerClient(service["server"].grpc_url) as client:
        for message, inputs in bad.items():
            for subset in asked:
                with pytest.raises(InferenceServerException) as e:
                    _infer(client, model, inputs, subset)
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT", (subset, e.value)
                assert message in e.value.message(), (subset, e.value.message())


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return _scrape(r.read().decode())


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_metrics_count_every_cell_decided_whatever_was_asked_and_every_refusal_by_its_reason(service):
    server, cells = service["server"], service["cells"]
    url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
    before = _metrics(url)
    refusals = [  # (model, inputs, outputs) and the (refusing model, reason) it must be counted under
        (api.INSPECT, _inputs(cells[:1], ct=b"not an image"), ("preprocess", "not_an_image")),
        (api.INSPECT, _inputs(cells[:2], ct=b"%PDF-1.7"), ("preprocess", "not_an_image")),
        (api.INSPECT, _inputs(cells[:1], rgb=b""), ("preprocess", "empty")),
        (api.INSPECT, _inputs(cells[:1], meta=(np.nan, 2)), ("preprocess", "metadata")),
        (api.INSPECT_CT, _inputs(cells[:1], ct=_png(np.zeros((64, 64), np.uint8))), ("ct_preprocess", "blank")),
        (api.INSPECT_RGB, _inputs(cells[:1], rgb=_png(np.zeros((8, 8, 3), np.uint8))), ("rgb_preprocess", "too_small")),
    ]
    decided, refused = 0, {"ct": 0, "rgb": 0}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for model, inputs, _ in refusals:
            with pytest.raises(InferenceServerException):
                _infer(client, model, inputs, ENSEMBLES[model][1])
        for outputs, n in (((api.VERDICT,), 2), ((api.CT_CAM,), 1), ((api.RGB_SCORE, api.RGB_OOD), 2), (None, 1)):
            answer = _infer(client, api.INSPECT, _inputs(cells[:n]), outputs or api.INSPECT_OUTPUTS)
            assert len(next(iter(answer.values()))) == n
            decided += n
        verdicts = _infer(client, api.INSPECT, _inputs(cells[:decided]), (api.VERDICT,))[api.VERDICT].ravel()
        decided += len(verdicts)
        # cells the gate refuses: a slice sent as a module's and a CT slice sent as the photo (docs/interface.md)
        odd = _wrong_inputs(cells[0])
        for kind in ("metadata that contradicts the image", "a CT slice as the photo"):
            out = _infer(client, api.INSPECT, odd[kind][0], (api.CT_OOD, api.RGB_OOD, api.CT_PROBS))
            gated = {"ct": int((out[api.CT_OOD] >= 1).sum()), "rgb": int((out[api.RGB_OOD] >= 1).sum())}
            assert sum(gated.values()) >= 1, (kind, out)  # verdict 4, as test_each_kind_of_wrong_input... shows
            for source, n in gated.items():
                refused[source] += n
            decided += 1
        _infer(client, api.INSPECT_RGB, _inputs(cells[:1]), (api.RGB_SCORE,))  # a photo alone: no cell's verdict
    after = _metrics(url)

    def delta(prefix: str, **labels) -> float:
        keys = [
            k
            for k in after
            if (k == prefix or k.startswith(prefix + "{")) and all(f'{n}="{v}"' in k for n, v in labels.items())
        ]
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    # every cell of `inspect` decided and counted, whatever outputs its request asked for
    assert delta("battery_verdicts_total") == decided
    for code, name in enumerate(api.VERDICT_NAMES):  # the last request's verdicts, among the counted ones
        assert delta("battery_verdicts_total", verdict=name) >= int((verdicts == code).sum())
    assert not [k for k in after if "battery_verdicts_total" in k and 'battery_type="unknown"' in k]
    assert {k.split('battery_type="')[1].split('"')[0] for k in after if k.startswith("battery_verdicts_total{")} <= {
        "cell",
        "module",
    }
    assert delta("battery_ct_class_total") == decided  # one top class per cell
    # the photo-only request is in the RGB score histogram, beside the cells
    assert delta("battery_rgb_anomaly_score_count") == decided + 1
    for source, n in refused.items():  # the gate's refusals, by input
        assert delta("battery_not_inspectable_total", input=source) == n, source
    # each refusal once, under its model and reason; nothing else counted
    expected: dict[tuple[str, str], int] = {}
    for _, _, key in refusals:
        expected[key] = expected.get(key, 0) + 1
    for model in ("preprocess", "ct_preprocess", "rgb_preprocess"):
        for reason in api.REFUSAL_REASONS:  # every reason is exported from the start, at 0 until it happens
            key = f'battery_refused_total{{model="{model}",reason="{reason}"}}'
            assert key in after, sorted(k for k in after if k.startswith("battery_refused_total"))
            assert delta("battery_refused_total", model=model, reason=reason) == expected.get((model, reason), 0)
    reasons = {k.split('reason="')[1].split('"')[0] for k in after if k.startswith("battery_refused_total{")}
    assert reasons == set(api.REFUSAL_REASONS)
    # Triton's own count: a refused ensemble request counts twice under the ensemble (docs/interface.md)
    refused_inspect = sum(1 for m, _, _ in refusals if m == api.INSPECT)
    assert delta("nv_inference_request_failure", model=api.INSPECT) == 2 * refused_inspect


def test_asking_for_no_outputs_returns_all_of_them(service):
    inputs = _inputs(service["cells"][:1])
    with grpcclient.InferenceServerClient(service["server"].grpc_url) as client:
        for model, (names, outputs) in ENSEMBLES.items():
            tensors = []
            for name in names:
                t = grpcclient.InferInput(name, list(inputs[name].shape), "BYTES" if name != api.CT_META else "FP32")
                t.set_data_from_numpy(inputs[name])
                tensors.append(t)
            result = client.infer(model, tensors)
            assert {o["name"] for o in result.get_response(as_json=True)["outputs"]} == set(outputs), model


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def _wrong_inputs(cell) -> dict[str, tuple[dict, set[str]]]:
    """docs/interface.md's "What each kind of wrong input gets": kind -> (inputs, what may come
    back: "verdict 4" or a part of the error message)."""
    ct, rgb = cell.ct_path.read_bytes(), cell.rgb_path.read_bytes()
    photo = np.asarray(Image.open(io.BytesIO(rgb)).convert("RGB"))
    slice_ = np.asarray(Image.open(io.BytesIO(ct)).convert("L"))
    h, w = photo.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    bench = np.stack([90 + 40 * yy / h + 10 * xx / w] * 3, axis=-1).astype(np.uint8)  # a bench, no battery
    noise = (np.random.default_rng(5).random(photo.shape) * 255).astype(np.uint8)
    either = {"verdict 4", "not inspectable as placed", "no battery found"}
    one = _inputs([cell])
    return {
        "text as the CT slice": (
            one | {api.CT_IMAGE: np.array([[b"cell 42, shift B"]], object)},
            {"CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image"},
        ),
        "a truncated CT file": (
            one | {api.CT_IMAGE: np.array([[ct[: len(ct) // 2]]], object)},
            {"CT_IMAGE could not be decoded"},
        ),
        "a TIFF as the photo": (
            one | {api.RGB_IMAGE: np.array([[_tiff(photo)]], object)},
            {"RGB_IMAGE is not a PNG or JPEG image"},
        ),
        "empty bytes": (one | {api.CT_IMAGE: np.array([[b""]], object)}, {"CT_IMAGE is empty"}),
        "a blank CT slice": (
            one | {api.CT_IMAGE: np.array([[_png(np.zeros((64, 64), np.uint8))]], object)},
            {"CT_IMAGE is blank: every pixel is 0"},
        ),
        "an empty bench": (one | {api.RGB_IMAGE: np.array([[_jpeg(bench)]], object)}, {"photo: no battery found"}),
        "a battery type out of range": (
            one | {api.CT_META: np.array([[5, 2]], np.float32)},
            {"CT_META battery_type must be one of 0 cell, 1 module; got 5.0"},
        ),
        "a photo as the CT slice": (one | {api.CT_IMAGE: np.array([[rgb]], object)}, either),
        "a CT slice as the photo": (
            one | {api.RGB_IMAGE: np.array([[_png(np.stack([slice_] * 3, -1))]], object)},
            either,
        ),
        "metadata that contradicts the image": (
            one | {api.CT_META: np.array([[1 - cell.meta[0], cell.meta[1]]], np.float32)},
            either,
        ),
        "random noise as the photo": (one | {api.RGB_IMAGE: np.array([[_png(noise)]], object)}, either),
    }


def test_each_kind_of_wrong_input_gets_what_the_interface_document_says(service):
    text = DOC.read_text().split("### What each kind of wrong input gets", 1)[1].split("\n## ", 1)[0]
    seen = {}
    with grpcclient.InferenceServerClient(service["server"].grpc_url) as client:
        for kind, (inputs, allowed) in _wrong_inputs(service["cells"][0]).items():
            try:
                got = _infer(client, api.INSPECT, inputs, (api.VERDICT, api.CT_OOD, api.RGB_OOD))
                outcome = "verdict 4" if int(got[api.VERDICT][0, 0]) == api.NOT_INSPECTABLE else "a verdict"
            except InferenceServerException as e:
                assert e.status() == "StatusCode.INVALID_ARGUMENT", (kind, e)
                outcome = e.message()
            seen[kind] = outcome
            assert any(a in outcome for a in allowed), (kind, outcome)
    for message in ("CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image", "CT_IMAGE is empty", "no battery found"):
        assert message in text
    print(seen)  # which check caught the kinds either may catch, for the record (-s)


def _example(name: str) -> str:
    """The code block of docs/interface.md marked `<!-- example: name -->`, as a reader copies it."""
    block = DOC.read_text().split(f"<!-- example: {name} -->", 1)[1]
    return block.split("```", 2)[1].split("\n", 1)[1]


def test_the_examples_on_the_interface_page_answer_like_the_projects_client(service, tmp_path):
    """The HTTP (bash + curl) and gRPC (tritonclient alone) examples, copied from the page as a
    reader would, against the real server: the client's answer, and a refused cell's reason."""
    cell = service["cells"][0]
    with InspectionClient(service["server"].grpc_url, heatmaps=False) as client:
        expected = client.inspect(cell.ct_path.read_bytes(), cell.meta, cell.rgb_path.read_bytes())
    meta = [str(int(v)) for v in cell.meta]
    http_script, grpc_script = tmp_path / "inspect_http.sh", tmp_path / "inspect_grpc.py"
    http_script.write_text(_example("inspect_http.sh"))
    grpc_script.write_text(_example("inspect_grpc.py"))
    http = f"127.0.0.1:{service['server'].ports.http}"

    def run(*args):
        return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=60)

    out = run("bash", http_script, cell.ct_path, *meta, cell.rgb_path, http)
    assert out.returncode == 0, out.stderr
    answer = {o["name"]: o["data"] for o in json.loads(out.stdout)["outputs"]}
    assert answer["VERDICT"] == [expected.verdict_code]
    assert answer["CONFIDENCE"][0] == pytest.approx(expected.confidence, abs=1e-5)
    assert answer["CT_OOD"][0] == pytest.approx(expected.ct_ood, abs=1e-5)
    out = run(sys.executable, grpc_script, cell.ct_path, *meta, cell.rgb_path, service["server"].grpc_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"verdict {expected.verdict_code} {expected.verdict}, confidence {expected.confidence:.3f}\n"
    note = tmp_path / "notes.txt"
    note.write_bytes(b"not an image")
    out = run("bash", http_script, note, *meta, cell.rgb_path, http)
    assert out.returncode != 0 and "CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image" in out.stdout + out.stderr
    out = run(sys.executable, grpc_script, note, *meta, cell.rgb_path, service["server"].grpc_url)
    assert out.returncode == 1 and "refused: StatusCode.INVALID_ARGUMENT" in out.stderr


def test_an_http_client_written_from_the_five_steps_alone_gets_binary_outputs_too(service):
    """docs/interface.md's "HTTP without tritonclient", followed step by step with the standard
    library only, here asking for a map as binary output (step 5)."""
    cell = service["cells"][0]
    ct, rgb = cell.ct_path.read_bytes(), cell.rgb_path.read_bytes()

    def element(data: bytes) -> bytes:  # step 2
        return len(data).to_bytes(4, "little") + data

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "CT_IMAGE",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(ct) + 4},
                },
                {"name": "CT_META", "datatype": "FP32", "shape": [1, 2], "data": list(cell.meta)},  # step 3
                {
                    "name": "RGB_IMAGE",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(rgb) + 4},
                },
            ],
            "outputs": [{"name": "VERDICT"}, {"name": "CT_CAM", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = urllib.request.Request(  # steps 1, 4, 5
        f"http://127.0.0.1:{service['server'].ports.http}/v2/models/inspect/infer",
        data=header + element(ct) + element(rgb),
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        body, json_length = r.read(), int(r.headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:json_length])
    outputs = {o["name"]: o for o in answer["outputs"]}
    cam = outputs["CT_CAM"]
    raw = body[json_length : json_length + cam["parameters"]["binary_data_size"]]
    cam_map = np.frombuffer(raw, np.float32).reshape(cam["shape"])
    with InspectionClient(service["server"].grpc_url) as client:
        expected = client.inspect(ct, cell.meta, rgb)
    assert outputs["VERDICT"]["data"] == [expected.verdict_code]
    np.testing.assert_allclose(cam_map[0], expected.ct_cam, atol=1e-6)
    request.data = b'{"inputs": []}'  # a refusal: HTTP 400 with {"error": ...}
    request.remove_header("Inference-header-content-length")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    # step 6: the answer's "parameters" come once per output, every copy the same, so a parser that
    # keeps the last of equal keys reads them as one object
    copies: list[list] = []

    def keep(pairs):
        if pairs and pairs[0][0] == "sequence_id":
            copies.append(pairs)
        return dict(pairs)

    json.loads(body[:json_length], object_pairs_hook=keep)
    (pairs,) = copies
    assert len(pairs) == 3 * len(answer["outputs"]) and set(pairs) == {
        ("sequence_id", 0),
        ("sequence_start", False),
        ("sequence_end", False),
    }, pairs
    request.data = header + element(ct) + element(rgb)
    request.add_header("Inference-Header-Content-Length", str(len(header)))
    # an unknown model is HTTP 404 ("Errors")
    request.full_url = f"http://127.0.0.1:{service['server'].ports.http}/v2/models/no_such_model/infer"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 404 and "no_such_model" in json.loads(e.value.read())["error"]


def test_grpc_refusals_name_the_lowest_bad_cell_in_the_services_own_words(service):
    """docs/interface.md ("Batches", "Errors"): cells are checked in order, each completely; every refusal
    names its cell, one-cell requests too; over gRPC without tritonserver's prefixes; the same bad file
    gets the same message every time."""
    cells = service["cells"][:3]
    inputs = _inputs(cells)
    inputs[api.RGB_IMAGE][1, 0] = b"not an image"  # cell 1's photo ...
    inputs[api.CT_META][2] = (0, 7)  # ... and cell 2's metadata: cell 1 is named
    broken_png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    with grpcclient.InferenceServerClient(service["server"].grpc_url) as client:
        with pytest.raises(InferenceServerException) as e:
            _infer(client, api.INSPECT, inputs, [api.VERDICT])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert e.value.message().startswith("cell 1: RGB_IMAGE is not a PNG or JPEG image"), e.value.message()
        messages = set()
        for _ in range(2):
            with pytest.raises(InferenceServerException) as e:
                _infer(client, api.INSPECT, _inputs(cells[:1], ct=broken_png), [api.VERDICT])
            messages.add(e.value.message())
    (message,) = messages
    assert message.startswith("cell 0: CT_IMAGE could not be decoded") and "0x" not in message, message
