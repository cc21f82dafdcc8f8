"""Bad input against a real tritonserver: the catalogue of docs/operations.md "Operating limits".

Every kind of bad request gets its specific error, a good request sent at the same moment is
answered exactly as when sent alone, and the server stays ready. The repository is built
with small limits (1 MB encoded, 4 Mpixel decoded) so the limit cases stay cheap.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.dataset import pair_cells
from client.inspection import Cell, CellError, Inspection
from client.service import InspectionClient
from core import interface as api
from core.decode import Limits
from export.options import Tuning
from export.repository import build_repository
from serving.server import Ports, TritonServer, free_ports
from tests.integration.test_triton import _infer
from tests.support.tiny_models import make_ct_run, make_rgb_run
from tests.unit.test_decode import dicom

LIMITS = Limits(max_bytes=1_000_000, max_pixels=4_000_000, min_side=16)
OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _png(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _multi_frame_tiff() -> bytes:
    frames = [Image.fromarray((np.random.default_rng(i).random((64, 64)) * 255).astype(np.uint8)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _colour_dicom() -> bytes:

    ds = pydicom.dcmread(io.BytesIO(dicom(np.full((32, 32), 1000, np.uint16))))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
    ds.PixelData = np.zeros((32, 32, 3), np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("reliability")
    repo = root / "model_repository"
    build_repository(
        [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64)],
        "python-ort",
        repo,
        tuning=Tuning(limits=LIMITS),
        progress=lambda *_: None,
    )
    server = TritonServer(repo, Ports(*free_ports(3)), log_path=root / "tritonserver.log")
    server.start(timeout=180)
    cells, _ = pair_cells(small_dataset[0], progress=False)
    try:
        yield {"url": server.grpc_url, "server": server, "cells": cells}
    finally:
        server.stop()


def _inputs(ct: list[bytes], meta, rgb: list[bytes]) -> dict[str, np.ndarray]:
    return {
        api.CT_IMAGE: np.array([[b] for b in ct], object),
        api.CT_META: np.asarray(meta, np.float32).reshape(-1, 2),
        api.RGB_IMAGE: np.array([[b] for b in rgb], object),
    }


@pytest.fixture(scope="module")
def good(service):
    """A good cell's inputs and the answer to it alone."""
    c = service["cells"][0]
    inputs = _inputs([c.ct_path.read_bytes()], [c.meta], [c.rgb_path.read_bytes()])
    answer = _infer(service["url"], api.INSPECT, inputs)
    return inputs, {n: answer.as_numpy(n) for n in api.INSPECT_OUTPUTS}


def _with(good_inputs: dict, **replace) -> dict:
    out = dict(good_inputs)
    for name, value in replace.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def _one(data: bytes) -> np.ndarray:
    return np.array([[data]], object)


