"""Grad-CAM for the CT classifier: the service's in-graph map, or pytorch-grad-cam for audits.

The service computes Grad-CAM of the top class inside the exported graph (closed form,
no backward pass; `export.graphs.CTInference`), so every answer carries `CT_CAM` for free.
`TorchCAM` recomputes it on the PyTorch checkpoint with pytorch-grad-cam, with any of its
methods, to audit the served map or to look at a cell another way (GradCAM++, ScoreCAM...).
"""

from __future__ import annotations

from pathlib import Path
from threading import Lock

import numpy as np
import torch

from client.explain.explainers import CAM_METHODS as METHODS
from export.repository import classify_runs
from training.checkpoint import load_checkpoint


class WithMeta(torch.nn.Module):
    """pytorch-grad-cam calls model(image); the cell's metadata rides along."""

    def __init__(self, model: torch.nn.Module, meta: torch.Tensor):
        super().__init__()
        self.model, self.meta = model, meta

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image, self.meta.expand(image.shape[0], -1))


def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional stage, the one the served CAM weighs (`feature_maps`)."""
    for name in ("features", "body"):
        stage = getattr(model, name, None)
        if isinstance(stage, torch.nn.Sequential) and len(stage):
            return stage[-1]
        if stage is not None:
            return stage
    raise ValueError(f"{type(model).__name__} has neither .features nor .body: no layer to compute Grad-CAM on")


class TorchCAM:
    """pytorch-grad-cam on a CT checkpoint (a run folder or a .pt file)."""

    def __init__(self, checkpoint: str | Path, method: str = "gradcam", device: str | None = None):

        if method not in METHODS:
            raise ValueError(f"unknown Grad-CAM method {method!r}; choose one of {', '.join(METHODS)}")
        path = Path(checkpoint)
        if path.is_dir():
            path = classify_runs([path], required=("ct_classifier",))["ct_classifier"]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.info = load_checkpoint(path)
        if self.info.get("kind") != "ct_classifier":
            raise ValueError(f"{checkpoint} is a {self.info.get('kind')} checkpoint, not the CT classifier")
        self.model = self.model.eval().to(self.device)
        self.method = method
        self._lock = Lock()  # the CAM objects hook the model: one computation at a time

    def __call__(self, ct_tensor: np.ndarray, meta, target_class: int | None = None) -> np.ndarray:
        """The map (S, S) 0..1 for one normalised CT input (C, S, S); the top class unless given."""
        image = torch.from_numpy(np.asarray(ct_tensor, np.float32))[None].to(self.device)
        m = torch.tensor([list(meta)], dtype=torch.float32, device=self.device)
        import pytorch_grad_cam  # noqa: PLC0415 - optional heavy dependency, only for the audit path
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: PLC0415 - optional heavy dependency, only for the audit path

        targets = None if target_class is None else [ClassifierOutputTarget(int(target_class))]
        method = getattr(pytorch_grad_cam, METHODS[self.method])
        with self._lock, method(model=WithMeta(self.model, m), target_layers=[target_layer(self.model)]) as cam:
            if hasattr(cam, "batch_size"):
                cam.batch_size = 16  # ScoreCAM / AblationCAM: images per forward pass
            return np.asarray(cam(input_tensor=image, targets=targets)[0], np.float32)
