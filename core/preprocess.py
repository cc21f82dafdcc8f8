"""The one preprocessing of the project: decode at the needed scale, crop to the battery,
resize, normalise.

Training, evaluation and the server's preprocessing models all call `encoded_ct_input` and
`encoded_rgb_input` on the encoded file, so a model always sees at serving time exactly the
pixels it saw in training.

- Decoding: the image is decoded reduced (`core.decode`: JPEG in the DCT domain, other
  formats box-averaged) by the coarsest factor that still gives the crop its full input
  resolution. The first decode's factor assumes the battery spans a usual share of the
  image (`CT_CROP_SHARE`, `RGB_CROP_SHARE`); if the crop found turns out smaller, the image
  is decoded once more, finer. The battery search runs on a small copy of that decode, and
  only the crop is resampled to the input size.

- CT: find the battery in the slice (the reconstruction around it is near black), take a
  square crop around it with a margin (padding with black), resize to `size`, normalise.
- RGB: find the cell on the bench (where the hue differs from the scene's, or sharp
  brightness edges outline it), crop its box with a margin and stretch it to `size` x
  `size`; values stay in 0..1, which is what the autoencoder reconstructs.

Each function also returns the `Crop` it used, to map label polygons into model input
coordinates and heatmaps back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.decode import ImageError, Limits, Source, open_ct, open_rgb, rgb_pixels, scale_for

# Normalisation constants (stored in checkpoints; these are the defaults).
CT_MEAN, CT_STD = 0.2, 0.25
CROP_MARGIN = 0.06
# The share of the image's shorter side a battery's crop is assumed to span when the first
# decode's scale is chosen (synthetic data, 120 slices and 40 photos: CT square crops span
# 0.36-0.86 of the slice, median 0.67; photo crops 0.24-0.87 of the shorter side, median
# 0.66). A crop found smaller costs a second, finer decode; only a JPEG pays for that (the
# other formats are decoded whole once). CT: the least share seen, as a second decode of a
# 4000-px JPEG costs about 18 ms whatever the scale (entropy decoding). Photos: a little above
# the least (a 1920 x 1080 JPEG decodes in 2-5 ms); measured over the decode benchmark's
# photos, 0.3 gave the lowest medians at both 128 and 256 px of the shares 0.24-0.5.
CT_CROP_SHARE = 0.35
RGB_CROP_SHARE = 0.3


@dataclass(frozen=True)
class Crop:
    """A window of the source image (x0, y0 may be negative: padded), resampled to the input.

    CT crops are square (the slice keeps its geometry); RGB crops hug the battery and are
    stretched to the square input, so the autoencoder spends its pixels on the battery
    rather than on the bench.
    """

    x0: float
    y0: float
    width: float
    height: float

    @property
    def side(self) -> float:
        return max(self.width, self.height)

    def to_input(self, points, size: int) -> np.ndarray:
        """Map (N, 2) source pixel coordinates into a size x size model input."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        return (pts - [self.x0, self.y0]) * [size / self.width, size / self.height]

    def as_list(self) -> list[float]:
        return [float(self.x0), float(self.y0), float(self.width), float(self.height)]

    def scaled(self, factor: float) -> Crop:
        """The same window in the pixels of the image enlarged by `factor`."""
        return Crop(self.x0 * factor, self.y0 * factor, self.width * factor, self.height * factor)


def to_unit(image: np.ndarray) -> np.ndarray:
    """Scale an 8- or 16-bit (or float) image to float32 0..1."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise TypeError(f"unsupported image dtype {image.dtype}")


def _square_around(box: tuple[int, int, int, int], margin: float) -> Crop:
    x0, y0, x1, y1 = box
    side = max(max(x1 - x0, y1 - y0) * (1 + 2 * margin), 8.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Crop(cx - side / 2, cy - side / 2, side, side)


def _rect_around(box: tuple[int, int, int, int], margin: float) -> Crop:
    x0, y0, x1, y1 = box
    w, h = max((x1 - x0) * (1 + 2 * margin), 8.0), max((y1 - y0) * (1 + 2 * margin), 8.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Crop(cx - w / 2, cy - h / 2, w, h)


def _box(crop: Crop) -> tuple[int, int, int, int]:
    """The whole pixels the crop window covers: (x0, y0, x1, y1), x1 and y1 exclusive."""
    x0, y0 = int(np.floor(crop.x0)), int(np.floor(crop.y0))
    return x0, y0, x0 + int(np.ceil(crop.width)), y0 + int(np.ceil(crop.height))


def _inside(crop: Crop, width: int, height: int) -> bool:
    x0, y0, x1, y1 = _box(crop)
    return x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height


def _resized(image: Image.Image, box, size: int) -> np.ndarray:
    """An 8-bit RGB Pillow image's box resampled to (3, size, size) float32 in 0..1."""
    out = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
    return np.ascontiguousarray(out.transpose(2, 0, 1), np.float32) * np.float32(1 / 255)


