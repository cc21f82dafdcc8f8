"""The serving benchmark runs end to end on tiny settings and writes well-formed results.
(Speed is measured by `make bench`, never asserted here.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import ood, perf, robustness
from benchmarks.gateway import main as gateway
from benchmarks.serving import main
from benchmarks.soak import main as soak
from benchmarks.untrained import untrained_runs
from client.dataset import pair_cells
from core import interface as api
from core.preprocess import encoded_ct_input, encoded_rgb_input
from export.repository import classify_runs
from tests.support.tiny_models import make_ct_run, make_rgb_run
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.synth.plan import SynthConfig
from training.synth.writer import generate


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = root / "cells"
    generate(
        data,
        SynthConfig(
            batteries=2, seed=4, ct_size=96, rgb_width=160, rgb_height=90, slices_per_axis=1, photos_per_battery=1
        ),
        workers=1,
        progress=False,
    )
    runs = [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64)]
    out = root / "results"
    assert (
        main(
            [
                "--runs",
                *map(str, runs),
                "--data",
                str(data),
                "--cells",
                "4",
                "--concurrency",
                "1,2",
                "--seconds",
                "1",
                "--perf-interval",
                "500",
                "--baseline-seconds",
                "0.3",
                "--repository",
                str(root / "repo"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out / "latest"


def test_results_hold_every_path_and_the_headline_ratios(results):
    r = json.loads((results / "results.json").read_text())
    assert r["machine"]["sgemm_gflops"] > 0 and r["models"]["gflop_per_cell"] > 0
    assert [e["batch"] for e in r["in_process"]["onnxruntime"]] == [1, 8] and len(r["in_process"]["torch"]) == 2
    original = r["in_process"]["original"][0]
    assert original["cells_per_s"] > 0 and original["threads"] == 2 and original["cells"] >= 4
    assert set(original["seconds_per_step"]) == {"decode", "resize", "ct_network_and_gradcam", "rgb_network"}
    assert all(v > 0 for v in original["seconds_per_step"].values())
    e2e = r["in_process"]["end_to_end"][0]
    assert e2e["processes"] >= 1 and e2e["batch"] == 8 and e2e["cells"] >= 8 and e2e["cells_per_s"] > 0
    assert [e["concurrency"] for e in r["loadgen"]] == [1, 2]
    assert all(e["errors"] == 0 and e["cells"] > 0 and e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] for e in r["loadgen"])
    h = r["headline"]
    assert h["triton_vs_onnxruntime"] == pytest.approx(h["triton_cells_per_s"] / h["onnxruntime_cells_per_s"])
    assert h["triton_vs_original"] == pytest.approx(h["triton_cells_per_s"] / h["original_cells_per_s"])
    assert h["triton_vs_inprocess"] == pytest.approx(h["triton_cells_per_s"] / e2e["cells_per_s"])
    summary = (results / "summary.md").read_text()
    assert (
        "in-process ONNX Runtime on preprocessed tensors (networks only)" in summary
        and f"{h['triton_vs_onnxruntime']:.2f}" in summary
    )
    assert "best in-process end-to-end pipeline" in summary and "the original system's per-cell path" in summary
    assert r["machine"]["instruction_set"] in summary
    for plot in ("throughput.png", "latency.png"):
        assert (results / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(results / "results.csv")))
    assert {row["path"] for row in rows} >= {
        "in-process onnxruntime",
        "in-process torch",
        "in-process original",
        "in-process end_to_end",
        "triton loadgen",
    }
    assert all(float(row["cells_per_s"]) > 0 for row in rows)


def test_server_steps_account_for_every_cell_the_load_generator_sent(results):
    r = json.loads((results / "results.json").read_text())
    steps = {s["model"]: s for s in r["server_steps"]}
    sent = sum(e["cells"] + e["errors"] for e in r["loadgen"])  # measured cells; warm-up requests come on top
    assert set(steps) == {
        api.PREPROCESS,
        api.CT_CLASSIFIER,
        api.RGB_AUTOENCODER,
        api.VERDICT_MODEL,
    }  # the steps, not the ensemble
    assert steps[api.PREPROCESS]["requests"] >= sent
    for s in steps.values():
        assert (
            s["requests"] == steps[api.PREPROCESS]["requests"] and s["failures"] == 0
        )  # each cell went through every step once
        assert (
            1 <= s["mean_batch"] <= r["tuning"]["max_batch_size"]
            and s["compute_infer_ms"] > 0
            and 0 <= s["copy_share"] < 1
        )
    assert "Server time per cell by model" in (results / "summary.md").read_text()


@pytest.mark.skipif(perf.available() is not None, reason=f"perf_analyzer cannot run here: {perf.available()}")
def test_perf_analyzer_drove_each_ensemble_with_real_images(results):
    r = json.loads((results / "results.json").read_text())
    assert set(r["perf_analyzer"]) == {api.INSPECT, api.INSPECT_CT, api.INSPECT_RGB}
    for rows in r["perf_analyzer"].values():
        assert [e["concurrency"] for e in rows] == [1, 2] and all(
            e["cells_per_s"] > 0 and e["server_compute_ms"] > 0 for e in rows
        )


def test_bad_options_are_refused_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        main(["--concurrency", "0,x"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_untrained_runs_have_the_presets_architectures_and_sizes(tmp_path):

    runs = untrained_runs("quick", tmp_path)
    cfg = load_config("quick")
    found = classify_runs(runs)
    for kind, section in (("ct_classifier", "ct"), ("rgb_autoencoder", "rgb")):
        model, info = load_checkpoint(found[kind])
        assert info["input_size"] == cfg[section]["input_size"] and info["arch"] == cfg[section]["model"]["name"]
        assert info["untrained"] is True
    mtime = (tmp_path / "ct" / "checkpoint.pt").stat().st_mtime_ns
    assert (
        untrained_runs("quick", tmp_path) == runs and (tmp_path / "ct" / "checkpoint.pt").stat().st_mtime_ns == mtime
    )  # reused


def _small_benchmark_inputs(tmp_path):
    """(a 2-battery data set, tiny CT and RGB runs, a results folder) for a benchmark run in seconds."""
    data = tmp_path / "cells"
    generate(
        data,
        SynthConfig(
            batteries=2, seed=4, ct_size=96, rgb_width=160, rgb_height=90, slices_per_axis=1, photos_per_battery=1
        ),
        workers=1,
        progress=False,
    )
    return data, [make_ct_run(tmp_path / "ct", size=64), make_rgb_run(tmp_path / "rgb", size=64)], tmp_path / "results"


def _run_small(main, name: str, tmp_path, *options: str) -> tuple[int, Path, dict]:
    """(exit code, results folder, its <name>.json) of a benchmark's `main` on the small inputs, 4 cells."""
    data, runs, out = _small_benchmark_inputs(tmp_path)
    code = main(
        [
            "--runs",
            *map(str, runs),
            "--data",
            str(data),
            "--cells",
            "4",
            *options,
            "--repository",
            str(tmp_path / "repo"),
            "--out",
            str(out),
        ]
    )
    folder = next(out.glob(f"{name}-*"))
    return code, folder, json.loads((folder / f"{name}.json").read_text())


