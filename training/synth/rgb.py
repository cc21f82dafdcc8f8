"""Synthetic RGB photos of cells and modules on an inspection bench.

A photo is a cylindrical cell, a pouch cell or a module standing on a bench under studio
light, seen from a varied pose (distance, elevation, azimuth) with varied light, position
and wrap or housing colour. Exterior defects are drawn with the polygons that go into the
label JSON:

- `Damaged`: dents (a local dip in the shading), scratches (thin strokes through the
  wrap or paint) and torn wrap (the metal can showing through a jagged tear);
- `Pollution`: stains (a translucent tint with a darker drying rim) and residue (powdery
  specks).

The same spec rendered with `with_defects=False` gives the same photo without defects
(same light, same sensor noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.synth import raster

WRAP_COLOURS = [
    (40, 90, 180),
    (30, 140, 80),
    (190, 40, 40),
    (110, 50, 150),
    (25, 25, 30),
    (20, 140, 150),
    (220, 140, 30),
    (70, 70, 80),
]
BENCH_COLOURS = [(120, 122, 125), (60, 62, 66), (50, 80, 120), (60, 110, 80), (200, 200, 196), (150, 135, 115)]
BENCH_NAMES = ("grey", "dark grey", "blue", "green", "white", "beige")  # of BENCH_COLOURS, in order
HOUSING_COLOURS = [(175, 178, 182), (45, 45, 50), (90, 95, 100), (200, 200, 205)]


@dataclass(frozen=True)
class RGBPhotoSpec:
    battery_id: int
    battery_type: str  # cell | module
    form: str  # pouch | cylindrical
    index: int
    defect_kinds: tuple[str, ...]  # subset of ("Damaged", "Pollution"); empty for a normal photo
    width: int
    height: int
    seed: int

    def rng(self, stream: int) -> np.random.Generator:
        key = (self.battery_id, 100 + self.index, stream)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    def battery_rng(self) -> np.random.Generator:
        """Shared by all photos of a battery: the same wrap colour and proportions."""
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.battery_id, 99)))


@dataclass
class RGBDefect:
    name: str  # "Damaged" | "Pollution"
    kind: str  # dent | scratch | torn_wrap | stain | residue
    polygon: np.ndarray  # (N, 2) int


@dataclass
class RGBPhoto:
    image: np.ndarray  # (H, W, 3) uint8
    defects: list[RGBDefect]
    outline: np.ndarray
    distance: float  # mm
    degree: tuple[float, float]  # elevation, azimuth


class _Photo:
    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.img = np.zeros((h, w, 3), np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.xx, self.yy = xx, yy
        self.body = np.zeros((h, w), np.float32)  # the face defects may sit on
        self.metal = np.array([165, 168, 172], np.float32)


def _bench(ph: _Photo, rng: np.random.Generator, light: tuple[float, float]) -> None:
    h, w = ph.h, ph.w
    colour = np.array(BENCH_COLOURS[rng.integers(len(BENCH_COLOURS))], np.float32) * rng.uniform(0.85, 1.15)
    horizon = rng.uniform(0.12, 0.32) * h
    wall = colour * rng.uniform(0.35, 0.6)
    t = np.clip((ph.yy - horizon) / (h - horizon), 0, 1)[..., None]
    bench = colour * (0.75 + 0.35 * t)
    soft = np.clip((ph.yy - horizon) / (0.01 * h) + 0.5, 0, 1)[..., None]
    ph.img = wall * (1 - soft) + bench * soft
    ph.img *= 1 + 0.015 * raster.smooth_noise(rng, (h, w), 0.006 * w)[..., None]
    lx, ly = light
    d2 = ((ph.xx - lx) ** 2 + (ph.yy - ly) ** 2) / (0.8 * w) ** 2
    ph.img *= (0.7 + 0.5 * np.exp(-d2))[..., None]


def _shadow(ph: _Photo, cx: float, base_y: float, half_w: float, light: tuple[float, float]) -> None:
    """A soft contact shadow on the bench, thrown away from the light."""
    dx = np.clip((cx - light[0]) / ph.w, -0.5, 0.5) * half_w * 1.5
    footprint = raster.polygon_mask(raster.circle_polygon(cx + dx, base_y, half_w * 1.25, 40), (ph.h, ph.w)).astype(
        np.float32
    )
    footprint *= raster.rect_coverage((ph.h, ph.w), 0, base_y - half_w * 0.15, ph.w, ph.h)
    shadow = ndimage.gaussian_filter(footprint, 0.01 * ph.w + 2)
    ph.img *= (1 - 0.45 * shadow)[..., None]


def _cylinder(ph: _Photo, rng, brng, cx, cy, scale, elev, azim, light_dir) -> np.ndarray:
    """A standing cylindrical cell: shaded wrap, print band, metal top cap."""
    h_px = scale * brng.uniform(0.5, 0.62) * ph.h
    ratio = brng.choice([18 / 65, 21 / 70, 46 / 80, 26 / 65])
    r = h_px * ratio / 2
    ry = r * np.sin(np.radians(elev))
    top, bottom = cy - h_px / 2, cy + h_px / 2
    _shadow(ph, cx, bottom, r, (ph.w * (0.5 - 0.5 * np.sin(light_dir)), 0))
    wrap = np.array(WRAP_COLOURS[brng.integers(len(WRAP_COLOURS))], np.float32) * rng.uniform(0.85, 1.1)
    u = np.clip((ph.xx - cx) / r, -1, 1)
    phi = np.arcsin(u)
    diffuse = np.clip(np.cos(phi - light_dir), 0, 1)
    spec = np.exp(-(((phi - light_dir / 2) / 0.12) ** 2)) * rng.uniform(0.25, 0.6)
    shade = (0.3 + 0.7 * diffuse)[..., None]
    colour = wrap * shade + 255 * spec[..., None]
    # a printed band with rows of "text" that turns with the azimuth
    band_y = top + brng.uniform(0.25, 0.6) * h_px
    band = raster.rect_coverage((ph.h, ph.w), cx - r, band_y, cx + r, band_y + 0.12 * h_px)
    text_phase = (phi + np.radians(azim)) * 6
    text = ((np.sin(text_phase * 5) > 0.4) & (np.sin((ph.yy - band_y) / (0.015 * h_px)) > 0.2)).astype(np.float32)
    colour = colour * (1 - 0.35 * (band * text)[..., None]) + (band * (1 - text))[..., None] * 25
    body_poly = np.concatenate(
        [np.stack([cx + r * np.cos(t), top + ry * np.sin(t)], 1) for t in [np.linspace(np.pi, 0, 20)]]
        + [np.stack([cx + r * np.cos(t), bottom + ry * np.sin(t)], 1) for t in [np.linspace(0, np.pi, 20)]]
    )
    cov = raster.paint(ph.img, body_poly, colour)
    ph.body = cov * (np.abs(u) < 0.85)  # too oblique near the silhouette to inspect
    ph.body *= raster.rect_coverage((ph.h, ph.w), 0, top + ry + 0.04 * h_px, ph.w, bottom - 0.02 * h_px)
    cap = raster.blob_polygon(rng, (cx, top), r * 0.97, aspect=1.0, roughness=0.0, n_vertices=64)
    cap[:, 1] = top + (cap[:, 1] - top) * (ry / (r * 0.97) if r else 0)
    cap_shade = 0.75 + 0.35 * np.clip(1 - ((ph.xx - cx) / r) ** 2, 0, 1)
    raster.paint(ph.img, cap, ph.metal * cap_shade[..., None])
    button = raster.blob_polygon(rng, (cx, top - ry * 0.1), r * 0.35, aspect=1.0, roughness=0.0, n_vertices=40)
    button[:, 1] = top - ry * 0.1 + (button[:, 1] - top + ry * 0.1) * (ry / (r * 0.97) if r else 0)
    raster.paint(ph.img, button, ph.metal * 1.15)
    return body_poly


def _pouch(ph: _Photo, rng, brng, cx, cy, scale, elev, azim, light_dir) -> np.ndarray:
    """A pouch cell standing in a fixture: silver laminate, sealed margins, two tabs."""
    h_px = scale * brng.uniform(0.5, 0.62) * ph.h
    w_px = h_px * brng.uniform(0.45, 0.8) * max(abs(np.cos(np.radians(azim))), 0.55)
    top, bottom = cy - h_px / 2, cy + h_px / 2
    x0, x1 = cx - w_px / 2, cx + w_px / 2
    _shadow(ph, cx, bottom, w_px / 2, (ph.w * (0.5 - 0.5 * np.sin(light_dir)), 0))
    skew = np.sin(np.radians(azim)) * 0.04 * h_px
    laminate = (
        np.array([190, 192, 198], np.float32)
        * rng.uniform(0.85, 1.05)
        * np.array(brng.uniform(0.95, 1.05, 3), np.float32)
    )
    fx = np.clip((ph.xx - cx) / (w_px / 2), -1, 1)
    fy = np.clip((ph.yy - cy) / (h_px / 2), -1, 1)
    pillow = 1 - 0.25 * (fx**4 + fy**4)  # the electrode stack bulges the laminate
    sheen = 0.85 + 0.3 * np.clip(np.cos(fx * 1.4 - light_dir), 0, 1)
    crinkle = 1 + 0.025 * raster.smooth_noise(rng, (ph.h, ph.w), 0.004 * ph.w)
    colour = laminate * (pillow * sheen * crinkle)[..., None]
    for fxt in (0.28, 0.72):  # tabs
        tx = x0 + fxt * w_px
        tab = np.array(
            [
                [tx - 0.07 * w_px, top - 0.08 * h_px],
                [tx + 0.07 * w_px, top - 0.08 * h_px],
                [tx + 0.07 * w_px, top + 2],
                [tx - 0.07 * w_px, top + 2],
            ]
        )
        raster.paint(ph.img, tab, ph.metal * (1.1 if fxt < 0.5 else 0.85))
    body_poly = np.array([[x0, top + skew], [x1, top - skew], [x1, bottom - skew], [x0, bottom + skew]])
    cov = raster.paint(ph.img, body_poly, colour)
    seal = 0.06 * w_px
    inner = np.array(
        [
            [x0 + seal, top + skew + seal],
            [x1 - seal, top - skew + seal],
            [x1 - seal, bottom - skew - seal * 0.5],
            [x0 + seal, bottom + skew - seal * 0.5],
        ]
    )
    inner_cov = raster.paint(ph.img, inner, colour * 1.04)
    ph.body = inner_cov * cov
    return np.concatenate([body_poly[:2] + [[0, -0.08 * h_px], [0, -0.08 * h_px]], body_poly[2:]])


def _module(ph: _Photo, rng, brng, cx, cy, scale, elev, azim, light_dir) -> np.ndarray:
    """A module: a box with a front face, a top and one side, bolts, label, terminals."""
    fh = scale * brng.uniform(0.32, 0.42) * ph.h
    fw = fh * brng.uniform(1.4, 2.1) * max(abs(np.cos(np.radians(azim))), 0.6)
    depth = fh * brng.uniform(0.5, 0.9)
    top_h = depth * np.sin(np.radians(elev)) * 0.8
    side_w = depth * abs(np.sin(np.radians(azim))) * 0.6
    sgn = 1 if np.sin(np.radians(azim)) >= 0 else -1
    x0, x1 = cx - fw / 2, cx + fw / 2
    y0, y1 = cy - fh / 2 + top_h / 2, cy + fh / 2 + top_h / 2
    _shadow(ph, cx, y1, fw / 2 + side_w / 2, (ph.w * (0.5 - 0.5 * np.sin(light_dir)), 0))
    base = np.array(HOUSING_COLOURS[brng.integers(len(HOUSING_COLOURS))], np.float32) * rng.uniform(0.9, 1.1)
    brushed = 1 + 0.02 * raster.smooth_noise(rng, (ph.h, ph.w), 0.002 * ph.w)
    front = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    top = np.array([[x0, y0], [x1, y0], [x1 + sgn * side_w, y0 - top_h], [x0 + sgn * side_w, y0 - top_h]])
    sx = x1 if sgn > 0 else x0
    side = np.array([[sx, y0], [sx + sgn * side_w, y0 - top_h], [sx + sgn * side_w, y1 - top_h], [sx, y1]])
    lit = 0.8 + 0.2 * np.cos(light_dir)
    raster.paint(ph.img, top, base * 1.15 * lit)
    raster.paint(ph.img, side, base * 0.7)
    cov = raster.paint(ph.img, front, base[None, None, :] * (lit * brushed)[..., None])
    for tx in (0.3, 0.7):  # terminals on top
        tcx = x0 + tx * fw + sgn * side_w * 0.5
        tcy = y0 - top_h * 0.5
        term = raster.blob_polygon(rng, (tcx, tcy), 0.04 * fw, aspect=1.0, roughness=0.0)
        raster.paint(ph.img, term, np.array([180, 40, 40] if tx < 0.5 else [30, 30, 30], np.float32))
    inset = 0.05 * fw
    for bx, by in (
        (x0 + inset, y0 + inset),
        (x1 - inset, y0 + inset),
        (x0 + inset, y1 - inset),
        (x1 - inset, y1 - inset),
    ):
        raster.paint(ph.img, raster.circle_polygon(bx, by, 0.015 * fw, 20), ph.metal * 0.8)
    lx0, ly0 = x0 + brng.uniform(0.15, 0.45) * fw, y0 + brng.uniform(0.25, 0.45) * fh
    label = raster.rect(lx0, ly0, lx0 + 0.3 * fw, ly0 + 0.22 * fh)
    stripes = (np.sin((ph.yy - ly0) / (0.012 * fh)) > 0.5).astype(np.float32)
    raster.paint(ph.img, label, np.full(3, 235, np.float32)[None, None, :] * (1 - 0.6 * stripes)[..., None])
    ph.body = cov * raster.rect_coverage((ph.h, ph.w), x0 + 2 * inset, y0 + inset, x1 - 2 * inset, y1 - inset)
    return np.concatenate(
        [front[[3, 0]], top[[3, 2]] if sgn > 0 else top[[3]], side[[1, 2]] if sgn > 0 else top[[2, 1]], front[[2]]]
    )


# ----------------------------------------------------------------------------- defects


def _place(rng, body: np.ndarray, radius: float) -> tuple[float, float] | None:
    """A centre on the inspectable face at least `radius` from its edge, or None."""
    inside = body > 0.5
    if not inside.any():
        return None
    dist = ndimage.distance_transform_edt(inside[::4, ::4]) * 4
    ys, xs = np.nonzero(dist >= radius)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return float(xs[i] * 4), float(ys[i] * 4)


def _draw_defect(ph: _Photo, rng: np.random.Generator, name: str, body_size: float) -> RGBDefect | None:
    kinds = {"Damaged": ["dent", "scratch", "torn_wrap"], "Pollution": ["stain", "residue"]}[name]
    kind = kinds[rng.integers(len(kinds))]
    shape = (ph.h, ph.w)
    radius = body_size * np.exp(rng.uniform(np.log(0.04), np.log(0.12)))
    if kind == "scratch":
        length = body_size * rng.uniform(0.2, 0.5)
        centre = _place(rng, ph.body, length / 2)
        if centre is None:
            return None
        angle = rng.uniform(0, np.pi)
        steps = 12
        t = np.linspace(-0.5, 0.5, steps)[:, None] * length
        direction = np.array([np.cos(angle), np.sin(angle)])
        wobble = np.cumsum(rng.normal(0, length * 0.01, steps))[:, None] * np.array([-direction[1], direction[0]])
        line = np.array(centre) + t * direction + wobble
        poly = raster.to_int_polygon(raster.polyline_outline(line, max(2.0, ph.w / 500) * rng.uniform(1.0, 2.5)), shape)
        # Through a dark wrap a scratch shows bright metal; on bright laminate, a dark crease.
        box, cov = raster.polygon_coverage(poly, shape)
        surface = float(ph.img[box][cov > 0.5].mean()) if (cov > 0.5).any() else 128.0
        bright = surface < 140 and rng.random() < 0.85
        raster.paint(ph.img, poly, ph.metal * 1.25 if bright else np.full(3, 35, np.float32))
        return RGBDefect(name, kind, poly)
    centre = _place(rng, ph.body, radius)
    if centre is None:
        return None
    roughness = {"dent": 0.15, "torn_wrap": 0.6, "stain": 0.45, "residue": 0.35}[kind]
    poly = raster.blob_polygon(
        rng,
        centre,
        radius,
        aspect=rng.uniform(1.0, 1.8),
        angle=rng.uniform(0, np.pi),
        roughness=roughness,
        n_vertices=36 if kind == "torn_wrap" else None,
    )
    if kind == "torn_wrap":  # jagged edge
        poly = poly + rng.normal(0, radius * 0.06, poly.shape)
    poly = raster.to_int_polygon(poly, shape)
    box, cov = raster.polygon_coverage(poly, shape)
    if cov.size == 0:
        return None
    patch = ph.img[box]
    yy, xx = ph.yy[box], ph.xx[box]
    c = cov[..., None]
    if kind == "dent":
        a = rng.uniform(0, 2 * np.pi)
        grad = ((xx - centre[0]) * np.cos(a) + (yy - centre[1]) * np.sin(a)) / radius
        rim = np.exp(-(((np.sqrt(((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2)) / radius - 0.85) / 0.15) ** 2))
        factor = 1 + rng.uniform(0.25, 0.5) * np.clip(grad, -1, 1) - 0.25 * rim
        ph.img[box] = patch * (1 - c) + c * patch * factor[..., None]
    elif kind == "torn_wrap":
        brushed = 1 + 0.05 * rng.standard_normal(cov.shape[1])[None, :]
        metal = ph.metal[None, None, :] * brushed[..., None]
        edge = np.clip(cov * (1 - cov) * 4, 0, 1)[..., None]
        ph.img[box] = patch * (1 - c) + c * metal + edge * 60
    elif kind == "stain":
        tint = np.array([[110, 75, 35], [60, 50, 30], [140, 120, 60], [30, 30, 30]][rng.integers(4)], np.float32)
        alpha = rng.uniform(0.45, 0.8)
        ring = np.clip(1.0 - np.abs(cov - 0.5) * 2, 0, 1) * 0.4 + 0.6  # darker drying rim
        mix = c * alpha * ring[..., None]
        ph.img[box] = patch * (1 - mix) + mix * tint
    else:  # residue: powdery specks
        specks = (rng.random(cov.shape) < rng.uniform(0.25, 0.6)).astype(np.float32)
        specks = ndimage.gaussian_filter(specks, 0.8) * 1.5
        a = np.clip(specks * cov * rng.uniform(0.6, 0.9), 0, 1)[..., None]
        ph.img[box] = patch * (1 - a) + a * np.array([235, 232, 220], np.float32)
    return RGBDefect(name, kind, poly)


def photo_conditions(spec: RGBPhotoSpec) -> dict:
    """What the generator draws for the photo `spec` before the battery: camera distance (mm),
    elevation and azimuth (degrees), light direction (-0.9 from the left .. 0.9 from the right) and
    bench colour: the same draws, in the same order, as `render_rgb_photo` and `_bench` make."""
    rng = spec.rng(1)
    distance, elev, azim = float(rng.uniform(250, 450)), float(rng.uniform(10, 45)), float(rng.uniform(0, 360))
    light_dir = float(rng.uniform(-0.9, 0.9))
    rng.uniform(0.2, 0.8), rng.uniform(-0.2, 0.3)  # the light's position
    bench = int(rng.integers(len(BENCH_COLOURS)))
    return {
        "distance": distance,
        "elevation": elev,
        "azimuth": azim,
        "light_dir": light_dir,
        "bench": BENCH_NAMES[bench],
    }


def render_rgb_photo(spec: RGBPhotoSpec, with_defects: bool = True) -> RGBPhoto:
    h, w = spec.height, spec.width
    ph = _Photo(h, w)
    rng, brng = spec.rng(1), spec.battery_rng()
    distance = float(rng.uniform(250, 450))
    elev = float(rng.uniform(10, 45))
    azim = float(rng.uniform(0, 360))
    light_dir = rng.uniform(-0.9, 0.9)
    light = (w * rng.uniform(0.2, 0.8), h * rng.uniform(-0.2, 0.3))
    _bench(ph, rng, light)
    scale = 350.0 / distance
    cx = w * 0.5 + rng.uniform(-0.2, 0.2) * w
    cy = h * 0.55 + rng.uniform(-0.05, 0.05) * h
    draw = _module if spec.battery_type == "module" else (_pouch if spec.form == "pouch" else _cylinder)
    outline = draw(ph, rng, brng, cx, cy, scale, elev, azim, light_dir)
    defects: list[RGBDefect] = []
    if with_defects:
        drng = spec.rng(3)
        ys, xs = np.nonzero(ph.body > 0.5)
        body_size = float(min(np.ptp(xs), np.ptp(ys))) if len(xs) else 0.0
        for name in spec.defect_kinds:
            wanted, tries = int(drng.integers(1, 3)), 0
            placed = 0
            while placed < wanted and tries < 8:  # a photo labelled defective always shows one
                d = _draw_defect(ph, drng, name, body_size * (0.8**tries))
                tries += 1
                if d is not None:
                    defects.append(d)
                    placed += 1
    image = _camera(ph, spec)
    return RGBPhoto(
        image=image,
        defects=defects,
        outline=raster.to_int_polygon(outline, (h, w)),
        distance=round(distance, 1),
        degree=(round(elev, 1), round(azim, 1)),
    )


def _camera(ph: _Photo, spec: RGBPhotoSpec) -> np.ndarray:
    """The scene as the camera records it: lens blur, white balance, exposure, vignetting, noise."""
    cam = spec.rng(4)
    img = ndimage.gaussian_filter(ph.img, (0.6, 0.6, 0))
    img *= cam.uniform(0.95, 1.05, 3).astype(np.float32) * cam.uniform(0.85, 1.1)  # white balance, exposure
    vignette = 1 - 0.25 * (((ph.xx - ph.w / 2) / ph.w) ** 2 + ((ph.yy - ph.h / 2) / ph.h) ** 2) * 2
    img = img * vignette[..., None] + cam.normal(0, cam.uniform(1.5, 4.0), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_empty_bench(spec: RGBPhotoSpec) -> np.ndarray:
    """(H, W, 3) uint8: the photo `spec` would give with no battery on the bench (an empty fixture)."""
    ph = _Photo(spec.height, spec.width)
    rng = spec.rng(1)
    (
        rng.uniform(250, 450),
        rng.uniform(10, 45),
        rng.uniform(0, 360),
        rng.uniform(-0.9, 0.9),
    )  # same light as the full photo
    light = (spec.width * rng.uniform(0.2, 0.8), spec.height * rng.uniform(-0.2, 0.3))
    _bench(ph, rng, light)
    return _camera(ph, spec)
