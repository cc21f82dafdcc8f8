"""Decode what a station hands over, at the scale the networks need, with limits checked
before any pixel is decoded.

CT: PNG, JPEG, TIFF (8- or 16-bit) or DICOM. RGB: PNG or JPEG. Training, evaluation and
the server all read images through `open_ct` / `open_rgb` (by way of
`core.preprocess.encoded_ct_input` / `encoded_rgb_input`), so they see the same pixels.

A line's CT slice is 4000 x 4000 and its photo 1920 x 1080, while the networks take 96-512
pixels of a crop of it. So an image is decoded reduced by a factor of 1, 2, 4 or 8
(`Source.decode(scale)`): a JPEG in the DCT domain (libjpeg decodes 1/2, 1/4, 1/8 directly,
skipping most of the inverse transform), any other format decoded whole and then box-averaged
(each output pixel the mean of scale x scale input pixels) before anything else touches it.
Which factor is the preprocessing's choice (the coarsest that still gives the crop its full
input resolution).

Every failure is an `ImageError` whose message says what was wrong in terms a station
integrator can act on.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image

DICOM_MAGIC_OFFSET = 128
SCALES = (1, 2, 4, 8)  # the reductions JPEG decodes in the DCT domain; the others are box-averaged to match


class ImageError(ValueError):
    """A request's image cannot be used; the message names the problem, `reason` is its kind
    (one of core.interface.REFUSAL_REASONS, for the refusal metrics)."""

    def __init__(self, message: str, reason: str = "not_an_image"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What the server accepts, per image (configurable in the preprocessing models' parameters)."""

    max_bytes: int = 64 * 2**20
    max_pixels: int = 50_000_000  # width x height, checked from the header before decoding
    min_side: int = 16

    def to_parameters(self) -> dict[str, str]:
        """The preprocessing models' config parameters that carry these limits."""
        return {
            "max_image_bytes": str(self.max_bytes),
            "max_image_pixels": str(self.max_pixels),
            "min_image_side": str(self.min_side),
        }

    @classmethod
    def from_parameters(cls, parameters: dict) -> Limits:
        """The limits in a model config's parameters (`to_parameters`); a missing one keeps its default."""
        d = cls()
        return cls(
            max_bytes=int(parameters.get("max_image_bytes", d.max_bytes)),
            max_pixels=int(parameters.get("max_image_pixels", d.max_pixels)),
            min_side=int(parameters.get("min_image_side", d.min_side)),
        )


def sniff(data: bytes) -> str | None:
    """The format from the first bytes: png, jpeg, tiff, dicom, or None.

    DICOM first: the standard lets the 128-byte preamble before `DICM` hold anything, and
    some writers put a TIFF header there so that the file also opens as a TIFF."""
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def image_array(im: Image.Image) -> np.ndarray:
    """An opened PIL image as a numpy array (grey stays 2-D, 16-bit stays 16-bit)."""
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, np.uint16)
    if im.mode == "I":
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


