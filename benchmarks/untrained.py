"""Checkpoints with a training preset's architectures and input sizes but random weights.

Speed does not depend on the weights, so `python -m benchmarks serving --untrained full`
measures the serving path with the full preset's networks (CT 512 px, RGB 256 px) without
the days of training they need on a CPU. Their verdicts mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.labels import BATTERY_TYPES, CT_CLASSES, SLICE_AXES
from core.preprocess import CT_MEAN, CT_STD
from training.checkpoint import save_checkpoint
from training.config import load_config
from training.models import create_model


def untrained_runs(preset: str, out: str | Path, seed: int = 0) -> list[Path]:
    """RUN folders `out/ct` and `out/rgb` (written once; reused when present)."""
    out = Path(out)
    cfg = load_config(preset)
    ct_run, rgb_run = out / "ct", out / "rgb"
    torch.manual_seed(seed)
    if not (ct_run / "checkpoint.pt").exists():
        args = {k: v for k, v in cfg["ct"]["model"].items() if k != "name"}
        model = create_model(cfg["ct"]["model"]["name"], **args).eval()
        save_checkpoint(
            ct_run,
            model,
            {
                "kind": "ct_classifier",
                "arch": cfg["ct"]["model"]["name"],
                "arch_args": args,
                "class_names": list(CT_CLASSES),
                "input_size": int(cfg["ct"]["input_size"]),
                "in_chans": 1,
                "normalization": {"mean": CT_MEAN, "std": CT_STD},
                "temperature": 1.0,
                "untrained": True,
                "meta_spec": {
                    "names": ["battery_type", "slice_axis"],
                    "battery_type": list(BATTERY_TYPES),
                    "slice_axis": list(SLICE_AXES),
                },
            },
        )
    if not (rgb_run / "checkpoint.pt").exists():
        args = {k: v for k, v in cfg["rgb"]["model"].items() if k != "name"}
        model = create_model(cfg["rgb"]["model"]["name"], **args).eval()
        save_checkpoint(
            rgb_run,
            model,
            {
                "kind": "rgb_autoencoder",
                "arch": cfg["rgb"]["model"]["name"],
                "arch_args": args,
                "input_size": int(cfg["rgb"]["input_size"]),
                "in_chans": 3,
                "normalization": {"mean": 0.0, "std": 1.0},
                "score": dict(cfg["rgb"]["score"]),
                "threshold": 0.01,
                "threshold_method": "f1",
                "thresholds": {"f1": 0.01, "roc": 0.01},
                "untrained": True,
            },
        )
    return [ct_run, rgb_run]
