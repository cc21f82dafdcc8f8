"""Training losses: focal loss for the CT classifier, MSE + SSIM for the autoencoder, per-pixel
focal loss for its segmentation head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.) with per-class weights and label smoothing.

    gamma = 0 and no weights reduce it to label-smoothed cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = logits.shape[1]
        logp = F.log_softmax(logits, dim=1)
        soft = F.one_hot(target, n).to(logp.dtype) * (1 - self.label_smoothing) + self.label_smoothing / n
        focal = (1 - logp.exp()).pow(self.gamma) if self.gamma else 1.0
        loss = -(soft * focal * logp).sum(dim=1)
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, 'valid' region only."""
    c = x.shape[1]
    win = _gaussian_window(size, sigma, c, x.device, x.dtype)
    mu_x = F.conv2d(x, win, groups=c)
    mu_y = F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x**2
    syy = F.conv2d(y * y, win, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return ssim_map(x, y, data_range).mean()


class ReconstructionLoss(nn.Module):
    """(1 - w) * MSE + w * (1 - SSIM)."""

    def __init__(self, ssim_weight: float = 0.5):
        super().__init__()
        self.ssim_weight = ssim_weight

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(recon, target)
        if not self.ssim_weight:
            return mse
        return (1 - self.ssim_weight) * mse + self.ssim_weight * (1 - ssim(recon, target))


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pixel focal loss for the segmentation head: anomalous pixels are rare, and most
    normal ones are easy, so their well-classified mass must not drown the rest."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return ((1 - p_true).pow(gamma) * bce).mean()
