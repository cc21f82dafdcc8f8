"""CT classifiers: an image backbone, the [battery_type, slice_axis] metadata, 5 logits.

Late fusion (the default): backbone -> pooled features, concatenated with the metadata,
-> MLP head (Linear, BatchNorm1d, ReLU, Dropout, Linear). The head is deliberately this
shape: the gradient of a logit with respect to the pooled features has a closed form
through it, which lets the exported graph emit Grad-CAM in its forward pass.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from core.labels import CT_CLASSES
from training.models.registry import register

META_DIM = 2  # [battery_type, slice_axis]


def _resnet18_trunk(in_chans: int) -> nn.Module:
    """torchvision ResNet18 without its classifier, first conv for `in_chans` channels."""
    net = tv_resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def fusion_head(in_features: int, hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


def _pool(kind: str) -> nn.Module:
    if kind not in POOLS:
        raise ValueError(f"pool must be one of {sorted(POOLS)}, got {kind!r}")
    return POOLS[kind](1)


class LateFusionClassifier(nn.Module):
    """features(image) -> global pool -> concat(meta) -> head.

    `pool="max"` suits small local defects (one void lights up one cell of the last
    feature map, which averaging would dilute). Either way the Grad-CAM channel weights
    are the same closed form: the spatial mean of d logit / d feature map is
    d logit / d pooled feature divided by the map's area.
    """

    def __init__(
        self,
        features: nn.Module,
        num_features: int,
        hidden: int = 256,
        dropout: float = 0.3,
        num_classes: int = len(CT_CLASSES),
        use_meta: bool = True,
        pool: str = "avg",
    ):
        super().__init__()
        self.features = features  # image -> (B, C, h, w), the last convolutional stage
        self.pool = _pool(pool)
        self.use_meta = use_meta
        self.head = fusion_head(num_features + (META_DIM if use_meta else 0), hidden, dropout, num_classes)

    def feature_maps(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """The last convolutional stage (B, C, h, w): what Grad-CAM weighs."""
        return self.features(image)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.feature_maps(image, meta)).flatten(1)
        if self.use_meta:
            pooled = torch.cat([pooled, meta.to(pooled.dtype)], dim=1)
        return self.head(pooled)


class EarlyFusionClassifier(nn.Module):
    """The metadata, through an MLP, scales and shifts the stem's feature maps (FiLM)."""

    def __init__(
        self,
        in_chans: int = 1,
        hidden: int = 256,
        dropout: float = 0.3,
        num_classes: int = len(CT_CLASSES),
        pool: str = "avg",
    ):
        super().__init__()
        trunk = _resnet18_trunk(in_chans)
        self.stem, self.body = trunk[:4], trunk[4:]
        self.film = nn.Sequential(nn.Linear(META_DIM, 64), nn.ReLU(inplace=True), nn.Linear(64, 2 * 64))
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        self.pool = _pool(pool)
        self.use_meta = False  # the head sees image features only: the metadata acted on the stem
        self.head = fusion_head(512, hidden, dropout, num_classes)

    def feature_maps(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        gamma, beta = self.film(meta.to(x.dtype)).chunk(2, dim=1)
        x = x * (1 + gamma[..., None, None]) + beta[..., None, None]
        return self.body(x)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.feature_maps(image, meta)).flatten(1))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
        )
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        x = x * channel[..., None, None]
        spatial = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))
        return x * spatial


@register("resnet18_late_fusion")
def resnet18_late_fusion(
    in_chans: int = 1, hidden: int = 256, dropout: float = 0.3, num_classes: int = len(CT_CLASSES), pool: str = "avg"
):
    return LateFusionClassifier(_resnet18_trunk(in_chans), 512, hidden, dropout, num_classes, pool=pool)


@register("resnet18")
def resnet18(
    in_chans: int = 1, hidden: int = 256, dropout: float = 0.3, num_classes: int = len(CT_CLASSES), pool: str = "avg"
):
    """Image only: the metadata input is accepted and ignored (same call signature)."""
    return LateFusionClassifier(_resnet18_trunk(in_chans), 512, hidden, dropout, num_classes, use_meta=False, pool=pool)