def box_reduce(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Each scale x scale block of `pixels` (H, W) or (H, W, C) -> its mean.

    8-bit images by Pillow's `reduce` (rounded to uint8); 16-bit ones in numpy, summed in
    32 bits a row and a column phase at a time, as float32 in 0..1 (a mean of 16-bit
    values has more than 16 bits). A partial block at the right or bottom edge: Pillow
    averages the pixels it has; the 16-bit path repeats the last row and column into it.
    """
    if scale == 1:
        return pixels
    if pixels.dtype == np.uint8:  # grey or RGB (image_array gives no other 8-bit layout)
        return np.asarray(Image.fromarray(pixels).reduce(scale))
    if pixels.dtype != np.uint16:
        raise TypeError(f"box_reduce takes uint8 or uint16 pixels, got {pixels.dtype}")
    h, w = pixels.shape[:2]
    ph, pw = -h % scale, -w % scale
    if ph or pw:  # a partial block at the edge: repeat the last row and column into it
        pixels = np.pad(pixels, ((0, ph), (0, pw)) + ((0, 0),) * (pixels.ndim - 2), mode="edge")
    rows = pixels[0::scale].astype(np.uint32)
    for i in range(1, scale):
        rows += pixels[i::scale]
    out = rows[:, 0::scale].copy()
    for j in range(1, scale):
        out += rows[:, j::scale]
    return out.astype(np.float32) * np.float32(1.0 / (scale * scale * 65535))


class Decoded:
    """An image decoded at 1/scale of its size: pixel (i, j) stands for the original's
    rows [i*scale, (i+1)*scale) and columns [j*scale, (j+1)*scale).

    `image` is the Pillow image where the decoder gave one that needs nothing more (8-bit grey
    or RGB), so that resampling a crop of it needs no copy into numpy; `pixels` is the numpy
    array, made on first use."""

    def __init__(
        self, scale: int, width: int, height: int, pixels: np.ndarray | None = None, image: Image.Image | None = None
    ):
        self.scale, self.width, self.height = scale, width, height  # width, height: of the original image
        self.image = image
        self._pixels = pixels

    @property
    def pixels(self) -> np.ndarray:
        """(h, w) grey or (h, w, 3) colour: uint8, uint16, or float32 in 0..1 after a 16-bit box reduction."""
        if self._pixels is None:
            self._pixels = image_array(self.image)
        return self._pixels


class Source:
    """An encoded image whose header has been read and checked; `decode(scale)` decodes it.

    A JPEG is decoded anew at each scale asked for (in the DCT domain); the other formats are
    decoded whole once and reduced from that."""

    def __init__(self, data: bytes, kind: str, what: str, limits: Limits):
        self.data, self.kind, self.what = data, kind, what
        self._pixels: np.ndarray | None = None
        if kind == "dicom":
            self._dicom = _read_dicom(data, limits, what)
            self.width, self.height = int(self._dicom.Columns), int(self._dicom.Rows)
        else:
            with _pil_errors(what):
                im = Image.open(io.BytesIO(data))
                _check_size(im.width, im.height, limits, what)
                if getattr(im, "n_frames", 1) > 1:
                    raise ImageError(f"{what} has {im.n_frames} frames; send one slice per request", "multi_frame")
                self.width, self.height = im.width, im.height

    def decode(self, scale: int = 1) -> Decoded:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale}")
        if self.kind == "dicom":
            if self._pixels is None:
                self._pixels = _dicom_pixels(self._dicom, self.what)
            return Decoded(scale, self.width, self.height, pixels=box_reduce(self._pixels, scale))
        if self.kind != "jpeg":
            return Decoded(scale, self.width, self.height, pixels=box_reduce(self._full(), scale))
        with _pil_errors(self.what):
            im = Image.open(io.BytesIO(self.data))
            if scale > 1 and im.mode in ("L", "RGB"):
                im.draft(im.mode, (-(-im.width // scale), -(-im.height // scale)))
            im.load()
            got = -(-self.width // im.width)
            if got == scale and im.mode in ("L", "RGB"):
                return Decoded(scale, self.width, self.height, image=im)
            pixels = image_array(im)
        # a JPEG libjpeg would not scale (e.g. CMYK): reduce what it gave
        return Decoded(scale, self.width, self.height, pixels=box_reduce(pixels, scale // got))

    def _full(self) -> np.ndarray:
        """PNG, TIFF: decoded whole once (they have no cheaper way), reduced as often as asked."""
        if self._pixels is None:
            with _pil_errors(self.what):
                im = Image.open(io.BytesIO(self.data))
                im.load()
                self._pixels = image_array(im)
        return self._pixels


def scale_for(window: float, size: int) -> int:
    """The largest of SCALES at which `window` original pixels still span at least `size`
    decoded pixels (1 when even the full resolution has fewer)."""
    return max([s for s in SCALES if window / s >= size] or [1])


def open_ct(data: bytes, limits: Limits = Limits()) -> Source:
    """An encoded CT slice, checked (size, format, header), ready to decode at any scale."""
    what = "CT_IMAGE"
    _check_bytes(data, limits, what)
    kind = sniff(data)
    if kind is None:
        raise ImageError(f"{what} is not a PNG, JPEG, TIFF or DICOM image (first bytes {_first_bytes(data)})")
    return Source(data, kind, what, limits)


def open_rgb(data: bytes, limits: Limits = Limits()) -> Source:
    """An encoded photo, checked, ready to decode at any scale."""
    what = "RGB_IMAGE"
    _check_bytes(data, limits, what)
    kind = sniff(data)
    if kind not in ("png", "jpeg"):
        raise ImageError(f"{what} is not a PNG or JPEG image (first bytes {_first_bytes(data)})")
    return Source(data, kind, what, limits)


def decode_ct(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """An encoded CT slice at full resolution -> 2-D uint8/uint16 array (or (H, W, 3) for a colour file)."""
    return open_ct(data, limits).decode(1).pixels


def decode_rgb(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """An encoded photo at full resolution -> (H, W, 3) uint8."""
    return rgb_pixels(open_rgb(data, limits).decode(1).pixels)


def rgb_pixels(pixels: np.ndarray) -> np.ndarray:
    """Decoded photo pixels -> (H, W, 3): a grey photo gets three equal channels, 16 bits become 8."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.dtype == np.uint16:
        pixels = (pixels.astype(np.float32) / 257.0).round().astype(np.uint8)
    return pixels


# ------------------------------------------------------------------------------- internals


def _first_bytes(data: bytes) -> str:
    return " ".join(f"0x{b:02x}" for b in data[:8]) or "nothing"


def _check_size(width: int, height: int, limits: Limits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}", "too_large"
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"{what} is {width}x{height}; both sides must be at least {limits.min_side} pixels", "too_small"
        )


