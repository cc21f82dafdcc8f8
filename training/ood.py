"""Out-of-distribution gates: is this input a battery cell of a kind the models know?

A classifier always answers with one of its classes and an autoencoder always gives a
score, so on an MRI slice, a portrait, noise, the photo sent on the CT input or an empty
bench they answer confidently and wrongly. Each served network therefore also computes a
score of how far its input lies from what it was trained on, scaled so that the
threshold calibrated on validation data is 1.0 (`CT_OOD`, `RGB_OOD`; >= 1 means not
inspectable, verdict 4).

The score is a Mahalanobis distance in the network's own feature space (Lee et al.,
NeurIPS 2018), with a covariance shared by the classes and shrunk (Ledoit-Wolf) so that a
few hundred training images suffice for hundreds of dimensions:

- CT: the classifier's pooled features, the mean of its last feature map and the crop's
  border contrast. Each class has a mean per slice axis, and the distance is to the
  nearest mean of the battery type and axis the metadata names, so a module slice labelled
  as a cell (or the reverse) lies far from every class it may be.
- RGB: the autoencoder's encoder stages and bottleneck code (mean and spread over the
  image), the photo's own colour statistics (the autoencoder centres colour away), the log
  of its mean reconstruction error and the error map's mean, spread and hot share; one
  Gaussian of normal training photos. Defects are local and move these little; a photo of
  something else moves them all.

Features are standardised by their spread within the training classes; a dimension that
never varied in training gets a twentieth of the median spread, so a feature that only
wakes up on foreign inputs counts fully.

Calibration: the threshold is the `quantile` of the validation distances (defective
validation cells included: they must not be refused) times `margin`. Both are the
training config's (`ct.ood`, `rgb.ood`), and the resulting gate is stored in the
checkpoint under `ood`. `python -m training.ood RUN --data DIR` fits a run's gate again.

That threshold and the placement ranges are only provisional: fitted on the training data,
they say nothing about how many of the next line's cells they refuse. The preset then
calibrates both on held-out cells drawn the way the line draws them, for a stated
false-refusal rate (training/conformal.py; `--calibration DIR ...` here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from core.aihub import scan
from core.decode import ImageError
from core.labels import BATTERY_TYPES, CT_CLASSES, class_type
from core.preprocess import check_frame, encoded_rgb_input, fit_frame
from training import conformal
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import DEFAULTS as CONFIG_DEFAULTS
from training.data.split import DEFAULT_FRACTIONS, read_split, split_dataset
from training.datasets import load_ct, load_rgb
from training.models.autoencoder import scorer_from

GATE_DEFAULTS = {"quantile": 0.995, "margin": 1.2, "folds": 5, "spread": "held-out"}
SPREADS = ("held-out", "training")
# The photo gate's default: a spread held out on photos of one resolution refused 6-19% of normal photos
# of other resolutions (docs/robustness.md)
RGB_SPREAD = "training"
CALIBRATION = CONFIG_DEFAULTS["calibration"]
# What each gate reads; a gate fitted on other features cannot be used (refit it: python -m training.ood RUN)
CT_FEATURES = "ct/pooled+mean+border/class-and-axis/2"
N_AXES = 3  # slice_axis values x, y, z
RGB_FEATURES = "rgb/stages+colour+border+error+error-map/1"
LOG_ERROR_EPS = 1e-6


def fit_gaussian(
    features: np.ndarray,
    labels: np.ndarray | None = None,
    n_classes: int = 1,
    spread: np.ndarray | None = None,
    spread_labels: np.ndarray | None = None,
) -> dict:
    """Class means of features (N, D) and one shared, shrunk precision matrix, standardised by
    the within-class spread (a dimension that never varied gets 5% of the median spread).

    With `spread` (M, D) and its `spread_labels`, the within-class spread (scale and covariance)
    is measured on those rows around the class means of `features`: images the network did not
    train on, so that the Gaussian is as wide as what it has not seen rather than as tight as
    what it memorised. Rows of a class `features` lacks are left out."""

    features = np.asarray(features, np.float64)
    labels = np.zeros(len(features), np.int64) if labels is None else np.asarray(labels, np.int64)
    present = [int(k) for k in range(n_classes) if (labels == k).any()]
    center = features.mean(axis=0)
    raw_means = np.zeros((n_classes, features.shape[1]))
    for k in present:
        raw_means[k] = features[labels == k].mean(axis=0)
    residuals = features - raw_means[labels]
    if spread is not None:
        spread = np.asarray(spread, np.float64)
        spread_labels = np.zeros(len(spread), np.int64) if spread_labels is None else np.asarray(spread_labels)
        known = np.isin(spread_labels, present)
        if known.sum() >= 2:  # else (a tiny data set) the training spread is all there is
            residuals = spread[known] - raw_means[spread_labels[known]]
        else:
            spread = None
    std = residuals.std(axis=0)
    scale = 1.0 / np.maximum(std, max(float(np.median(std)), 1e-6) * 0.05)
    means = (raw_means - center) * scale
    lw = LedoitWolf(assume_centered=True).fit(residuals * scale)
    return {
        "center": center.tolist(),
        "scale": scale.tolist(),
        "means": means.tolist(),
        "precision": lw.precision_.tolist(),
        "present": present,
        "shrinkage": float(lw.shrinkage_),
        "fitted_on": int(len(features)),
        "spread_from": "training" if spread is None else "held-out",
        "spread_on": int(len(residuals)),
    }


def folds_of(n: int, k: int) -> list[np.ndarray]:
    """k contiguous blocks of range(n): the loaders keep a split in battery order, so a block
    holds whole batteries but for its two ends."""
    return [b for b in np.array_split(np.arange(n), max(1, min(k, n // 2))) if len(b)]


def cross_fitted_distances(fit, features: np.ndarray, groups, k: int) -> np.ndarray:
    """Distances of each held-out row to a gate whose spread was measured without it:
    `fit(rows)` fits a gate on the held-out rows `rows`, and each of k blocks is scored by the
    gate fitted on the others. The threshold calibrated on these is the one an unseen battery meets."""
    n = len(features)
    out = np.empty(n)
    for block in folds_of(n, k):
        rest = np.setdiff1d(np.arange(n), block)
        g = None if groups is None else np.asarray(groups)[block]
        out[block] = distances(fit(rest), features[block], g)
    return out


def distances(gate: dict, features: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Mahalanobis distance (N,) of each feature row to the nearest allowed class mean (reference in numpy)."""
    z = (np.asarray(features, np.float64) - np.asarray(gate["center"])) * np.asarray(gate["scale"])
    means, precision = np.asarray(gate["means"]), np.asarray(gate["precision"])
    d = z[:, None, :] - means[None]
    q = np.einsum("nkd,de,nke->nk", d, precision, d)
    allowed = np.zeros(q.shape, bool)
    allowed[:, gate["present"]] = True
    if groups is not None and gate.get("class_groups") is not None:
        allowed &= np.asarray(gate["class_groups"])[None, :] == np.asarray(groups).reshape(-1, 1)
    return np.sqrt(np.maximum(np.where(allowed, q, np.inf).min(axis=1), 0.0))


