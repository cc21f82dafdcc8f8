"""python -m training.preset quick|standard|full [--out runs/NAME]

One command for a whole preset: generate its synthetic training set (unless --data is
given or it already exists), train the CT classifier and the RGB autoencoder, calibrate
their out-of-distribution gates on held-out cells of several sizes (training/conformal.py),
generate a fresh test set with another seed, evaluate both models on it, and print a table
of the numbers with the time each step took. `make serve` runs the quick preset when no trained
runs exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from training.config import load_config
from training.evaluate import evaluate, summary
from training.ood import calibrate_run
from training.synth.plan import DEFECT_VISIBILITY, SynthConfig
from training.synth.writer import CONFIG_FILE, generate
from training.train import train_ct, train_rgb

TEST_SEED_OFFSET = 1000


def synth_config(d: dict, seed: int, batteries: int | None = None) -> SynthConfig:
    return SynthConfig(
        batteries=batteries or d["batteries"],
        seed=seed,
        ct_size=d["ct_size"],
        rgb_width=d["rgb_size"][0],
        rgb_height=d["rgb_size"][1],
        slices_per_axis=d["slices_per_axis"],
        photos_per_battery=d["photos"],
        rgb_defect_rate=d["rgb_defect_rate"],
        visibility=dict(DEFECT_VISIBILITY) | dict(d.get("visibility") or {}),
    )


def calibration_sets(cfg: dict, root: Path) -> list[tuple[Path, SynthConfig]]:
    """The held-out cells the gates are calibrated on: at each size of `cfg["calibration"]`, one set
    with the generator's default configuration and one with the preset's, each of its own seed."""
    c, d = cfg["calibration"], cfg["data"]
    out = []
    for i, (ct, (w, h)) in enumerate(c["sizes"]):
        seed = int(c["seed"]) + 2 * i
        sizes = {"ct_size": int(ct), "rgb_width": int(w), "rgb_height": int(h), "photos_per_battery": c["photos"]}
        default = SynthConfig(batteries=c["batteries"], seed=seed, **sizes)
        own = dataclasses.replace(synth_config(d, seed + 1, c["batteries"]), **sizes)
        out += [(root / f"default-{ct}-seed{seed}", default), (root / f"preset-{ct}-seed{seed + 1}", own)]
    return out


def calibrate(cfg: dict, runs: list[Path], root: Path) -> list[Path]:
    """Generate the calibration sets under `root` (once) and calibrate each run's gate on them."""
    sets = calibration_sets(cfg, root)
    for path, synth in sets:
        stored = path / CONFIG_FILE
        if stored.exists() and json.loads(stored.read_text()) != json.loads(json.dumps(dataclasses.asdict(synth))):
            print(f"calibration data: {path} was generated with another configuration; generating it again")
            shutil.rmtree(path)
        ensure_data(path, synth, "calibration data")
    dirs = [p for p, _ in sets]
    for run in runs:
        calibrate_run(run, dirs, cfg["calibration"])
    return dirs


def ensure_data(path: Path, cfg: SynthConfig, what: str) -> None:
    if (path / CONFIG_FILE).exists():
        print(f"{what}: reusing {path}")
        return
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"error: {path} exists, is not empty and was not written by the generator; pass --data")
    print(f"{what}: generating {cfg.batteries} batteries into {path} (seed {cfg.seed})")
    generate(path, cfg)


def merge_summary(earlier: dict, only: str, timings: dict, results: dict) -> tuple[dict, dict]:
    """--only ct / --only rgb: keep the other model's numbers and timings from an earlier run.

    Data the earlier run generated was only reused by this one: its longer time is kept.
    """
    kept = {k: v for k, v in earlier.get("timings", {}).items() if not k.endswith(f"_{only}_s")}
    timings = kept | {k: max(v, kept.get(k, 0.0)) for k, v in timings.items()}
    return timings, {k: v for k, v in earlier.get("results", {}).items() if k != only} | results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.preset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("preset", help="quick, standard, full, or a YAML path")
    p.add_argument("--out", type=Path, help="run folder (default runs/PRESET); models go to OUT/ct and OUT/rgb")
    p.add_argument(
        "--data", type=Path, help="training data (default data/PRESET, generated from the preset if missing)"
    )
    p.add_argument(
        "--test-data", type=Path, help="fresh test data (default data/PRESET_test, generated with another seed)"
    )
    p.add_argument("--only", choices=["ct", "rgb"], help="train one model only")
    p.add_argument("--skip-eval", action="store_true", help="train only")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads per training (default: the config's, else all cores); "
        "use 1 for each of two trainings run side by side",
    )
    p.add_argument(
        "--reviewed",
        type=Path,
        action="append",
        metavar="DIR",
        help="also learn from the reviewed cells of this line archive or run folder (repeatable; "
        "python -m training.train --help says how)",
    )
    args = p.parse_args(argv)
    cfg = load_config(args.preset)
    if args.threads:
        cfg["ct"]["threads"] = cfg["rgb"]["threads"] = args.threads
    name = Path(args.preset).stem
    out = args.out or Path("runs") / name
    data = args.data or Path("data") / name
    test_data = args.test_data or Path("data") / f"{name}_test"
    d = cfg["data"]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if not args.data:
        ensure_data(data, synth_config(d, d["seed"]), "training data")
    timings["generate_training_data_s"] = time.perf_counter() - t
    models = [args.only] if args.only else ["ct", "rgb"]
    for model in models:
        t = time.perf_counter()
        (train_ct if model == "ct" else train_rgb)(data, cfg, out / model, None, progress=True, reviewed=args.reviewed)
        timings[f"train_{model}_s"] = time.perf_counter() - t
    if cfg["calibration"]["batteries"] > 0:
        t = time.perf_counter()
        calibrate(cfg, [out / m for m in models], Path("data") / f"{name}_calibration")
        timings["calibrate_s"] = time.perf_counter() - t
    results = {}
    if not args.skip_eval:
        t = time.perf_counter()
        if not args.test_data:
            test_batteries = d.get("test_batteries") or max(20, d["batteries"] // 2)
            ensure_data(test_data, synth_config(d, d["seed"] + TEST_SEED_OFFSET, test_batteries), "test data")
        timings["generate_test_data_s"] = time.perf_counter() - t
        for model in models:
            t = time.perf_counter()
            results[model] = evaluate(out / model, test_data, split="all", progress=True)
            timings[f"evaluate_{model}_s"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    if args.only and summary_path.exists():
        timings, results = merge_summary(json.loads(summary_path.read_text()), args.only, timings, results)
    report = {"preset": name, "data": str(data), "test_data": str(test_data), "timings": timings, "results": results}
    summary_path.write_text(json.dumps(report, indent=1) + "\n")
    print()
    for model in ("ct", "rgb"):
        if model in results:
            print(summary(results[model]))
    print(
        "time: "
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items())
        + f"; total {sum(timings.values()) / 60:.1f} min"
    )
    print(f"wrote {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
