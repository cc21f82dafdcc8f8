"""Training end to end on small synthetic data: the loops learn, checkpoints carry what export needs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.aihub import battery_key, scan
from core.preprocess import rgb_input
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.data.split import read_split, write_split
from training.datasets import defect_masks, load_rgb
from training.evaluate import evaluate
from training.models.autoencoder import scorer_from
from training.synth.plan import SynthConfig
from training.synth.rgb import RGBPhotoSpec, render_rgb_photo
from training.synth.writer import generate
from training.train import rgb_scores, train_ct, train_rgb

RGB_TINY = {
    "input_size": 64,
    "epochs": 40,
    "batch_size": 8,
    "model": {"name": "conv_autoencoder", "base": 16, "latent": 32, "depth": 3},
    "scheduler": {"T_0": 40, "T_mult": 1, "eta_min": 1e-5, "warmup_epochs": 1},
    "early_stopping": {"patience": 40},
    "workers": 1,
    "optimizer": {"lr": 3e-3, "weight_decay": 1e-5},
}


@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgbset")
    cfg = SynthConfig(
        batteries=40,
        seed=21,
        ct_size=64,
        rgb_width=256,
        rgb_height=144,
        slices_per_axis=1,
        photos_per_battery=2,
        rgb_defect_rate=0.35,
    )
    plans = generate(root, cfg, workers=1, progress=False)
    # An explicit split, so that validation (threshold calibration) and test both hold
    # defective photos: 4 + 4 defective and 4 + 4 normal batteries, the rest train.
    defective = [p for p in plans if p.rgb_defects]
    normal = [p for p in plans if not p.rgb_defects]
    assignment = {}
    for group in (defective, normal):
        for i, p in enumerate(group):
            assignment[battery_key(p.battery_type, p.form, p.battery_id)] = (
                "val" if i < 4 else "test" if i < 8 else "train"
            )
    write_split(assignment, root.parent / f"{root.name}_split", seed=0)
    return root, cfg, root.parent / f"{root.name}_split"


# the error map: the reconstruction error, or the segmentation head's probability
RGB_SCORING = {
    "reconstruction": {},
    "segmentation": {
        "model": RGB_TINY["model"] | {"skips": 1, "segment": 8, "segment_depth": 3},
        "anomalies": {"probability": 0.8, "max_blobs": 3, "radius": [0.03, 0.15]},
        "score": {"error": "segmentation_probability", "smooth_sigma": 1.5, "top_fraction": 0.01, "border": 0.06},
    },
}


@pytest.fixture(scope="module", params=list(RGB_SCORING))
def rgb_run(rgb_set, tmp_path_factory, request):
    root, _, splits = rgb_set
    cfg = load_config(None)
    cfg["rgb"].update(RGB_TINY | RGB_SCORING[request.param])
    run = tmp_path_factory.mktemp("rgbrun")
    torch.manual_seed(0)
    train_rgb(root, cfg, run, splits=splits, progress=False)
    return run


def test_autoencoder_really_reconstructs_held_out_normal_photos(rgb_set, rgb_run):
    root = rgb_set[0]
    model, info = load_checkpoint(rgb_run)
    split = read_split(rgb_run / "split")
    held_out = [r for r in scan(root, progress=False).rgb if split[r.battery_key] == "test" and r.is_normal]
    assert len(held_out) >= 5
    x = torch.from_numpy(load_rgb(held_out, 64, workers=1, progress=False).images.astype(np.float32))
    with torch.no_grad():
        recon = model(x)
    recon_mse = float(((recon - x) ** 2).mean())
    flat_mse = float(((x.mean(dim=(2, 3), keepdim=True) - x) ** 2).mean())
    assert recon_mse < 0.35 * flat_mse, (recon_mse, flat_mse)
    # not a flat image: the reconstruction keeps the spatial structure of its input
    assert float(recon.std(dim=(2, 3)).mean()) > 0.5 * float(x.std(dim=(2, 3)).mean())


def test_error_map_is_higher_inside_defect_polygons_than_on_the_same_pixels_without_the_defect(rgb_set, rgb_run):
    root, cfg, _ = rgb_set
    model, info = load_checkpoint(rgb_run)
    scorer = scorer_from(model, info["score"]).eval()
    defective = [r for r in scan(root, progress=False).rgb if not r.is_normal]
    higher, total, with_defect, without = 0, 0, [], []
    for r in defective[:12]:
        spec = RGBPhotoSpec(
            r.battery_id,
            r.battery_type,
            r.form,
            r.index,
            tuple(sorted({d.name for d in r.defects})),
            cfg.rgb_width,
            cfg.rgb_height,
            cfg.seed,
        )
        photo, clean = render_rgb_photo(spec), render_rgb_photo(spec, with_defects=False)
        x, crop = rgb_input(photo.image, 64)
        x_clean, _ = rgb_input(clean.image, 64)
        _, maps = rgb_scores(scorer, np.stack([x, x_clean]))
        mask = defect_masks([r], [crop], 64)[0].astype(bool)
        if mask.sum() < 2:
            continue
        total += 1
        higher += maps[0][mask].mean() > maps[1][mask].mean()
        with_defect.append(maps[0][mask].mean())
        without.append(maps[1][mask].mean())
    # A tiny model trained for seconds: most defects must raise the error where they are,
    # and on average clearly so (a reconstruction error starts near 0; a probability map
    # of a briefly trained head sits well above 0 everywhere, so it is held to a margin).
    assert total >= 6 and higher >= 0.6 * total, (higher, total)
    if info["score"]["error"] == "segmentation_probability":
        assert higher >= 0.75 * total and np.mean(with_defect) > np.mean(without) + 0.05, (
            higher,
            np.mean(with_defect),
            np.mean(without),
        )
    else:
        assert np.mean(with_defect) > 1.5 * np.mean(without), (np.mean(with_defect), np.mean(without))


def test_rgb_checkpoint_carries_threshold_and_score_definition(rgb_run):
    _, info = load_checkpoint(rgb_run)
    assert info["kind"] == "rgb_autoencoder" and info["input_size"] == 64
    assert (
        info["threshold_method"] == "f1"
        and info["threshold"] == info["thresholds"]["f1"]
        and "roc" in info["thresholds"]
    )
    assert set(info["score"]) == {"error", "smooth_sigma", "top_fraction", "border"}
    assert info["normalization"]["std"] == 1.0 and info["arch"] == "conv_autoencoder"


def test_rgb_evaluation_reports_image_and_pixel_metrics(rgb_set, rgb_run):
    result = evaluate(rgb_run, rgb_set[0], split="test", progress=False)
    for key in ("image_roc_auc", "image_pr_auc", "pixel_roc_auc"):
        assert 0.0 <= result[key] <= 1.0
    assert result["reconstruction_mse_normal"] < result["flat_mean_colour_mse_normal"]
    assert (rgb_run / "recon_test.png").exists() and json.loads((rgb_run / "eval_test.json").read_text())[
        "photos"
    ] == result["photos"]


def test_ct_training_writes_a_complete_checkpoint_and_evaluation(small_dataset, tmp_path):
    root, _ = small_dataset
    cfg = load_config(None)
    cfg["ct"].update(
        {
            "input_size": 48,
            "epochs": 2,
            "batch_size": 8,
            "workers": 1,
            "model": {"name": "resnet18_late_fusion", "hidden": 32, "dropout": 0.1},
        }
    )
    info = train_ct(root, cfg, tmp_path, progress=False)
    model, back = load_checkpoint(tmp_path)
    for key in ("arch", "arch_args", "class_names", "input_size", "normalization", "meta_spec", "temperature"):
        assert key in back, key
    assert back["meta_spec"]["names"] == ["battery_type", "slice_axis"] and back["temperature"] > 0
    assert len(json.loads((tmp_path / "history.json").read_text())) == 2
    assert any((tmp_path / "tb").iterdir())  # TensorBoard event file
    result = evaluate(tmp_path, root, split="val", progress=False)
    assert result["slices"] > 0 and len(result["confusion_matrix"]) == 5
    assert (tmp_path / "confusion_val.png").exists()
    assert 0 <= result["ece_after_temperature"] <= 1 and "binary_defect" in result
    assert info["val_macro_f1"] == back["val_macro_f1"]


def test_train_command_reports_a_bad_config_in_one_line(small_dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ct:\n  epoks: 3\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "ct",
            "--data",
            str(small_dataset[0]),
            "--config",
            str(bad),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown config key 'ct.epoks'" in done.stderr
