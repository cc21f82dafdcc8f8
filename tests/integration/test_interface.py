"""The interface as an integrator meets it (docs/interface.md), against a real tritonserver.

Any subset of an ensemble's outputs answers, with the values of the whole answer; a bad cell
gets its own message whatever was asked for; the metrics count what happened: every cell
decided, whatever outputs were asked for, and every refusal by its reason.
"""

from __future__ import annotations

import io
import itertools
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.dataset import pair_cells
from core import interface as api
from core.preprocess import encoded_ct_input
from export.repository import build_repository
from serving.server import Ports, TritonServer, free_ports
from tests.support.tiny_models import make_ct_run, make_rgb_run

ENSEMBLES = {
    api.INSPECT: ((api.CT_IMAGE, api.CT_META, api.RGB_IMAGE), api.INSPECT_OUTPUTS),
    api.INSPECT_CT: ((api.CT_IMAGE, api.CT_META), api.INSPECT_CT_OUTPUTS),
    api.INSPECT_RGB: ((api.RGB_IMAGE,), api.INSPECT_RGB_OUTPUTS),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("interface")
    cells, _ = pair_cells(small_dataset[0], progress=False)
    ct_x = np.stack([encoded_ct_input(c.ct_path.read_bytes(), 64)[0] for c in cells])
    meta = np.array([c.meta for c in cells], np.float32)
    runs = [  # a CT gate calibrated on the data set's cells, so that verdict 4 can happen
        make_ct_run(root / "ct", size=64, images=torch.from_numpy(ct_x), meta=torch.from_numpy(meta), gate=True),
        make_rgb_run(root / "rgb", size=64, threshold=0.05),
    ]
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
            subsets = _subsets(outputs)
            start = time.perf_counter()
            for subset in subsets:
                got = _infer(client, model, inputs, subset)
                assert set(got) == set(subset), (model, subset, sorted(got))
                for name in subset:
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


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_metrics_count_every_cell_decided_whatever_was_asked_and_every_refusal_by_its_reason(service):
    server, cells = service["server"], service["cells"]
    url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
    before = _scrape(url)
    refusals = [  # (model, inputs, outputs) and the (refusing model, reason) it must be counted under
        (api.INSPECT, _inputs(cells[:1], ct=b"not an image"), ("preprocess", "not_an_image")),
        (api.INSPECT, _inputs(cells[:2], ct=b"%PDF-1.7"), ("preprocess", "not_an_image")),
        (api.INSPECT, _inputs(cells[:1], rgb=b""), ("preprocess", "empty")),
        (api.INSPECT, _inputs(cells[:1], meta=(np.nan, 2)), ("preprocess", "metadata")),
        (api.INSPECT_CT, _inputs(cells[:1], ct=_png(np.zeros((64, 64), np.uint8))), ("ct_preprocess", "blank")),
        (api.INSPECT_RGB, _inputs(cells[:1], rgb=_png(np.zeros((8, 8, 3), np.uint8))), ("rgb_preprocess", "too_small")),
    ]
    decided = 0
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
        _infer(client, api.INSPECT_RGB, _inputs(cells[:1]), (api.RGB_SCORE,))  # a photo alone: no cell's verdict
    after = _scrape(url)

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
    # the photo-only request is in the RGB score histogram, beside the cells
    assert delta("battery_rgb_anomaly_score_count") == decided + 1
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