# kind -> (how the good request is spoiled, the model it goes to, what the error says)
def catalogue(good_inputs: dict) -> dict[str, tuple[dict, str, str]]:
    ct, rgb = good_inputs[api.CT_IMAGE][0, 0], good_inputs[api.RGB_IMAGE][0, 0]
    photo = np.asarray(Image.open(io.BytesIO(rgb)).convert("RGB"))
    noise = (np.random.default_rng(0).random((700, 700, 3)) * 255).astype(np.uint8)
    g = lambda **r: _with(good_inputs, **r)  # noqa: E731
    return {
        "undecodable CT bytes": (
            g(CT_IMAGE=_one(b"\x00\x01garbage" * 10)),
            api.INSPECT,
            "CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image",
        ),
        "truncated CT PNG": (g(CT_IMAGE=_one(ct[: len(ct) // 2])), api.INSPECT, "CT_IMAGE could not be decoded"),
        "empty CT bytes": (g(CT_IMAGE=_one(b"")), api.INSPECT, "CT_IMAGE is empty"),
        "a text file as the photo": (
            g(RGB_IMAGE=_one(b"cell 42, station 3, shift B\n")),
            api.INSPECT,
            "RGB_IMAGE is not a PNG or JPEG image",
        ),
        "a PDF as the CT slice": (
            g(CT_IMAGE=_one(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj\n")),
            api.INSPECT,
            "CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image",
        ),
        "a TIFF as the photo": (
            g(RGB_IMAGE=_one(_multi_frame_tiff())),
            api.INSPECT,
            "RGB_IMAGE is not a PNG or JPEG image",
        ),
        "metadata of the wrong dtype": (
            g(CT_META=np.array([[0, 2]], np.int32)),
            api.INSPECT,
            "inference input 'CT_META' data-type is 'INT32', but model 'inspect' expects 'FP32'",
        ),
        "metadata of the wrong shape": (
            g(CT_META=np.array([[0, 2, 1]], np.float32)),
            api.INSPECT,
            "unexpected shape for input 'CT_META'",
        ),
        "CT image sent as numbers": (
            g(CT_IMAGE=np.zeros((1, 1), np.float32)),
            api.INSPECT,
            "inference input 'CT_IMAGE' data-type is 'FP32', but model 'inspect' expects 'BYTES'",
        ),
        "missing input": (g(RGB_IMAGE=None), api.INSPECT, "expected 3 inputs but got 2 inputs"),
        "extra input": (
            g(EXTRA=np.zeros((1, 1), np.float32)),
            api.INSPECT,
            "expected 3 inputs but got 4 inputs for model 'inspect'",
        ),
        "NaN metadata": (
            g(CT_META=np.array([[np.nan, 2]], np.float32)),
            api.INSPECT,
            "CT_META contains NaN or infinity",
        ),
        "infinite metadata": (
            g(CT_META=np.array([[0, np.inf]], np.float32)),
            api.INSPECT,
            "CT_META contains NaN or infinity",
        ),
        "unknown battery type": (
            g(CT_META=np.array([[5, 2]], np.float32)),
            api.INSPECT,
            "CT_META battery_type must be one of 0 cell, 1 module",
        ),
        "fractional slice axis": (
            g(CT_META=np.array([[0, 1.5]], np.float32)),
            api.INSPECT,
            "CT_META slice_axis must be one of 0 x, 1 y, 2 z",
        ),
        "an all-black CT slice": (
            g(CT_IMAGE=_one(_png(np.zeros((128, 128), np.uint8)))),
            api.INSPECT,
            "CT_IMAGE is blank: every pixel is 0",
        ),
        "an all-white photo": (
            g(RGB_IMAGE=_one(_jpeg(np.full((108, 192, 3), 255, np.uint8)))),
            api.INSPECT,
            "RGB_IMAGE is blank: every pixel is 255",
        ),
        "a tiny CT slice": (
            g(CT_IMAGE=_one(_png(np.eye(8, dtype=np.uint8) * 200))),
            api.INSPECT,
            "both sides must be at least 16 pixels",
        ),
        "an enormous photo": (
            g(RGB_IMAGE=_one(_jpeg(np.asarray(Image.fromarray(photo).resize((2800, 1575)))))),
            api.INSPECT,
            "pixels, over the limit of 4000000",
        ),
        "a decompression bomb": (
            g(CT_IMAGE=_one(_png(np.zeros((8000, 8000), np.uint8), optimize=True))),
            api.INSPECT,
            "= 64000000 pixels, over the limit of 4000000",
        ),
        "too many bytes": (g(RGB_IMAGE=_one(_png(noise))), api.INSPECT, "bytes, over the limit of 1000000"),
        "a multi-frame TIFF slice": (
            g(CT_IMAGE=_one(_multi_frame_tiff())),
            api.INSPECT,
            "has 3 frames; send one slice per request",
        ),
        "a DICOM without pixel data": (
            g(CT_IMAGE=_one(dicom(np.full((32, 32), 1000, np.uint16), with_pixels=False))),
            api.INSPECT,
            "DICOM file without pixel data",
        ),
        "a colour DICOM": (g(CT_IMAGE=_one(_colour_dicom())), api.INSPECT, "a CT slice must be monochrome"),
        "a batch with one bad cell": (
            _inputs([ct, b"\x00garbage", ct], [[0, 2]] * 3, [rgb] * 3),
            api.INSPECT,
            "cell 1: CT_IMAGE is not a PNG, JPEG, TIFF or DICOM image",
        ),
        "a batch over the maximum size": (
            _inputs([ct] * 17, [[0, 2]] * 17, [rgb] * 17),
            api.INSPECT,
            "inference request batch-size must be <= 16",
        ),
        "inputs of different batch sizes": (
            _inputs([ct] * 2, [[0, 2]], [rgb] * 2),
            api.INSPECT,
            "input 'CT_META' batch size does not match other inputs",
        ),
        "an unknown model": (good_inputs, "inspect_v2", "Request for unknown model: 'inspect_v2' is not found"),
    }


KINDS = list(
    catalogue(
        {
            api.CT_IMAGE: _one(b"\x89PNG" + b"\0" * 64),
            api.RGB_IMAGE: _one(_jpeg(np.zeros((4, 4, 3), np.uint8))),
            api.CT_META: np.zeros((1, 2), np.float32),
        }
    )
)


def test_the_catalogue_has_at_least_twenty_kinds_and_the_docs_give_each_message(good):
    cases = catalogue(good[0])
    assert len(cases) >= 20
    limits = OPERATIONS.read_text().split("## Operating limits", 1)[1].split("\n## ", 1)[0]
    undocumented = [kind for kind, (_, _, message) in cases.items() if kind not in limits or message not in limits]
    assert not undocumented, undocumented


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_request_gets_its_error_while_a_good_one_sent_with_it_is_answered(service, good, kind):
    bad_inputs, model, message = catalogue(good[0])[kind]
    good_inputs, expected = good
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_infer, service["url"], model, bad_inputs)
        fine = pool.submit(_infer, service["url"], api.INSPECT, good_inputs)
        with pytest.raises(InferenceServerException) as err:
            bad.result(timeout=120)
        answer = fine.result(timeout=120)
    assert message in err.value.message(), err.value.message()
    assert err.value.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE"), (
        err.value.status()
    )
    for name in api.NUMERIC_OUTPUTS:
        np.testing.assert_allclose(answer.as_numpy(name), expected[name], atol=1e-5, err_msg=name)
    assert answer.as_numpy(api.MODEL_VERSIONS).tolist() == expected[api.MODEL_VERSIONS].tolist()
    with grpcclient.InferenceServerClient(service["url"]) as c:
        assert c.is_server_ready() and c.is_model_ready(api.INSPECT)


def test_a_batch_with_bad_cells_answers_exactly_the_good_ones(service, good):
    cells = [Cell(c.ct_path.read_bytes(), c.meta, c.rgb_path.read_bytes(), c.cell_id) for c in service["cells"][:6]]
    spoiled = list(cells)
    spoiled[1] = Cell(b"", cells[1].meta, cells[1].rgb, cells[1].cell_id)
    spoiled[4] = Cell(cells[4].ct, (0.0, 9.0), cells[4].rgb, cells[4].cell_id)
    with InspectionClient(service["url"], heatmaps=False) as client:
        alone = client.inspect_many(cells, concurrency=2)
        mixed = client.inspect_cells(spoiled)
    assert [type(r) for r in mixed] == [Inspection, CellError, Inspection, Inspection, CellError, Inspection]
    assert (
        mixed[1].cell_id == cells[1].cell_id
        and mixed[1].kind == "invalid_argument"
        and mixed[1].message.endswith("CT_IMAGE is empty")
    )
    assert "cell 4" not in mixed[4].message and "slice_axis must be one of" in mixed[4].message
    for i in (0, 2, 3, 5):
        assert mixed[i].cell_id == cells[i].cell_id and mixed[i].verdict == alone[i].verdict
        assert mixed[i].rgb_score == pytest.approx(alone[i].rgb_score, abs=1e-5)
