"""python -m benchmarks training [--presets quick standard] [--batteries 40] [--epochs 3]

Where a training's time goes, for each network of each preset, on this CPU:

- **matrix**: SGEMM GFLOP/s with the training's threads: the ceiling every other figure is
  compared to.
- **bare network**: optimiser steps (forward, backward, AdamW) on random tensors at the
  preset's batch, input size and memory format, nothing else: samples/s, GFLOP per sample
  (PyTorch's FlopCounterMode over forward and backward, 2 per multiply-add), GFLOP/s and its
  ratio to SGEMM. For CT the training-only defect-map head is included, as it trains.
- **the real loop**: the preset's own trainer (`training.train`) for --epochs on a small set
  generated with the preset's data configuration: samples/s, and how its time splits between
  the network's own arithmetic (the samples it trained divided by the bare network's rate),
  everything else in the training loop (batch assembly, flips and warps, acquisition drift,
  painted blemishes, the losses, the optimiser's bookkeeping), the validation pass after each
  epoch, and the fitting after training (temperature, gate, placement ranges, thresholds).
  Reading and preprocessing the images happens once before training and is reported apart.

Results go to benchmarks/results/training-<time>/results.json and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import measure
from benchmarks.serving import results_folder
from training.config import load_config
from training.losses import FocalLoss, ReconstructionLoss, binary_focal_loss
from training.models import create_model
from training.preset import synth_config
from training.synth.writer import generate
from training.train import FORMATS, DefectMapHead, train_ct, train_rgb

NETWORKS = ("ct", "rgb")


def _ct_step(c: dict, fmt):
    """(one optimiser step on random tensors, the batch) for the preset's CT network."""
    model = create_model(c["model"]["name"], **{k: v for k, v in c["model"].items() if k != "name"})
    head = DefectMapHead(model, float(c["defect_map_weight"]))
    model.to(memory_format=fmt), head.to(memory_format=fmt)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = FocalLoss(2.0, 0.05)
    b, s = int(c["batch_size"]), int(c["input_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, s, s, generator=g).contiguous(memory_format=fmt)
    meta = torch.zeros(b, 2)
    y = torch.randint(0, 5, (b,), generator=g)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.99).float().contiguous(memory_format=fmt)
    model.train()

    def step():
        loss = loss_fn(model(x, meta), y)
        if float(c["defect_map_weight"]) > 0:
            loss = loss + head.loss(mask)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, b


def _rgb_step(c: dict, fmt):
    model = create_model(c["model"]["name"], **{k: v for k, v in c["model"].items() if k != "name"})
    model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ReconstructionLoss(c["loss"]["ssim_weight"])
    b, s = int(c["batch_size"]), int(c["input_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, s, s, generator=g).contiguous(memory_format=fmt)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.95).float()
    segmenting = getattr(model, "segmenter", None) is not None
    model.train()

    def step():
        recon = model(x)
        loss = loss_fn(recon, x)
        if segmenting:
            loss = loss + binary_focal_loss(model.segment_logits(x, recon.detach()), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, b


def bare_network(c: dict, network: str, seconds: float, memory_format: str | None = None) -> dict:
    """The network's own training rate: samples/s, GFLOP per sample (forward + backward), GFLOP/s."""
    fmt = FORMATS[memory_format or c.get("memory_format") or "contiguous"]
    step, batch = (_ct_step if network == "ct" else _rgb_step)(c, fmt)
    step()  # warm-up: oneDNN picks its kernels
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    # the best of three windows: a window another process disturbed only ever runs slower
    windows = [measure.timed(step, seconds / 3) for _ in range(3)]
    per_step, calls = min(w[0] for w in windows), sum(w[1] for w in windows)
    rate = batch / per_step
    return {
        "memory_format": memory_format or c.get("memory_format"),
        "batch": batch,
        "input_size": int(c["input_size"]),
        "samples_per_s": rate,
        "gflop_per_sample": flops / 1e9,
        "gflops": rate * flops / 1e9,
        "steps_timed": calls,
    }


def real_loop(cfg: dict, network: str, data: Path, epochs: int, bare_rate: float) -> dict:
    """The preset's trainer for `epochs` epochs: where its time went."""
    c = cfg[network]
    if (c.get("progressive") or {}).get("size"):  # the same share of epochs at the smaller size
        c["progressive"]["epochs"] = min(epochs - 1, round(epochs * c["progressive"]["epochs"] / c["epochs"]))
    c["epochs"] = epochs
    c["early_stopping"]["patience"] = epochs + 1
    with tempfile.TemporaryDirectory() as run:
        info = (train_ct if network == "ct" else train_rgb)(data, cfg, Path(run), progress=False)
        history = json.loads((Path(run) / "history.json").read_text())
    samples = sum(r["samples"] for r in history)
    loop = sum(r["loop_seconds"] for r in history)
    evaluation = sum(r["eval_seconds"] for r in history)
    total = loop + evaluation + info["fit_seconds"]
    # the bare rate is at the full input size; epochs at a smaller progressive size cost less
    size = int(c["input_size"])
    arithmetic = sum(r["samples"] * (r.get("input_size", size) / size) ** 2 for r in history) / bare_rate
    return {
        "epochs": len(history),
        "samples": samples,
        "samples_per_s": samples / loop,
        "seconds": {
            "network_arithmetic": arithmetic,
            "rest_of_loop": loop - arithmetic,
            "validation": evaluation,
            "fitting_after_training": info["fit_seconds"],
            "total": total,
            "reading_and_preprocessing_once": info["load_seconds"],
        },
        "network_share": arithmetic / total,
    }


def measure_preset(args, preset: str, cfg: dict, data: Path | None, sgemm: float, out: dict) -> None:
    """Each network of one preset: bare in its layout and the plain one, then (with data) the real loop."""
    for network in NETWORKS:
        c = cfg[network]
        row = out[network] = {"bare": {}}
        for fmt in dict.fromkeys([c["memory_format"], "contiguous"]):
            bare = bare_network(c, network, args.seconds, fmt)
            bare["vs_sgemm"] = bare["gflops"] / sgemm
            row["bare"][fmt] = bare
            print(
                f"  {preset} {network} bare ({fmt}, batch {bare['batch']}, {bare['input_size']} px): "
                f"{bare['samples_per_s']:.1f} samples/s, {bare['gflop_per_sample']:.2f} GFLOP each, "
                f"{bare['gflops']:.1f} GFLOP/s = {bare['vs_sgemm']:.2f} of SGEMM"
            )
        if data is not None:
            rate = row["bare"][c["memory_format"]]["samples_per_s"]
            loop = row["loop"] = real_loop(load_config(preset) | {network: c}, network, data, args.epochs, rate)
            s = loop["seconds"]
            print(
                f"  {preset} {network} real loop: {loop['samples_per_s']:.1f} samples/s; of {s['total']:.0f} s, "
                f"network {s['network_arithmetic']:.0f} s ({loop['network_share']:.0%}), rest of the loop "
                f"{s['rest_of_loop']:.0f} s, validation {s['validation']:.0f} s, fitting "
                f"{s['fitting_after_training']:.0f} s (reading once: {s['reading_and_preprocessing_once']:.0f} s)"
            )


def run(args) -> Path:
    folder = results_folder(args, "training")
    torch.set_num_threads(args.threads)
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": measure.machine(),
        "sgemm_gflops": measure.sgemm_gflops(seconds=args.seconds),
        "presets": {},
    }
    sgemm = results["sgemm_gflops"]
    print(
        f"{results['machine']['cpu']} ({results['machine']['instruction_set']}), {args.threads} threads: "
        f"SGEMM {sgemm:.1f} GFLOP/s"
    )
    for preset in args.presets:
        cfg = load_config(preset)
        for network in NETWORKS:
            cfg[network]["threads"] = args.threads
        out = results["presets"][preset] = {}
        with tempfile.TemporaryDirectory(prefix=f"train-bench-{preset}-") as tmp:
            data = None
            if not args.skip_loop:
                data = Path(tmp)
                print(f"{preset}: generating {args.batteries} batteries with the preset's data configuration")
                generate(data, synth_config(cfg["data"], cfg["data"]["seed"], args.batteries))
            measure_preset(args, preset, cfg, data, sgemm, out)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "summary.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print(f"wrote {folder}")
    return folder


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores, {m['instruction_set']}; SGEMM {r['sgemm_gflops']:.1f} GFLOP/s",
        "",
        "| preset | network | layout | batch x px | bare samples/s | GFLOP/sample | GFLOP/s | of SGEMM "
        "| loop samples/s | network share of the time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, nets in r["presets"].items():
        for net, row in nets.items():
            for fmt, b in row["bare"].items():
                loop = row.get("loop") if fmt == next(iter(row["bare"])) else None
                lines.append(
                    f"| {preset} | {net} | {fmt} | {b['batch']} x {b['input_size']} | {b['samples_per_s']:.1f} | "
                    f"{b['gflop_per_sample']:.2f} | {b['gflops']:.1f} | {b['vs_sgemm']:.2f} | "
                    + (f"{loop['samples_per_s']:.1f} | {loop['network_share']:.0%} |" if loop else "| |")
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", nargs="+", default=["quick", "standard"], help="presets or YAML paths")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="training threads (default: all)")
    p.add_argument("--seconds", type=float, default=10.0, help="timing per bare network and for SGEMM")
    p.add_argument("--batteries", type=int, default=40, help="batteries in the small set the real loop trains on")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the real loop")
    p.add_argument("--skip-loop", action="store_true", help="bare networks only (no data, no real training)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = p.parse_args(argv)
    run(args)
    return 0
