"""Checkpoints that carry everything export and serving need, not just weights."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import torch

from training.models import create_model

CHECKPOINT = "checkpoint.pt"
KINDS = ("ct_classifier", "rgb_autoencoder")


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, info: dict) -> Path:
    """Write RUN/checkpoint.pt: the weights plus `info` (arch, args, classes, sizes, calibration...)."""
    if info.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}")
    for key in ("arch", "arch_args", "input_size", "normalization"):
        if key not in info:
            raise ValueError(f"checkpoint info lacks {key!r}")
    path = Path(run_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        info,
        state_dict=model.state_dict(),
        saved=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
    )
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, checkpoint info) from a run folder or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with 'python -m training.train'")
    info = torch.load(path, map_location="cpu", weights_only=False)
    if info.get("kind") not in KINDS:
        raise ValueError(f"{path} is not a checkpoint of this project (kind {info.get('kind')!r})")
    model = create_model(info["arch"], **info["arch_args"])
    model.load_state_dict(info.pop("state_dict"))
    return model.eval(), info
