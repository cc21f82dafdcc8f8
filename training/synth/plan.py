"""What to generate: batteries, their classes, slices and photos, all decided up front.

The plan is a pure function of the configuration, so the same seed always gives the same
data set, however many workers render it and in whatever order.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np

from core.labels import CT_CLASSES, SLICE_AXES, class_finding, class_type
from training.synth.ct import CTSliceSpec
from training.synth.rgb import RGBPhotoSpec

# Somewhat more defects than the real test split (where resin overflow is 1%), so that a
# small synthetic set still holds every class.
DEFAULT_MIX = {
    "cell_normal": 0.25,
    "cell_porosity": 0.2,
    "module_normal": 0.25,
    "module_porosity": 0.2,
    "module_resin_overflow": 0.1,
}

SUBSETS = ("Training", "Validation")

# How often a slice of a defective battery cuts through its defect. Many x-axis slices of
# a porosity battery show no pore at all, as in the real data; such slices still carry
# the battery's label, which is why slice_axis is a model input.
DEFECT_VISIBILITY = {"x": 0.3, "y": 0.9, "z": 0.85}
CT_FORMATS = ("jpeg", "tiff16", "dicom")


def photo_size(text: str) -> tuple[int, int]:
    """A command line's WIDTHxHEIGHT, e.g. 1920x1080 (an argparse type)."""

    w, sep, h = text.lower().partition("x")
    if not sep or not (w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1920x1080")
    return int(w), int(h)


@dataclass(frozen=True)
class SynthConfig:
    batteries: int = 100
    seed: int = 0
    ct_size: int = 512
    rgb_width: int = 1920
    rgb_height: int = 1080
    slices_per_axis: int = 2
    photos_per_battery: int = 2
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    rgb_defect_rate: float = 0.3  # share of batteries whose photos show exterior defects
    cylindrical_fraction: float = 0.5
    validation_fraction: float = 0.2  # share written under Validation/ (AI Hub's own split)
    visibility: dict = field(default_factory=lambda: dict(DEFECT_VISIBILITY))  # per axis
    # How CT slices are written, by weight: JPEG (what AI Hub ships), 16-bit TIFF, DICOM (as other stations send them)
    ct_formats: dict = field(default_factory=lambda: {"jpeg": 1.0})

    def __post_init__(self):
        unknown = set(self.mix) - set(CT_CLASSES)
        if unknown:
            raise ValueError(f"unknown CT classes in mix: {sorted(unknown)}; known: {list(CT_CLASSES)}")
        if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError("class mix weights must be non-negative and not all zero")
        if self.batteries < 1:
            raise ValueError("need at least one battery")
        if not 0 <= self.rgb_defect_rate <= 1:
            raise ValueError("rgb_defect_rate must be within 0..1")
        if self.ct_size < 64 or min(self.rgb_width, self.rgb_height) < 64:
            raise ValueError("images must be at least 64 pixels on a side")
        if set(self.visibility) != set(SLICE_AXES) or not all(0 <= v <= 1 for v in self.visibility.values()):
            raise ValueError(
                f"visibility needs a probability 0..1 for each axis {list(SLICE_AXES)}, got {self.visibility}"
            )
        if (
            set(self.ct_formats) - set(CT_FORMATS)
            or any(v < 0 for v in self.ct_formats.values())
            or sum(self.ct_formats.values()) <= 0
        ):
            raise ValueError(f"ct_formats needs non-negative weights of {', '.join(CT_FORMATS)}, got {self.ct_formats}")
        if self.slices_per_axis < 1 or self.photos_per_battery < 1:
            raise ValueError("need at least one slice per axis and one photo per battery")


@dataclass(frozen=True)
class BatteryPlan:
    battery_id: int
    battery_type: str
    form: str
    ct_class: str
    rgb_defects: tuple[str, ...]
    subset: str
    ct_slices: tuple[CTSliceSpec, ...]
    photos: tuple[RGBPhotoSpec, ...]


def allocate(weights: dict[str, float], total: int) -> dict[str, int]:
    """Exact counts that follow the weights (largest remainder; ties in key order)."""
    keys = list(weights)
    w = np.array([weights[k] for k in keys], float)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(int)
    order = sorted(range(len(keys)), key=lambda i: (-(quota[i] - counts[i]), i))
    for i in order[: total - counts.sum()]:
        counts[i] += 1
    return {k: int(c) for k, c in zip(keys, counts)}


def _slice_specs(cfg: SynthConfig, rng, battery_id, battery_type, form, finding) -> tuple[CTSliceSpec, ...]:
    specs = []
    for axis in SLICE_AXES:
        indices = sorted(rng.choice(np.arange(1, 40), size=cfg.slices_per_axis, replace=False).tolist())
        for idx in indices:
            show = finding != "normal" and rng.random() < cfg.visibility[axis]
            specs.append(
                CTSliceSpec(battery_id, battery_type, form, axis, int(idx), finding, bool(show), cfg.ct_size, cfg.seed)
            )
    if finding != "normal" and not any(s.show_defect for s in specs):
        # A defective battery is labelled from its slices, so at least one must show it.
        candidates = [i for i, s in enumerate(specs) if s.axis != "x"]
        i = candidates[int(rng.integers(len(candidates)))]
        s = specs[i]
        specs[i] = CTSliceSpec(
            s.battery_id, s.battery_type, s.form, s.axis, s.slice_index, s.finding, True, s.size, s.seed
        )
    return tuple(specs)


def make_plan(cfg: SynthConfig) -> list[BatteryPlan]:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    counts = allocate(cfg.mix, cfg.batteries)
    classes = [c for c, k in counts.items() for _ in range(k)]
    rng.shuffle(classes)
    n_rgb_defective = int(round(cfg.rgb_defect_rate * cfg.batteries))
    rgb_flags = np.zeros(cfg.batteries, bool)
    rgb_flags[:n_rgb_defective] = True
    rng.shuffle(rgb_flags)
    n_val = int(round(cfg.validation_fraction * cfg.batteries))
    subsets = np.array(["Training"] * (cfg.batteries - n_val) + ["Validation"] * n_val)
    rng.shuffle(subsets)
    plans = []
    for i, ct_class in enumerate(classes):
        battery_id = i + 1
        brng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, battery_id)))
        battery_type, finding = class_type(ct_class), class_finding(ct_class)
        form = "cylindrical" if brng.random() < cfg.cylindrical_fraction else "pouch"
        if battery_type == "module" and finding == "resin_overflow":
            form = "pouch" if brng.random() < 0.6 else form
        rgb_defects: tuple[str, ...] = ()
        if rgb_flags[i]:
            rgb_defects = (("Damaged",), ("Pollution",), ("Damaged", "Pollution"))[
                int(brng.choice(3, p=[0.45, 0.45, 0.1]))
            ]
        slices = _slice_specs(cfg, brng, battery_id, battery_type, form, finding)
        photos = tuple(
            RGBPhotoSpec(battery_id, battery_type, form, j + 1, rgb_defects, cfg.rgb_width, cfg.rgb_height, cfg.seed)
            for j in range(cfg.photos_per_battery)
        )
        plans.append(
            BatteryPlan(battery_id, battery_type, form, ct_class, rgb_defects, str(subsets[i]), slices, photos)
        )
    return plans
