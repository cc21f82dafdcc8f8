"""Batch augmentations on tensors: flips, 90-degree rotations, small affine warps."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, cfg: dict, gen: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """Apply the configured augmentations independently to each sample of a (B, C, H, W) batch."""
    b = x.shape[0]
    if cfg.get("hflip"):
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.get("vflip"):
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    if cfg.get("rot90") and x.shape[2] == x.shape[3]:
        k = torch.randint(0, 4, (b,), generator=gen)
        x = torch.stack([torch.rot90(x[i], int(k[i]), dims=(1, 2)) for i in range(b)])
    affine = cfg.get("affine")
    if affine:
        deg = math.radians(affine.get("degrees", 0.0))
        lo, hi = affine.get("scale", [1.0, 1.0])
        shift = affine.get("translate", 0.0)
        angle = (torch.rand(b, generator=gen) * 2 - 1) * deg
        scale = lo + torch.rand(b, generator=gen) * (hi - lo)
        t = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift * 2  # grid units span 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return x