def _cut(image: np.ndarray, crop: Crop, size: int, pad: str = "zero") -> np.ndarray:
    """Resample the crop window to (size, size) float32 in 0..1, or (channels, size, size) for a
    colour image (anti-aliased bilinear).

    `image` is uint8, uint16 or float 0..1; only the window is converted. Outside the image the
    window is padded with zeros (`pad="zero"`: CT, where it is air) or with the nearest edge
    pixel (`pad="edge"`: photos, where black bars would be a feature of the crop rather than
    of the battery). An 8-bit photo is resampled by Pillow in 8 bits, all channels in one
    call (most of the time the RGB path spends here at line size otherwise).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _box(crop)
    cw, ch = x1 - x0, y1 - y0
    if _inside(crop, w, h):
        window, box = image, (x0, y0, x1, y1)  # inside: no copy, the resampler reads the box
    elif pad == "edge":  # the part inside, edge pixels repeated out to the window (a crop always overlaps its image)
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y0 + ch, h), min(x0 + cw, w)
        if bottom <= top or right <= left:
            raise ValueError(f"crop {crop} lies outside the {w}x{h} image")
        sides = ((top - y0, y0 + ch - bottom), (left - x0, x0 + cw - right)) + ((0, 0),) * (image.ndim - 2)
        window, box = np.pad(image[top:bottom, left:right], sides, mode="edge"), (0, 0, cw, ch)
    else:
        window = np.zeros((ch, cw, *image.shape[2:]), image.dtype)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + cw, w), min(y0 + ch, h)
        if sx1 > sx0 and sy1 > sy0:
            window[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        box = (0, 0, cw, ch)
    if window.ndim == 3 and window.dtype == np.uint8:
        return _resized(Image.fromarray(np.ascontiguousarray(window[..., :3])), box, size)
    bx0, by0, bx1, by1 = box
    region = to_unit(window[by0:by1, bx0:bx1])
    if region.ndim == 2:
        return np.asarray(Image.fromarray(region, mode="F").resize((size, size), Image.BILINEAR), np.float32)
    out = np.empty((region.shape[2], size, size), np.float32)  # channels first, as the networks take them
    for c in range(region.shape[2]):
        out[c] = Image.fromarray(np.ascontiguousarray(region[..., c]), mode="F").resize((size, size), Image.BILINEAR)
    return out


def _box_of(mask: np.ndarray, min_fraction: float) -> tuple[int, int, int, int] | None:
    """Bounding box of the rows and columns where the mask is dense enough (ignores specks)."""
    rows = np.nonzero(mask.mean(axis=1) >= min_fraction)[0]
    cols = np.nonzero(mask.mean(axis=0) >= min_fraction)[0]
    if len(rows) == 0 or len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _box_facts(mask: np.ndarray, box: tuple[int, int, int, int] | None) -> dict[str, float] | None:
    """What the battery search saw, free of the image's size (None: nothing found):

    span    the box's longer side over the image's shorter side
    aspect  log of the box's width over its height
    offset  the box centre's distance from the image centre, in half-sides (0 centred, 1 at the edge)
    edge    the share of the box's four sides that lie on the image's border (a battery cut off)
    fill    the share of the box the object covers (a solid cell against scattered texture)
    """
    if box is None:
        return None
    h, w = mask.shape
    x0, y0, x1, y1 = box
    bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
    return {
        "span": max(bw, bh) / min(h, w),
        "aspect": float(np.log(bw / bh)),
        "offset": max(abs((x0 + x1) / 2 - w / 2) / (w / 2), abs((y0 + y1) / 2 - h / 2) / (h / 2)),
        "edge": ((x0 <= 0) + (y0 <= 0) + (x1 >= w) + (y1 >= h)) / 4,
        "fill": float(mask[y0:y1, x0:x1].mean()),
    }


def _search_ct(gray: np.ndarray) -> tuple[tuple[int, int, int, int], dict[str, float] | None]:
    """(battery box in the slice's pixels, the search's facts) of a CT slice."""
    step = max(1, max(gray.shape) // 256)  # search on a small copy: fast on 4000-px slices
    small = to_unit(gray[::step, ::step])
    smooth = ndimage.uniform_filter(small, 3)
    mask = smooth > max(0.08, 0.25 * float(np.percentile(smooth, 99.5)))
    box = _box_of(mask, 0.02)
    facts = _box_facts(mask, box)
    if box is None:
        return (0, 0, gray.shape[1], gray.shape[0]), facts
    x0, y0, x1, y1 = box
    return (x0 * step, y0 * step, min(x1 * step, gray.shape[1]), min(y1 * step, gray.shape[0])), facts


def find_battery_ct(gray: np.ndarray) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of the battery in a CT slice (uint8, uint16 or float 0..1)."""
    return _search_ct(gray)[0]


