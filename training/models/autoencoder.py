"""The RGB convolutional autoencoder, trained on normal photos only.

A narrow bottleneck (spatial size/16, few channels) keeps it from learning the identity,
so it reconstructs what normal cells look like and fails on dents, scratches and stains.

With `segment` > 0 it also carries a small segmentation network (the discriminative half
of DRAEM, Zavrtanik et al., ICCV 2021) that looks at the photo next to its
reconstruction and outputs, per pixel, the probability that the photo departs from a
normal cell there. It learns this from the blemishes painted on normal photos in
training, so training still sees normal photos only; its map is sharper and better
calibrated than the raw reconstruction error, which also lights up wherever a normal
detail is reconstructed a little off.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 4, stride=2, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class SegmentationHead(nn.Module):
    """(photo, reconstruction) -> per-pixel anomaly logits (B, 1, H, W): a small U-Net.

    Its input is the photo, the reconstruction and their absolute difference (9 channels),
    each centred on the photo's mean colour.
    """

    def __init__(self, in_chans: int = 3, base: int = 16, depth: int = 3):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.stem = nn.Sequential(
            nn.Conv2d(3 * in_chans, base, 3, padding=1),
            nn.BatchNorm2d(base),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(base, base, 3, padding=1),
            nn.BatchNorm2d(base),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.down = nn.ModuleList(_down(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            _up(widths[i + 1] + (widths[i + 1] if i + 1 < depth else 0), widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(2 * base, 1, 3, padding=1)

    def forward(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        mean = image.mean(dim=(2, 3), keepdim=True)
        x = self.stem(torch.cat([image - mean, recon - mean, (image - recon).abs()], dim=1))
        stages = [x]
        for block in self.down:
            stages.append(block(stages[-1]))
        y = stages[-1]
        for j, block in enumerate(self.up):
            if j:
                y = torch.cat([y, stages[len(stages) - 1 - j]], dim=1)
            y = block(y)
        return self.out(torch.cat([y, stages[0]], dim=1))


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder, 1x1 bottleneck, upsampling decoder.

    `skips` (0 .. depth-1) passes that many encoder stages, deepest first, to the decoder
    stage of the same resolution (U-Net style; never the full-resolution input). Without
    skips the bottleneck has to carry everything and fine normal detail (print, labels,
    bolts) comes back blurred, so normal photos score high; with skips the detail comes
    through and the model must be trained as a denoiser (`rgb.anomalies`) so that it
    learns to replace anomalous patches rather than copy them.
    """

    def __init__(
        self,
        in_chans: int = 3,
        base: int = 32,
        latent: int = 64,
        depth: int = 4,
        center: bool = True,
        skips: int = 0,
        segment: int = 0,
        segment_depth: int = 3,
    ):
        super().__init__()
        # `segment`: base width of the segmentation head (0: none); the input side must then
        # also be a multiple of 2**segment_depth
        self.segmenter = SegmentationHead(in_chans, segment, segment_depth) if segment else None
        if not 0 <= skips < depth:
            raise ValueError(f"skips must be between 0 and depth - 1 = {depth - 1}, got {skips}")
        # With `center`, the image's mean colour is taken out before encoding and added
        # back after decoding: bench and wrap colours vary from photo to photo, and an
        # autoencoder otherwise spends its small code on them and greys everything out.
        self.center = center
        self.skips = skips
        widths = [base * 2**i for i in range(depth)]
        enc, cin = [], in_chans
        for w in widths:
            enc.append(_down(cin, w))
            cin = w
        enc.append(nn.Conv2d(cin, latent, 1))
        self.encoder = nn.Sequential(*enc)
        # up-block j doubles the resolution; its input has the resolution of encoder stage
        # depth-1-j, whose output it also takes when 1 <= j <= skips
        dec, cin = [nn.Conv2d(latent, widths[-1], 1), nn.LeakyReLU(0.2, inplace=True)], widths[-1]
        for j in range(depth):
            cout = widths[depth - 2 - j] if j < depth - 1 else base
            dec.append(_up(cin + (widths[depth - 1 - j] if 1 <= j <= skips else 0), cout))
            cin = cout
        dec.append(nn.Conv2d(base, in_chans, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.multiple = 2 ** max(depth, segment_depth if segment else 0)  # input sides must be a multiple of this

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stages = []
        for block in self.encoder[:-1]:
            x = block(x)
            stages.append(x)
        code = self.encoder[-1](x)
        y = self.decoder[1](self.decoder[0](code))
        for j, up in enumerate(self.decoder[2:-1]):
            if 1 <= j <= self.skips:
                y = torch.cat([y, stages[len(stages) - 1 - j]], dim=1)
            y = up(y)
        return self.decoder[-1](y), stages + [code]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(reconstruction (B, C, H, W), the encoder's feature maps, its bottleneck code last) in one pass."""
        if not self.center:
            out, maps = self._decode(x)
            return torch.sigmoid(out), maps
        mean = x.mean(dim=(2, 3), keepdim=True)
        out, maps = self._decode(x - mean)
        return torch.clamp(out + mean, 0.0, 1.0), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[0]

    def segment_logits(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly logits (B, 1, H, W) from the segmentation head."""
        if self.segmenter is None:
            raise ValueError("this autoencoder has no segmentation head (segment=0)")
        return self.segmenter(image, recon)


@register("conv_autoencoder")
def conv_autoencoder(
    in_chans: int = 3,
    base: int = 32,
    latent: int = 64,
    depth: int = 4,
    center: bool = True,
    skips: int = 0,
    segment: int = 0,
    segment_depth: int = 3,
):
    return ConvAutoencoder(in_chans, base, latent, depth, center, skips, segment, segment_depth)


# How an error map and an anomaly score are computed from a reconstruction. Stored in the
# checkpoint with the threshold; the exported graph computes exactly this.
# `error`: squared_error_channel_mean (the reconstruction error) or segmentation_probability
# (the segmentation head's output; needs an autoencoder built with `segment`).
# The score ignores a band along the frame (`border`, a fraction of the side): the crop
# margin is bench, and convolutions reconstruct the frame's edge worst of all.
ERRORS = ("squared_error_channel_mean", "segmentation_probability")
DEFAULT_SCORE = {"error": "squared_error_channel_mean", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06}


def scorer_from(model: nn.Module, score: dict) -> AnomalyScorer:
    """The scorer a checkpoint's score definition describes (older ones have no border)."""
    return AnomalyScorer(
        model, score["smooth_sigma"], score["top_fraction"], score.get("border", 0.0), score.get("error", ERRORS[0])
    )


class AnomalyScorer(nn.Module):
    """image -> (anomaly score (B,), error map (B, H, W)), all in one traceable graph."""

    def __init__(
        self,
        autoencoder: nn.Module,
        smooth_sigma: float = 1.5,
        top_fraction: float = 0.01,
        border: float = 0.0,
        error: str = ERRORS[0],
    ):
        super().__init__()
        if error not in ERRORS:
            raise ValueError(f"unknown error map {error!r}; expected one of {', '.join(ERRORS)}")
        if error == "segmentation_probability" and getattr(autoencoder, "segmenter", None) is None:
            raise ValueError(
                "error map segmentation_probability needs an autoencoder with a segmentation head (model.segment > 0)"
            )
        self.autoencoder = autoencoder
        self.error = error
        self.top_fraction = top_fraction
        self.border = border
        radius = max(1, int(round(3 * smooth_sigma)))
        coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-(coords**2) / (2 * smooth_sigma**2))
        g = g / g.sum()
        self.register_buffer("kernel", (g[:, None] * g[None, :])[None, None])
        self.pad = radius

    def error_map(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.error == "segmentation_probability":
            err = torch.sigmoid(self.autoencoder.segment_logits(image, recon))
        else:
            err = (image - recon).pow(2).mean(dim=1, keepdim=True)
        err = nn.functional.conv2d(nn.functional.pad(err, [self.pad] * 4, mode="replicate"), self.kernel)
        return err[:, 0]

    def score(self, error_map: torch.Tensor) -> torch.Tensor:
        h, w = (int(d) for d in error_map.shape[-2:])  # fixed per model: constants in an exported graph
        by, bx = int(round(h * self.border)), int(round(w * self.border))
        if by or bx:
            error_map = error_map[:, by : h - by, bx : w - bx]
        flat = error_map.flatten(1)
        k = max(1, int(round(int(flat.shape[1]) * self.top_fraction)))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emap = self.error_map(image, self.autoencoder(image))
        return self.score(emap), emap

    def score_with_features(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(score (B,), error map (B, H, W), reconstruction, the encoder's feature maps) from one pass of
        the autoencoder."""
        recon, maps = self.autoencoder.reconstruct(image)
        emap = self.error_map(image, recon)
        return self.score(emap), emap, recon, maps
