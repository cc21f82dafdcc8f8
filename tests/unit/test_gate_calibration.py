"""The gate's calibration (training/conformal.py): the order statistic's promise, and a fitted gate
that keeps it on a fresh set of a seed drawn at run time."""

from __future__ import annotations

import json
import secrets
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binom

from client.__main__ import main as client_main
from client.review.runs import load_run, placement_table, refused_rows
from core.aihub import scan
from core.decode import ImageError
from core.preprocess import find_object_rgb, fit_frame
from export.local import TorchPipeline
from serving.runtime import ct_tensor, rgb_tensor
from tests.support.tiny_models import make_ct_run, make_rgb_run
from training import conformal
from training.checkpoint import load_checkpoint
from training.config import DEFAULTS as CONFIG_DEFAULTS
from training.datasets import load_ct, load_rgb
from training.ood import calibrate_run
from training.ood import main as ood_main
from training.synth.plan import SynthConfig
from training.synth.writer import generate

# calibration and fresh cells: the generator's default configuration at two sizes each
SIZES = ((96, (160, 90)), (192, (288, 162)))


def test_the_order_statistic_promises_the_rate_and_a_small_set_says_it_cannot():
    # the largest of n scores leaves a share above it distributed Beta(n, 1): P(share > r) = (1 - r)^n
    assert conformal.promised_rate(100, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    k = conformal.order_statistic(2000, 0.005, 0.95)
    assert conformal.promised_rate(2000, k, 0.95) <= 0.005 < conformal.promised_rate(2000, k - 1, 0.95)
    assert conformal.order_statistic(500, 0.005, 0.95) is None  # 598 needed
    assert conformal.images_needed(0.005, 0.95) == 598
    assert conformal.order_statistic(598, 0.005, 0.95) == 598


def test_calibration_sets_the_served_threshold_and_ranges_at_tau():
    gate = {"validation": {"median": 10.0, "q99": 20.0}, "threshold": 99.0}
    frame = {"ranges": {}, "spread": {f: [0.4, 0.5, 0.6] for f in ("span", "aspect", "offset", "edge", "fill")}}
    distances = np.array([12.0, 25.0, 15.0])  # scores 0.2, 1.5, 0.5 from the distance
    facts = [dict.fromkeys(frame["spread"], 0.5)] * 3
    facts = facts[:2] + [dict(facts[2], fill=0.8)]  # fill 3 spreads above its median (spread 0.1)
    scores, worst = conformal.nonconformity(distances, facts, gate, frame)
    assert scores == pytest.approx([0.2, 1.5, 3.0]) and worst == ["distance", "distance", "fill"]
    g, f = conformal.calibrated(gate, frame, scores, worst, {"rate": 0.5, "confidence": 0.5}, ["d"])
    tau = g["calibration"]["tau"]
    assert g["threshold"] == pytest.approx(10 + 10 * tau) and f["ranges"]["span"] == pytest.approx(
        [0.5 - 0.1 * tau, 0.5 + 0.1 * tau]
    )
    assert (scores > tau).sum() == g["calibration"]["refused_in_calibration"]
    # the edge share moves in quarters: its spread is at least one step
    assert f["ranges"]["edge"][1] == pytest.approx(0.5 + 0.25 * tau)
    none_found = conformal.nonconformity(distances[:1], [None], gate, frame)
    assert none_found[0][0] == np.inf and none_found[1] == ["no battery"]


def _sets(root, seed: int, batteries: int) -> list:
    out = []
    for i, (ct, (w, h)) in enumerate(SIZES):
        cfg = SynthConfig(
            batteries=batteries,
            seed=seed * 10 + i,
            ct_size=ct,
            rgb_width=w,
            rgb_height=h,
            slices_per_axis=1,
            photos_per_battery=3,
        )
        path = root / f"{ct}-seed{seed * 10 + i}"
        generate(path, cfg, workers=1, progress=False)
        out.append(path)
    return out


def _refused(pipeline: TorchPipeline, data) -> tuple[int, int, int, int]:
    """(CT slices refused, slices, photos refused, photos) by the served checks: the placement
    check in the preprocessing and the gate's score of 1 or more in the network."""
    ds = scan(data, progress=False)
    counts = []
    for records, one, facts, graph in (
        (ds.ct, ct_tensor, pipeline.ct_facts, pipeline.ct_graph),
        (ds.rgb, rgb_tensor, pipeline.rgb_facts, pipeline.rgb_graph),
    ):
        refused = 0
        for r in records:
            try:
                x = one(r.path.read_bytes(), facts)
            except ImageError:
                refused += 1
                continue
            args = [np.asarray(x, np.float32)[None]]
            if graph is pipeline.ct_graph:
                args.append(np.asarray([r.meta], np.float32))
            with torch.no_grad():
                ood = float(graph(*(torch.from_numpy(a) for a in args))[2][0, 0])
            refused += ood >= 1.0
        counts += [refused, len(records)]
    return tuple(counts)


def test_a_calibrated_gate_keeps_its_promise_on_a_fresh_set_of_a_seed_drawn_now(tmp_path):
    # fit: a small training-like set at one size; the fixture networks are random but seeded (deterministic)
    fit = tmp_path / "fit"
    generate(
        fit,
        SynthConfig(batteries=24, seed=5, ct_size=128, rgb_width=192, rgb_height=108, photos_per_battery=2),
        workers=1,
        progress=False,
    )
    ds = scan(fit, progress=False)
    ct = load_ct(ds.ct, 64, workers=1, progress=False, dtype=np.float32)
    rgb = load_rgb(ds.rgb, 64, workers=1, progress=False, dtype=np.float32)
    runs = tmp_path / "runs"
    make_ct_run(runs / "ct", images=ct.images, meta=ct.meta, gate=True, frame=fit_frame(ct.placements))
    make_rgb_run(runs / "rgb", images=rgb.images, gate=True, frame=fit_frame(rgb.placements))

    # the provisional gate, fitted on the training size alone, against a set of a seed nobody chose
    seed = 100_000 + secrets.randbelow(900_000)
    print(f"fresh set seed {seed} (replay: set it in place of the draw)")
    fresh = _sets(tmp_path / "fresh", seed, batteries=24)

    def refused(runs) -> np.ndarray:
        pipeline = TorchPipeline([runs / "ct", runs / "rgb"])
        return sum(np.array(_refused(pipeline, data)) for data in fresh)

    provisional = refused(runs)
    # calibrated on held-out cells of those sizes (fixed seeds)
    calibration = _sets(tmp_path / "calibration", 4242, batteries=48)
    promises = []
    for kind in ("ct", "rgb"):
        info = calibrate_run(runs / kind, calibration, {"rate": 0.02, "confidence": 0.99}, progress=False)
        promises.append(info["ood"]["calibration"]["promised_rate"])
        assert info["frame"]["calibration"] == info["ood"]["calibration"]
    calibrated = refused(runs)
    bounds = [int(binom.ppf(0.999, n, rate)) for n, rate in zip(calibrated[1::2], promises)]
    print(
        f"refused of {calibrated[1]} slices / {calibrated[3]} photos: provisional {provisional[0::2]}, "
        f"calibrated {calibrated[0::2]}, bounds {bounds}"
    )
    for refused_now, bound, rate, what in zip(calibrated[0::2], bounds, promises, ("CT", "photo")):
        # a rate of `rate` exceeds the bound about once in a thousand honest runs
        assert refused_now <= bound, f"seed {seed}: {refused_now} {what} images refused, promise {rate:.2%}"
    # and the check can fail: the gate fitted on the training size alone does not keep such a promise
    assert any(p > b for p, b in zip(provisional[0::2], bounds)), (provisional, bounds)


def test_inspect_dir_says_why_a_cell_was_refused_and_writes_the_placement_facts_that_decided_it(
    tmp_path, small_dataset, capsys
):
    root, _ = small_dataset
    data = tmp_path / "cells"
    shutil.copytree(root, data)
    ds = scan(data, progress=False)
    ct = load_ct(ds.ct, 64, workers=1, progress=False, dtype=np.float32)
    rgb = load_rgb(ds.rgb, 64, workers=1, progress=False, dtype=np.float32)
    runs = tmp_path / "runs"
    make_ct_run(runs / "ct", images=ct.images, meta=ct.meta, frame=fit_frame(ct.placements))
    make_rgb_run(runs / "rgb", images=rgb.images, frame=fit_frame(rgb.placements))
    # one photo cut so that its battery fills the frame edge to edge: no training photo was taken so
    photo = ds.rgb[0]
    image = Image.open(photo.path)
    x0, y0, x1, y1 = find_object_rgb(np.asarray(image.convert("RGB")))
    image.crop((x0 + 2, y0 + 2, x1 - 2, y1 - 2)).resize(image.size).save(photo.path)

    out = tmp_path / "run" / "results.jsonl"
    rc = client_main(["inspect-dir", str(data), "--local", str(runs / "ct"), str(runs / "rgb"), "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    refused = [r for r in rows if r.get("refusal")]
    assert rc == 0 and refused, printed  # a refusal is an answer, not a failed run
    assert all(photo.path.stem in r["rgb_path"] for r in refused)
    r = refused[0]
    assert r["refusal"].startswith("photo: not inspectable as placed: the battery ")
    assert "look at how the cell sits in the fixture" in r["refusal"]
    seen = r["placement"]["photo"]
    assert seen["outside_facts"] and set(seen["facts"]) == {"span", "aspect", "offset", "edge", "fill"}
    for fact in seen["outside_facts"]:
        lo, hi = seen["ranges"][fact]
        assert not lo <= seen["facts"][fact] <= hi
    assert r["placement"]["ct"]["outside_facts"] == []
    assert f"refused: photo: placement ({', '.join(seen['outside_facts'])})" in printed
    # the review station lists it with the facts and the accepted ranges
    run = load_run(out.parent)
    assert refused_rows(run.rows) == refused
    table = placement_table(r["placement"])
    assert sum(table["outside"]) == len(seen["outside_facts"]) and len(table["fact"]) == 10


def test_the_command_calibrates_a_run_at_the_presets_rate_for_its_input_unless_told_another(tmp_path, small_dataset):
    root, _ = small_dataset
    ds = scan(root, progress=False)
    rgb = load_rgb(ds.rgb, 64, workers=1, progress=False, dtype=np.float32)
    run = make_rgb_run(tmp_path / "rgb", images=rgb.images, gate=True, frame=fit_frame(rgb.placements))
    assert ood_main([str(run), "--no-refit", "--calibration", str(root), "--quiet"]) == 0
    record = load_checkpoint(run)[1]["ood"]["calibration"]
    assert record["rate"] == CONFIG_DEFAULTS["calibration"]["rate"]["rgb"] and record["images"] == len(ds.rgb)
    assert ood_main([str(run), "--no-refit", "--calibration", str(root), "--rate", "0.2", "--quiet"]) == 0
    assert load_checkpoint(run)[1]["ood"]["calibration"]["rate"] == 0.2