def _check_bytes(data: bytes, limits: Limits, what: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{what} must be bytes, got {type(data).__name__}", "not_bytes")
    if len(data) == 0:
        raise ImageError(f"{what} is empty", "empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes, over the limit of {limits.max_bytes}", "too_large")


class _pil_errors:
    """Pillow's exceptions (truncated or corrupt data, decompression bombs) as ImageError."""

    def __init__(self, what: str):
        self.what = what
        self._warnings = warnings.catch_warnings()

    def __enter__(self):
        self._warnings.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, kind, e, tb):
        self._warnings.__exit__(kind, e, tb)
        if e is None or isinstance(e, ImageError):
            return False
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ImageError(f"{self.what} is too large to decode safely: {e}", "too_large") from None
        if isinstance(e, Exception):  # PIL raises OSError, SyntaxError, ValueError...
            raise ImageError(f"{self.what} could not be decoded ({type(e).__name__}: {_stable(e)})") from None
        return False


_OBJECT_AT = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _stable(e: Exception) -> str:
    """The library's message without the memory addresses it prints (`<_io.BytesIO object at 0x7f...>`),
    so the same bad file gets the same message every time."""
    return " ".join(_OBJECT_AT.sub("", str(e)).split())


def _read_dicom(data: bytes, limits: Limits, what: str):

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise ImageError(f"{what} is not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ImageError(f"{what} is a DICOM file without pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(cols, rows, limits, what)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageError(
            f"{what} is a multi-frame DICOM ({ds.NumberOfFrames} frames); send one slice per request", "multi_frame"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(
            f"{what} is a DICOM with {ds.SamplesPerPixel} samples per pixel; a CT slice must be monochrome",
            "not_monochrome",
        )
    return ds


def _dicom_pixels(ds, what: str) -> np.ndarray:
    """The slice's stored values as uint8 (8 bits stored) or uint16 (more: scaled to fill 16 bits,
    as a 16-bit TIFF would), signed storage shifted to unsigned keeping the order, MONOCHROME1 inverted."""
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ImageError(f"{what}: DICOM pixel data could not be decoded ({type(e).__name__}: {e})") from None
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    work = np.int32 if bits < 32 else np.int64
    if pixels.dtype.kind == "i":
        pixels = pixels.astype(work) + (1 << (bits - 1))
    top = (1 << bits) - 1
    if pixels.dtype.kind != "u" or pixels.max() > top:  # out-of-range values (padding) clipped, as the bits say
        pixels = np.clip(pixels.astype(work), 0, top)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":  # bright means low: invert
        pixels = top - pixels.astype(work)
    if bits <= 8:
        return (pixels.astype(np.uint16) << (8 - bits)).astype(np.uint8)
    return (pixels.astype(np.uint16) << (16 - bits)) if bits < 16 else pixels.astype(np.uint16, copy=False)
