"""The architecture study: which CT network should a line run, given its takt and its PC?

  python -m benchmarks study [--archs A B ...] [--preset quick] [--out DIR]

Trains each CT architecture of the registry on one split of one data set with one preset,
evaluates each on the same fresh test set (batteries none of them saw), exports each to
ONNX (FP32, parity-checked, and INT8 calibrated on the training data) and measures what
each costs to serve the way `make bench` does: FLOPs and parameters, in-process ONNX
Runtime images/s (FP32 and INT8, batch 8, on the test slices preprocessed), and Triton
`inspect` cells/s at line size (CT 4000 x 4000, photos 1920 x 1080; perf_analyzer, the
load generator where perf_analyzer cannot run) with that CT network and the study's RGB
autoencoder in the repository.

Output in OUT (default benchmarks/results/study-PRESET):
  study.json      every figure, the machine, the settings and the time each step took
  study.md        the table, with the accuracy/cost frontier marked
  frontier.png    macro-F1 against served cells/s and against network images/s
  ARCH/           run/ (checkpoint, history, eval), eval.json, onnx/, cost.json, served.json
  split/          the one train/val/test assignment every architecture was trained on

Resumable: run the same command again and every step already done is kept (an architecture
already trained is not trained again; a measurement is repeated only if its settings
changed, or with --remeasure). All architectures are trained first, then all are measured,
so the measurements run back to back on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml
from tqdm import tqdm

from benchmarks import loadgen, measure, perf
from benchmarks.options import positive_ints
from benchmarks.serving import line_cells, line_set
from core import interface as api
from core.aihub import scan
from core.facts import ServingFacts
from core.labels import CT_CLASSES
from export.graphs import inference_graph
from export.onnx_export import example_inputs, export_run
from export.quantize import calibration_tensors, quantize_int8
from export.repository import RUNTIMES, build_repository
from export.tensorrt import build_repository_engines
from serving.runtime import ct_tensor
from serving.server import Ports, TritonServer, free_ports
from training.checkpoint import CHECKPOINT, load_checkpoint
from training.config import load_config
from training.data.split import read_split, split_dataset, write_split
from training.evaluate import evaluate
from training.metrics import macro_f1
from training.models import list_models
from training.preset import TEST_SEED_OFFSET, ensure_data, synth_config
from training.synth.plan import photo_size
from training.train import train_ct, train_rgb

NOT_CT = {"conv_autoencoder"}
ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEFAULT_ARCHS = (
    "resnet18_late_fusion",
    "resnet18",
    "resnet18_early_fusion",
    "cbam_resnet18",
    "drn_aspp",
    "efficientnet_b0",
    "convnext_tiny",
)


def ct_architectures() -> list[str]:
    return [name for name in list_models() if name not in NOT_CT]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def _say(bar: tqdm, text: str) -> None:
    """A line above the progress bar (printed plainly when the bar is off)."""
    if bar.disable:
        print(text)
    else:
        bar.write(text)


class Study:
    """One study folder: its settings, and each architecture's steps, done or to do."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.cfg = load_config(args.preset)
        if args.epochs:
            self.cfg["ct"]["epochs"] = args.epochs
        name = Path(args.preset).stem
        self.data = args.data or Path("data") / name
        self.test_data = args.test_data or Path("data") / f"{name}_test"
        self.timings: dict[str, dict[str, float]] = {}
        self.settings = {
            "preset": str(args.preset),
            "data": str(self.data),
            "test_data": str(self.test_data),
            "ct": {k: v for k, v in self.cfg["ct"].items() if k not in ("model", "threads", "workers", "device")}
            | {"model_args": {k: v for k, v in self.cfg["ct"]["model"].items() if k != "name"}},
        }
        if args.arch_args:
            self.settings["arch_args"] = args.arch_args
        self.settings = json.loads(json.dumps(self.settings))  # as settings.json holds them (lists, not tuples)

    # --- setup ----------------------------------------------------------------------------

    def check_settings(self) -> None:
        """A study folder holds one study: refuse to mix architectures trained under other settings."""
        held = _read(self.out / "settings.json")
        if held is not None and held != self.settings:
            changed = sorted(k for k in set(held) | set(self.settings) if held.get(k) != self.settings.get(k))
            raise SystemExit(
                f"error: {self.out} holds a study with other settings ({', '.join(changed)} differ); "
                "give another --out, or remove that folder to start again"
            )
        _write(self.out / "settings.json", self.settings)

    def prepare_data(self) -> None:
        d = self.cfg["data"]
        if not self.args.data:
            ensure_data(self.data, synth_config(d, d["seed"]), "training data")
        if not self.args.test_data:
            batteries = d.get("test_batteries") or max(20, d["batteries"] // 2)
            ensure_data(self.test_data, synth_config(d, d["seed"] + TEST_SEED_OFFSET, batteries), "test data")
        for folder in (self.data, self.test_data):
            if not folder.is_dir():
                raise SystemExit(f"error: {folder} is not a folder")

    @property
    def split(self) -> Path:
        """OUT/split: written once, so that every architecture trains and validates on the same batteries."""
        folder = self.out / "split"
        if not (folder / "train.txt").exists():
            seed = int(self.cfg["ct"]["split_seed"])
            write_split(split_dataset(scan(self.data, progress=False), seed=seed), folder, seed=seed)
        read_split(folder)  # refuses a damaged one
        return folder

    def rgb_run(self) -> Path:
        if self.args.rgb:
            if not (self.args.rgb / CHECKPOINT).exists():
                raise SystemExit(f"error: --rgb {self.args.rgb} holds no {CHECKPOINT} (an RGB run folder)")
            return self.args.rgb
        run = self.out / "rgb"
        if not (run / CHECKPOINT).exists():
            print(f"training the RGB autoencoder of the {self.settings['preset']} preset once into {run}")
            train_rgb(self.data, self.cfg, run, self.split, progress=not self.args.quiet)
        return run

    # --- pass 1: train, evaluate, export --------------------------------------------------

    def _timed(self, arch: str, step: str, fn):
        start = time.perf_counter()
        value = fn()
        self.timings.setdefault(arch, {})[step] = round(time.perf_counter() - start, 1)
        return value

    def train(self, arch: str, bar: tqdm) -> Path:
        run = self.out / arch / "run"
        if (run / CHECKPOINT).exists():
            _say(bar, f"{arch}: trained already ({run}), kept")
            return run
        cfg = json.loads(json.dumps(self.cfg))
        cfg["ct"]["model"] = (
            {"name": arch}
            | {k: v for k, v in cfg["ct"]["model"].items() if k != "name"}
            | self.args.arch_args.get(arch, {})
        )
        info = self._timed(
            arch, "train_s", lambda: train_ct(self.data, cfg, run, self.split, progress=not self.args.quiet)
        )
        _say(
            bar,
            f"{arch}: trained {info['epochs_trained']} epochs in {info['train_seconds'] / 60:.1f} min, "
            f"val macro-F1 {info['val_macro_f1']:.3f}",
        )
        return run

    def evaluate(self, arch: str, run: Path, bar: tqdm) -> dict:
        path = self.out / arch / "eval.json"
        held = _read(path)
        if held is not None:
            return held
        r = self._timed(arch, "evaluate_s", lambda: evaluate(run, self.test_data, split="all", progress=False))
        trained = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
        result = {
            "train_minutes": trained["train_seconds"] / 60,
            "epochs": trained["epochs_trained"],
            "val_macro_f1": trained.get("val_macro_f1"),
            "slices": r["slices"],
            "macro_f1": r["macro_f1"],
            "macro_f1_ci95": r["macro_f1_ci95"],
            "accuracy": r["accuracy"],
            "roc_auc_macro": r["roc_auc_macro"],
            "per_battery_macro_f1": r["per_battery"]["macro_f1"],
            "best_possible_macro_f1": r["best_possible_macro_f1"],
        }
        _write(path, result)
        _say(bar, f"{arch}: test macro-F1 {result['macro_f1']:.3f}, accuracy {result['accuracy']:.3f}")
        return result

    def export(self, arch: str, run: Path, bar: tqdm) -> dict:
        folder = self.out / arch / "onnx"
        path = self.out / arch / "export.json"
        held = _read(path)
        if held is not None and Path(held["fp32"]).exists() and Path(held["int8"]).exists():
            return held

        def work():
            exported = export_run(run, folder)
            feeds = calibration_tensors(self.data, exported.facts, None)
            int8 = quantize_int8(exported.onnx_path, folder / "ct_classifier.int8.onnx", feeds)
            worst = max((v for d in exported.parity.values() for v in d.values()), default=0.0)
            return {"fp32": str(exported.onnx_path), "int8": str(int8), "parity_max_abs_diff": worst}

        result = self._timed(arch, "export_s", work)
        _write(path, result)
        return result

    # --- pass 2: what it costs to serve ---------------------------------------------------

    def cost(self, arch: str, run: Path, exported: dict, tensors, bar: tqdm) -> dict:
        path = self.out / arch / "cost.json"
        settings = {"batch": self.args.batch, "seconds": self.args.seconds, "provider": self.args.ort_provider}
        held = _read(path)
        if held is not None and held.get("settings") == settings and not self.args.remeasure:
            return held
        model, info = load_checkpoint(run)
        graph = inference_graph(model, info)
        x, meta, labels = tensors(info)
        result = {
            "settings": settings,
            "input_size": int(info["input_size"]),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflop_per_image": measure.flops_per_image(graph, example_inputs(info, 1)) / 1e9,
            "machine": measure.machine(),
        }
        for precision in ("fp32", "int8"):
            session = ort.InferenceSession(exported[precision], providers=ORT_PROVIDERS[self.args.ort_provider])
            images_per_s, probs = measure.ct_images_per_s_and_probs(
                session, x, meta, self.args.batch, self.args.seconds
            )
            result[f"ort_{precision}_images_per_s"] = images_per_s
            result[f"ort_{precision}_macro_f1"] = macro_f1(labels, probs.argmax(1), len(CT_CLASSES))
        _write(path, result)
        _say(
            bar,
            f"{arch}: {result['params_m']:.1f} M parameters, {result['gflop_per_image']:.2f} GFLOP/image, "
            f"ONNX Runtime FP32 {result['ort_fp32_images_per_s']:.0f} / INT8 {result['ort_int8_images_per_s']:.0f} "
            "images/s",
        )
        return result

    def served(self, arch: str, run: Path, rgb: Path, cells, bar: tqdm) -> dict:
        """`cells()`: the line-size cells to send, loaded on the first call."""
        path = self.out / arch / "served.json"
        settings = {
            "runtime": self.args.runtime,
            "cells": self.args.cells,
            "line_data": str(self.args.line_data or "generated"),
            "ct_size": self.args.ct_size,
            "rgb_size": list(self.args.rgb_size),
            "concurrency": self.args.concurrency,
            "perf_interval_ms": self.args.perf_interval,
            "rgb_run": str(rgb),
        }
        held = _read(path)
        if held is not None and held.get("settings") == settings and not self.args.remeasure:
            return held
        work = self.out / arch / "serving"
        repo = work / "model_repository"
        start = time.perf_counter()
        build_repository([run, rgb], self.args.runtime, repo, progress=lambda *_: None)
        if self.args.runtime == "tensorrt":  # engines are built on the GPU that serves them
            build_repository_engines(repo, progress=lambda *_: None)
        server = TritonServer(repo, Ports(*free_ports(3)), log_path=work / "tritonserver.log")
        server.start(timeout=300)
        say = (lambda text: _say(bar, text)) if not self.args.quiet else (lambda text: None)
        try:
            missing = perf.available()
            if missing is None:
                client = "perf_analyzer"
                metrics_url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
                rows = perf.run(
                    server.grpc_url,
                    metrics_url,
                    api.INSPECT,
                    cells(),
                    self.args.concurrency,
                    self.args.perf_interval,
                    work / "perf_analyzer",
                    progress=say,
                )
            else:
                client = f"load generator ({missing})"
                rows = loadgen.sweep(
                    server.grpc_url, cells(), self.args.concurrency, self.args.perf_interval / 1000, progress=say
                )
        finally:
            server.stop()
            shutil.rmtree(repo, ignore_errors=True)  # rebuilt in a minute; a study's repositories add up
        best = max(rows, key=lambda r: r["cells_per_s"])
        result = {
            "settings": settings,
            "client": client,
            "inspect_cells_per_s": best["cells_per_s"],
            "at_concurrency": best["concurrency"],
            "p50_ms": best.get("p50_ms"),
            "p99_ms": best.get("p99_ms"),
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
        }
        _write(path, result)
        _say(bar, f"{arch}: Triton inspect {result['inspect_cells_per_s']:.1f} cells/s ({client})")
        return result


def _test_tensors(test_data: Path):
    """(x, meta, labels) of the fresh test slices, preprocessed as served, per input geometry."""
    records = scan(test_data, progress=False).ct
    cache: dict = {}

    def get(info: dict):
        key = (int(info["input_size"]), json.dumps(info["normalization"], sort_keys=True))
        if key not in cache:
            facts = ServingFacts.from_dict(info)
            cache[key] = (
                np.stack([ct_tensor(r.path.read_bytes(), facts) for r in records]),
                np.array([r.meta for r in records], np.float32),
                np.array([r.label_index for r in records]),
            )
        return cache[key]

    return get


def frontier(rows: list[dict], speed: str) -> set[str]:
    """The architectures no other beats on both macro-F1 and `speed` (the accuracy/cost frontier)."""
    out = set()
    for r in rows:
        if r.get(speed) is None:
            continue
        dominated = any(
            o is not r
            and o.get(speed) is not None
            and o["macro_f1"] >= r["macro_f1"]
            and o[speed] >= r[speed]
            and (o["macro_f1"] > r["macro_f1"] or o[speed] > r[speed])
            for o in rows
        )
        if not dominated:
            out.add(r["arch"])
    return out


def table(rows: list[dict]) -> list[str]:
    served = frontier(rows, "inspect_cells_per_s")
    network = frontier(rows, "ort_fp32_images_per_s")

    def interval(r):
        ci = r.get("macro_f1_ci95")
        return f"({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "| architecture | params (M) | GFLOP/image | test macro-F1 (95% interval) | accuracy | ROC-AUC | INT8 macro-F1 "
        "| ORT FP32 images/s | ORT INT8 images/s | Triton inspect cells/s | p99 ms | trained (min) | frontier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["macro_f1"]):
        marks = [m for m, s in (("served", served), ("network", network)) if r["arch"] in s]
        lines.append(
            f"| {r['arch']} | {num(r.get('params_m'), '.1f')} | {num(r.get('gflop_per_image'), '.2f')} "
            f"| {r['macro_f1']:.3f} {interval(r)} | {r['accuracy']:.3f} | {num(r.get('roc_auc_macro'), '.3f')} "
            f"| {num(r.get('ort_int8_macro_f1'), '.3f')} | {num(r.get('ort_fp32_images_per_s'), '.0f')} "
            f"| {num(r.get('ort_int8_images_per_s'), '.0f')} | {num(r.get('inspect_cells_per_s'), '.1f')} "
            f"| {num(r.get('p99_ms'), '.0f')} | {num(r.get('train_minutes'), '.1f')} | {', '.join(marks) or '-'} |"
        )
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only for the figure

    panels = [
        ("inspect_cells_per_s", "Triton inspect, cells/s at line size"),
        ("ort_fp32_images_per_s", "CT network alone, ONNX Runtime FP32 images/s"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, label) in zip(axes, panels):
        shown = [r for r in rows if r.get(key) is not None]
        best = frontier(shown, key)
        for r in shown:
            on = r["arch"] in best
            ci = r.get("macro_f1_ci95")
            if ci:  # the 95% interval: how far another test set of this size could move the point
                ax.plot([r[key]] * 2, ci, color="0.75", lw=3, zorder=1, solid_capstyle="butt")
            ax.scatter(r[key], r["macro_f1"], s=60, color="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(r["arch"], (r[key], r["macro_f1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        line = sorted((r for r in shown if r["arch"] in best), key=lambda r: r[key])
        if len(line) > 1:
            ax.plot([r[key] for r in line], [r["macro_f1"] for r in line], color="tab:red", lw=1, zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel("test macro-F1 (grey: 95% interval)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(study: Study, archs: list[str], started: float) -> dict:
    rows = []
    for arch in archs:
        folder = study.out / arch
        ev, cost, served = (_read(folder / f) for f in ("eval.json", "cost.json", "served.json"))
        if ev is None:
            continue
        row = {"arch": arch, **ev}
        if cost:
            row |= {k: v for k, v in cost.items() if k not in ("settings", "machine")}
        if served:
            row |= {k: served[k] for k in ("inspect_cells_per_s", "at_concurrency", "p50_ms", "p99_ms", "client")}
        rows.append(row)
    machine = measure.machine()
    result = {
        "settings": study.settings,
        "measurement": {
            "line_data": str(study.args.line_data) if study.args.line_data else None,
            "ct_size": study.args.ct_size,
            "rgb_size": list(study.args.rgb_size),
            "cells": study.args.cells,
            "concurrency": study.args.concurrency,
            "batch": study.args.batch,
            "runtime": study.args.runtime,
        },
        "machine": machine,
        "rows": rows,
        "frontier": {
            "served": sorted(frontier(rows, "inspect_cells_per_s")),
            "network": sorted(frontier(rows, "ort_fp32_images_per_s")),
        },
        "timings_this_invocation_s": study.timings,
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(study.out / "study.json", result)
    input_size = study.cfg["ct"]["input_size"]
    title = (
        f"{len(rows)} CT architectures, preset {Path(study.settings['preset']).stem} ({input_size} px inputs), "
        f"test set {study.test_data}; {machine['cpu']}, {machine['cores']} cores, {machine['instruction_set']}"
    )
    plot(rows, study.out / "frontier.png", title)
    total_train = sum(r["train_minutes"] for r in rows)
    a = study.args
    sent = (
        f"{a.cells} cells of {a.line_data}"
        if a.line_data
        else f"{a.cells} line-size cells (CT {a.ct_size} x {a.ct_size}, photos {a.rgb_size[0]} x {a.rgb_size[1]})"
    )
    md = [
        f"# Architecture study: {Path(study.settings['preset']).stem} preset",
        "",
        f"{title}.",
        "",
        f"Trained on {study.data} (one split, `split/`), evaluated on every slice of {study.test_data}. "
        f"ONNX Runtime: batch {study.args.batch}, CPU provider, on the test slices preprocessed. Triton: "
        f"`inspect` with the `{study.args.runtime}` repository, {sent}, "
        f"best of concurrency {', '.join(map(str, study.args.concurrency))}.",
        "",
        *table(rows),
        "",
        "frontier: no other architecture has both a higher macro-F1 and a higher rate (served: Triton cells/s; "
        "network: ONNX Runtime FP32 images/s).",
        "",
        f"Training took {total_train:.1f} min in all; this invocation took "
        f"{result['wall_seconds_this_invocation'] / 60:.0f} min (steps already done were kept).",
        "",
        "![frontier](frontier.png)",
        "",
    ]
    (study.out / "study.md").write_text("\n".join(md))
    return result


def arch_argument(text: str) -> tuple[str, str, object]:
    """ "drn_aspp:rates=[12,24,36]" -> ("drn_aspp", "rates", [12, 24, 36])."""
    arch, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not (sep and eq and arch and key):
        raise argparse.ArgumentTypeError(f"expected ARCH:KEY=VALUE, got {text!r}")
    try:
        return arch, key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML ({e})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(DEFAULT_ARCHS),
        metavar="ARCH",
        help=f"CT architectures of the registry (default: all {len(DEFAULT_ARCHS)})",
    )
    p.add_argument(
        "--arch-args",
        type=arch_argument,
        action="append",
        default=[],
        metavar="ARCH:KEY=VALUE",
        help="an architecture argument for one architecture, over the preset's model arguments (YAML value; "
        "repeatable), e.g. drn_aspp:rates=[12,24,36] for 512 px inputs",
    )
    p.add_argument("--preset", default="quick", help="training preset (quick, standard, full) or a YAML path")
    p.add_argument("--epochs", type=int, help="override the preset's CT epoch count")
    p.add_argument("--data", type=Path, help="training data (default data/PRESET, generated if missing)")
    p.add_argument("--test-data", type=Path, help="fresh test data (default data/PRESET_test, generated if missing)")
    p.add_argument(
        "--rgb", type=Path, help="RGB run served beside each CT network (default: trained once into OUT/rgb)"
    )
    p.add_argument("--out", type=Path, help="study folder (default benchmarks/results/study-PRESET)")
    p.add_argument("--batch", type=int, default=8, help="ONNX Runtime batch (default 8)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per ONNX Runtime measurement (default 4)")
    p.add_argument("--ct-size", type=int, default=4000, help="side of the line-size CT slices sent (default 4000)")
    p.add_argument(
        "--rgb-size", type=photo_size, default=(1920, 1080), help="line-size photos WIDTHxHEIGHT (default 1920x1080)"
    )
    p.add_argument(
        "--line-data",
        type=Path,
        help="AI-Hub-layout folder of the cells sent to Triton (default: a generated set of --ct-size slices and "
        "--rgb-size photos in build/bench_data/, as make bench uses)",
    )
    p.add_argument("--cells", type=int, default=32, help="distinct line-size cells sent to Triton (default 32)")
    p.add_argument("--concurrency", type=positive_ints, default=[8], help="requests in flight, best taken (default 8)")
    p.add_argument(
        "--perf-interval", type=int, default=4000, help="perf_analyzer measurement window, ms (default 4000)"
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="python-ort",
        help="repository runtime for the Triton measurement (default python-ort; tensorrt on a GPU)",
    )
    p.add_argument(
        "--ort-provider",
        choices=sorted(ORT_PROVIDERS),
        default="cpu",
        help="ONNX Runtime execution provider of the in-process measurement (default cpu; cuda or tensorrt on a GPU "
        "with onnxruntime-gpu)",
    )
    p.add_argument("--skip-serving", action="store_true", help="leave out the Triton measurement")
    p.add_argument("--remeasure", action="store_true", help="measure again even where figures are held")
    p.add_argument("--quiet", action="store_true", help="no per-batch progress bars")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    known = ct_architectures()
    given = {}
    for arch, key, value in args.arch_args:
        given.setdefault(arch, {})[key] = value
    args.arch_args = given
    unknown = [a for a in [*args.archs, *given] if a not in known]
    if unknown:
        print(
            f"error: not a CT architecture of the registry: {', '.join(unknown)}; known: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    args.out = args.out or Path("benchmarks/results") / f"study-{Path(args.preset).stem}"
    started = time.perf_counter()
    try:
        study = Study(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.ort_provider != "cpu":
        missing = [p for p in ORT_PROVIDERS[args.ort_provider][:-1] if p not in ort.get_available_providers()]
        if missing:
            print(
                f"error: ONNX Runtime here lacks {', '.join(missing)} (onnxruntime-gpu, on a machine with a GPU)",
                file=sys.stderr,
            )
            return 2
    study.check_settings()
    study.prepare_data()
    rgb = study.rgb_run()
    exported = {}
    with tqdm(args.archs, desc="train, evaluate, export", unit="arch", disable=args.quiet) as bar:
        for arch in bar:
            bar.set_postfix(arch=arch)
            run = study.train(arch, bar)
            study.evaluate(arch, run, bar)
            exported[arch] = study.export(arch, run, bar)
    tensors = _test_tensors(study.test_data)
    # loaded (and the line-size set generated) only when a Triton measurement is due
    cells = functools.cache(lambda: line_cells(args.line_data or line_set(args.ct_size, args.rgb_size), args.cells))
    with tqdm(args.archs, desc="measure", unit="arch", disable=args.quiet) as bar:
        for arch in bar:
            bar.set_postfix(arch=arch)
            run = study.out / arch / "run"
            study.cost(arch, run, exported[arch], tensors, bar)
            if not args.skip_serving:
                study.served(arch, run, rgb, cells, bar)
    result = report(study, args.archs, started)
    print("\n".join(table(result["rows"])))
    print(f"\nwrote {study.out / 'study.md'}, study.json and frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
