"""Training configuration: defaults here, overridden by a YAML file (training/configs/NAME.yaml).

A preset file has up to four sections: `data` (the synthetic set it is meant for), `ct`,
`rgb` and `calibration` (the held-out cells the gate is calibrated on). Unknown keys are
errors, so a typo never silently trains the default.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from training.models.autoencoder import DEFAULT_SCORE

_SCHED = {"T_0": 5, "T_mult": 2, "eta_min": 1e-5, "warmup_epochs": 1}

DEFAULTS = {
    "data": {
        "batteries": 60,
        "test_batteries": None,
        "seed": 0,
        "ct_size": 256,
        "rgb_size": [640, 360],
        "slices_per_axis": 2,
        "photos": 2,
        "rgb_defect_rate": 0.4,
        "visibility": None,
    },
    "ct": {
        "model": {"name": "resnet18_late_fusion", "hidden": 256, "dropout": 0.3},
        "input_size": 128,
        "epochs": 20,
        "batch_size": 32,
        "optimizer": {"lr": 1e-3, "weight_decay": 1e-4},
        "scheduler": dict(_SCHED),
        "loss": {"focal_gamma": 2.0, "label_smoothing": 0.05, "class_weights": "balanced"},
        "augment": {
            "hflip": True,
            "vflip": True,
            "rot90": False,
            "affine": {"degrees": 8.0, "scale": [0.92, 1.08], "translate": 0.04},
        },
        # random acquisition drift in training (training/augment.py `acquisition`; probability 0: none)
        "acquisition": {"probability": 0.0},
        "weighted_sampling": False,
        # channels_last: the memory layout oneDNN's convolutions run fastest in on CPUs (0.6 -> 0.7 of SGEMM)
        "memory_format": "channels_last",
        # progressive resizing: the first `epochs` epochs see the batches scaled down to `size` pixels
        # (a 128-px step costs 0.64 of a 160-px one); the rest train at input_size
        "progressive": {"size": None, "epochs": 0},
        # Weight of the training-only defect-map loss (0: train on slice labels alone).
        "defect_map_weight": 1.0,
        # each reviewed line cell (--reviewed) counts as this many training slices
        "reviewed_repeat": 2,
        "early_stopping": {"patience": 6},
        # out-of-distribution gate (training/ood.py): threshold = quantile of validation distances x margin;
        # spread: the covariance from the validation slices (held-out, cross-fitted over `folds`) or the training ones
        "ood": {"quantile": 0.995, "margin": 1.2, "folds": 5, "spread": "held-out"},
        "seed": 0,
        "split_seed": 0,
        # train / val / test shares of the batteries (the presets judge on a fresh set generated apart)
        "split": [0.7, 0.1, 0.2],
        "threads": None,
        "workers": None,
        "device": "auto",
    },
    "rgb": {
        "model": {"name": "conv_autoencoder", "base": 32, "latent": 32, "depth": 4},
        "input_size": 128,
        "epochs": 40,
        "batch_size": 16,
        "optimizer": {"lr": 2e-3, "weight_decay": 1e-5},
        "scheduler": dict(_SCHED),
        # segment_weight: the segmentation head's focal loss (only with model.segment > 0)
        "loss": {"ssim_weight": 0.5, "segment_weight": 1.0},
        "augment": {"hflip": True},
        "memory_format": "channels_last",
        "progressive": {"size": None, "epochs": 0},  # as for ct; the size must be a multiple of the model's
        "acquisition": {"probability": 0.0},
        # Random blemishes painted on the input, clean image as the target (0: plain autoencoder).
        "anomalies": {"probability": 0.5, "max_blobs": 2, "radius": [0.03, 0.12]},
        "reviewed_repeat": 2,  # each photo reviewed as a false alarm (--reviewed) counts this many times
        "early_stopping": {"patience": 8},
        "score": dict(DEFAULT_SCORE),
        "threshold": "f1",  # which validation-calibrated threshold is stored: f1 | roc
        # spread "training": measured on photos of one resolution, a held-out spread refused 6-19% of normal
        # photos of 960 x 540 and 1920 x 1080 (docs/robustness.md); the training spread refused none
        "ood": {"quantile": 0.995, "margin": 1.2, "folds": 5, "spread": "training"},
        "seed": 0,
        "split_seed": 0,
        # train / val / test shares of the batteries (the presets judge on a fresh set generated apart)
        "split": [0.7, 0.1, 0.2],
        "threads": None,
        "workers": None,
        "device": "auto",
    },
    # The gate's calibration (training/conformal.py): after training, held-out cells are generated at each
    # size (CT slice side, photo width x height), `batteries` with the generator's default configuration and
    # as many with the preset's, seeds from `seed` on; each input's gate then refuses at most `rate` of new
    # images of that kind with `confidence`. The photo's rate is lower: one photo serves several cells (each
    # CT slice of its battery), so its refusals come in clusters of cells; it needs 1,197 calibration photos
    # (`photos` per battery), the CT rate 598 slices. batteries 0: no calibration (the fit-time thresholds stay).
    "calibration": {
        "rate": {"ct": 0.005, "rgb": 0.0025},
        "confidence": 0.95,
        "batteries": 17,
        "photos": 12,
        "sizes": [[256, [480, 270]], [512, [960, 540]], [4000, [1920, 1080]]],
        "seed": 3000,
    },
}

# Sub-dictionaries whose keys are free (passed through as keyword arguments).
_FREE = {
    ("ct", "model"),
    ("rgb", "model"),
    ("ct", "augment", "affine"),
    ("data", "visibility"),
    ("ct", "acquisition"),
    ("rgb", "acquisition"),
}


def _merge(base: dict, override: dict, path: tuple = ()) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        where = ".".join(path + (key,))
        if path not in _FREE and key not in base:
            raise ValueError(f"unknown config key {where!r}; known here: {', '.join(sorted(base))}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, path + (key,))
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None) -> dict:
    """Defaults overridden by the YAML file at `path` (None: the defaults alone)."""
    if path is None:
        return copy.deepcopy(DEFAULTS)
    path = Path(path)
    if not path.exists():
        named = Path(__file__).parent / "configs" / f"{path.name if path.suffix else path.name + '.yaml'}"
        if named.exists():
            path = named
        else:
            raise FileNotFoundError(
                f"no config {path} (presets: "
                f"{', '.join(sorted(p.stem for p in (Path(__file__).parent / 'configs').glob('*.yaml')))})"
            )
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping with data/ct/rgb sections")
    return _merge(DEFAULTS, loaded)
