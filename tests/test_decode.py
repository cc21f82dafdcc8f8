"""What the preprocessing models do, without a server: decoding, limits, metadata checks, batched ONNX runs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from export.decode import ImageError, Limits, decode_ct, decode_rgb, sniff
from export.serving import OrtRunner, RequestError, check_meta, ct_tensors, rgb_tensors
from training.preprocess import ct_input, load_image


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def ct_slice(size: int = 96, bits: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * (0.6 + 0.2 * np.sin(xx / 5))
    return (disc * (255 if bits == 8 else 65535)).astype(np.uint8 if bits == 8 else np.uint16)


def dicom(pixels: np.ndarray, bits_stored: int | None = None, with_pixels: bool = True) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, bits", [("PNG", 8), ("PNG", 16), ("TIFF", 8), ("TIFF", 16), ("JPEG", 8)])
def test_ct_formats_decode_to_what_training_reads_from_the_same_file(tmp_path, fmt, bits):
    pixels = ct_slice(bits=bits)
    data = encode(pixels, fmt)
    (tmp_path / "x").write_bytes(data)
    decoded = decode_ct(data)
    np.testing.assert_array_equal(decoded, load_image(tmp_path / "x"))
    assert decoded.dtype == (np.uint8 if bits == 8 else np.uint16)
    if fmt != "JPEG":
        np.testing.assert_array_equal(decoded, pixels)


def test_an_8_bit_and_a_16_bit_slice_of_the_same_picture_give_the_same_model_input():
    eight = ct_slice(bits=8)
    sixteen = eight.astype(np.uint16) * 257  # the same values on the 16-bit scale
    a = ct_input(decode_ct(encode(eight, "PNG")), 64)[0]
    b = ct_input(decode_ct(encode(sixteen, "TIFF")), 64)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dicom_slices_decode_with_their_bit_depth_scaled_to_16_bits():
    pixels16 = ct_slice(bits=16)
    np.testing.assert_array_equal(decode_ct(dicom(pixels16)), pixels16)
    twelve = (pixels16 >> 4).astype(np.uint16)  # a 12-bit station
    np.testing.assert_array_equal(decode_ct(dicom(twelve, bits_stored=12)), twelve << 4)
    assert sniff(dicom(pixels16)) == "dicom"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\x00\x01garbage-bytes", r"not a PNG, JPEG, TIFF or DICOM image \(first bytes 0x00 0x01"),
    (None, "truncated"),
])
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


@pytest.mark.parametrize("meta, message", [
    (np.array([[np.nan, 1]], np.float32), "NaN or infinity"),
    (np.array([[0, np.inf]], np.float32), "NaN or infinity"),
    (np.array([[2, 1]], np.float32), "battery_type must be one of 0 cell, 1 module"),
    (np.array([[0, 0.5]], np.float32), "slice_axis must be one of 0 x, 1 y, 2 z"),
    (np.array([[0, 1]], np.float64), "must be FP32"),
    (np.array([[0, 1, 2]], np.float32), "2 values per cell"),
])
def test_bad_metadata_is_refused_with_the_reason(meta, message):
    with pytest.raises(RequestError, match=message):
        check_meta(meta)


def test_in_a_batch_the_first_bad_cell_is_named():
    meta = np.array([[0, 2], [1, 0], [0, 7], [np.nan, 0]], np.float32)
    with pytest.raises(RequestError, match=r"^cell 2: CT_META slice_axis must be one of 0 x, 1 y, 2 z; got 7.0$"):
        check_meta(meta)


def test_image_limits_are_options_of_the_repository_commands():
    import argparse

    from export.__main__ import add_tuning_arguments, main, tuning_from

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
    info = {"input_size": 48, "normalization": {"mean": 0.2, "std": 0.25}}
    good = encode(ct_slice(), "PNG")
    x = ct_tensors(np.array([[good], [good]], object), info)
    assert x.shape == (2, 1, 48, 48) and x.dtype == np.float32
    with pytest.raises(RequestError, match="cell 1: CT_IMAGE is not a PNG"):
        ct_tensors(np.array([[good], [b"nonsense"]], object), info)
    photo = encode((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8), "PNG")
    assert rgb_tensors(np.array([[photo]], object), {"input_size": 32}).shape == (1, 3, 32, 32)


def test_ort_runner_runs_requests_as_one_batch_and_isolates_a_bad_request(tmp_path):
    import torch

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    path = tmp_path / "double.onnx"
    torch.onnx.export(Double(), (torch.zeros(1, 3),), str(path), input_names=["X"], output_names=["Y"],
                      dynamic_axes={"X": {0: "b"}, "Y": {0: "b"}}, dynamo=False)
    runner = OrtRunner(path, threads=1)
    out = runner.run_many([{"X": np.ones((2, 3), np.float32)}, {"X": np.full((1, 3), 3, np.float32)}])
    np.testing.assert_array_equal(out[0]["Y"], np.full((2, 3), 2))
    np.testing.assert_array_equal(out[1]["Y"], np.full((1, 3), 6))
    mixed = runner.run_many([{"X": np.ones((1, 3), np.float32)}, {"X": np.ones((1, 4), np.float32)}])
    np.testing.assert_array_equal(mixed[0]["Y"], np.full((1, 3), 2))
    assert isinstance(mixed[1], RequestError) and "inference failed" in str(mixed[1])


def test_verdict_outputs_decide_a_dynamic_batch_that_mixes_inspect_and_inspect_rgb_requests():
    from ensemble import VerdictRule, decide
    from ensemble import interface as api
    from export.serving import verdict_outputs
    from training.data.labels import CT_CLASSES, CT_DEFECT_CLASSES

    rule = VerdictRule(CT_CLASSES, CT_DEFECT_CLASSES, rgb_threshold=0.2)
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(5), 2).astype(np.float32), None, rng.dirichlet(np.ones(5), 1).astype(np.float32)]
    scores = [np.array([[0.1], [0.3]], np.float32), np.array([[0.25], [0.05], [0.2]], np.float32), np.array([[0.5]], np.float32)]
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
    np.testing.assert_array_equal(np.concatenate([o[api.VERDICT] for o in both])[:, 0],
                                  decide(rule, np.concatenate([probs[0], probs[2]]), np.array([0.1, 0.3, 0.5])).verdict)
