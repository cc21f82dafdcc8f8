"""Overlays of the heatmaps on the images the models saw, with the hot regions boxed.

- CT: Grad-CAM (0..1) in a colour map over the grey slice; every connected region at or
  above the threshold gets a box.
- RGB: the autoencoder's per-pixel error over the photo, the contour where the error
  reaches the threshold (by default the service's score threshold: the score is the mean
  of the highest errors, so pixels above it are what pushed the cell over) and a box
  around each such region.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from client.explain.case import Box

MIN_SIDE = 256  # overlays smaller than this are enlarged (nearest) so a reviewer can see them
BOX_COLOUR = (0, 255, 0)
CONTOUR_COLOUR = (0, 255, 255)
LABEL_COLOUR = (255, 255, 255)  # a labelled defect's outline: white, apart from the green boxes and cyan contour


def hot_regions(heat: np.ndarray, threshold: float, min_area: int = 4, max_regions: int = 8) -> list[Box]:
    """Connected regions where heat >= threshold, largest peak first."""
    mask = np.asarray(heat) >= threshold
    labels, n = ndimage.label(mask)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        area = int((labels[sl] == i).sum())
        if area < min_area:
            continue
        peak = float(heat[sl][labels[sl] == i].max())
        boxes.append(Box(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, area, peak))
    return sorted(boxes, key=lambda b: -b.peak)[:max_regions]


def _rgb8(image: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(image, np.float32), 0, 1)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    return (x * 255 + 0.5).astype(np.uint8)


def _blend(image: np.ndarray, heat: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    colours = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    base = np.clip(np.asarray(image, np.float32), 0, 1)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    return _rgb8((1 - alpha) * base + alpha * colours)


def _scale(im: Image.Image) -> tuple[Image.Image, float]:
    factor = max(1, int(np.ceil(MIN_SIDE / max(im.size))))
    return (im.resize((im.width * factor, im.height * factor), Image.NEAREST) if factor > 1 else im), factor


def _draw_boxes(im: Image.Image, boxes: list[Box], factor: float, colour=BOX_COLOUR) -> None:
    draw = ImageDraw.Draw(im)
    width = max(2, im.width // 200)
    for b in boxes:
        draw.rectangle(
            [b.x0 * factor, b.y0 * factor, b.x1 * factor - 1, b.y1 * factor - 1], outline=colour, width=width
        )
        if b.label:
            draw.text((b.x0 * factor + 3, b.y0 * factor + 2), b.label, fill=colour)


def image_png(image: np.ndarray) -> Image.Image:
    """A view (grey or colour, 0..1) as an 8-bit image at reviewing size."""
    return _scale(Image.fromarray(_rgb8(image)))[0]


def cam_overlay(
    image: np.ndarray, cam: np.ndarray, threshold: float = 0.5, alpha: float = 0.45
) -> tuple[Image.Image, list[Box]]:
    """Grad-CAM over the CT view with a box around each region at or above `threshold`."""
    if cam.shape != image.shape[:2]:
        raise ValueError(
            f"the CAM is {cam.shape} but the image is {image.shape[:2]}: they must be at the model's input size"
        )
    boxes = hot_regions(cam, threshold)
    im, factor = _scale(Image.fromarray(_blend(image, cam, alpha, "jet")))
    _draw_boxes(im, boxes, factor)
    return im, boxes


def error_overlay(
    image: np.ndarray, error_map: np.ndarray, threshold: float, alpha: float = 0.45, border: float = 0.0
) -> tuple[Image.Image, list[Box]]:
    """The error map over the RGB view: the contour where error >= threshold and boxes around
    those regions. `border` (a fraction of the side) is left out, as the score leaves it out."""
    if error_map.shape != image.shape[:2]:
        raise ValueError(f"the error map is {error_map.shape} but the image is {image.shape[:2]}")
    emap = np.asarray(error_map, np.float32)
    h, w = emap.shape
    by, bx = int(round(h * border)), int(round(w * border))
    scored = np.zeros_like(emap)
    scored[by : h - by, bx : w - bx] = emap[by : h - by, bx : w - bx]
    boxes = hot_regions(scored, threshold)
    top = max(float(emap.max()), threshold, 1e-12)  # colours relative to the larger of the peak and the threshold
    im, factor = _scale(Image.fromarray(_blend(image, emap / top, alpha, "inferno")))
    mask = scored >= threshold
    edge = mask & ~ndimage.binary_erosion(mask)
    if edge.any():
        pixels = np.asarray(im).copy()
        big = np.kron(edge, np.ones((factor, factor), bool)) if factor > 1 else edge
        pixels[ndimage.binary_dilation(big, iterations=max(1, factor // 2))] = CONTOUR_COLOUR
        im = Image.fromarray(pixels)
    _draw_boxes(im, boxes, factor)
    return im, boxes


def boxes_overlay(image: np.ndarray, boxes: list[Box]) -> Image.Image:
    """Detector boxes (with their labels) over a view."""
    im, factor = _scale(Image.fromarray(_rgb8(image)))
    _draw_boxes(im, boxes, factor, colour=(255, 64, 64))
    return im


def draw_labelled(
    im: Image.Image, polygons: list[tuple[str, list[tuple[float, float]]]], view_size: int
) -> Image.Image:
    """Outline labelled defect polygons (name, points in view pixels) on an overlay of a view of
    `view_size` pixels, each named, so a reviewer sees whether the boxes found them."""
    im = im.copy()
    draw = ImageDraw.Draw(im)
    factor = im.width / view_size
    width = max(2, im.width // 160)
    for name, points in polygons:
        xy = [(x * factor, y * factor) for x, y in points]
        if len(xy) >= 2:
            draw.line([*xy, xy[0]], fill=LABEL_COLOUR, width=width, joint="curve")
            x0, y0 = min(x for x, _ in xy), min(y for _, y in xy)
            draw.text((x0, max(0, y0 - 12)), f"label: {name}", fill=LABEL_COLOUR)
    return im
