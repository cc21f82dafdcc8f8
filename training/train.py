"""python -m training.train ct|rgb --data DIR --config NAME --out RUN

Trains the CT late-fusion classifier or the RGB autoencoder on a data set in the AI Hub
layout, split by battery, and writes RUN/checkpoint.pt with everything export needs
(architecture, classes, input size, normalisation, metadata spec, temperature, or the
calibrated anomaly threshold and score definition), RUN/history.json, RUN/config.yaml,
RUN/split/ and TensorBoard logs in RUN/tb/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.aihub import Dataset, scan
from core.labels import BATTERY_TYPES, CT_CLASSES, SLICE_AXES, class_type
from core.preprocess import CT_MEAN, CT_STD, fit_frame
from training.augment import acquisition, augment, synthetic_anomalies
from training.checkpoint import save_checkpoint
from training.config import load_config
from training.data.reviewed import ReviewedExamples, reviewed_examples
from training.data.split import DEFAULT_FRACTIONS, read_split, split_dataset, write_split
from training.datasets import load_ct, load_rgb
from training.losses import FocalLoss, ReconstructionLoss, binary_focal_loss
from training.metrics import f1_optimal_threshold, fit_temperature, macro_f1, roc_optimal_threshold
from training.models import create_model
from training.models.autoencoder import AnomalyScorer, scorer_from
from training.ood import describe, describe_frame, fit_ct_gate, fit_rgb_gate, rgb_frame


def seed_everything(seed: int) -> torch.Generator:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _threads(cfg: dict) -> None:
    torch.set_num_threads(int(cfg.get("threads") or os.cpu_count() or 1))


FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _memory_format(cfg: dict) -> torch.memory_format:
    name = cfg.get("memory_format") or "contiguous"
    if name not in FORMATS:
        raise ValueError(f"memory_format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def progressive_size(cfg: dict, epoch: int) -> int | None:
    """The side the batches of this (0-based) epoch are scaled down to, or None for input_size."""
    p = cfg.get("progressive") or {}
    size = p.get("size")
    if size and int(p.get("epochs") or 0) >= int(cfg["epochs"]):
        raise ValueError(f"progressive.epochs must leave at least one of the {cfg['epochs']} epochs at input_size")
    if not size or epoch >= int(p.get("epochs") or 0):
        return None
    if int(size) >= int(cfg["input_size"]):
        raise ValueError(f"progressive.size {size} must be smaller than input_size {cfg['input_size']}")
    return int(size)


def scaled_down(x: torch.Tensor, size: int | None, masks_from: int | None = None) -> torch.Tensor:
    """A batch scaled to size x size: images antialiased, and channels from `masks_from` on (0/1 defect
    masks) max-pooled, so that a void of one pixel still marks its cell."""
    if size is None or x.shape[-1] == size:
        return x
    k = x.shape[1] if masks_from is None else masks_from
    out = [nn.functional.interpolate(x[:, :k], size=(size, size), mode="bilinear", antialias=True, align_corners=False)]
    if k < x.shape[1]:
        out.append(nn.functional.adaptive_max_pool2d(x[:, k:], (size, size)))
    return torch.cat(out, 1)


def _device(cfg: dict) -> torch.device:
    """'auto' takes a GPU when there is one (the full preset is meant for GPUs)."""
    name = cfg.get("device") or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _scheduler(opt, cfg: dict, steps_per_epoch: int):
    """Linear warm-up, then cosine annealing with warm restarts (stepped every batch)."""
    s = cfg["scheduler"]
    warm = s.get("warmup_epochs", 0) * steps_per_epoch
    t0, t_mult, floor = s["T_0"] * steps_per_epoch, s["T_mult"], s["eta_min"]
    base = [g["lr"] for g in opt.param_groups]

    def factor(step: int) -> list[float]:
        if step < warm:
            return [(step + 1) / warm] * len(base)
        t, period = step - warm, t0
        while t >= period:
            t, period = t - period, period * t_mult
        cos = 0.5 * (1 + math.cos(math.pi * t / period))
        return [(floor + (b - floor) * cos) / b for b in base]

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor(step)[0])


class EarlyStopping:
    """Keeps the best weights by a validation metric and says when patience has run out."""

    def __init__(self, patience: int, higher_is_better: bool):
        self.patience, self.sign = patience, 1.0 if higher_is_better else -1.0
        self.best, self.best_state, self.bad_epochs = -math.inf, None, 0

    @property
    def best_value(self) -> float:
        return self.sign * self.best

    def improved(self, value: float, model: torch.nn.Module) -> bool:
        if self.sign * value > self.best:
            self.best, self.bad_epochs = self.sign * value, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def _train_epoch(model, opt, sched, batches: list, batch_loss, desc: str, progress: bool, digits: int) -> float | None:
    """One pass over `batches`; `batch_loss(idx)` augments, runs the model and returns the loss."""
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    for idx in bar:
        loss = batch_loss(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses):.{digits}f}")
    return float(np.mean(losses)) if losses else None


def _save_run(
    run: Path, model: torch.nn.Module, info: dict, history: list, start: float, data: Path, cfg: dict
) -> dict:
    """Write the checkpoint (with what every run records) and the per-epoch history."""
    model.to(memory_format=torch.contiguous_format)  # the saved and exported weights in the plain layout
    info = info | {
        "epochs_trained": len(history),
        "train_seconds": time.perf_counter() - start,
        "data": str(data),
        "config": cfg,
    }
    save_checkpoint(run, model, info)
    (run / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return info


def resolve_split(
    ds: Dataset, run: Path, splits: Path | None, seed: int, fractions=DEFAULT_FRACTIONS
) -> dict[str, str]:
    assignment = read_split(splits) if splits else split_dataset(ds, tuple(fractions), seed=seed)
    write_split(assignment, run / "split", seed=seed, fractions=tuple(fractions))
    return assignment


def _batches(
    n: int, batch_size: int, rng: np.random.Generator, weights: np.ndarray | None = None, drop_last: bool = True
):
    idx = rng.choice(n, size=n, replace=True, p=weights / weights.sum()) if weights is not None else rng.permutation(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield idx[i : i + batch_size]


@torch.no_grad()
def ct_logits(model: torch.nn.Module, images: np.ndarray, meta: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size].astype(np.float32)).to(device)
        out.append(model(x, torch.from_numpy(meta[i : i + batch_size]).to(device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CT_CLASSES)), np.float32)


@torch.no_grad()
def rgb_scores(scorer: AnomalyScorer, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly scores (N,), error maps (N, S, S))."""
    scorer.eval()
    device = next(scorer.parameters()).device
    scores, maps = [], []
    for i in range(0, len(images), batch_size):
        s, m = scorer(torch.from_numpy(images[i : i + batch_size].astype(np.float32)).to(device))
        scores.append(s.cpu().numpy())
        maps.append(m.cpu().numpy())
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0,) + images.shape[2:], np.float32)
    return np.concatenate(scores), np.concatenate(maps)