@register("resnet18_early_fusion")
def resnet18_early_fusion(
    in_chans: int = 1, hidden: int = 256, dropout: float = 0.3, num_classes: int = len(CT_CLASSES), pool: str = "avg"
):
    return EarlyFusionClassifier(in_chans, hidden, dropout, num_classes, pool)


@register("cbam_resnet18")
def cbam_resnet18(
    in_chans: int = 1, hidden: int = 256, dropout: float = 0.3, num_classes: int = len(CT_CLASSES), pool: str = "avg"
):
    """ResNet18 with CBAM on the residual branch of every basic block, late fusion."""
    trunk = _resnet18_trunk(in_chans)
    for stage in trunk[4:]:
        for block in stage:
            block.bn2 = nn.Sequential(block.bn2, CBAM(block.bn2.num_features))
    return LateFusionClassifier(trunk, 512, hidden, dropout, num_classes, pool=pool)


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """A ResNet stage that keeps its input's resolution: stride 1, every 3x3 conv dilated.

    torchvision's BasicBlock refuses `replace_stride_with_dilation`, so the convolutions are
    changed in place (stride, dilation and padding are plain attributes of nn.Conv2d; the
    weights keep their shapes). The first block's 1x1 downsample keeps matching the channels.
    """
    for block in stage:
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, 3x3 branches at several
    dilation rates and an image-level branch, concatenated and projected by a 1x1 conv.

    The image-level branch is broadcast back over the map (no interpolation, so any input
    size exports) and has no BatchNorm (a 1x1 map of batch 1 has no statistics)."""

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (2, 4, 6)):
        super().__init__()

        def branch(kernel: int, rate: int) -> nn.Sequential:
            pad = 0 if kernel == 1 else rate
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel, padding=pad, dilation=rate, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([branch(1, 1), *(branch(3, int(r)) for r in rates)])
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [b(x) for b in self.branches]
        maps.append(self.image_pool(x).expand_as(maps[0]))
        return self.project(torch.cat(maps, dim=1))


@register("drn_aspp")
def drn_aspp(
    in_chans: int = 1,
    hidden: int = 256,
    dropout: float = 0.3,
    num_classes: int = len(CT_CLASSES),
    pool: str = "avg",
    output_stride: int = 8,
    aspp_channels: int = 256,
    rates: tuple[int, ...] | list[int] = (2, 4, 6),
):
    """Dilated ResNet18 (DRN-A style: the last stages dilated instead of strided, output stride
    8 or 16) with an ASPP head in DeepLabV3 style, late fusion of the metadata as the others.

    ASPP is the last convolutional stage (`features = Sequential(trunk, ASPP)`), so pooling
    and the fusion head follow it exactly as in the other models and the served Grad-CAM is
    the same closed form, taken on the ASPP output. DeepLab's rates (6, 12, 18) suit a 33 x 33
    map of a 513 px crop; the default (2, 4, 6) suits the 12 x 12 map of a 96 px input at
    output stride 8 (scale them with the input size)."""
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    trunk = _resnet18_trunk(in_chans)
    if output_stride == 8:
        _dilate(trunk[6], 2)
        _dilate(trunk[7], 4)
    else:
        _dilate(trunk[7], 2)
    head = ASPP(512, aspp_channels, tuple(int(r) for r in rates))
    return LateFusionClassifier(nn.Sequential(trunk, head), aspp_channels, hidden, dropout, num_classes, pool=pool)


class _TimmFeatures(nn.Module):
    def __init__(self, name: str, in_chans: int):
        super().__init__()
        self.net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, global_pool="")
        self.num_features = self.net.num_features

    def forward(self, x):
        return self.net.forward_features(x)


def _timm_late_fusion(name: str):
    def build(
        in_chans: int = 1,
        hidden: int = 256,
        dropout: float = 0.3,
        num_classes: int = len(CT_CLASSES),
        pool: str = "avg",
    ):
        features = _TimmFeatures(name, in_chans)
        return LateFusionClassifier(features, features.num_features, hidden, dropout, num_classes, pool=pool)

    build.__doc__ = f"timm {name} backbone (random init; no weights are downloaded), late fusion."
    return build


for _name in ("convnext_tiny", "efficientnet_b0"):
    register(_name)(_timm_late_fusion(_name))