def test_soak_runs_end_to_end_and_reports_failures_memory_and_the_burst(tmp_path):

    code, folder, r = _run_small(
        soak, "soak", tmp_path, "--minutes", "0.1", "--saturation-seconds", "2", "--burst-seconds", "2"
    )
    assert code == 0, (folder / "summary.md").read_text()
    assert r["saturation_cells_per_s"] > 0 and r["soak"]["sent"] > 0 and r["soak"]["answered"] == r["soak"]["sent"]
    assert (
        len(r["memory"]["samples"]) >= 2 and r["memory"]["baseline_bytes"] > 50 * 2**20
    )  # tritonserver and its backends
    places = r["memory"]["by_process"]
    assert "tritonserver" in places and any(name.startswith("ct_classifier") for name in places)
    assert sum(v["end"] for v in places.values()) == pytest.approx(r["memory"]["end_bytes"], rel=0.05)
    assert r["burst"]["answered"] + sum(r["burst"]["errors"].values()) == r["burst"]["sent"]
    assert r["after_burst"]["server_alive"] and r["after_burst"]["ready"]
    summary = (folder / "summary.md").read_text()
    assert "failed cells in the soak" in summary and "server memory growth" in summary


def test_gateway_benchmark_times_every_cell_from_trigger_to_answer_with_and_without_shadow_traffic(tmp_path):

    code, folder, r = _run_small(
        gateway, "gateway", tmp_path, "--rate", "6", "--seconds", "3", "--stations", "2", "--shadow", "0,1"
    )
    assert code == 0, (folder / "summary.md").read_text() + (folder / "gateway-shadow0-round1.log").read_text()[-2000:]
    assert [leg["shadow"] for leg in r["legs"]] == [0.0, 1.0]
    for leg in r["legs"]:
        assert leg["sent"] >= 12 and leg["answered"] == leg["sent"] and leg["duplicates"] == 0 and leg["errors"] == 0
        lat = leg["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 30_000
        # each cell takes at least a read of Trigger and of its fields, the acknowledgement, the handshake's read
        # and two writes
        assert leg["plc_requests_per_s"] * leg["elapsed_s"] >= 5 * leg["sent"]
        assert 0 < leg["cpu_cores"]["gateway"] < 4 and 0 < leg["cpu_cores"]["plc"] < 4
    off, on = r["legs"]
    assert off["shadowed"] == 0
    # the answered cells shadowed to the same networks staged again (the 4 warm-up cells too; those still queued
    # when the gateway stops are not sent): they agree on every one
    assert 0 < on["shadowed"] <= on["sent"] + 4
    assert on["shadow_outcomes"] == {"agree": on["shadowed"], "flip": 0, "error": 0}
    summary = (folder / "summary.md").read_text()
    assert "trigger -> result p50" in summary and "watching by subscribe" in summary and "| 1 (1) |" in summary


def test_the_ood_and_robustness_evaluations_run_on_a_data_set_and_say_when_a_target_is_missed(small_dataset, tmp_path):
    """Tiny random networks whose gates are fitted on the data set's own images: the in-distribution
    cells pass (calibrated on them), so the reports' numbers are real and their verdicts follow them."""

    cells, _ = pair_cells(small_dataset[0], progress=False)
    ct_x = torch.from_numpy(np.stack([encoded_ct_input(c.ct_path.read_bytes(), 64)[0] for c in cells]))
    meta = torch.tensor([c.meta for c in cells], dtype=torch.float32)
    rgb_x = torch.from_numpy(np.stack([encoded_rgb_input(c.rgb_path.read_bytes(), 64)[0] for c in cells]))
    runs = [
        make_ct_run(tmp_path / "ct", size=64, images=ct_x, meta=meta, gate=True),
        make_rgb_run(tmp_path / "rgb", size=64, images=rgb_x, gate=True),
    ]
    result = ood.evaluate(runs, small_dataset[0], progress=False)
    assert result["in_distribution"]["cells"] == len(cells) and result["in_distribution"]["false_rejection"] == 0.0
    kinds = {(r["kind"], r["input"]) for r in result["kinds"]}
    assert {
        ("natural", "ct"),
        ("medical", "rgb"),
        ("swapped", "ct"),
        ("meta_swap", "ct"),
        ("empty_bench", "rgb"),
    } <= kinds
    for r in result["kinds"]:
        assert 0.0 <= r["rejected"] <= 1.0 and r["images"] > 0 and (r["auroc"] is None or 0.0 <= r["auroc"] <= 1.0)
    assert result["met"] == all(r["rejected"] >= ood.REJECTION_TARGET for r in result["kinds"])
    assert "| **all** |" in ood.markdown(result)

    rob = robustness.evaluate(runs, small_dataset[0], progress=False, limit=16)
    families = {(r["input"], r["family"]) for r in rob["rows"]}
    assert len(families) == 2 + len(robustness.CT_FAMILIES) + len(robustness.RGB_FAMILIES)
    unchanged = {r["input"]: r for r in rob["rows"] if r["family"] == "none"}
    assert unchanged["ct"]["loss"] == 0.0 and unchanged["rgb"]["refused"] == 0.0
    moderate = [r for r in rob["rows"] if r["strength"] == "moderate"]
    assert rob["met"] == all(r["met"] for r in moderate)
    assert all(r["met"] == (r["loss"] <= 0.03 and r["refused"] <= 0.05) for r in moderate)
