"""The graphs that are exported: what each served network computes in one forward pass.

- `CTInference`: (image, meta) -> (class probabilities with the calibration temperature
  applied, Grad-CAM of the top class on the last convolutional stage). Grad-CAM needs the
  gradient of the top logit with respect to the feature maps; through a global pool and
  the MLP head (Linear, BatchNorm1d in eval, ReLU, Dropout, Linear) it has a closed form:

      d logit_k / d pooled = W1^T (bn_scale * [u > 0] * W2[k])

  where u is the head's pre-ReLU activation. Average and max pooling both spread it as
  d logit_k / d pooled / (h * w) when averaged over the map, which is Grad-CAM's channel
  weight. So the heatmap costs one weighted sum over the feature maps, no backward pass.
  Like pytorch-grad-cam, the map is ReLU'd, resized (bilinear) to the input size and
  scaled to 0..1 per image.
- `RGBInference`: image -> (anomaly score (B, 1), error map (B, S, S)), the checkpoint's
  own `AnomalyScorer`.

Both also emit their out-of-distribution score (B, 1), scaled so that 1.0 is the
threshold calibrated on validation data (`training/ood.py`), from the features of the
same forward pass. A checkpoint without a calibrated gate (trained before gates existed)
exports with a score of 0: nothing is refused until `python -m training.ood RUN` fits one.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.autoencoder import scorer_from
from training.ood import CT_FEATURES, RGB_FEATURES, GaussianGate, ct_gate_features, ct_group, rgb_features

CAM_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image adds the same to the max


def _head_layers(head: nn.Module) -> tuple[nn.Linear, nn.BatchNorm1d, nn.Linear]:
    layers = list(head) if isinstance(head, nn.Sequential) else []
    kinds = [type(m) for m in layers]
    if kinds != [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]:
        raise ValueError(
            "in-graph Grad-CAM needs the fusion head Linear, BatchNorm1d, ReLU, Dropout, Linear; "
            f"this model's head is {[k.__name__ for k in kinds] or type(head).__name__}"
        )
    return layers[0], layers[1], layers[4]


def _gate(gate: dict | None, features: str) -> nn.Module | None:
    if not gate:
        return None
    if gate.get("features") != features:
        raise ValueError(
            f"the checkpoint's out-of-distribution gate was fitted on features {gate.get('features')!r}, "
            f"this version computes {features!r}: refit it with 'python -m training.ood RUN'"
        )
    return GaussianGate(gate)


class CTInference(nn.Module):
    """A late- or early-fusion CT classifier -> (probabilities (B, C), CAM (B, S, S), OOD score (B, 1))."""

    def __init__(self, classifier: nn.Module, temperature: float = 1.0, gate: dict | None = None):
        super().__init__()
        self.gate = _gate(gate, CT_FEATURES)
        if not hasattr(classifier, "feature_maps"):
            raise ValueError(f"{type(classifier).__name__} has no feature_maps(); it cannot be exported with Grad-CAM")
        self.classifier = classifier.eval()
        self.fc1, self.bn, self.fc2 = _head_layers(classifier.head)
        self.use_meta = bool(getattr(classifier, "use_meta", False))
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.classifier.feature_maps(image, meta)  # (B, C, h, w)
        channels, h, w = fmap.shape[1], fmap.shape[2], fmap.shape[3]
        pooled = self.classifier.pool(fmap).flatten(1)
        x = torch.cat([pooled, meta.to(pooled.dtype)], dim=1) if self.use_meta else pooled
        bn_scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        u = (self.fc1(x) - self.bn.running_mean) * bn_scale + self.bn.bias
        logits = self.fc2(torch.relu(u))
        probs = torch.softmax(logits * self.inv_temperature, dim=1)
        top = logits.argmax(dim=1)
        grad_hidden = self.fc2.weight[top] * (u > 0).to(u.dtype) * bn_scale  # (B, hidden)
        weights = (grad_hidden @ self.fc1.weight)[:, :channels] / (h * w)  # (B, C)
        cam = torch.relu((weights[:, :, None, None] * fmap).sum(dim=1, keepdim=True))
        # resizing commutes with the per-image affine scaling, so resizing first and
        # scaling once gives pytorch-grad-cam's scale -> resize -> scale exactly
        cam = nn.functional.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cam = cam - cam.flatten(1).min(dim=1).values[:, None, None]
        cam = cam / (cam.flatten(1).max(dim=1).values[:, None, None] + CAM_EPS)
        ood = (
            self.gate(ct_gate_features(fmap, pooled, image), ct_group(meta))
            if self.gate is not None
            else torch.zeros_like(probs[:, 0])
        )
        return probs, cam, ood[:, None]


class RGBInference(nn.Module):
    """The autoencoder with the checkpoint's score definition -> (score (B, 1), error map (B, S, S),
    OOD score (B, 1))."""

    def __init__(self, autoencoder: nn.Module, score: dict, gate: dict | None = None):
        super().__init__()
        self.scorer = scorer_from(autoencoder.eval(), score).eval()
        self.gate = _gate(gate, RGB_FEATURES)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        score, emap, recon, maps = self.scorer.score_with_features(image)
        ood = self.gate(rgb_features(image, recon, maps, emap)) if self.gate is not None else torch.zeros_like(score)
        return score[:, None], emap, ood[:, None]


def inference_graph(model: nn.Module, info: dict) -> nn.Module:
    """The exported graph of a checkpoint (model, info) as `load_checkpoint` returns them."""
    if info["kind"] == "ct_classifier":
        return CTInference(model, info.get("temperature", 1.0), info.get("ood")).eval()
    return RGBInference(model, info["score"], info.get("ood")).eval()
