"""Small randomly initialised checkpoints, built from configs, for export and serving tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.checkpoint import save_checkpoint
from training.data.labels import BATTERY_TYPES, CT_CLASSES, SLICE_AXES
from training.models import create_model
from training.preprocess import CT_MEAN, CT_STD

CT_ARGS = {"hidden": 32, "dropout": 0.2, "pool": "max"}
RGB_ARGS = {"base": 8, "latent": 16, "depth": 3, "skips": 1, "segment": 8, "segment_depth": 3}
RGB_SCORE = {"error": "segmentation_probability", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06}


def ct_info(size: int, arch: str, arch_args: dict, temperature: float = 1.3) -> dict:
    return {"kind": "ct_classifier", "arch": arch, "arch_args": arch_args, "class_names": list(CT_CLASSES), "input_size": size,
            "in_chans": 1, "normalization": {"mean": CT_MEAN, "std": CT_STD}, "temperature": temperature,
            "meta_spec": {"names": ["battery_type", "slice_axis"], "battery_type": list(BATTERY_TYPES), "slice_axis": list(SLICE_AXES)}}


def rgb_info(size: int, arch_args: dict, score: dict, threshold: float) -> dict:
    return {"kind": "rgb_autoencoder", "arch": "conv_autoencoder", "arch_args": arch_args, "input_size": size, "in_chans": 3,
            "normalization": {"mean": 0.0, "std": 1.0}, "score": score, "threshold": threshold, "threshold_method": "f1",
            "thresholds": {"f1": threshold, "roc": threshold * 1.1}}


def settle_batchnorm(model: torch.nn.Module, *inputs) -> torch.nn.Module:
    """Set BatchNorm running statistics from real inputs (as a short training run would),
    so that a random network's outputs vary from image to image instead of saturating."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(*inputs)
    return model.eval()


def make_ct_run(run: Path, size: int = 64, arch: str = "resnet18_late_fusion", seed: int = 0, images=None, meta=None, **args) -> Path:
    torch.manual_seed(seed)
    arch_args = CT_ARGS | args
    model = create_model(arch, **arch_args)
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(16, 1, size, size, generator=g)
        meta = torch.tensor([[i % 2, i % 3] for i in range(16)], dtype=torch.float32)
    settle_batchnorm(model, torch.as_tensor(images), torch.as_tensor(meta))
    save_checkpoint(run, model, ct_info(size, arch, arch_args))
    return Path(run)


def make_rgb_run(run: Path, size: int = 64, seed: int = 0, threshold: float = 0.5, score: dict | None = None, images=None,
                 **args) -> Path:
    torch.manual_seed(seed)
    arch_args = RGB_ARGS | args
    model = create_model("conv_autoencoder", **arch_args)
    if images is None:
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(seed))
    settle_batchnorm(model, torch.as_tensor(images))
    if arch_args.get("segment"):  # the head's BatchNorms too
        with torch.no_grad():
            model.train()
            x = torch.as_tensor(images)
            model.segment_logits(x, model(x))
            model.eval()
    save_checkpoint(run, model, rgb_info(size, arch_args, score or (RGB_SCORE if arch_args.get("segment") else
                                                                     {"error": "squared_error_channel_mean", "smooth_sigma": 1.5,
                                                                      "top_fraction": 0.01, "border": 0.06}), threshold))
    return Path(run)


def gap_threshold(values: np.ndarray, low: float = 0.3, high: float = 0.7) -> tuple[float, float]:
    """A threshold in the widest gap between sorted values within the given quantile range,
    and the gap's half-width: no value lies closer to it than that."""
    v = np.sort(np.asarray(values, np.float64))
    a, b = int(len(v) * low), max(int(len(v) * high), int(len(v) * low) + 2)
    gaps = np.diff(v[a:b])
    i = int(gaps.argmax())
    return float((v[a + i] + v[a + i + 1]) / 2), float(gaps[i] / 2)
