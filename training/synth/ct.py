"""Synthetic CT slices of pouch cells, cylindrical cells and modules.

A slice is made in two steps, as a real scanner makes it:

1. `build_scene` paints a linear attenuation map (mu) of the battery cut along one axis:
   casing, electrode layer stack or jelly roll, tabs, walls, potting resin, welds; then the
   defects: gas voids (porosity) in the stack, or resin where it should not be.
2. `acquire` forward-projects that map (Radon transform), applies beam hardening and
   Poisson photon noise (photon starvation behind dense paths gives real streaks), adds
   occasional detector gain errors (rings), and reconstructs by filtered back-projection.
   The result is windowed to 8 bits with per-scan contrast and gamma.

Porosity is drawn with the exact integer polygons that go into the label JSON. The same
`CTSliceSpec` rendered with `with_defects=False` gives the defect-free slice with the same
noise, which is how tests check that defects are where the labels say.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import iradon, radon

from training.synth import raster

# Relative linear attenuation of the materials in a lithium-ion battery.
AIR = 0.0
GAS = 0.03
FILM = 0.22  # pouch laminate, separators, insulators
ANODE = 0.34  # graphite on copper foil
CATHODE = 0.78  # metal oxide on aluminium foil
RESIN = 0.42  # potting resin
# Radius range of the largest void of a group, in pixels of a 512-px slice: the smallest
# still spans about 2 pixels at the 160-px input of the standard preset.
VOID_RADIUS = (3.5, 24.0)
HOUSING = 1.05  # aluminium housing
WALL = 1.2  # cooling plates between cells
TAB = 1.45  # copper/aluminium tabs and busbars
STEEL = 1.9  # cylindrical can, caps
WELD = 2.3  # weld beads


@dataclass(frozen=True)
class CTSliceSpec:
    """Everything that determines one slice; rendering it twice gives the same bytes."""

    battery_id: int
    battery_type: str  # cell | module
    form: str  # pouch | cylindrical
    axis: str  # x | y | z
    slice_index: int
    finding: str  # normal | porosity | resin_overflow (the battery's)
    show_defect: bool  # whether this slice cuts through the battery's defect
    size: int
    seed: int

    def rng(self, *stream: int) -> np.random.Generator:
        """Independent, reproducible random streams.

        Stream 0 is per battery (shared by all its slices: dimensions, layer pitch), the
        others are per slice; geometry, defects and noise each have their own stream so
        that drawing a defect does not change the noise and vice versa.
        """
        axis = "xyz".index(self.axis)
        key = (self.battery_id, 0) if stream == (0,) else (self.battery_id, 1 + axis, self.slice_index, *stream)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))


@dataclass
class Defect:
    name: str  # AI Hub name: "Porosity" | "Resin overflow"
    polygon: np.ndarray  # (N, 2) int


@dataclass
class CTSlice:
    image: np.ndarray  # (size, size) uint8
    defects: list[Defect]
    outline: np.ndarray  # (N, 2) int, the battery outline
    roi: tuple[int, int]  # first and last image row of the battery band


@dataclass
class Scene:
    mu: np.ndarray
    stack: np.ndarray  # where the electrode stack is (pores form there)
    layer_angle: float | None  # direction of the layers, pores flatten along it
    overflow_zone: np.ndarray  # where resin must not be (air gaps inside the housing)
    outline: np.ndarray
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- scene


class _Painter:
    """Paints materials onto an attenuation map, in pixels of a frame of size n."""

    def __init__(self, n: int, rng: np.random.Generator, battery: dict):
        self.n = n
        self.s = n / 512.0  # all lengths below are given for a 512-pixel frame
        self.rng = rng
        self.b = battery
        self.mu = np.zeros((n, n), np.float32)
        self.stack = np.zeros((n, n), bool)
        self.zone = np.zeros((n, n), bool)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        self.xx, self.yy = xx, yy

    def fill(self, cov: np.ndarray, value) -> None:
        self.mu = self.mu * (1.0 - cov) + cov * value

    def rect(self, x0, y0, x1, y1, value) -> np.ndarray:
        cov = raster.rect_coverage(self.mu.shape, x0, y0, x1, y1)
        self.fill(cov, value)
        return cov

    def layers(self, coord: np.ndarray) -> np.ndarray:
        """Alternating cathode/anode layers along `coord` (pixels), slightly wavy."""
        b = self.b
        pitch = b["pitch"] * self.s
        wav = raster.smooth_noise(self.rng, coord.shape, 40 * self.s) * b["waviness"] * pitch
        phase = (coord + wav) / pitch
        k = np.floor(phase).astype(np.int64)
        frac = phase - k
        half = 0.22
        cathode = np.clip((half - np.abs(frac - 0.5)) * pitch + 0.5, 0, 1)
        gain = b["layer_gain"][np.mod(k, len(b["layer_gain"]))]
        mean = 0.5 * (CATHODE + ANODE)
        contrast = b["layer_contrast"]
        layered = ANODE + (CATHODE * gain - ANODE) * cathode
        return (mean + contrast * (layered - mean)).astype(np.float32)

    def mottle(self, amp: float, sigma: float) -> np.ndarray:
        return raster.smooth_noise(self.rng, self.mu.shape, sigma * self.s) * amp

    def resin(self, cov: np.ndarray) -> None:
        self.fill(cov, RESIN + self.mottle(0.025, 3.0))


def _battery_params(spec: CTSliceSpec) -> dict:
    """Per-battery constants shared by all slices of the battery."""
    rng = spec.rng(0)
    return {
        "pitch": rng.uniform(2.6, 4.2),
        "waviness": rng.uniform(0.05, 0.35),
        "layer_gain": rng.uniform(0.88, 1.12, size=64),
        "layer_contrast": rng.uniform(0.35, 1.0),
        "w": rng.uniform(0.5, 0.68),
        "h": rng.uniform(0.42, 0.58),
        "t": rng.uniform(0.07, 0.12),
        "R": rng.uniform(0.19, 0.27),
        "cells": int(rng.integers(4, 9)),
        "rows": int(rng.integers(2, 4)),
        "cols": int(rng.integers(3, 6)),
        "resin_level": rng.uniform(0.18, 0.32),
    }


def _pouch_cell(p: _Painter, axis: str, offset: tuple[float, float]) -> tuple[np.ndarray, float | None]:
    n, s, b = p.n, p.s, p.b
    cx, cy = n / 2 + offset[0], n / 2 + offset[1]
    if axis == "y":  # the large face: electrodes lie in the slice plane
        w, h = b["w"] * n, b["h"] * n
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        tab_h = 0.06 * n
        for fx in (0.27, 0.73):
            tx = x0 + fx * w
            p.rect(tx - 0.06 * w, y0 - tab_h, tx + 0.06 * w, y0 + 4 * s, TAB)
        p.rect(x0, y0, x1, y1, FILM)
        m = 0.035 * n
        inner = p.rect(x0 + m * 0.5, y0 + m, x1 - m * 0.5, y1 - m * 0.6, 0.5 * (CATHODE + ANODE))
        p.fill(inner, 0.5 * (CATHODE + ANODE) + p.mottle(0.04, 2.0) + p.mottle(0.03, 12.0))
        outline = raster.rect(x0, y0 - tab_h, x1, y1)
        p.stack |= inner > 0.5
        return outline, None
    if axis == "x":  # thickness x height: vertical layers
        w, h = b["t"] * n, b["h"] * n
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        tab_h = 0.06 * n
        p.rect(cx - 1.5 * s, y0 - tab_h, cx + 1.5 * s, y0 + 8 * s, TAB)
        seal = np.array(
            [[x0, y0 + 0.05 * h], [cx - 3 * s, y0], [cx + 3 * s, y0], [x1, y0 + 0.05 * h], [x1, y1], [x0, y1]]
        )
        raster.paint(p.mu, seal, FILM)
        inner = raster.rect_coverage(p.mu.shape, x0 + 2 * s, y0 + 0.07 * h, x1 - 2 * s, y1 - 2 * s)
        p.fill(inner, p.layers(p.xx - x0))
        p.stack |= inner > 0.5
        return raster.rect(x0, y0 - tab_h, x1, y1), np.pi / 2
    # z: width x thickness, horizontal layers, sealed ends
    w, h = b["w"] * n * 1.1, b["t"] * n
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    seal = np.array(
        [
            [x0, cy - 2 * s],
            [x0 + 0.04 * w, y0],
            [x1 - 0.04 * w, y0],
            [x1, cy - 2 * s],
            [x1, cy + 2 * s],
            [x1 - 0.04 * w, y1],
            [x0 + 0.04 * w, y1],
            [x0, cy + 2 * s],
        ]
    )
    raster.paint(p.mu, seal, FILM)
    inner = raster.rect_coverage(p.mu.shape, x0 + 0.05 * w, y0 + 2 * s, x1 - 0.05 * w, y1 - 2 * s)
    p.fill(inner, p.layers(p.yy - y0))
    p.stack |= inner > 0.5
    return np.rint(seal), 0.0


def _jelly_roll(p: _Painter, cx: float, cy: float, r_out: float, r_core: float) -> np.ndarray:
    """Axial cut of a cylindrical cell: can, jelly-roll spiral, hollow core. Returns roll coverage."""
    s = p.s
    can = raster.disc_coverage(p.mu.shape, cx, cy, r_out)
    p.fill(can, STEEL)
    p.fill(raster.disc_coverage(p.mu.shape, cx, cy, r_out - 3.5 * s), FILM)
    roll = raster.disc_coverage(p.mu.shape, cx, cy, r_out - 5 * s)
    dx, dy = p.xx - cx, p.yy - cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    pitch = p.b["pitch"] * s
    spiral = r - pitch * theta / (2 * np.pi)  # Archimedean spiral: layers follow r = pitch*theta/2pi
    p.fill(roll, p.layers(spiral))
    core = raster.disc_coverage(p.mu.shape, cx, cy, r_core)
    p.fill(core, AIR)
    p.fill(raster.disc_coverage(p.mu.shape, cx, cy, max(r_core * 0.35, 1.0)), STEEL * 0.7)  # mandrel pin
    roll_only = roll * (1 - raster.disc_coverage(p.mu.shape, cx, cy, r_core + 2 * s))
    p.stack |= roll_only > 0.5
    return roll_only


def _cylinder_side(
    p: _Painter, cx: float, y0: float, y1: float, radius: float, chord: float, r_core: float, cap: bool = True
) -> tuple[float, float]:
    """Longitudinal cut of a cylindrical cell at distance `chord` from its axis."""
    s = p.s
    half = np.sqrt(max(radius * radius - chord * chord, (0.3 * radius) ** 2))
    x0, x1 = cx - half, cx + half
    p.rect(x0, y0, x1, y1, STEEL)
    p.rect(x0 + 3.5 * s, y0 + 10 * s, x1 - 3.5 * s, y1 - 4 * s, FILM)
    ry0, ry1 = y0 + 16 * s, y1 - 9 * s
    roll = raster.rect_coverage(p.mu.shape, x0 + 5 * s, ry0, x1 - 5 * s, ry1)
    radial = np.sqrt((p.xx - cx) ** 2 + chord * chord)  # the cut meets the spiral at this radius
    p.fill(roll, p.layers(radial))
    if chord < r_core:
        core_half = np.sqrt(r_core * r_core - chord * chord)
        p.rect(cx - core_half, ry0, cx + core_half, ry1, AIR)
        roll = roll * (1 - raster.rect_coverage(p.mu.shape, cx - core_half - 2 * s, ry0, cx + core_half + 2 * s, ry1))
    if cap:  # positive cap: crimped plate, vent disc and a tab from the roll
        p.rect(x0 - 1 * s, y0, x1 + 1 * s, y0 + 5 * s, STEEL)
        p.rect(cx - 0.35 * half, y0 - 6 * s, cx + 0.35 * half, y0 + 1 * s, STEEL)
        p.rect(cx - 0.55 * half, y0 + 7 * s, cx + 0.55 * half, y0 + 9 * s, STEEL * 0.8)
        p.rect(cx + 0.2 * half, y0 + 9 * s, cx + 0.2 * half + 1.5 * s, ry0, TAB)
    p.stack |= roll > 0.5
    return x0, x1


def _cylindrical_cell(p: _Painter, axis: str, offset, slice_index: int) -> tuple[np.ndarray, float | None]:
    n, s, b = p.n, p.s, p.b
    cx, cy = n / 2 + offset[0], n / 2 + offset[1]
    R = b["R"] * n
    r_core = 0.11 * R
    if axis == "z":
        _jelly_roll(p, cx, cy, R, r_core)
        return raster.circle_polygon(cx, cy, R), None
    height = min(2.9 * R, np.sqrt((0.9 * n) ** 2 - (2 * R) ** 2))
    # y cuts through the axis; x cuts are off axis (chords), as a slice stack across the can.
    frac = (slice_index % 7) / 7.0
    chord = (0.05 + 0.1 * frac) * R if axis == "y" else (0.3 + 0.5 * frac) * R
    y0, y1 = cy - height / 2, cy + height / 2
    x0, x1 = _cylinder_side(p, cx, y0, y1, R, chord, r_core)
    return raster.rect(x0, y0 - 6 * s, x1, y1), np.pi / 2


def _pouch_module(p: _Painter, axis: str, offset) -> tuple[np.ndarray, float | None]:
    n, s, b = p.n, p.s, p.b
    cx, cy = n / 2 + offset[0], n / 2 + offset[1]
    k = b["cells"]
    wall = 2.0 * s
    housing = 5.0 * s
    side_gap = 6.0 * s
    if axis == "x":  # along the stack: the face of one cell
        w, h = b["w"] * n, b["h"] * n
    else:
        w = min(0.72 * n, k * b["t"] * n * 0.75 + 2 * (housing + side_gap))
        h = b["h"] * n if axis == "y" else 0.55 * w
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    p.rect(x0, y0, x1, y1, HOUSING)
    p.rect(x0 + housing, y0 + housing, x1 - housing, y1 - housing, AIR)
    ix0, iy0, ix1, iy1 = x0 + housing + side_gap, y0 + housing, x1 - housing - side_gap, y1 - housing
    if axis in ("x", "y"):
        top_gap = 0.12 * h
        resin_h = 0.09 * h
        ry0 = iy1 - resin_h
        p.resin(raster.rect_coverage(p.mu.shape, x0 + housing, ry0, x1 - housing, iy1))
        n_welds = max(k * 2, 6)
        for i in range(n_welds):  # the row of small bright features along the bottom edge
            wx = ix0 + (i + 0.5) * (ix1 - ix0) / n_welds
            p.fill(raster.disc_coverage(p.mu.shape, wx, iy1 - 2.5 * s, 2.2 * s), WELD)
        cy0, cy1 = iy0 + top_gap, ry0
        zone = raster.rect_coverage(p.mu.shape, x0 + housing, iy0, x1 - housing, cy0 - 3 * s)
    else:  # z: a horizontal cut at mid height; the air gaps are at the ends of the cells
        end_gap = 0.1 * h
        cy0, cy1 = iy0 + end_gap, iy1 - end_gap
        zone = raster.rect_coverage(p.mu.shape, x0 + housing, iy0, x1 - housing, cy0 - 3 * s)
        zone = np.maximum(zone, raster.rect_coverage(p.mu.shape, x0 + housing, cy1 + 3 * s, x1 - housing, iy1))
    if axis == "x":
        p.rect(ix0, cy0, ix1, cy1, FILM)
        inner = raster.rect_coverage(p.mu.shape, ix0 + 3 * s, cy0 + 3 * s, ix1 - 3 * s, cy1 - 3 * s)
        p.fill(inner, 0.5 * (CATHODE + ANODE) + p.mottle(0.04, 2.0) + p.mottle(0.03, 12.0))
        for fx in (0.25, 0.75):
            tx = ix0 + fx * (ix1 - ix0)
            p.rect(tx - 0.05 * w, cy0 - 0.6 * (cy0 - iy0), tx + 0.05 * w, cy0 + 2 * s, TAB)
        p.stack |= inner > 0.5
        layer_angle = None
    else:
        pitch_x = (ix1 - ix0) / k
        for i in range(k):
            bx0 = ix0 + i * pitch_x
            bx1 = bx0 + pitch_x - wall
            p.rect(bx0, cy0, bx1, cy1, FILM)
            inner = raster.rect_coverage(p.mu.shape, bx0 + 1.5 * s, cy0 + 4 * s, bx1 - 1.5 * s, cy1 - 3 * s)
            p.fill(inner, p.layers(p.xx - bx0))
            p.stack |= inner > 0.5
            p.rect(bx1, cy0 - (6 * s if axis == "y" else 0), bx1 + wall, cy1, WALL)
            if axis == "y":  # tabs and busbar above each cell
                tx = 0.5 * (bx0 + bx1)
                p.rect(tx - 1.5 * s, cy0 - 0.5 * (cy0 - iy0), tx + 1.5 * s, cy0 + 4 * s, TAB)
        if axis == "y":
            p.rect(ix0, cy0 - 0.55 * (cy0 - iy0), ix1, cy0 - 0.45 * (cy0 - iy0), TAB)
            zone = zone * (
                1 - raster.rect_coverage(p.mu.shape, ix0 - 2 * s, cy0 - 0.6 * (cy0 - iy0), ix1 + 2 * s, cy0 + 4 * s)
            )
        layer_angle = np.pi / 2
    p.zone |= zone > 0.5
    return raster.rect(x0, y0, x1, y1), layer_angle


def _cylindrical_module(p: _Painter, axis: str, offset, slice_index: int) -> tuple[np.ndarray, float | None]:
    n, s, b = p.n, p.s, p.b
    cx, cy = n / 2 + offset[0], n / 2 + offset[1]
    housing = 5.0 * s
    margin = 10.0 * s
    cols = b["cols"]
    if axis == "z":  # top-down: a grid of jelly rolls potted in resin
        rows = b["rows"]
        avail = 0.58 * n
        R = min(avail / (2 * cols), avail / (2 * rows)) * 0.92
        w = 2 * R * cols / 0.92 + 2 * (housing + margin)
        h = 2 * R * rows / 0.92 + 2 * (housing + margin)
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        p.rect(x0, y0, x1, y1, HOUSING)
        p.rect(x0 + housing, y0 + housing, x1 - housing, y1 - housing, AIR)
        gx0, gy0, gx1, gy1 = x0 + housing + margin, y0 + housing + margin, x1 - housing - margin, y1 - housing - margin
        p.resin(raster.rect_coverage(p.mu.shape, gx0, gy0, gx1, gy1))  # potting between the cans
        for r in range(rows):
            for c in range(cols):
                ccx = gx0 + (c + 0.5) * (gx1 - gx0) / cols
                ccy = gy0 + (r + 0.5) * (gy1 - gy0) / rows
                _jelly_roll(p, ccx, ccy, R, 0.11 * R)
        inside = raster.rect_coverage(p.mu.shape, x0 + housing, y0 + housing, x1 - housing, y1 - housing)
        grid = raster.rect_coverage(p.mu.shape, gx0 - 3 * s, gy0 - 3 * s, gx1 + 3 * s, gy1 + 3 * s)
        p.zone |= (inside * (1 - grid)) > 0.5
        return raster.rect(x0, y0, x1, y1), None
    # side view: a row of cans, resin up to its level, busbar on top
    R = min(0.66 * n / (2 * cols) * 0.9, 0.2 * n)
    height = min(2.9 * R, 0.55 * n)
    w = 2 * R * cols / 0.9 + 2 * (housing + margin)
    h = height + 0.2 * height + 2 * housing
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    p.rect(x0, y0, x1, y1, HOUSING)
    p.rect(x0 + housing, y0 + housing, x1 - housing, y1 - housing, AIR)
    cell_y1 = y1 - housing
    cell_y0 = cell_y1 - height
    level = cell_y1 - b["resin_level"] * height
    p.resin(raster.rect_coverage(p.mu.shape, x0 + housing, level, x1 - housing, cell_y1))
    frac = (slice_index % 5) / 5.0
    chord = (0.05 + 0.1 * frac) * R if axis == "y" else (0.3 + 0.4 * frac) * R
    gx0, gx1 = x0 + housing + margin, x1 - housing - margin
    for c in range(cols):
        ccx = gx0 + (c + 0.5) * (gx1 - gx0) / cols
        _cylinder_side(p, ccx, cell_y0, cell_y1, R, chord, 0.11 * R)
    bus_y = cell_y0 - 0.1 * height
    p.rect(gx0, bus_y, gx1, bus_y + 3 * s, TAB)
    for c in range(cols):
        ccx = gx0 + (c + 0.5) * (gx1 - gx0) / cols
        p.rect(ccx - 1.5 * s, bus_y, ccx + 1.5 * s, cell_y0 - 5 * s, TAB)
        p.fill(raster.disc_coverage(p.mu.shape, ccx, bus_y + 1.5 * s, 2.5 * s), WELD)
    air = p.mu < 0.05
    inside = raster.rect_coverage(p.mu.shape, x0 + housing, y0 + housing, x1 - housing, level - 3 * s) > 0.5
    p.zone |= air & inside
    return raster.rect(x0, y0, x1, y1), np.pi / 2


def build_scene(spec: CTSliceSpec) -> Scene:
    """The defect-free attenuation map of the slice."""
    n = spec.size
    p = _Painter(n, spec.rng(1), _battery_params(spec))
    geo = spec.rng(2)
    offset = (geo.uniform(-0.02, 0.02) * n, geo.uniform(-0.03, 0.03) * n)
    if spec.battery_type == "cell" and spec.form == "pouch":
        outline, angle = _pouch_cell(p, spec.axis, offset)
    elif spec.battery_type == "cell":
        outline, angle = _cylindrical_cell(p, spec.axis, offset, spec.slice_index)
    elif spec.form == "pouch":
        outline, angle = _pouch_module(p, spec.axis, offset)
    else:
        outline, angle = _cylindrical_module(p, spec.axis, offset, spec.slice_index)
    return Scene(mu=p.mu.astype(np.float32), stack=p.stack, layer_angle=angle, overflow_zone=p.zone, outline=outline)


# ---------------------------------------------------------------------------- defects


def _add_porosity(scene: Scene, rng: np.random.Generator, n: int) -> list[Defect]:
    """Gas voids: a few pixels to large, rounded to flat, single or clustered, faint or dark."""
    s = n / 512.0
    ys, xs = np.nonzero(scene.stack)
    if len(xs) == 0:
        return []
    defects: list[Defect] = []
    n_groups = int(rng.choice([1, 1, 1, 2, 2, 3]))
    group = 0
    while group < n_groups or (not defects and group < 12):  # a slice said to show porosity shows at least one void
        group += 1
        i = int(rng.integers(len(xs)))
        center = np.array([xs[i], ys[i]], float)
        clustered = rng.random() < 0.4
        count = int(rng.integers(3, 9)) if clustered else 1
        # log-uniform size: many small pores, a few big ones (radius 3.5..24 px at 512)
        big = np.exp(rng.uniform(np.log(VOID_RADIUS[0]), np.log(VOID_RADIUS[1]))) * s
        for j in range(count):
            radius = big if j == 0 else big * rng.uniform(0.25, 0.7)
            radius = max(radius, 1.6 * s)
            c = center + (rng.normal(0, big * 1.6, 2) if j else 0)
            if not (0 <= c[0] < n and 0 <= c[1] < n) or not scene.stack[int(c[1]), int(c[0])]:
                continue
            aspect = rng.uniform(1.0, 2.8)
            angle = scene.layer_angle if scene.layer_angle is not None else rng.uniform(0, np.pi)
            angle += rng.normal(0, 0.2)
            roughness = rng.uniform(0.05, 0.4)
            depth = rng.uniform(0.65, 1.0)  # partially filled or thin voids look fainter
            for _attempt in range(4):  # a void stays inside the electrode stack: shrink until it fits
                poly = raster.to_int_polygon(
                    raster.blob_polygon(rng, tuple(c), radius, aspect=aspect, angle=angle, roughness=roughness), (n, n)
                )
                box, cov = raster.polygon_coverage(poly, (n, n))
                inside = float((cov * scene.stack[box]).sum() / max(cov.sum(), 1e-6))
                if inside >= 0.9:
                    break
                radius *= 0.7
            else:
                continue
            if raster.polygon_area(poly) < 4 * s * s:
                continue
            cov = cov * scene.stack[box]
            local = scene.mu[box]
            scene.mu[box] = local * (1 - cov) + cov * (local * (1 - depth) + GAS * depth)
            defects.append(Defect("Porosity", poly))
    return defects


def _add_resin_overflow(scene: Scene, rng: np.random.Generator, n: int) -> list[Defect]:
    """Resin where it must not be: a bright amorphous mass in an air gap of the module."""
    s = n / 512.0
    zone = scene.overflow_zone
    if not zone.any():
        return []
    dist = ndimage.distance_transform_edt(zone)
    ys, xs = np.nonzero(dist >= min(dist.max(), 4 * s))
    i = int(rng.integers(len(xs)))
    cx, cy = float(xs[i]), float(ys[i])
    reach = float(dist[ys[i], xs[i]])
    radius = float(np.clip(reach * rng.uniform(0.8, 1.5), 4 * s, 40 * s))
    poly = raster.blob_polygon(
        rng,
        (cx, cy),
        radius,
        aspect=rng.uniform(1.0, 1.8),
        angle=rng.uniform(0, np.pi),
        roughness=rng.uniform(0.3, 0.6),
    )
    poly = raster.to_int_polygon(poly, (n, n))
    value = RESIN * rng.uniform(1.25, 1.7)
    box, cov = raster.polygon_coverage(poly, (n, n))
    mottle = 1 + 0.06 * rng.standard_normal(cov.shape)
    local = scene.mu[box]
    scene.mu[box] = np.maximum(local, local * (1 - cov) + cov * value * mottle)
    return [Defect("Resin overflow", poly)]


# -------------------------------------------------------------------------- acquisition


def acquire(mu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scan the attenuation map and reconstruct it, with the artefacts of a real CT.

    The physics (projection, beam hardening, photon noise, detector errors, FBP) runs at
    up to 320 pixels; what it adds on top of the ideal image is upsampled and added to
    the full-resolution scene (FBP is linear, so this is the same decomposition a full
    scan has, at a fraction of the cost).
    """
    n = mu.shape[0]
    lo = int(np.clip(n // 2, 128, 320))
    mu_lo = ndimage.zoom(mu, lo / n, order=1, prefilter=False) if lo != n else mu
    angles = np.linspace(0.0, 180.0, int(lo * 0.75), endpoint=False)
    ideal = radon(mu_lo, angles, circle=True)
    p_max = rng.uniform(2.5, 5.0)  # attenuation along the densest ray
    k = p_max / max(float(ideal.max()), 1e-6)
    p = ideal * k
    beta = rng.uniform(0.02, 0.07)  # beam hardening: dense paths look less dense (cupping)
    p_bh = p - beta * p * p
    i0 = 10 ** rng.uniform(3.4, 4.6)  # photons per detector bin
    # Photon noise in its Gaussian form (counts >> 1 per bin), with one fixed draw per
    # detector bin: the same scan with and without a defect then differs only along the
    # rays through the defect, as two exposures of one object would.
    expected = i0 * np.exp(-p_bh)
    counts = np.maximum(expected + np.sqrt(expected) * rng.standard_normal(expected.shape), 1.0)
    p_meas = -np.log(counts / i0)
    if rng.random() < 0.3:  # a few miscalibrated detector bins give rings
        bins = rng.integers(0, p_meas.shape[0], size=int(rng.integers(1, 5)))
        p_meas[bins, :] += rng.normal(0, 0.03, size=(len(bins), 1))
    error = iradon((p_meas - p) / k, angles, circle=True, filter_name=str(rng.choice(["ramp", "shepp-logan", "hann"])))
    error = ndimage.zoom(error.astype(np.float32), n / lo, order=3)[:n, :n]
    blurred = ndimage.gaussian_filter(mu, 0.6 * n / 512.0)
    grain = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 0.7)
    local_noise = np.sqrt(ndimage.gaussian_filter(error * error, 6.0))
    rec = blurred + error + grain * local_noise * 1.5
    yy, xx = np.mgrid[0:n, 0:n]
    fov = (xx - n / 2 + 0.5) ** 2 + (yy - n / 2 + 0.5) ** 2 <= (n / 2) ** 2
    return np.where(fov, rec, 0.0).astype(np.float32)


def window(rec: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map attenuation to 8-bit grey with this scan's contrast settings."""
    lo = rng.uniform(0.0, 0.1)
    hi = rng.uniform(0.95, 1.6)
    gamma = rng.uniform(0.75, 1.25)
    g = np.clip((rec - lo) / (hi - lo), 0, 1) ** gamma
    return np.rint(g * 255).astype(np.uint8)


# Scenes and scans are drawn at most this large. A larger slice (a line's 4000 x 4000) is the
# slice drawn at size / k (k the smallest integer that brings it under this), enlarged, with
# the detector's own grain added at full resolution: the structure a model can see at its
# input (160-512 px from a crop of the slice) is all there, at a fraction of the cost
# (4000 px: about 1 s a slice instead of 12).
PHYSICS_SIZE = 1024
GRAIN = 2.5  # grey levels (standard deviation) of the full-resolution detector grain


def render_ct_slice(spec: CTSliceSpec, with_defects: bool = True) -> CTSlice:
    k = -(-spec.size // PHYSICS_SIZE)
    if k > 1:
        return _enlarged(render_ct_slice(replace(spec, size=round(spec.size / k)), with_defects), spec)
    scene = build_scene(spec)
    defects: list[Defect] = []
    if with_defects and spec.show_defect:
        drng = spec.rng(3)
        if spec.finding == "porosity":
            defects = _add_porosity(scene, drng, spec.size)
        elif spec.finding == "resin_overflow":
            defects = _add_resin_overflow(scene, drng, spec.size)
    noise = spec.rng(4)
    image = window(acquire(scene.mu, noise), noise)
    outline = raster.to_int_polygon(scene.outline, image.shape)
    rows = np.nonzero(scene.mu.max(axis=1) > 0.05)[0]
    roi = (int(rows.min()), int(rows.max())) if len(rows) else (0, spec.size - 1)
    return CTSlice(image=image, defects=defects, outline=outline, roi=roi)


def _enlarged(small: CTSlice, spec: CTSliceSpec) -> CTSlice:
    """`small` (a slice drawn at a fraction of spec.size) at spec.size, labels included."""
    n = spec.size
    scale = n / small.image.shape[0]
    image = np.asarray(Image.fromarray(small.image).resize((n, n), Image.BICUBIC), np.float32)
    image += spec.rng(6).standard_normal((n, n), np.float32) * np.float32(GRAIN)
    image = np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8)

    def up(poly: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.asarray(poly, np.float64) * scale), 0, n - 1).astype(np.int64)

    r0, r1 = small.roi
    return CTSlice(
        image=image,
        defects=[Defect(d.name, up(d.polygon)) for d in small.defects],
        outline=up(small.outline),
        roi=(int(r0 * scale), min(int(np.ceil((r1 + 1) * scale)) - 1, n - 1)),
    )