FRAME_FACTS = ("span", "aspect", "offset", "edge", "fill")
# each fact in words: the sentence and how its value reads (aspect as the width to height ratio)
FRAME_WORDS = {
    "span": ("the battery spans {} of the frame", "{:.0%}"),
    "aspect": ("the battery's box has a width to height ratio of {}", "{:.2f}"),
    "offset": ("the battery sits {} of the way from the centre to the edge", "{:.0%}"),
    "edge": ("the battery touches {} of the frame's sides", "{:.0%}"),
    "fill": ("the object fills {} of its box", "{:.0%}"),
}


# facts that move in steps widen their range by at least one step: `edge` counts the box's sides on
# the border in quarters, so one more side than training ever had is no more unusual than the others
FRAME_STEPS = {"edge": 0.25}
# each fact's spread over the training images, kept with the frame: its 1st percentile, median and
# 99th percentile (the units the gate's calibration measures a placement in, training/conformal.py)
SPREAD_QUANTILES = (0.01, 0.5, 0.99)


def fit_frame(facts: list[dict[str, float] | None], margin: float = 0.25) -> dict:
    """The range of each search fact over images of the training data, widened on each side by
    `margin` of its width (at least one step for a fact that moves in steps): what the
    preprocessing accepts as a battery placed as the model knows it, until the gate's calibration
    (training/conformal.py) sets the ranges from held-out images. Also each fact's `spread` (1st
    percentile, median, 99th percentile). Stored with the model (`frame` in the checkpoint and the
    serving facts)."""
    seen = [f for f in facts if f is not None]
    if not seen:
        raise ValueError("no image of the training data had a battery found in it")
    ranges, spread = {}, {}
    for name in FRAME_FACTS:
        v = np.array([f[name] for f in seen], np.float64)
        lo, hi = float(v.min()), float(v.max())
        pad = max(margin * max(hi - lo, 1e-3), FRAME_STEPS.get(name, 0.0))
        ranges[name] = [lo - pad, hi + pad]
        spread[name] = [float(q) for q in np.quantile(v, SPREAD_QUANTILES)]
    return {
        "ranges": ranges,
        "margin": margin,
        "spread": spread,
        "fitted_on": len(seen),
        "missed": len(facts) - len(seen),
    }


def check_frame(facts: dict[str, float] | None, frame: dict | None, what: str) -> None:
    """Raise ImageError when the battery search found nothing, or found it where no training image
    had it (`frame` from `fit_frame`; None checks nothing)."""
    if not frame:
        return
    if facts is None:
        raise ImageError(
            f"{what}: no battery found in the image (an empty station, or not a battery cell)", "no_battery"
        )
    for name, (lo, hi) in frame["ranges"].items():
        v = facts[name]
        if not lo <= v <= hi:
            sentence, number = FRAME_WORDS[name]
            value, lo, hi = np.exp([v, lo, hi]) if name == "aspect" else (v, max(lo, 0.0), hi)
            raise ImageError(
                f"{what}: not inspectable as placed: {sentence.format(number.format(value))}, where the model "
                f"knows {number.format(lo)}-{number.format(hi)} (not a battery cell, cut off, or another set-up "
                "than training)",
                "placement",
            )


def _ct_grey(image: np.ndarray) -> np.ndarray:
    """A decoded CT slice as a 2-D grey image (its own dtype: converted to 0..1 only where used)."""
    if image.ndim == 3:  # a CT saved as RGB: take the luminance
        image = image[..., :3].mean(axis=2).astype(image.dtype)
    if image.ndim != 2:
        raise ValueError(f"a CT slice must be a 2-D grey image, got shape {image.shape}")
    return image


def ct_input(image: np.ndarray, size: int, mean: float = CT_MEAN, std: float = CT_STD) -> tuple[np.ndarray, Crop]:
    """A CT slice already decoded (H, W) of uint8/uint16/float -> model input (1, size, size)
    float32, and its crop. Files and requests go through `encoded_ct_input`."""
    gray = _ct_grey(image)
    crop = _square_around(find_battery_ct(gray), CROP_MARGIN)
    x = (_cut(gray, crop, size) - mean) / std  # float32 throughout
    return x[None].astype(np.float32, copy=False), crop