def calibrate(gate: dict, val_distances: np.ndarray, cfg: dict) -> dict:
    """The gate with its threshold: the `quantile` of validation distances times `margin`."""
    cfg = GATE_DEFAULTS | dict(cfg or {})
    if not (0 < cfg["quantile"] <= 1 and cfg["margin"] > 0 and int(cfg["folds"]) >= 2 and cfg["spread"] in SPREADS):
        raise ValueError(f"ood needs 0 < quantile <= 1, margin > 0, folds >= 2 and spread in {SPREADS}, got {cfg}")
    v = np.asarray(val_distances, np.float64)
    if not len(v):
        raise ValueError("no validation images to calibrate the out-of-distribution threshold on")
    threshold = float(np.quantile(v, cfg["quantile"]) * cfg["margin"])
    return gate | {
        "threshold": threshold,
        "quantile": float(cfg["quantile"]),
        "margin": float(cfg["margin"]),
        "validation": {
            "count": int(len(v)),
            "median": float(np.median(v)),
            "q99": float(np.quantile(v, 0.99)),
            "max": float(v.max()),
            "rejected": float((v >= threshold).mean()),
        },
    }


class GaussianGate(nn.Module):
    """features (B, D) [, group (B,)] -> distance / threshold (B,): the gate in an exported graph."""

    def __init__(self, gate: dict):
        super().__init__()
        f32 = torch.float32
        self.register_buffer("center", torch.tensor(gate["center"], dtype=f32))
        self.register_buffer("scale", torch.tensor(gate["scale"], dtype=f32))
        self.register_buffer("means", torch.tensor(gate["means"], dtype=f32))
        self.register_buffer("precision", torch.tensor(gate["precision"], dtype=f32))
        k = len(gate["means"])
        present = torch.zeros(k, dtype=torch.bool)
        present[list(gate["present"])] = True
        self.register_buffer("present", present)
        groups = gate.get("class_groups")
        self.register_buffer("class_groups", torch.tensor(groups if groups is not None else [0] * k, dtype=f32))
        self.grouped = groups is not None
        self.register_buffer("inv_threshold", torch.tensor(1.0 / float(gate["threshold"]), dtype=f32))

    def forward(self, features: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        z = (features - self.center) * self.scale
        d = z[:, None, :] - self.means[None]  # (B, K, D)
        q = ((d @ self.precision) * d).sum(dim=-1)  # (B, K)
        allowed = self.present[None, :].expand_as(q)
        if self.grouped and group is not None:
            allowed = allowed & (self.class_groups[None, :] == group[:, None])
        q = torch.where(allowed, q, torch.full_like(q, 1e12))
        return torch.sqrt(torch.clamp(q.min(dim=1).values, min=0.0)) * self.inv_threshold


# --- the features each gate reads -------------------------------------------------------


def border_contrast(image: torch.Tensor, band: float = 0.1) -> torch.Tensor:
    """(B, C): mean of the frame's outer band minus the mean of its centre, per channel. A
    battery centred in the crop leaves the band as background; one cut off by the frame's
    edge, or an image that fills the frame, does not."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    by, bx = max(1, int(round(h * band))), max(1, int(round(w * band)))
    total = image.sum(dim=(2, 3))
    centre = image[:, :, by : h - by, bx : w - bx]
    inner = centre.sum(dim=(2, 3))
    n_band = h * w - centre.shape[-2] * centre.shape[-1]
    return (total - inner) / n_band - inner / (centre.shape[-2] * centre.shape[-1])


def ct_gate_features(fmap: torch.Tensor, pooled: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(B, 2 C + 1): the classifier's pooled features (what its head reads), the feature map's
    mean (the slice's overall look, which max pooling ignores) and the border contrast of the input."""
    return torch.cat([pooled, fmap.mean(dim=(2, 3)), border_contrast(image)], dim=1)


def ct_features(classifier: nn.Module, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    fmap = classifier.feature_maps(image, meta)
    return ct_gate_features(fmap, classifier.pool(fmap).flatten(1), image)


def rgb_features(
    image: torch.Tensor, recon: torch.Tensor, maps: list[torch.Tensor], error_map: torch.Tensor
) -> torch.Tensor:
    """The mean and spread of every encoder stage and of the bottleneck code, the photo's colour
    mean, spread and border contrast, the log of the mean squared reconstruction error, and the
    error map's mean, spread and share above 0.5 (a defect lights a small part of it, a foreign
    photo much of it)."""
    error = (image - recon).pow(2).mean(dim=(1, 2, 3))
    stats = [t for m in maps for t in (m.mean(dim=(2, 3)), m.std(dim=(2, 3)))]
    mean_error = error_map.mean(dim=(1, 2))
    return torch.cat(
        stats
        + [
            image.mean(dim=(2, 3)),
            image.std(dim=(2, 3)),
            border_contrast(image),
            torch.log(error + LOG_ERROR_EPS)[:, None],
            mean_error[:, None],
            error_map.std(dim=(1, 2))[:, None],
            torch.log(mean_error + LOG_ERROR_EPS)[:, None],
            (error_map > 0.5).to(error_map.dtype).mean(dim=(1, 2))[:, None],
        ],
        dim=1,
    )


@torch.no_grad()
def ct_feature_array(classifier: nn.Module, images: np.ndarray, meta: np.ndarray, batch_size: int = 64) -> np.ndarray:
    classifier.eval()
    out = [
        ct_features(
            classifier,
            torch.from_numpy(images[i : i + batch_size].astype(np.float32)),
            torch.from_numpy(meta[i : i + batch_size].astype(np.float32)),
        ).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def rgb_feature_array(scorer: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """`rgb_features` of images (N, 3, S, S) through an `AnomalyScorer` (the checkpoint's score definition)."""
    scorer.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size].astype(np.float32))
        _, emap, recon, maps = scorer.score_with_features(x)
        out.append(rgb_features(x, recon, maps, emap).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def ct_group(meta):
    """The group a slice may be compared with, from its metadata (N, 2): battery type x slice axis
    (numpy or torch)."""
    return meta[:, 0] * N_AXES + meta[:, 1]


def fit_ct_gate_on(
    train_features: np.ndarray,
    labels: np.ndarray,
    train_meta: np.ndarray,
    val_features: np.ndarray,
    val_meta: np.ndarray,
    class_types: list[int],
    cfg: dict,
    val_labels: np.ndarray | None = None,
) -> dict:
    """The CT gate from features: one mean per (class, slice axis) from the training slices,
    compared only with slices of the battery type and axis their metadata names.

    With `val_labels` and `cfg["spread"]` "held-out" (the default), the spread around those
    means is measured on the validation slices (out of sample) and the threshold is
    cross-fitted: each block of validation slices is scored by the spread of the others
    (`cfg["folds"]` blocks). Otherwise the spread comes from the training features and the
    threshold from the validation distances as they are."""
    cfg = GATE_DEFAULTS | dict(cfg or {})
    axes = np.asarray(train_meta)[:, 1].astype(np.int64)
    components = np.asarray(labels, np.int64) * N_AXES + axes
    k = len(class_types) * N_AXES
    extra = {
        "class_groups": [class_types[c // N_AXES] * N_AXES + c % N_AXES for c in range(k)],
        "features": CT_FEATURES,
    }
    groups = ct_group(np.asarray(val_meta))
    if val_labels is None or cfg["spread"] == "training":
        gate = fit_gaussian(train_features, components, k) | extra
        return calibrate(gate, distances(gate, val_features, groups), cfg)
    val_components = np.asarray(val_labels, np.int64) * N_AXES + np.asarray(val_meta)[:, 1].astype(np.int64)

    def fit(rows):
        return fit_gaussian(train_features, components, k, val_features[rows], val_components[rows]) | extra

    held_out = cross_fitted_distances(fit, np.asarray(val_features), groups, int(cfg["folds"]))
    return calibrate(fit(np.arange(len(val_features))), held_out, cfg)


def fit_ct_gate(classifier: nn.Module, train, val, class_types: list[int], cfg: dict) -> dict:
    """The CT gate from the training slices (means, covariance) and the validation slices (threshold).

    `train` and `val` are `training.datasets.CTArrays`; `class_types[k]` is the battery type of class k.
    A CT slice looks different along each axis, so each class has a mean per axis."""
    return fit_ct_gate_on(
        ct_feature_array(classifier, train.images, train.meta),
        train.labels,
        train.meta,
        ct_feature_array(classifier, val.images, val.meta),
        val.meta,
        class_types,
        cfg,
        val_labels=val.labels,
    )


def fit_rgb_gate_on(train_features: np.ndarray, val_features: np.ndarray, cfg: dict) -> dict:
    """The RGB gate from features: the mean of normal training photos; with `cfg["spread"]`
    "held-out", the spread of the validation photos around it (out of sample) and the threshold
    cross-fitted over blocks of validation photos, else the training photos' spread and the
    threshold from all validation photos (defective ones included: they must pass)."""
    cfg = GATE_DEFAULTS | {"spread": RGB_SPREAD} | dict(cfg or {})
    if cfg["spread"] == "training":
        gate = fit_gaussian(train_features) | {"features": RGB_FEATURES}
        return calibrate(gate, distances(gate, val_features), cfg)

    def fit(rows):
        return fit_gaussian(train_features, spread=val_features[rows]) | {"features": RGB_FEATURES}

    held_out = cross_fitted_distances(fit, np.asarray(val_features), None, int(cfg["folds"]))
    return calibrate(fit(np.arange(len(val_features))), held_out, cfg)


def fit_rgb_gate(scorer: nn.Module, train_images: np.ndarray, val_images: np.ndarray, cfg: dict) -> dict:
    """The RGB gate from normal training photos and all validation photos; `scorer` is the
    checkpoint's `AnomalyScorer`."""
    return fit_rgb_gate_on(rgb_feature_array(scorer, train_images), rgb_feature_array(scorer, val_images), cfg)


def placements(records, size: int) -> list:
    """What the battery search sees in each RGB photo of `records` (AI Hub records), searched as the
    server searches a request: for photos the training did not load (its defective ones)."""
    facts: list = []
    for r in records:
        encoded_rgb_input(Path(r.path).read_bytes(), size, facts_out=facts)
    return facts


def rgb_frame(ds, assignment: dict, train, val, size: int) -> dict:
    """The photo placement ranges over all training and validation photos: those `train` and `val`
    (RGBArrays) hold, and the defective training photos, which the autoencoder's training skips."""
    skipped = [r for r in ds.rgb if assignment.get(r.battery_key) == "train" and not r.is_normal]
    return fit_frame(train.placements + val.placements + placements(skipped, size))


def frame_refused(found: list, frame: dict | None) -> np.ndarray:
    """(N,) bool: which of the search results `found` (per image) the served preprocessing refuses."""
    out = np.zeros(len(found), bool)
    for i, facts in enumerate(found):
        try:
            check_frame(facts, frame, "image")
        except ImageError:
            out[i] = True
    return out


def describe_frame(frame: dict) -> str:
    r = frame["ranges"]
    return (
        f"placement ranges from {frame['fitted_on']} images: span {r['span'][0]:.2f}-{r['span'][1]:.2f}, "
        f"offset <= {r['offset'][1]:.2f}, edge <= {r['edge'][1]:.2f}, fill {r['fill'][0]:.2f}-{r['fill'][1]:.2f}"
    )


def describe(gate: dict) -> str:
    v = gate["validation"]
    return (
        f"out-of-distribution threshold {gate['threshold']:.2f} (validation distances: median {v['median']:.2f}, "
        f"max {v['max']:.2f}; {v['rejected']:.1%} of {v['count']} would be refused)"
    )


def recalibrate(run: Path, data: Path | None = None, progress: bool = True) -> dict:
    """Fit a run's gate again on its training data (or `data`), with its split and config."""

    model, info = load_checkpoint(run)
    data = Path(data or info.get("data") or "")
    if not data.is_dir():
        raise SystemExit(f"error: no data folder to calibrate on ({data}); pass --data")
    ds = scan(data, progress=progress)
    same = Path(info.get("data", "")).resolve() == data.resolve() and (run / "split").exists()
    assignment = (
        read_split(run / "split")
        if same
        else split_dataset(
            ds,
            tuple(info.get("config", {}).get("split", DEFAULT_FRACTIONS)),
            seed=info.get("config", {}).get("split_seed", 0),
        )
    )
    cfg = info.get("config", {}).get("ood") or {}
    if info["kind"] == "ct_classifier":
        parts = {n: [r for r in ds.ct if assignment.get(r.battery_key) == n] for n in ("train", "val")}
        norm = info["normalization"]
        train, val = (
            load_ct(parts[n], info["input_size"], norm["mean"], norm["std"], progress=progress)
            for n in ("train", "val")
        )
        groups = [BATTERY_TYPES.index(class_type(c)) for c in CT_CLASSES]
        info["ood"] = fit_ct_gate(model, train, val, groups, cfg)
        info["frame"] = fit_frame(train.placements + val.placements)
    else:
        train = load_rgb(
            [r for r in ds.rgb if assignment.get(r.battery_key) == "train" and r.is_normal],
            info["input_size"],
            progress=progress,
        )
        val = load_rgb(
            [r for r in ds.rgb if assignment.get(r.battery_key) == "val"], info["input_size"], progress=progress
        )
        info["ood"] = fit_rgb_gate(scorer_from(model, info["score"]), train.images, val.images, cfg)
        info["frame"] = rgb_frame(ds, assignment, train, val, info["input_size"])
    save_checkpoint(run, model, info)
    return info["ood"]


# --- calibration on held-out cells (training/conformal.py) ---------------------------------


def calibration_records(dirs, kind: str, progress: bool = True) -> list:
    """Every CT slice (kind "ct") or photo ("rgb") of the data sets `dirs`, whatever their split."""
    out = []
    for d in dirs:
        ds = scan(Path(d), progress=progress)
        out += ds.ct if kind == "ct" else ds.rgb
    if not out:
        what = "CT slices" if kind == "ct" else "photos"
        raise ValueError(f"no {what} in the calibration data {', '.join(map(str, dirs))}")
    return out


def ct_scores(model, info: dict, records, progress: bool = True) -> tuple[np.ndarray, list]:
    """(distances, placement facts) of CT records, read as the server reads them."""
    norm = info["normalization"]
    arrays = load_ct(records, info["input_size"], norm["mean"], norm["std"], progress=progress, dtype=np.float32)
    feats = ct_feature_array(model, arrays.images, arrays.meta)
    return distances(info["ood"], feats, ct_group(arrays.meta)), arrays.placements


def rgb_scores(model, info: dict, records, progress: bool = True) -> tuple[np.ndarray, list]:
    """(distances, placement facts) of RGB records, read as the server reads them."""
    arrays = load_rgb(records, info["input_size"], progress=progress, dtype=np.float32)
    feats = rgb_feature_array(scorer_from(model, info["score"]), arrays.images)
    return distances(info["ood"], feats), arrays.placements


def calibrate_info(model, info: dict, dirs, cfg: dict | None = None, progress: bool = True) -> dict:
    """A checkpoint's info with its gate and placement ranges calibrated on the data sets `dirs`."""
    gate, frame = info.get("ood"), info.get("frame")
    if not gate or not frame or "spread" not in frame or "q99" not in gate.get("validation", {}):
        raise ValueError(
            "this run's gate was fitted before calibration existed (no spreads stored): fit it again first with "
            "'python -m training.ood RUN'"
        )
    kind = "ct" if info["kind"] == "ct_classifier" else "rgb"
    records = calibration_records(dirs, kind, progress)
    distances, facts = (ct_scores if kind == "ct" else rgb_scores)(model, info, records, progress)
    scores, worst = conformal.nonconformity(distances, facts, gate, frame)
    gate, frame = conformal.calibrated(gate, frame, scores, worst, cfg or {}, [str(d) for d in dirs])
    return info | {"ood": gate, "frame": frame}


def calibrate_run(run: Path, dirs, cfg: dict | None = None, progress: bool = True) -> dict:
    """Calibrate a run's gate on the data sets `dirs`, save it in the checkpoint, print what it promises."""
    model, info = load_checkpoint(run)
    cfg = dict(cfg or {})
    if isinstance(cfg.get("rate"), dict):  # one rate per input: {"ct": ..., "rgb": ...}
        cfg["rate"] = cfg["rate"]["ct" if info["kind"] == "ct_classifier" else "rgb"]
    info = calibrate_info(model, info, dirs, cfg, progress)
    save_checkpoint(run, model, info)
    what = "CT" if info["kind"] == "ct_classifier" else "photo"
    print(f"{run}: {conformal.describe(info['ood']['calibration'], what)}")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.ood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "runs", type=Path, nargs="+", help="run folders (CT or RGB) whose out-of-distribution gate to fit again"
    )
    p.add_argument("--data", type=Path, help="data set (AI Hub layout; default: the data each run was trained on)")
    p.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="then calibrate the gate for a false-refusal rate on these held-out data sets (AI Hub layout, every "
        "split; cells drawn the way the line draws them: training/conformal.py)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="false-refusal rate to promise (default: the presets' per input, CT "
        f"{CALIBRATION['rate']['ct']:g}, photo {CALIBRATION['rate']['rgb']:g})",
    )
    p.add_argument("--confidence", type=float, default=CALIBRATION["confidence"], help="confidence of that promise")
    p.add_argument(
        "--no-refit", action="store_true", help="keep the fitted gate; only calibrate it (needs --calibration)"
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.no_refit and not args.calibration:
        p.error("--no-refit needs --calibration")
    for run in args.runs:
        if not args.no_refit:
            before = (load_checkpoint(run)[1].get("ood") or {}).get("calibration")
            gate = recalibrate(run, args.data, progress=not args.quiet)
            if before and not args.calibration:
                print(
                    f"{run}: warning: the fit replaced the gate calibrated on {', '.join(before['data'])}; calibrate "
                    "it again: --calibration DIR ... (the presets' sets are in data/<preset>_calibration)"
                )
            print(f"{run}: {describe(gate)}")
            print(f"{run}: {describe_frame(load_checkpoint(run)[1]['frame'])}")
        if args.calibration:
            try:
                rate = CALIBRATION["rate"] if args.rate is None else args.rate  # the presets' per input by default
                calibrate_run(run, args.calibration, {"rate": rate, "confidence": args.confidence}, not args.quiet)
            except ValueError as e:
                raise SystemExit(f"error: {run}: {e}") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
