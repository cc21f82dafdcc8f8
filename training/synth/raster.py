"""Drawing primitives shared by the CT and RGB renderers.

Everything works on float32 numpy arrays in pixel coordinates (x to the right, y down).
Shapes are drawn from the same integer polygons that are written to the label JSON, so
a label outlines exactly what was drawn.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SUPERSAMPLE = 4


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length `sigma` pixels.

    Computed at a reduced resolution and upsampled when sigma is large, which keeps it
    cheap on full-HD frames without changing its look.
    """
    h, w = shape
    step = max(1, int(sigma // 4))
    small = rng.standard_normal((h // step + 2, w // step + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / step, mode="wrap")
    if step > 1:
        small = ndimage.zoom(small, step, order=1)
    field = small[:h, :w]
    std = float(field.std()) or 1.0
    return (field - field.mean()) / std


def blob_polygon(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    aspect: float = 1.0,
    angle: float = 0.0,
    roughness: float = 0.25,
    n_vertices: int | None = None,
) -> np.ndarray:
    """An irregular closed outline around `center`: a radius modulated by random harmonics.

    Returns an (N, 2) float array. `roughness` 0 gives an ellipse; 0.5 is amorphous.
    """
    if n_vertices is None:
        n_vertices = int(np.clip(radius * 1.5, 8, 48))
    theta = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += roughness / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.35, None) * radius
    x = r * np.cos(theta) * aspect
    y = r * np.sin(theta)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y], axis=1)


def polyline_outline(points: np.ndarray, width: float) -> np.ndarray:
    """The closed outline of a polyline drawn `width` pixels wide (for scratches)."""
    d = np.gradient(points, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) * (width / 2.0)
    return np.concatenate([points + normal, (points - normal)[::-1]], axis=0)


def to_int_polygon(poly: np.ndarray, shape) -> np.ndarray:
    """Round to integer pixels inside the frame: what a label file stores."""
    h, w = shape
    out = np.rint(poly).astype(np.int64)
    out[:, 0] = np.clip(out[:, 0], 0, w - 1)
    out[:, 1] = np.clip(out[:, 1], 0, h - 1)
    return out


def flat(poly: np.ndarray) -> list[int]:
    """[x1, y1, x2, y2, ...] as in AI Hub label JSON."""
    return [int(v) for v in poly.reshape(-1)]


def polygon_coverage(poly: np.ndarray, shape) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage (0..1) of a polygon, computed only over its bounding box.

    Returns the (rows, cols) slices of that box and the coverage patch.
    """
    h, w = shape
    x0 = int(max(np.floor(poly[:, 0].min()) - 1, 0))
    y0 = int(max(np.floor(poly[:, 1].min()) - 1, 0))
    x1 = int(min(np.ceil(poly[:, 0].max()) + 2, w))
    y1 = int(min(np.ceil(poly[:, 1].max()) + 2, h))
    if x1 <= x0 or y1 <= y0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    # Pixel centres sit at integer coordinates, so pixel (i, j) spans [i-0.5, i+0.5).
    pts = [((px - x0 + 0.5) * s, (py - y0 + 0.5) * s) for px, py in poly]
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    cov = canvas.resize((x1 - x0, y1 - y0), Image.BOX)
    return (slice(y0, y1), slice(x0, x1)), np.asarray(cov, np.float32) / 255.0


def polygon_mask(poly: np.ndarray, shape) -> np.ndarray:
    """Full-frame boolean mask of the pixels whose centre lies inside the polygon."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in poly], fill=1)
    return np.asarray(canvas, bool)


def paint(target: np.ndarray, poly: np.ndarray, value) -> np.ndarray:
    """Composite `value` (scalar, or full-frame array) into `target` under a polygon.

    Returns the full-frame coverage of the polygon (useful for later effects).
    """
    box, cov = polygon_coverage(poly, target.shape[:2])
    full = np.zeros(target.shape[:2], np.float32)
    if cov.size == 0:
        return full
    full[box] = cov
    v = value[box] if isinstance(value, np.ndarray) and value.shape[:2] == target.shape[:2] else value
    c = cov if target.ndim == 2 else cov[..., None]
    target[box] = target[box] * (1.0 - c) + c * v
    return full


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def rect_coverage(shape, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Anti-aliased coverage of an axis-aligned rectangle, analytically (no rasterising)."""
    h, w = shape
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    cx = np.clip(np.minimum(xs + 0.5, x1) - np.maximum(xs - 0.5, x0), 0, 1)
    cy = np.clip(np.minimum(ys + 0.5, y1) - np.maximum(ys - 0.5, y0), 0, 1)
    return cy[:, None] * cx[None, :]


def disc_coverage(shape, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage of a disc (distance-based, one pixel of soft edge)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return np.clip(r - d + 0.5, 0, 1)


def circle_polygon(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
