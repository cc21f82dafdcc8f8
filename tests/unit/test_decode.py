"""What the preprocessing models do, without a server: decoding at scale, limits, metadata checks, batched ONNX runs."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from core import decode
from core import interface as api
from core.decode import ImageError, Limits, box_reduce, decode_ct, decode_rgb, open_ct, sniff
from core.facts import ServingFacts
from core.labels import CT_CLASSES, CT_DEFECT_CLASSES
from core.preprocess import (
    CROP_MARGIN,
    CT_CROP_SHARE,
    _ct_grey,
    _decode_for,
    _square_around,
    encoded_ct_input,
    encoded_rgb_input,
    find_battery_ct,
)
from ensemble import VerdictRule, decide
from export.__main__ import main
from export.options import add_tuning_arguments, tuning_from
from serving.runtime import (
    OrtRunner,
    RequestError,
    cell_tensors,
    check_meta,
    ct_tensors,
    rgb_tensors,
    verdict_outputs,
)
from training.datasets import _ct_one, _rgb_one
from training.synth.ct import CTSliceSpec, render_ct_slice
from training.synth.rgb import RGBPhotoSpec, render_rgb_photo
from training.synth.writer import dicom_bytes


def facts(kind: str, size: int) -> ServingFacts:
    """Serving facts of a network taking `size` px crops (CT: mean 0.2, std 0.25)."""
    return ServingFacts.from_dict(
        {"kind": kind, "input_size": size, "normalization": {"mean": 0.2, "std": 0.25}, "class_names": list(CT_CLASSES)}
    )


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def ct_slice(size: int = 96, bits: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * (0.6 + 0.2 * np.sin(xx / 5))
    return (disc * (255 if bits == 8 else 65535)).astype(np.uint8 if bits == 8 else np.uint16)


def dicom(pixels: np.ndarray, bits_stored: int | None = None, with_pixels: bool = True) -> bytes:

    return dicom_bytes(pixels, bits_stored, with_pixels)


@pytest.mark.parametrize("fmt, bits", [("PNG", 8), ("PNG", 16), ("TIFF", 8), ("TIFF", 16), ("JPEG", 8)])
def test_ct_formats_decode_at_full_resolution_to_their_pixels(fmt, bits):
    pixels = ct_slice(bits=bits)
    decoded = decode_ct(encode(pixels, fmt))
    assert decoded.dtype == (np.uint8 if bits == 8 else np.uint16) and decoded.shape == pixels.shape
    if fmt != "JPEG":
        np.testing.assert_array_equal(decoded, pixels)


def test_an_8_bit_and_a_16_bit_slice_of_the_same_picture_give_the_same_model_input():
    eight = ct_slice(bits=8)
    sixteen = eight.astype(np.uint16) * 257  # the same values on the 16-bit scale
    a = encoded_ct_input(encode(eight, "PNG"), 64)[0]
    b = encoded_ct_input(encode(sixteen, "TIFF"), 64)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_box_reduction_is_the_mean_of_each_block():
    rng = np.random.default_rng(0)
    sixteen = rng.integers(0, 65536, (40, 24), dtype=np.uint16)
    expected = sixteen.astype(np.float64).reshape(10, 4, 6, 4).mean(axis=(1, 3)) / 65535
    np.testing.assert_allclose(box_reduce(sixteen, 4), expected, rtol=1e-6)
    eight = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    means = eight.astype(np.float64).reshape(20, 2, 12, 2, 3).mean(axis=(1, 3))
    assert np.abs(box_reduce(eight, 2).astype(np.float64) - means).max() <= 0.5 + 1e-9  # rounded to 8 bits
    odd = box_reduce(rng.integers(0, 65536, (41, 26), dtype=np.uint16), 4)
    assert odd.shape == (11, 7)  # a partial block at the edge still gives a pixel


@pytest.mark.parametrize("fmt, scale", [("JPEG", 4), ("JPEG", 8), ("PNG", 4), ("TIFF", 2)])
def test_decoding_at_a_scale_gives_the_reduced_picture(fmt, scale):
    pixels = ct_slice(size=512)
    decoded = open_ct(encode(pixels, fmt)).decode(scale)
    assert decoded.scale == scale and decoded.pixels.shape == (512 // scale, 512 // scale)
    assert (decoded.width, decoded.height) == (512, 512)
    reference = pixels.astype(np.float64).reshape(512 // scale, scale, 512 // scale, scale).mean(axis=(1, 3))
    # JPEG in the DCT domain: the same picture, up to its compression error
    assert np.abs(decoded.pixels.astype(np.float64) - reference).mean() < (4 if fmt == "JPEG" else 0.5)


def _line_size_files(tmp_path):
    """One 4000 x 4000 slice as JPEG, PNG, 16-bit TIFF and DICOM, and a 1920 x 1080 photo as JPEG and PNG."""

    rendered = render_ct_slice(CTSliceSpec(1, "module", "cylindrical", "z", 3, "porosity", True, 4000, 5))
    ct, outline = rendered.image, rendered.outline
    photo = render_rgb_photo(RGBPhotoSpec(1, "cell", "pouch", 0, ("Damaged",), 1920, 1080, 5)).image
    files = {
        "ct.jpg": encode(ct, "JPEG", quality=90),
        "ct.png": encode(ct, "PNG", compress_level=1),
        "ct.tif": encode(ct.astype(np.uint16) * 257, "TIFF"),
        "ct.dcm": dicom(ct.astype(np.uint16) * 257),
        "rgb.jpg": encode(photo, "JPEG", quality=92),
        "rgb.png": encode(photo, "PNG", compress_level=1),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files, outline


def test_line_size_files_give_identical_tensors_through_the_served_and_the_training_path(tmp_path):

    files, outline = _line_size_files(tmp_path)
    ct_facts, rgb_facts = facts("ct_classifier", 160), facts("rgb_autoencoder", 160)
    served = {}
    for name, data in files.items():
        if name.startswith("ct"):
            x = ct_tensors(np.array([[data]], object), ct_facts)[0]
            trained, crop, _ = _ct_one((tmp_path / name, 160, 0.2, 0.25, np.float16))
        else:
            x = rgb_tensors(np.array([[data]], object), rgb_facts)[0]
            trained, crop, _ = _rgb_one((tmp_path / name, 160, np.float16))
        np.testing.assert_array_equal(x.astype(np.float16), trained)  # training keeps its arrays in float16
        served[name] = (x, crop)
    # the crop is in the slice's own pixels, whatever scale it was decoded at: around the labelled outline
    crop = served["ct.jpg"][1]
    (ox0, oy0), (ox1, oy1) = outline.min(0), outline.max(0)
    assert crop.x0 <= ox0 and crop.y0 <= oy0 and crop.x0 + crop.side >= ox1 and crop.y0 + crop.side >= oy1, (
        crop,
        outline,
    )
    assert crop.side < 1.3 * max(ox1 - ox0, oy1 - oy0), crop
    # the same slice in four formats: the same input, up to JPEG's compression and 8-bit rounding
    for name in ("ct.png", "ct.tif", "ct.dcm"):
        assert np.abs(served[name][0] - served["ct.jpg"][0]).mean() < 0.05, name
    np.testing.assert_allclose(served["ct.tif"][0], served["ct.dcm"][0], atol=1e-6)
    assert np.abs(served["rgb.png"][0] - served["rgb.jpg"][0]).mean() < 0.02


def test_a_line_size_jpeg_is_decoded_once_at_the_scale_its_crop_needs(tmp_path, monkeypatch):

    files, _ = _line_size_files(tmp_path)
    scales = []
    real = decode.Source.decode
    monkeypatch.setattr(decode.Source, "decode", lambda self, scale=1: scales.append(scale) or real(self, scale))
    x, crop = encoded_ct_input(files["ct.jpg"], 512)
    # 2000 px decoded (4000 x CT_CROP_SHARE / 2 >= 512): any battery's crop keeps its full 512 px
    assert scales == [2] and crop.side / 2 >= 512
    scales.clear()
    encoded_ct_input(files["ct.jpg"], 160)
    assert scales == [8]
    scales.clear()
    x, crop = encoded_rgb_input(files["rgb.jpg"], 128)
    assert len(scales) == 1 and min(crop.width, crop.height) / scales[0] >= 128


def test_a_small_battery_in_a_large_slice_is_decoded_again_finer():

    small = np.zeros((2048, 2048), np.uint8)
    small[900:1150, 900:1150] = ct_slice(size=250)  # a battery of 250 px in a 2048-px field of view
    source = open_ct(encode(small, "PNG"))
    seen = []
    source.decode = lambda scale=1, real=source.decode: seen.append(scale) or real(scale)
    decoded, crop = _decode_for(
        source, CT_CROP_SHARE, 160, lambda g: _square_around(find_battery_ct(g), CROP_MARGIN), _ct_grey
    )
    scale = decoded.scale
    assert seen[0] > scale and crop.side / scale >= 160 and scale == 1, (seen, crop)


def test_a_dicom_whose_preamble_is_a_tiff_header_is_read_as_dicom():

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # ships with pydicom: "II*\0" before "DICM"
    assert data[:4] == b"II*\x00" and sniff(data) == "dicom"
    pixels = decode_ct(data)
    assert pixels.shape == (128, 128) and pixels.dtype == np.uint16 and pixels.max() > pixels.min()
    x, crop = encoded_ct_input(data, 64)
    assert x.shape == (1, 64, 64) and np.isfinite(x).all()


def test_dicom_slices_decode_with_their_bit_depth_scaled_to_16_bits():
    pixels16 = ct_slice(bits=16)
    np.testing.assert_array_equal(decode_ct(dicom(pixels16)), pixels16)
    twelve = (pixels16 >> 4).astype(np.uint16)  # a 12-bit station
    np.testing.assert_array_equal(decode_ct(dicom(twelve, bits_stored=12)), twelve << 4)
    assert sniff(dicom(pixels16)) == "dicom"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"\x00\x01garbage-bytes", r"not a PNG, JPEG, TIFF or DICOM image \(first bytes 0x00 0x01"),
        (None, "truncated"),
    ],
)
def test_bad_ct_bytes_get_a_specific_reason(data, message):
    if data is None:  # a PNG cut in half
        data = encode(ct_slice(), "PNG")[:200]
        message = "could not be decoded"
    with pytest.raises(ImageError, match=message):
        decode_ct(data)


def test_dicom_without_pixel_data_and_multi_frame_tiff_are_refused():
    with pytest.raises(ImageError, match="without pixel data"):
        decode_ct(dicom(ct_slice(bits=16), with_pixels=False))
    frames = [Image.fromarray(ct_slice()) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="3 frames"):
        decode_ct(buf.getvalue())


def test_limits_are_checked_from_the_header_before_decoding():
    big = encode(np.zeros((400, 500), np.uint8), "PNG")
    with pytest.raises(ImageError, match="over the limit of 100000"):
        decode_ct(big, Limits(max_pixels=100_000))
    with pytest.raises(ImageError, match="bytes, over the limit"):
        decode_ct(big, Limits(max_bytes=100))
    with pytest.raises(ImageError, match="at least 16 pixels"):
        decode_ct(encode(np.zeros((8, 300), np.uint8), "PNG"))


def test_rgb_accepts_png_and_jpeg_only_and_always_gives_three_channels():
    photo = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_rgb(encode(photo, "PNG")), photo)
    assert decode_rgb(encode(photo, "JPEG")).shape == (60, 90, 3)
    assert decode_rgb(encode(photo[..., 0], "PNG")).shape == (60, 90, 3)
    with pytest.raises(ImageError, match="not a PNG or JPEG"):
        decode_rgb(encode(photo, "TIFF"))


@pytest.mark.parametrize(
    "meta, message",
    [
        (np.array([[np.nan, 1]], np.float32), "NaN or infinity"),
        (np.array([[0, np.inf]], np.float32), "NaN or infinity"),
        (np.array([[2, 1]], np.float32), "battery_type must be one of 0 cell, 1 module"),
        (np.array([[0, 0.5]], np.float32), "slice_axis must be one of 0 x, 1 y, 2 z"),
        (np.array([[0, 1]], np.float64), "must be FP32"),
        (np.array([[0, 1, 2]], np.float32), "2 values per cell"),
    ],
)
def test_bad_metadata_is_refused_with_the_reason(meta, message):
    with pytest.raises(RequestError, match=message):
        check_meta(meta)


def test_in_a_batch_the_first_bad_cell_is_named():
    meta = np.array([[0, 2], [1, 0], [0, 7], [np.nan, 0]], np.float32)
    with pytest.raises(RequestError, match=r"^cell 2: CT_META slice_axis must be one of 0 x, 1 y, 2 z; got 7.0$"):
        check_meta(meta)


def test_a_whole_request_is_checked_cell_by_cell_and_the_lowest_bad_cell_is_named():
    ct_info, rgb_info = facts("ct_classifier", 48), facts("rgb_autoencoder", 32)
    ct = encode(ct_slice(), "PNG")
    photo = encode((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8), "PNG")
    meta = np.array([[0, 2], [1, 0], [0, 7]], np.float32)  # cell 2's metadata is bad ...
    cts = np.array([[ct], [ct], [ct]], object)
    rgbs = np.array([[photo], [b"nonsense"], [photo]], object)  # ... and cell 1's photo, a lower cell
    with pytest.raises(RequestError, match=r"^cell 1: RGB_IMAGE is not a PNG or JPEG image") as refused:
        cell_tensors(meta, cts, rgbs, ct_info, rgb_info, Limits())
    assert refused.value.reason == "not_an_image"
    x, y = cell_tensors(meta[:2], cts[:2], np.array([[photo], [photo]], object), ct_info, rgb_info, Limits())
    assert x.shape == (2, 1, 48, 48) and y.shape == (2, 3, 32, 32)
    # a request of one cell names its cell too, as every refusal does
    with pytest.raises(RequestError, match=r"^cell 0: CT_IMAGE is empty"):
        cell_tensors(meta[:1], np.array([[b""]], object), rgbs[:1], ct_info, rgb_info, Limits())


def test_the_same_undecodable_file_gets_the_same_message_every_time():
    broken = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # a PNG signature over garbage
    messages = set()
    for _ in range(3):
        with pytest.raises(RequestError) as refused:
            ct_tensors(np.array([[broken]], object), facts("ct_classifier", 48))
        messages.add(str(refused.value))
    assert len(messages) == 1 and "0x" not in messages.pop()


def test_image_limits_are_options_of_the_repository_commands():

    p = argparse.ArgumentParser()
    add_tuning_arguments(p)
    tuning = tuning_from(p.parse_args(["--max-image-bytes", "5000", "--max-image-pixels", "90000"]))
    assert tuning.limits == Limits(max_bytes=5000, max_pixels=90000)
    assert tuning_from(p.parse_args([])).limits == Limits()
    assert main(["repository", "--runs", "nowhere", "--max-image-pixels", "0"]) == 2  # refused with a message


def test_good_metadata_passes():
    meta = np.array([[0, 2], [1, 0]], np.float32)
    assert check_meta(meta) is meta


def test_a_batch_of_encoded_images_becomes_model_input_and_a_bad_cell_is_named():
    info = facts("ct_classifier", 48)
    good = encode(ct_slice(), "PNG")
    x = ct_tensors(np.array([[good], [good]], object), info)
    assert x.shape == (2, 1, 48, 48) and x.dtype == np.float32
    with pytest.raises(RequestError, match="cell 1: CT_IMAGE is not a PNG"):
        ct_tensors(np.array([[good], [b"nonsense"]], object), info)
    photo = encode((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8), "PNG")
    assert rgb_tensors(np.array([[photo]], object), facts("rgb_autoencoder", 32)).shape == (1, 3, 32, 32)


def test_ort_runner_runs_requests_as_one_batch_and_isolates_a_bad_request(tmp_path):

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    path = tmp_path / "double.onnx"
    torch.onnx.export(
        Double(),
        (torch.zeros(1, 3),),
        str(path),
        input_names=["X"],
        output_names=["Y"],
        dynamic_axes={"X": {0: "b"}, "Y": {0: "b"}},
        dynamo=False,
    )
    runner = OrtRunner(path, threads=1)
    out = runner.run_many([{"X": np.ones((2, 3), np.float32)}, {"X": np.full((1, 3), 3, np.float32)}])
    np.testing.assert_array_equal(out[0]["Y"], np.full((2, 3), 2))
    np.testing.assert_array_equal(out[1]["Y"], np.full((1, 3), 6))
    mixed = runner.run_many([{"X": np.ones((1, 3), np.float32)}, {"X": np.ones((1, 4), np.float32)}])
    np.testing.assert_array_equal(mixed[0]["Y"], np.full((1, 3), 2))
    assert isinstance(mixed[1], RequestError) and "inference failed" in str(mixed[1])


def test_verdict_outputs_decide_a_dynamic_batch_that_mixes_inspect_and_inspect_rgb_requests():

    rule = VerdictRule(CT_CLASSES, CT_DEFECT_CLASSES, rgb_threshold=0.2)
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(5), 2).astype(np.float32), None, rng.dirichlet(np.ones(5), 1).astype(np.float32)]
    scores = [
        np.array([[0.1], [0.3]], np.float32),
        np.array([[0.25], [0.05], [0.2]], np.float32),
        np.array([[0.5]], np.float32),
    ]
    out = verdict_outputs(rule, probs, scores)
    assert [len(o[api.VERDICT]) for o in out] == [2, 3, 1]
    for o, p, s in zip(out, probs, scores):
        assert o[api.VERDICT].shape == (len(s), 1) and o[api.VERDICT].dtype == np.int32
        np.testing.assert_array_equal(o[api.RGB_THRESHOLD], np.full((len(s), 1), 0.2, np.float32))
        if p is not None:
            d = decide(rule, p, s)
            np.testing.assert_array_equal(o[api.VERDICT][:, 0], d.verdict)
            np.testing.assert_allclose(o[api.CONFIDENCE][:, 0], d.confidence)
    assert out[1][api.VERDICT][:, 0].tolist() == [2, 0, 0]  # RGB half only
    both = verdict_outputs(rule, [probs[0], probs[2]], [scores[0], scores[2]])
    np.testing.assert_array_equal(
        np.concatenate([o[api.VERDICT] for o in both])[:, 0],
        decide(rule, np.concatenate([probs[0], probs[2]]), np.array([0.1, 0.3, 0.5])).verdict,
    )


def test_the_two_pixel_limits_of_the_interface_page_give_their_messages_and_the_reason_too_large():
    """docs/interface.md's limits: past 50 Mpixel the service's own message; past the image
    library's limit (Pillow's MAX_IMAGE_PIXELS, about 89.5 Mpixel) Pillow refuses to open it
    first, with its own words. Both before any pixel is decoded, both counted as too_large."""
    assert 89_000_000 < Image.MAX_IMAGE_PIXELS < 90_000_000

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, format="PNG")  # bilevel: small in memory and on disk
        return buf.getvalue()

    with pytest.raises(ImageError, match=r"is 8000x8000 = 64000000 pixels, over the limit of 50000000") as e:
        open_ct(png(8000))
    assert e.value.reason == "too_large"
    with pytest.raises(ImageError, match="CT_IMAGE is too large to decode safely: Image size") as e:
        open_ct(png(9500))
    assert e.value.reason == "too_large"
