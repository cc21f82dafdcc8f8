"""The architecture study end to end on a tiny preset: two architectures trained, evaluated,
exported (FP32 and INT8), measured in ONNX Runtime and through a real tritonserver, the table,
the frontier and the plot; then resumed without training or measuring again."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from benchmarks.study import frontier, table
from benchmarks.study import main as study
from tests.support.tiny_models import make_rgb_run
from training.synth.plan import SynthConfig
from training.synth.writer import generate

TINY = {
    "ct": {
        "model": {"name": "resnet18_late_fusion", "hidden": 16, "dropout": 0.1, "pool": "max"},
        "input_size": 64,
        "epochs": 1,
        "batch_size": 8,
        "scheduler": {"T_0": 1, "T_mult": 1, "eta_min": 1.0e-5, "warmup_epochs": 0},
        "early_stopping": {"patience": 1},
    }
}
ARCHS = ["resnet18", "drn_aspp"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    small = dict(ct_size=64, rgb_width=112, rgb_height=64, slices_per_axis=1, photos_per_battery=1)
    generate(root / "data", SynthConfig(batteries=12, seed=5, **small), workers=1, progress=False)
    generate(root / "test", SynthConfig(batteries=4, seed=6, **small), workers=1, progress=False)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    argv = [
        "--archs",
        *ARCHS,
        "--arch-args",
        "drn_aspp:aspp_channels=32",
        "--preset",
        str(root / "tiny.yaml"),
        "--data",
        str(root / "data"),
        "--test-data",
        str(root / "test"),
        "--rgb",
        str(make_rgb_run(root / "rgb", size=64, threshold=0.1)),
        "--out",
        str(root / "out"),
        "--line-data",
        str(root / "test"),
        "--cells",
        "4",
        "--concurrency",
        "2",
        "--perf-interval",
        "1000",
        "--seconds",
        "0.2",
        "--quiet",
    ]
    assert study(argv) == 0
    return {"root": root, "out": root / "out", "argv": argv}


def test_every_architecture_is_trained_evaluated_exported_and_measured(tiny_study):
    out = tiny_study["out"]
    result = json.loads((out / "study.json").read_text())
    rows = {r["arch"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(ARCHS)
    for arch, r in rows.items():
        assert r["slices"] == 12 and 0 <= r["macro_f1"] <= 1 and r["epochs"] == 1
        assert 0 <= r["macro_f1_ci95"][0] <= r["macro_f1_ci95"][1] <= 1
        assert r["params_m"] > 1 and r["gflop_per_image"] > 0
        assert r["ort_fp32_images_per_s"] > 0 and r["ort_int8_images_per_s"] > 0 and 0 <= r["ort_int8_macro_f1"] <= 1
        assert r["inspect_cells_per_s"] > 0 and r["at_concurrency"] == 2
        assert (out / arch / "onnx" / "ct_classifier.int8.onnx").exists()
        assert not (out / arch / "serving" / "model_repository").exists()  # removed once measured
    drn = torch.load(out / "drn_aspp" / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert drn["arch"] == "drn_aspp" and drn["arch_args"] == {
        "hidden": 16,
        "dropout": 0.1,
        "pool": "max",
        "aspp_channels": 32,
    }
    # the dilated network with its ASPP head costs more than the plain ResNet18 at the same input
    assert rows["drn_aspp"]["gflop_per_image"] > 2 * rows["resnet18"]["gflop_per_image"]
    assert result["machine"]["instruction_set"] and result["settings"]["ct"]["input_size"] == 64
    # every architecture trained on the one split of the study
    assert (out / "split" / "train.txt").read_text() == (out / "resnet18" / "run" / "split" / "train.txt").read_text()
    md = (out / "study.md").read_text()
    assert all(f"| {a} |" in md for a in ARCHS) and "frontier" in md
    assert Image.open(out / "frontier.png").size[0] > 600


def test_a_second_run_keeps_what_is_done_and_other_settings_are_refused(tiny_study, capsys):
    out = tiny_study["out"]
    held = {a: (out / a / "run" / "checkpoint.pt").stat().st_mtime_ns for a in ARCHS}
    served = {a: (out / a / "served.json").read_text() for a in ARCHS}
    capsys.readouterr()
    assert study(tiny_study["argv"]) == 0
    said = capsys.readouterr().out
    assert all(f"{a}: trained already" in said for a in ARCHS)
    assert {a: (out / a / "run" / "checkpoint.pt").stat().st_mtime_ns for a in ARCHS} == held
    assert {a: (out / a / "served.json").read_text() for a in ARCHS} == served
    with pytest.raises(SystemExit, match="other settings .*ct"):
        study([*tiny_study["argv"], "--epochs", "2"])
    assert study([*tiny_study["argv"][:1], "resnet50", *tiny_study["argv"][3:]]) == 2


def test_the_frontier_keeps_the_architectures_nothing_beats_on_both_counts():
    rows = [
        {"arch": "a", "macro_f1": 0.80, "accuracy": 0.8, "speed": 10.0},
        {"arch": "b", "macro_f1": 0.70, "accuracy": 0.7, "speed": 20.0},
        {"arch": "c", "macro_f1": 0.60, "accuracy": 0.6, "speed": 15.0},  # b is better and faster
        {"arch": "d", "macro_f1": 0.80, "accuracy": 0.8, "speed": 5.0},  # a ties on F1 and is faster
        {"arch": "e", "macro_f1": 0.90, "accuracy": 0.9, "speed": None},  # not measured: not placed
    ]
    assert frontier(rows, "speed") == {"a", "b"}
    lines = table([{**r, "inspect_cells_per_s": r["speed"], "ort_fp32_images_per_s": None} for r in rows])
    assert lines[2].startswith("| e |") and "n/a" in lines[2]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["e", "a", "d", "b", "c"]
    assert lines[3].endswith("| served |") and lines[4].endswith("| - |")