def _not_blank(image: np.ndarray, what: str) -> np.ndarray:
    """Refuse an image whose pixels are all equal (a dark frame, a saturated sensor, a failed
    reconstruction): the models would answer it, but about nothing."""
    low, high = image.min(), image.max()
    if low == high:
        value = low if image.dtype.kind in "ui" else round(float(low) * 255)  # a box-reduced 16-bit image is 0..1
        raise ImageError(
            f"{what} is blank: every pixel is {value} (a camera or reconstruction fault); nothing to inspect",
            "blank",
        )
    return image


def _decode_for(source: Source, share: float, size: int, locate, to_pixels):
    """(decoded image, crop in the original's pixels): decoded at the coarsest scale that
    gives the crop `locate` finds (on `to_pixels` of the first decode) at least `size` pixels
    a side, on the first try if the crop spans `share` of the shorter side or more, else on
    a second, finer decode."""
    decoded = source.decode(scale_for(min(source.width, source.height) * share, size))
    crop = locate(to_pixels(_not_blank(decoded.pixels, source.what))).scaled(decoded.scale)
    finer = scale_for(min(crop.width, crop.height), size)
    if finer < decoded.scale:
        decoded = source.decode(finer)
    return decoded, crop


def encoded_ct_input(
    data: bytes,
    size: int,
    mean: float = CT_MEAN,
    std: float = CT_STD,
    limits: Limits = Limits(),
    frame: dict | None = None,
    facts_out: list | None = None,
) -> tuple[np.ndarray, Crop]:
    """An encoded CT slice (PNG, JPEG, 8/16-bit TIFF, DICOM) -> model input (1, size, size)
    float32, normalised, and its crop in the slice's own pixels. Raises ImageError, also when
    `frame` (the model's `fit_frame` ranges) refuses what the battery search saw; `facts_out`,
    a list, receives those facts."""
    seen = []

    def locate(gray):
        box, facts = _search_ct(gray)
        seen.append(facts)
        return _square_around(box, CROP_MARGIN)

    decoded, crop = _decode_for(open_ct(data, limits), CT_CROP_SHARE, size, locate, _ct_grey)
    if facts_out is not None:
        facts_out.append(seen[0])
    check_frame(seen[0], frame, "CT slice")
    x = (_cut(_ct_grey(decoded.pixels), crop.scaled(1 / decoded.scale), size) - mean) / std
    return x[None].astype(np.float32, copy=False), crop


EDGE_THRESHOLD = 0.3  # Sobel magnitude of log-brightness that counts as an outline
DARK_OFFSET = 0.06  # added before log and ratios: sensor noise in dark corners is neither hue nor edge
HORIZON_FRACTION = 0.5  # a row with more edge pixels than this is the wall/bench horizon
PIECE_FRACTION = 0.2  # pieces with at least this share of the largest piece's pixels belong to the object


def _grow(mask: np.ndarray, times: int) -> np.ndarray:
    """`ndimage.binary_dilation(mask, iterations=times)` (4-neighbour cross), by array shifts.

    The same pixels (tested against scipy), several times faster on a photo-sized mask.
    """
    for _ in range(times):
        out = mask.copy()
        out[1:] |= mask[:-1]
        out[:-1] |= mask[1:]
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
        mask = out
    return mask


def _shrink(mask: np.ndarray, times: int) -> np.ndarray:
    """`ndimage.binary_erosion(mask, iterations=times)` (cross, outside the image counts as empty)."""
    for _ in range(times):
        out = mask.copy()
        out[[0, -1]] = False
        out[:, [0, -1]] = False
        out[1:] &= mask[:-1]
        out[:-1] &= mask[1:]
        out[:, 1:] &= mask[:, :-1]
        out[:, :-1] &= mask[:, 1:]
        mask = out
    return mask