def trunk_in_chans(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


class DefectMapHead(nn.Module):
    """Training-only deep supervision: where are the defects, from the last feature map?

    A 1x1 convolution reads the classifier's last convolutional stage (caught with a
    forward hook, so it works for every backbone) and is trained, with binary
    cross-entropy, to say which cells of that map hold a labelled defect polygon. Small
    voids are a few pixels of a slice; this tells the backbone where to look, which the
    slice label alone does only after many more examples. It is not part of the saved
    model: the checkpoint and the exported graph are the plain classifier.
    """

    def __init__(self, model: nn.Module, weight: float):
        super().__init__()
        self.weight = weight
        self.features, self.hook = None, None
        if weight <= 0:
            self.conv = nn.Identity()
            return
        trunk = model.features if hasattr(model, "features") else model.body  # late / early fusion
        self.hook = trunk.register_forward_hook(self._keep)
        was_training = model.training
        param = next(model.parameters())
        with torch.no_grad():  # one dry run tells the channel count of the last stage
            model.eval()(
                torch.zeros(1, trunk_in_chans(model), 64, 64, device=param.device),
                torch.zeros(1, 2, device=param.device),
            )
        model.train(was_training)
        self.conv = nn.Conv2d(self.features.shape[1], 1, 1)

    def _keep(self, module, inputs, output):
        self.features = output

    def loss(self, mask: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """mask: (B, 1, H, W) in 0..1 at input resolution; known: (B,) bool, the images whose
        defects are outlined (a reviewed line cell confirmed defective has a class, no outline)."""
        logits = self.conv(self.features)
        target = (nn.functional.adaptive_max_pool2d(mask, logits.shape[-2:]) > 0.5).float()
        if known is not None:
            if not bool(known.any()):
                return logits.sum() * 0.0
            logits, target = logits[known], target[known]
        return self.weight * nn.functional.binary_cross_entropy_with_logits(logits, target)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def _class_weights(labels: np.ndarray, spec) -> torch.Tensor | None:
    if spec in (None, "none"):
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=len(CT_CLASSES)).astype(float)
        w = np.where(counts > 0, len(labels) / (len(CT_CLASSES) * np.maximum(counts, 1)), 0.0)
        return torch.tensor(w, dtype=torch.float32)
    w = np.asarray(spec, float)
    if w.shape != (len(CT_CLASSES),):
        raise ValueError(f"class_weights must be 'balanced', none, or {len(CT_CLASSES)} numbers")
    return torch.tensor(w, dtype=torch.float32)


def _reviewed(folders, run: Path, progress: bool, repeat: int) -> ReviewedExamples:
    examples = reviewed_examples(folders or [])
    if folders:
        examples.write(run)
        if progress:
            print(
                f"reviewed line cells from {', '.join(map(str, folders))}: {len(examples.trained)} to train on "
                f"({len(examples.ct)} CT slices, {len(examples.rgb)} photos, each x{repeat}), "
                f"{len(examples.held)} held out for comparing releases"
            )
    return examples


def train_ct(
    data: Path,
    cfg: dict,
    run: Path,
    splits: Path | None = None,
    progress: bool = True,
    reviewed: list[Path] | None = None,
) -> dict:
    c = cfg["ct"]
    gen = seed_everything(c["seed"])
    _threads(c)
    ds = scan(data, progress=progress)
    assignment = resolve_split(ds, run, splits, c["split_seed"], c["split"])
    parts = {name: [r for r in ds.ct if assignment.get(r.battery_key) == name] for name in ("train", "val")}
    if not parts["train"] or not parts["val"]:
        raise SystemExit(
            f"error: need CT slices in both train and val splits, got {len(parts['train'])} and {len(parts['val'])}"
        )
    examples = _reviewed(reviewed, run, progress, int(c["reviewed_repeat"]))
    outlined = len(parts["train"])  # the data set's slices have their defects outlined; reviewed ones do not
    parts["train"] += examples.ct * int(c["reviewed_repeat"])
    size = int(c["input_size"])
    aux_weight = float(c["defect_map_weight"])
    progressive_size(c, 0)  # a wrong progressive size stops the run before the slices are read
    loading = time.perf_counter()
    train = load_ct(parts["train"], size, workers=c["workers"], progress=progress, with_masks=aux_weight > 0)
    # a reviewed normal slice has no defect (all of its mask is known); a confirmed defect's outline is unknown
    known = np.array([i < outlined or r.label.endswith("_normal") for i, r in enumerate(parts["train"])])
    val = load_ct(parts["val"], size, workers=c["workers"], progress=progress)
    load_seconds = time.perf_counter() - loading
    arch_args = {k: v for k, v in c["model"].items() if k != "name"}
    device = _device(c)
    fmt = _memory_format(c)
    model = create_model(c["model"]["name"], **arch_args).to(device)
    defect_map = DefectMapHead(model, aux_weight).to(device)
    model.to(memory_format=fmt)
    defect_map.to(memory_format=fmt)
    opt = torch.optim.AdamW(
        list(model.parameters()) + list(defect_map.parameters()),
        lr=c["optimizer"]["lr"],
        weight_decay=c["optimizer"]["weight_decay"],
    )
    bs = int(c["batch_size"])
    steps = max(1, len(train.labels) // bs)
    sched = _scheduler(opt, c, steps)
    loss_fn = FocalLoss(
        c["loss"]["focal_gamma"], c["loss"]["label_smoothing"], _class_weights(train.labels, c["loss"]["class_weights"])
    ).to(device)
    sample_w = None
    if c["weighted_sampling"]:
        counts = np.bincount(train.labels, minlength=len(CT_CLASSES))
        sample_w = 1.0 / counts[train.labels]
    rng = np.random.default_rng(c["seed"])
    tb = SummaryWriter(run / "tb")
    history, stopper = [], EarlyStopping(c["early_stopping"]["patience"], higher_is_better=True)
    fill = -CT_MEAN / CT_STD  # black after normalisation
    start = time.perf_counter()
    scale = [None]  # the side this epoch's batches are scaled to (progressive resizing)

    def batch_loss(idx):
        x = torch.from_numpy(train.images[idx].astype(np.float32))
        if train.masks is not None:  # image and defect mask go through the same random flips and warps
            x = torch.cat([x, torch.from_numpy(train.masks[idx]).float()[:, None]], 1)
        x = augment(x, c["augment"], gen, fill=torch.tensor([fill, 0.0][: x.shape[1]]).view(1, -1, 1, 1))
        x[:, :1] = acquisition(x[:, :1], c["acquisition"], gen, CT_MEAN, CT_STD)  # the slice, not its defect mask
        x = scaled_down(x, scale[0], masks_from=1).to(device).contiguous(memory_format=fmt)
        loss = loss_fn(
            model(x[:, :1], torch.from_numpy(train.meta[idx]).to(device)),
            torch.from_numpy(train.labels[idx]).to(device),
        )
        return (
            loss if train.masks is None else loss + defect_map.loss(x[:, 1:], torch.from_numpy(known[idx]).to(device))
        )

    for epoch in range(int(c["epochs"])):
        scale[0] = progressive_size(c, epoch)
        looping = time.perf_counter()
        train_loss = _train_epoch(
            model,
            opt,
            sched,
            list(_batches(len(train.labels), bs, rng, sample_w)),
            batch_loss,
            f"ct epoch {epoch + 1}/{c['epochs']}",
            progress,
            3,
        )
        evaluating = time.perf_counter()
        logits = ct_logits(model, val.images, val.meta)
        val_loss = float(loss_fn(torch.from_numpy(logits).to(device), torch.from_numpy(val.labels).to(device)))
        f1 = macro_f1(val.labels, logits.argmax(1), len(CT_CLASSES))
        acc = float((logits.argmax(1) == val.labels).mean())
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_macro_f1": f1,
            "val_accuracy": acc,
            "lr": opt.param_groups[0]["lr"],
            "input_size": scale[0] or size,
            "samples": steps * bs,
            "loop_seconds": evaluating - looping,
            "eval_seconds": time.perf_counter() - evaluating,
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        for k in ("train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr"):
            if row[k] is not None:
                tb.add_scalar(f"ct/{k}", row[k], epoch + 1)
        # the kept model is one trained at the size it serves at (progressive epochs are not candidates)
        improved = scale[0] is None and stopper.improved(f1, model)
        if progress:
            print(
                f"ct epoch {epoch + 1:>3}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                f"val macro-F1 {f1:.4f}  acc {acc:.4f}{'  *' if improved else ''}",
                flush=True,
            )
        if stopper.should_stop:
            if progress:
                print(f"early stop: no better val macro-F1 for {stopper.bad_epochs} epochs")
            break
    tb.close()
    defect_map.remove()
    fitting = time.perf_counter()
    model.load_state_dict(stopper.best_state)
    best = stopper.best_value
    model.cpu().to(memory_format=torch.contiguous_format)
    logits = ct_logits(model, val.images, val.meta)
    temperature = fit_temperature(logits, val.labels)
    gate = fit_ct_gate(model, train, val, [BATTERY_TYPES.index(class_type(name)) for name in CT_CLASSES], c["ood"])
    frame = fit_frame(train.placements + val.placements)
    if progress:
        print(f"ct {describe(gate)}")
        print(f"ct {describe_frame(frame)}")
    info = {
        "kind": "ct_classifier",
        "arch": c["model"]["name"],
        "arch_args": arch_args,
        "class_names": list(CT_CLASSES),
        "input_size": size,
        "in_chans": 1,
        "normalization": {"mean": CT_MEAN, "std": CT_STD, "scale": "image / dtype max (8 or 16 bit)"},
        "preprocess": "core.preprocess.encoded_ct_input",
        "meta_spec": {
            "names": ["battery_type", "slice_axis"],
            "battery_type": list(BATTERY_TYPES),
            "slice_axis": list(SLICE_AXES),
        },
        "temperature": temperature,
        "ood": gate,
        "frame": frame,
        "val_macro_f1": best,
        "load_seconds": load_seconds,
        "fit_seconds": time.perf_counter() - fitting,
    }
    return _save_run(run, model, info, history, start, data, c)


def train_rgb(
    data: Path,
    cfg: dict,
    run: Path,
    splits: Path | None = None,
    progress: bool = True,
    reviewed: list[Path] | None = None,
) -> dict:
    c = cfg["rgb"]
    gen = seed_everything(c["seed"])
    _threads(c)
    ds = scan(data, progress=progress)
    assignment = resolve_split(ds, run, splits, c["split_seed"], c["split"])
    train_recs = [r for r in ds.rgb if assignment.get(r.battery_key) == "train" and r.is_normal]  # normal only
    # photos reviewed as false alarms: normal photos of the line
    train_recs += _reviewed(reviewed, run, progress, int(c["reviewed_repeat"])).rgb * int(c["reviewed_repeat"])
    val_recs = [r for r in ds.rgb if assignment.get(r.battery_key) == "val"]
    if not train_recs or not any(r.is_normal for r in val_recs):
        raise SystemExit(
            f"error: need normal RGB photos in train and val, got {len(train_recs)} and "
            f"{sum(r.is_normal for r in val_recs)}"
        )
    size = int(c["input_size"])
    arch_args = {k: v for k, v in c["model"].items() if k != "name"}
    device = _device(c)
    model = create_model(c["model"]["name"], **arch_args).to(device)
    if size % model.multiple:
        raise SystemExit(f"error: rgb input_size {size} must be a multiple of {model.multiple} for this autoencoder")
    if (progressive_size(c, 0) or size) % model.multiple:
        raise SystemExit(f"error: rgb progressive.size must be a multiple of {model.multiple} for this autoencoder")
    loading = time.perf_counter()
    train = load_rgb(train_recs, size, workers=c["workers"], progress=progress)
    val = load_rgb(val_recs, size, workers=c["workers"], progress=progress)
    load_seconds = time.perf_counter() - loading
    fmt = _memory_format(c)
    model.to(memory_format=fmt)
    val_normal = val.images[~val.anomalous]
    opt = torch.optim.AdamW(model.parameters(), lr=c["optimizer"]["lr"], weight_decay=c["optimizer"]["weight_decay"])
    bs = int(c["batch_size"])
    steps = max(1, len(train.images) // bs)
    sched = _scheduler(opt, c, steps)
    loss_fn = ReconstructionLoss(c["loss"]["ssim_weight"])
    segmenting = getattr(model, "segmenter", None) is not None
    seg_weight = float(c["loss"]["segment_weight"]) if segmenting else 0.0
    score_cfg = dict(c["score"])
    try:  # built before training so that a score the model cannot compute stops the run now
        scorer = scorer_from(model, score_cfg)
    except ValueError as e:
        raise SystemExit(f"error: rgb.score: {e}") from None
    if segmenting and not (c["anomalies"] or {}).get("probability"):
        raise SystemExit(
            "error: the segmentation head learns from painted blemishes: set rgb.anomalies.probability > 0"
        )
    rng = np.random.default_rng(c["seed"])
    tb = SummaryWriter(run / "tb")
    history, stopper = [], EarlyStopping(c["early_stopping"]["patience"], higher_is_better=False)
    start = time.perf_counter()

    def rgb_loss(clean: torch.Tensor, blemished: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        blemished = blemished.contiguous(memory_format=fmt)
        recon = model(blemished)
        loss = loss_fn(recon, clean)
        if segmenting:  # the head sees the reconstruction as it is, but does not train the autoencoder
            loss = loss + seg_weight * binary_focal_loss(model.segment_logits(blemished, recon.detach()), mask)
        return loss

    def batch_loss(idx):
        x = acquisition(
            augment(torch.from_numpy(train.images[idx].astype(np.float32)), c["augment"], gen), c["acquisition"], gen
        )
        x = scaled_down(x, scale[0])
        blemished, mask = synthetic_anomalies(x, c["anomalies"], gen, with_mask=True)  # denoising: clean target
        return rgb_loss(x.to(device), blemished.to(device), mask.to(device))

    # validation: the normal photos as they are (reconstruction) and, with a segmentation
    # head, the same blemishes painted on them every epoch (a fixed generator)
    val_clean = torch.from_numpy(val_normal.astype(np.float32))
    if segmenting:
        val_blemished, val_mask = (
            t.to(device)
            for t in synthetic_anomalies(
                val_clean, c["anomalies"], torch.Generator().manual_seed(c["seed"] + 1), with_mask=True
            )
        )
    val_clean = val_clean.to(device)
    scale = [None]  # the side this epoch's photos are scaled to (progressive resizing)
    for epoch in range(int(c["epochs"])):
        scale[0] = progressive_size(c, epoch)
        looping = time.perf_counter()
        train_loss = _train_epoch(
            model,
            opt,
            sched,
            list(_batches(len(train.images), bs, rng)),
            batch_loss,
            f"rgb epoch {epoch + 1}/{c['epochs']}",
            progress,
            4,
        )
        evaluating = time.perf_counter()
        model.eval()
        with torch.no_grad():
            val_loss = float(np.mean([float(loss_fn(model(x), x)) for x in val_clean.split(32)]))
            if segmenting:
                val_loss += seg_weight * float(
                    np.mean(
                        [
                            float(binary_focal_loss(model.segment_logits(b, model(b)), m))
                            for b, m in zip(val_blemished.split(32), val_mask.split(32))
                        ]
                    )
                )
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": opt.param_groups[0]["lr"],
            "input_size": scale[0] or size,
            "samples": steps * bs,
            "loop_seconds": evaluating - looping,
            "eval_seconds": time.perf_counter() - evaluating,
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        for k in ("train_loss", "val_loss", "lr"):
            if row[k] is not None:
                tb.add_scalar(f"rgb/{k}", row[k], epoch + 1)
        improved = scale[0] is None and stopper.improved(val_loss, model)
        if progress:
            print(
                f"rgb epoch {epoch + 1:>3}: train loss {row['train_loss']:.5f}  val loss "
                f"{val_loss:.5f}{'  *' if improved else ''}",
                flush=True,
            )
        if stopper.should_stop:
            if progress:
                print(f"early stop: no better val loss for {stopper.bad_epochs} epochs")
            break
    tb.close()
    fitting = time.perf_counter()
    model.load_state_dict(stopper.best_state)
    best = stopper.best_value
    model.to(memory_format=torch.contiguous_format)
    scorer.cpu().eval()  # wraps the model, now holding its best weights
    scores, _ = rgb_scores(scorer, val.images)
    gate = fit_rgb_gate(scorer, train.images, val.images, c["ood"])
    frame = rgb_frame(ds, assignment, train, val, size)
    if progress:
        print(f"rgb {describe(gate)}")
        print(f"rgb {describe_frame(frame)}")
    thresholds = {}
    if val.anomalous.any():
        thresholds["f1"], f1 = f1_optimal_threshold(val.anomalous, scores)
        thresholds["roc"], youden = roc_optimal_threshold(val.anomalous, scores)
        method = c["threshold"]
        calibration = {"f1_at_f1_threshold": f1, "youden_j_at_roc_threshold": youden}
    else:  # no defective photo to calibrate on: 99th percentile of normal scores
        thresholds["normal_p99"] = float(np.percentile(scores, 99))
        method, calibration = "normal_p99", {"warning": "validation split had no defective photos"}
        print(
            "warning: no defective RGB photos in the validation split; threshold = 99th percentile of normal scores",
            file=sys.stderr,
        )
    info = {
        "kind": "rgb_autoencoder",
        "arch": c["model"]["name"],
        "arch_args": arch_args,
        "input_size": size,
        "in_chans": 3,
        "normalization": {"mean": 0.0, "std": 1.0, "scale": "image / 255, values 0..1"},
        "preprocess": "core.preprocess.encoded_rgb_input",
        "score": score_cfg,
        "threshold": thresholds[method],
        "threshold_method": method,
        "thresholds": thresholds,
        "calibration": calibration,
        "ood": gate,
        "frame": frame,
        "val_loss": best,
        "load_seconds": load_seconds,
        "fit_seconds": time.perf_counter() - fitting,
    }
    return _save_run(run, model, info, history, start, data, c)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", choices=["ct", "rgb"], help="ct: the late-fusion CT classifier; rgb: the RGB autoencoder")
    p.add_argument("--data", type=Path, required=True, help="data set folder (AI Hub layout)")
    p.add_argument(
        "--config", default="quick", help="preset name (quick, standard, full) or a YAML path (default quick)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument(
        "--splits", type=Path, help="folder with train/val/test.txt (default: split the data by battery, seeded)"
    )
    p.add_argument("--epochs", type=int, help="override the config's epoch count")
    p.add_argument(
        "--reviewed",
        type=Path,
        action="append",
        metavar="DIR",
        help="also learn from the reviewed cells of this line archive or inspect-dir run folder (repeatable): "
        "a false alarm is normal for the input it was flagged for, a confirmed CT defect keeps its class",
    )
    p.add_argument(
        "--reviewed-repeat", type=int, metavar="N", help="each reviewed cell counts N times (default: the config's, 2)"
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} is not a folder", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.epochs:
        cfg[args.model]["epochs"] = args.epochs
    if args.reviewed_repeat:
        cfg[args.model]["reviewed_repeat"] = args.reviewed_repeat
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.yaml").write_text(yaml.safe_dump({args.model: cfg[args.model]}, sort_keys=False))
    trainer = train_ct if args.model == "ct" else train_rgb
    try:
        info = trainer(args.data, cfg, args.out, args.splits, progress=not args.quiet, reviewed=args.reviewed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model == "ct":
        print(
            f"wrote {args.out / 'checkpoint.pt'}: val macro-F1 {info['val_macro_f1']:.4f}, temperature "
            f"{info['temperature']:.3f}, "
            f"{info['epochs_trained']} epochs in {info['train_seconds']:.0f} s"
        )
    else:
        print(
            f"wrote {args.out / 'checkpoint.pt'}: threshold {info['threshold']:.6f} ({info['threshold_method']}), "
            f"{info['epochs_trained']} epochs in {info['train_seconds']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
