"""Decode what a station hands over, with limits checked before any pixel is decoded.

CT: PNG, JPEG, TIFF (8- or 16-bit) or DICOM. RGB: PNG or JPEG. The decoded arrays are
exactly what `training.preprocess.load_image` gives for the same file, so serving and
training see the same pixels. Every failure is an `ImageError` whose message says what
was wrong in terms a station integrator can act on.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.preprocess import image_array

DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """A request's image cannot be used; the message names the reason."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts, per image (configurable in the preprocessing models' parameters)."""

    max_bytes: int = 64 * 2**20
    max_pixels: int = 50_000_000  # width x height, checked from the header before decoding
    min_side: int = 16


def sniff(data: bytes) -> str | None:
    """The format from the first bytes: png, jpeg, tiff, dicom, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def _first_bytes(data: bytes) -> str:
    return " ".join(f"0x{b:02x}" for b in data[:8]) or "nothing"


def _check_size(width: int, height: int, limits: Limits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise ImageError(f"{what} is {width}x{height}; both sides must be at least {limits.min_side} pixels")


def _decode_pil(data: bytes, limits: Limits, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_size(im.width, im.height, limits, what)
            if getattr(im, "n_frames", 1) > 1:
                raise ImageError(f"{what} has {im.n_frames} frames; send one slice per request")
            im.load()
            return image_array(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what} is too large to decode safely: {e}") from None
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError...
        raise ImageError(f"{what} could not be decoded ({type(e).__name__}: {e})") from None


def _decode_dicom(data: bytes, limits: Limits, what: str) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise ImageError(f"{what} is not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ImageError(f"{what} is a DICOM file without pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(cols, rows, limits, what)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageError(f"{what} is a multi-frame DICOM ({ds.NumberOfFrames} frames); send one slice per request")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(f"{what} is a DICOM with {ds.SamplesPerPixel} samples per pixel; a CT slice must be monochrome")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ImageError(f"{what}: DICOM pixel data could not be decoded ({type(e).__name__}: {e})") from None
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    if pixels.dtype.kind == "i":  # signed storage: shift to unsigned, keeping the order of values
        pixels = pixels.astype(np.int64) + (1 << (bits - 1))
    pixels = np.clip(pixels.astype(np.int64), 0, (1 << bits) - 1)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":  # bright means low: invert
        pixels = (1 << bits) - 1 - pixels
    if bits <= 8:
        return (pixels << (8 - bits)).astype(np.uint8)
    return (pixels << (16 - bits)).astype(np.uint16)  # 12-bit CT fills the 16-bit range, as a 16-bit TIFF would


def decode_ct(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """An encoded CT slice -> 2-D uint8/uint16 array (or (H, W, 3) for a colour file, which preprocessing greys)."""
    what = "CT_IMAGE"
    _check_bytes(data, limits, what)
    kind = sniff(data)
    if kind == "dicom":
        return _decode_dicom(data, limits, what)
    if kind is None:
        raise ImageError(f"{what} is not a PNG, JPEG, TIFF or DICOM image (first bytes {_first_bytes(data)})")
    return _decode_pil(data, limits, what)


def decode_rgb(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """An encoded photo -> (H, W, 3) uint8."""
    what = "RGB_IMAGE"
    _check_bytes(data, limits, what)
    kind = sniff(data)
    if kind not in ("png", "jpeg"):
        raise ImageError(f"{what} is not a PNG or JPEG image (first bytes {_first_bytes(data)})")
    image = _decode_pil(data, limits, what)
    if image.ndim == 2:  # a grey photo: three equal channels
        image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    return image


def _check_bytes(data: bytes, limits: Limits, what: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes, over the limit of {limits.max_bytes}")