def find_object_rgb(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Box of the battery in a bench photo (H, W, 3) of uint8 or float 0..1 (`_search_rgb`)."""
    return _search_rgb(rgb)[0]


def _search_rgb(rgb: np.ndarray) -> tuple[tuple[int, int, int, int], dict[str, float] | None]:
    """(box of the battery in a bench photo (H, W, 3) of uint8 or float 0..1, the search's facts).

    Bench and wall share one colour under smoothly varying light (fall-off, vignetting,
    soft shadows change brightness, not hue), so the object is what differs in hue from
    the scene's median, or, grey on grey, what is outlined by sharp brightness edges. A
    grey box on a grey bench breaks up into pieces (an outline with gaps, a label, bolts,
    terminals): every piece of a comparable size is kept, so a high-contrast label does
    not win over the faint outline around it. Rows that are mostly edge are the horizon
    between wall and bench.

    Computed one colour plane at a time (contiguous memory) with the morphology done by
    array shifts: the same boxes, bit for bit, as the interleaved scipy formulation, in
    about 60% of its time (this is most of the server's RGB preprocessing).
    """
    step = max(1, max(rgb.shape[:2]) // 320)
    small = to_unit(np.ascontiguousarray(rgb[::step, ::step, :3]))
    planes = [ndimage.uniform_filter(small[..., c], 3) + DARK_OFFSET for c in range(3)]
    lum = (planes[0] + planes[1] + planes[2]) / np.float32(3)  # = mean over the channels, the same sums
    hue = None  # per pixel: sum over channels of |chroma - the scene's median chroma|
    for plane in planes:
        chroma = plane / lum
        off = np.abs(chroma - np.median(chroma))
        hue = off if hue is None else hue + off
    hue_off = _grow(_shrink(hue > 0.25, 2), 2)  # binary opening: drop specks
    log_lum = np.log(lum)
    edges = np.hypot(ndimage.sobel(log_lum, 0), ndimage.sobel(log_lum, 1)) > EDGE_THRESHOLD
    edges[ndimage.binary_dilation(edges.mean(axis=1) > HORIZON_FRACTION)] = False  # the horizon and its rim
    mask = hue_off | edges
    labels, n = ndimage.label(_grow(mask, 4))  # nearby pieces join
    if n == 0:
        return (0, 0, rgb.shape[1], rgb.shape[0]), None
    sizes = np.bincount(labels.ravel(), weights=mask.ravel(), minlength=n + 1)  # mask pixels per piece
    keep = sizes >= PIECE_FRACTION * sizes[1:].max()
    keep[0] = False  # the background
    kept = keep[labels] & mask
    ys, xs = np.nonzero(kept)
    h, w = rgb.shape[:2]
    facts = _box_facts(
        _grow(kept, 4), (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    )  # fill: of the pieces as they join
    return (
        int(xs.min() * step),
        int(ys.min() * step),
        min(int(xs.max() + 1) * step, w),
        min(int(ys.max() + 1) * step, h),
    ), facts


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"an RGB photo must be (H, W, 3), got shape {image.shape}")
    return image


def rgb_input(image: np.ndarray, size: int) -> tuple[np.ndarray, Crop]:
    """An RGB photo already decoded (H, W, 3) uint8 -> model input (3, size, size) float32 in
    0..1, and its crop. Files and requests go through `encoded_rgb_input`."""
    rgb = _rgb(image)
    crop = _rect_around(find_object_rgb(rgb), CROP_MARGIN)
    x = _cut(rgb, crop, size, pad="edge")
    return np.clip(x, 0.0, 1.0, out=x), crop


def encoded_rgb_input(
    data: bytes, size: int, limits: Limits = Limits(), frame: dict | None = None, facts_out: list | None = None
) -> tuple[np.ndarray, Crop]:
    """An encoded photo (PNG, JPEG) -> model input (3, size, size) float32 in 0..1, and its crop
    in the photo's own pixels. Raises ImageError, also when `frame` refuses what the search saw."""
    seen = []

    def locate(im):
        box, facts = _search_rgb(im)
        seen.append(facts)
        return _rect_around(box, CROP_MARGIN)

    decoded, crop = _decode_for(open_rgb(data, limits), RGB_CROP_SHARE, size, locate, lambda p: _rgb(rgb_pixels(p)))
    if facts_out is not None:
        facts_out.append(seen[0])
    check_frame(seen[0], frame, "photo")
    window = crop.scaled(1 / decoded.scale)
    if (
        decoded.image is not None
        and decoded.image.mode == "RGB"
        and _inside(window, decoded.image.width, decoded.image.height)
    ):
        x = _resized(decoded.image, _box(window), size)  # straight from the decoder's image: no copy of the whole photo
    else:
        x = _cut(_rgb(rgb_pixels(decoded.pixels)), window, size, pad="edge")
    return np.clip(x, 0.0, 1.0, out=x), crop


def polygon_mask_in_input(points, crop: Crop, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a label polygon in model-input coordinates."""

    canvas = Image.new("L", (size, size), 0)
    xy = [tuple(p) for p in crop.to_input(points, size)]
    if len(xy) >= 3:
        ImageDraw.Draw(canvas).polygon(xy, fill=1)
    return np.asarray(canvas, bool)
