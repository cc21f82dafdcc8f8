"""python -m training.evaluate RUN --data DIR --split test

Evaluates a trained run on a data set and writes RUN/eval_<split>.json plus pictures:

- CT: accuracy, macro-F1, per-class precision/recall/F1, one-vs-rest ROC-AUC, confusion
  matrix (PNG), expected calibration error before and after temperature scaling (the
  temperature was fitted on validation data at training time), the binary defect/normal
  view that the verdict uses, and views that explain the numbers: slices of defective
  batteries that show no defect (labels are per battery), the best macro-F1 any model
  could reach given them, and per-battery accuracy.
- RGB: image ROC-AUC and PR-AUC, the validation-calibrated thresholds (F1- and
  ROC-optimal) applied to this split, pixel AUROC against the defect polygons,
  reconstruction error against a flat mean-colour image, and a preview PNG
  (input / reconstruction / error map).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from core.aihub import scan  # noqa: E402
from core.labels import CT_CLASSES, CT_DEFECT_CLASSES  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data.split import DEFAULT_FRACTIONS, read_split, split_dataset  # noqa: E402
from training.datasets import defect_masks, load_ct, load_rgb  # noqa: E402
from training.metrics import (  # noqa: E402
    battery_interval,
    binary_ap,
    binary_auc,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    macro_f1_interval,
    one_vs_rest_auc,
    per_class_prf,
    softmax,
)
from training.models.autoencoder import scorer_from  # noqa: E402
from training.ood import ct_feature_array, ct_group, distances, frame_refused, rgb_feature_array  # noqa: E402
from training.train import ct_logits, rgb_scores  # noqa: E402

DEFECT_IDX = [CT_CLASSES.index(c) for c in CT_DEFECT_CLASSES]


def _select(ds, run: Path, info: dict, data: Path, split: str, splits: Path | None):
    if split == "all":
        return lambda key: True
    if splits:
        assignment = read_split(splits)
    elif Path(info.get("data", "")).resolve() == data.resolve() and (run / "split").exists():
        assignment = read_split(run / "split")  # the very split the run trained with
    else:
        assignment = split_dataset(
            ds, tuple(info["config"].get("split", DEFAULT_FRACTIONS)), seed=info["config"]["split_seed"]
        )
    return lambda key: assignment.get(key) == split


def _binary(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray) -> dict:
    tp = int((y_true & y_pred).sum())
    fp = int((~y_true & y_pred).sum())
    fn = int((y_true & ~y_pred).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "roc_auc": binary_auc(y_true, score),
        "positives": int(y_true.sum()),
        "count": int(len(y_true)),
    }


def evaluate_ct(model, info: dict, records, out_png: Path, progress: bool = True) -> dict:
    arrays = load_ct(
        records, info["input_size"], info["normalization"]["mean"], info["normalization"]["std"], progress=progress
    )
    logits = ct_logits(model, arrays.images, arrays.meta)
    y = arrays.labels
    n = len(CT_CLASSES)
    raw, cal = softmax(logits, 1.0), softmax(logits, info["temperature"])
    pred = logits.argmax(1)
    cm = confusion_matrix(y, pred, n)
    prf = per_class_prf(cm)
    is_defect = np.isin(y, DEFECT_IDX)
    ambiguous = np.array([bool(is_defect[i] and not r.defects) for i, r in enumerate(records)])
    # What a perfect reader of each slice would score: it calls a slice that shows no
    # defect normal, whatever its battery's label says. No model can beat this.
    family_normal = np.array([CT_CLASSES.index(f"{r.battery_type}_normal") for r in records], np.int64)
    oracle = np.where(ambiguous, family_normal, y)
    per_battery = defaultdict(list)
    for i, r in enumerate(records):
        per_battery[r.battery_key].append(i)
    b_true = np.array([y[ix[0]] for ix in per_battery.values()])
    b_pred = np.array([np.log(cal[ix] + 1e-9).mean(axis=0).argmax() for ix in per_battery.values()])
    result = {
        "slices": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred, n),
        # 95% interval, batteries resampled: how far another test set of this size could move it
        "macro_f1_ci95": macro_f1_interval(y, pred, [r.battery_key for r in records], n),
        "per_class": {
            name: {
                "precision": float(prf["precision"][k]),
                "recall": float(prf["recall"][k]),
                "f1": float(prf["f1"][k]),
                "support": int(prf["support"][k]),
            }
            for k, name in enumerate(CT_CLASSES)
        },
        "roc_auc_ovr": dict(zip(CT_CLASSES, one_vs_rest_auc(cal, y, n))),
        "confusion_matrix": cm.tolist(),
        "temperature": info["temperature"],
        "ece_before_temperature": expected_calibration_error(raw, y),
        "ece_after_temperature": expected_calibration_error(cal, y),
        "ece_after_temperature_ci95": battery_interval(
            lambda ix: expected_calibration_error(cal[ix], y[ix]), [r.battery_key for r in records]
        ),
        "nll_before_temperature": float(-np.log(raw[np.arange(len(y)), y] + 1e-12).mean()),
        "nll_after_temperature": float(-np.log(cal[np.arange(len(y)), y] + 1e-12).mean()),
        "binary_defect": _binary(is_defect, np.isin(pred, DEFECT_IDX), cal[:, DEFECT_IDX].sum(axis=1)),
        "slices_of_defective_batteries_showing_no_defect": int(ambiguous.sum()),
        "macro_f1_without_those": macro_f1(y[~ambiguous], pred[~ambiguous], n),
        "best_possible_macro_f1": macro_f1(y, oracle, n),
        "per_battery": {
            "batteries": int(len(b_true)),
            "accuracy": float((b_true == b_pred).mean()),
            "macro_f1": macro_f1(b_true, b_pred, n),
        },
    }
    roc = [v for v in result["roc_auc_ovr"].values() if v is not None]
    result["roc_auc_macro"] = float(np.mean(roc)) if roc else None
    if info.get("ood"):  # the gate as served: a refused slice counts as an error
        refused = (
            distances(info["ood"], ct_feature_array(model, arrays.images, arrays.meta), ct_group(arrays.meta))
            >= info["ood"]["threshold"]
        ) | frame_refused(arrays.placements, info.get("frame"))
        gated = np.where(refused, -1, pred)
        result["gate"] = {
            "refused": float(refused.mean()),
            "refused_count": int(refused.sum()),
            "macro_f1_refusals_as_errors": macro_f1(y, gated, n),
            "accuracy_refusals_as_errors": float((gated == y).mean()),
        }
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), CT_CLASSES, rotation=35, ha="right")
    ax.set_yticks(range(n), CT_CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"CT confusion, macro-F1 {result['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return result


def evaluate_rgb(model, info: dict, records, out_png: Path, progress: bool = True) -> dict:
    size = info["input_size"]
    arrays = load_rgb(records, size, progress=progress)
    scorer = scorer_from(model, info["score"]).eval()
    scores, maps = rgb_scores(scorer, arrays.images)
    labels = arrays.anomalous
    masks = defect_masks(records, arrays.crops, size).astype(bool)
    images = arrays.images.astype(np.float32)
    with torch.no_grad():
        recon = np.concatenate([model(torch.from_numpy(images[i : i + 32])).numpy() for i in range(0, len(images), 32)])
    normal = ~labels
    recon_mse = float(((recon[normal] - images[normal]) ** 2).mean()) if normal.any() else None
    flat = images[normal].mean(axis=(2, 3), keepdims=True)
    flat_mse = float(((flat - images[normal]) ** 2).mean()) if normal.any() else None
    applied = {}
    for name, t in info["thresholds"].items():
        applied[name] = _binary(labels, scores > t, scores) | {"threshold": t}
    result = {
        "photos": int(len(labels)),
        "anomalous": int(labels.sum()),
        "image_roc_auc": binary_auc(labels, scores),
        "image_roc_auc_ci95": battery_interval(
            lambda ix: binary_auc(labels[ix], scores[ix]), [r.battery_key for r in records]
        ),
        "image_pr_auc": binary_ap(labels, scores),
        "pixel_roc_auc": float(roc_auc_score(masks.ravel(), maps.ravel())) if masks.any() and not masks.all() else None,
        "threshold_in_checkpoint": {"value": info["threshold"], "method": info["threshold_method"]},
        "thresholds_applied": applied,
        "reconstruction_mse_normal": recon_mse,
        "flat_mean_colour_mse_normal": flat_mse,
        "score_definition": info["score"],
    }
    if info.get("ood"):  # the gate as served: a refused photo counts as an error (a miss or a false alarm)
        refused = distances(info["ood"], rgb_feature_array(scorer, images)) >= info["ood"]["threshold"]
        refused |= frame_refused(arrays.placements, info.get("frame"))
        worst = np.where(labels, scores.min() - 1.0, scores.max() + 1.0)
        result["gate"] = {
            "refused": float(refused.mean()),
            "refused_count": int(refused.sum()),
            "image_roc_auc_refusals_as_errors": binary_auc(labels, np.where(refused, worst, scores)),
        }
    _recon_preview(images, recon, maps, masks, labels, scores, out_png)
    return result


def _recon_preview(images, recon, maps, masks, labels, scores, out_png: Path, per_kind: int = 3) -> None:
    picks = list(np.nonzero(~labels)[0][:per_kind]) + list(np.nonzero(labels)[0][: per_kind + 1])
    if not picks:
        return
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.5 * len(picks)), squeeze=False)
    vmax = float(np.percentile(maps[picks], 99.5)) or 1.0
    for row, i in enumerate(picks):
        axes[row, 0].imshow(images[i].transpose(1, 2, 0))
        axes[row, 1].imshow(np.clip(recon[i].transpose(1, 2, 0), 0, 1))
        axes[row, 2].imshow(maps[i], cmap="inferno", vmin=0, vmax=vmax)
        if masks[i].any():
            for ax in (axes[row, 0], axes[row, 2]):
                ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
        axes[row, 0].set_ylabel(f"{'defect' if labels[i] else 'normal'}\nscore {scores[i]:.4f}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ("input", "reconstruction", "error map")):
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def evaluate(run: Path, data: Path, split: str = "test", splits: Path | None = None, progress: bool = True) -> dict:
    model, info = load_checkpoint(run)
    ds = scan(data, progress=progress)
    wanted = _select(ds, run, info, data, split, splits)
    if info["kind"] == "ct_classifier":
        records = [r for r in ds.ct if wanted(r.battery_key)]
        if not records:
            raise SystemExit(f"error: no CT slices in split {split!r} of {data}")
        result = evaluate_ct(model, info, records, run / f"confusion_{split}.png", progress)
    else:
        records = [r for r in ds.rgb if wanted(r.battery_key)]
        if not records:
            raise SystemExit(f"error: no RGB photos in split {split!r} of {data}")
        result = evaluate_rgb(model, info, records, run / f"recon_{split}.png", progress)
    result = {"run": str(run), "kind": info["kind"], "data": str(data), "split": split} | result
    (run / f"eval_{split}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _interval(ci) -> str:
    return f" (95% {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def summary(result: dict) -> str:
    if result["kind"] == "ct_classifier":
        lines = [
            f"CT {result['split']}: {result['slices']} slices  accuracy {result['accuracy']:.4f}  macro-F1 "
            f"{result['macro_f1']:.4f} (95% {result['macro_f1_ci95'][0]:.3f}-{result['macro_f1_ci95'][1]:.3f})  "
            f"ROC-AUC (macro OvR) {result['roc_auc_macro'] or float('nan'):.4f}",
            f"  {'class':<22} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}",
        ]
        for name, m in result["per_class"].items():
            lines.append(f"  {name:<22} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8}")
        b = result["binary_defect"]
        lines += [
            f"  ECE {result['ece_before_temperature']:.4f} -> {result['ece_after_temperature']:.4f}"
            f"{_interval(result.get('ece_after_temperature_ci95'))} after temperature {result['temperature']:.3f}",
            f"  defect vs normal: F1 {b['f1']:.4f}  recall {b['recall']:.4f}  precision {b['precision']:.4f}  "
            f"ROC-AUC {b['roc_auc'] or float('nan'):.4f}",
            f"  {result['slices_of_defective_batteries_showing_no_defect']} slices of defective batteries show no "
            "defect; "
            f"macro-F1 without them {result['macro_f1_without_those']:.4f}; best possible macro-F1 on all slices "
            f"{result['best_possible_macro_f1']:.4f}",
            f"  per battery ({result['per_battery']['batteries']}): accuracy {result['per_battery']['accuracy']:.4f}  "
            f"macro-F1 {result['per_battery']['macro_f1']:.4f}",
        ]
        if "gate" in result:
            g = result["gate"]
            lines.append(
                f"  out-of-distribution gate: {g['refused_count']} of {result['slices']} slices refused "
                f"({g['refused']:.1%}); "
                f"macro-F1 counting them as errors {g['macro_f1_refusals_as_errors']:.4f}"
            )
        return "\n".join(lines)
    t = result["thresholds_applied"]
    lines = [
        f"RGB {result['split']}: {result['photos']} photos ({result['anomalous']} defective)  image ROC-AUC "
        f"{result['image_roc_auc'] or float('nan'):.4f}{_interval(result.get('image_roc_auc_ci95'))}  "
        f"PR-AUC {result['image_pr_auc'] or float('nan'):.4f}  "
        f"pixel AUROC {result['pixel_roc_auc'] or float('nan'):.4f}",
        f"  reconstruction MSE {result['reconstruction_mse_normal']:.5f} vs flat mean colour "
        f"{result['flat_mean_colour_mse_normal']:.5f}",
    ]
    for name, m in t.items():
        lines.append(
            f"  threshold {name} = {m['threshold']:.6f}: F1 {m['f1']:.4f}  precision {m['precision']:.4f}  recall "
            f"{m['recall']:.4f}"
        )
    if "gate" in result:
        g = result["gate"]
        lines.append(
            f"  out-of-distribution gate: {g['refused_count']} of {result['photos']} photos refused "
            f"({g['refused']:.1%}); "
            f"image ROC-AUC counting them as errors {g['image_roc_auc_refusals_as_errors'] or float('nan'):.4f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, help="run folder (holds checkpoint.pt)")
    p.add_argument("--data", type=Path, required=True, help="data set folder (AI Hub layout)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument(
        "--splits",
        type=Path,
        help="split files to use (default: the run's own split for its training data, "
        "else the data set split by battery with the run's split seed)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for path, what in ((args.run, "run folder"), (args.data, "data folder")):
        if not path.is_dir():
            print(f"error: {path} is not a {what}", file=sys.stderr)
            return 2
    result = evaluate(args.run, args.data, args.split, args.splits, progress=not args.quiet)
    print(summary(result))
    print(f"wrote {args.run / ('eval_' + args.split + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
