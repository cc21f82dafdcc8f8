"""Batch augmentations on tensors: flips, 90-degree rotations, small affine warps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, cfg: dict, gen: torch.Generator, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Apply the configured augmentations independently to each sample of a (B, C, H, W) batch.

    `fill` is what warps bring in from outside the frame: one value, or one per channel
    as a (1, C, 1, 1) tensor.
    """
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


def _blob_masks(
    b: int, h: int, w: int, gen: torch.Generator, radius: tuple[float, float], minor: tuple[float, float] | None = None
) -> torch.Tensor:
    """(B, 1, H, W) soft ellipses at random places, sizes (fraction of the side) and angles."""
    yy = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xx = torch.linspace(0, 1, w)[None, :].expand(h, w)
    c = 0.15 + 0.7 * torch.rand(b, 2, generator=gen)
    # log-uniform: as many small marks as large ones
    r = torch.exp(math.log(radius[0]) + (math.log(radius[1]) - math.log(radius[0])) * torch.rand(b, 2, generator=gen))
    if minor is not None:
        r[:, 1] = minor[0] + (minor[1] - minor[0]) * torch.rand(b, generator=gen)
    a = torch.rand(b, generator=gen) * math.pi
    dx, dy = xx[None] - c[:, 0, None, None], yy[None] - c[:, 1, None, None]
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    u, v = (dx * cos + dy * sin) / r[:, 0, None, None], (-dx * sin + dy * cos) / r[:, 1, None, None]
    d = torch.sqrt(u * u + v * v)
    return torch.clamp((1.0 - d) * 4.0, 0.0, 1.0)[:, None]


# A painted pixel counts as anomalous (segmentation target) where it changed by more than
# this (0..1 scale, any channel): about 10 grey levels, well above sensor noise.
VISIBLE_CHANGE = 0.04


def synthetic_anomalies(x: torch.Tensor, cfg: dict, gen: torch.Generator, with_mask: bool = False):
    """Paint random blemishes on a (B, 3, H, W) batch in 0..1, for a denoising autoencoder.

    Trained to map the blemished image back to the clean one, the autoencoder learns to
    replace what does not belong on a normal cell by what should be there, so real
    defects leave a large reconstruction error instead of being copied through. The
    blemishes are generic (flat colour, a patch of another photo, a brightness change,
    a thin line, scattered specks), never the defect kinds of the data set; training
    still sees normal photos only.

    With `with_mask`, also returns the (B, 1, H, W) 0/1 mask of where the painting
    visibly changed the image: the target of the segmentation head.
    """
    if not cfg or not cfg.get("probability"):
        return (x, torch.zeros_like(x[:, :1])) if with_mask else x
    b, _, h, w = x.shape
    out = x.clone()
    for _ in range(int(cfg.get("max_blobs", 2))):
        hit = (torch.rand(b, generator=gen) < cfg["probability"]).float()[:, None, None, None]
        mask = _blob_masks(b, h, w, gen, tuple(cfg.get("radius", (0.03, 0.12)))) * hit
        kind = torch.randint(0, 5, (b,), generator=gen)[:, None, None, None]
        colour = torch.rand(b, 3, 1, 1, generator=gen).expand_as(out)
        other = out[torch.roll(torch.arange(b), 1)]  # another photo's pixels at the same place
        gain = (0.4 + 1.2 * torch.rand(b, 1, 1, 1, generator=gen)) * out
        line_mask = _blob_masks(b, h, w, gen, (0.1, 0.3), minor=(1.0 / h, 2.5 / h)) * hit  # a scratch-like streak
        fill = torch.where(
            kind == 0, colour, torch.where(kind == 1, other, torch.where(kind == 2, gain.clamp(0, 1), colour))
        )
        specks = (torch.rand(b, 1, h, w, generator=gen) < 0.2 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)).float()
        m = torch.where(kind == 3, line_mask, torch.where(kind == 4, mask * specks, mask)) * (
            0.5 + 0.5 * torch.rand(b, 1, 1, 1, generator=gen)
        )
        out = out * (1 - m) + fill * m
    if with_mask:
        return out, ((out - x).abs().amax(dim=1, keepdim=True) > VISIBLE_CHANGE).to(x.dtype)
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each sample of (B, C, H, W) blurred with its own sigma (pixels; 0 leaves it as it is)."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).to(x.dtype)[:, None]
    k = torch.exp(-(coords[None] ** 2) / (2 * s**2))
    k = torch.where(sigma[:, None] > 0, k / k.sum(1, keepdim=True), (coords[None] == 0).to(x.dtype))  # (B, K)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), [radius] * 4, mode="replicate")
    kernel = k.repeat_interleave(c, 0)
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def acquisition(
    x: torch.Tensor, cfg: dict | None, gen: torch.Generator, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Random acquisition changes, as a station drifts over months, on (B, C, H, W) images that
    are `(pixels in 0..1 - mean) / std`: gain and offset (CT window and level, exposure), gamma,
    per-channel gain (white balance; photos), blur (focus, reconstruction filter) and noise.

    cfg (each optional): probability, gain [lo, hi], offset (+-), gamma [lo, hi],
    channel_gain (+-), blur (max sigma in pixels), noise (max sigma, 0..1 scale).
    """
    if not cfg or not cfg.get("probability"):
        return x
    b, c = x.shape[:2]
    v = x * std + mean

    def uniform(lo: float, hi: float, *shape) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    on = (torch.rand(b, generator=gen) < cfg["probability"]).to(x.dtype)[:, None, None, None]
    out = v
    if "gain" in cfg or "offset" in cfg:
        lo, hi = cfg.get("gain", [1.0, 1.0])
        out = (out - 0.5) * uniform(lo, hi, 1, 1, 1) + 0.5 + uniform(-1, 1, 1, 1, 1) * cfg.get("offset", 0.0)
    if "channel_gain" in cfg and c > 1:
        out = out * (1 + uniform(-1, 1, c, 1, 1) * cfg["channel_gain"])
    if "gamma" in cfg:
        lo, hi = cfg["gamma"]
        out = out.clamp(0, 1) ** uniform(lo, hi, 1, 1, 1)
    if cfg.get("blur"):
        sigma = uniform(0, cfg["blur"]) * (torch.rand(b, generator=gen) < 0.5)
        out = _gaussian_blur(out, sigma)
    if cfg.get("noise"):
        out = out + torch.randn(out.shape, generator=gen) * uniform(0, cfg["noise"], 1, 1, 1)
    out = out.clamp(0, 1)
    return ((on * out + (1 - on) * v) - mean) / std
