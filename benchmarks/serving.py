"""Serving throughput at line size, side by side in one run on one machine:

  Triton end to end (the project's asyncio gRPC load generator, and NVIDIA perf_analyzer on
  inspect / inspect_ct / inspect_rgb) against the best in-process end-to-end pipeline on the
  same cores (one process per core: the same decoding, preprocessing and ONNX Runtime),
  against the networks alone in-process (ONNX Runtime and PyTorch eager on preprocessed
  tensors) and against the original system's per-cell path (full-size decode and resize,
  PyTorch at batch 1, Grad-CAM by a backward pass, the autoencoder twice), with the machine's
  SGEMM GFLOP/s and each model's FLOPs per image.

  python -m benchmarks serving [--runs RUN... | --untrained full] [--data DIR] [--concurrency 1,2,4,8,16]

Cells: by default a line-size set (CT 4000 x 4000, mostly JPEG with some 16-bit TIFF and
DICOM slices; photos 1920 x 1080 PNG), generated once into build/bench_data/ (about a
minute); --ct-size / --rgb-size for another size, --data for a folder of your own.

Results: benchmarks/results/<time>/ (results.json, results.csv, throughput.png,
latency.png, summary.md) and benchmarks/results/latest -> it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import loadgen, measure, perf, stats
from benchmarks.options import positive_ints
from benchmarks.report import write_results
from benchmarks.untrained import untrained_runs
from client.dataset import pair_cells
from core import interface as api
from export.local import TorchPipeline
from export.onnx_export import example_inputs
from export.options import add_tuning_arguments, resolve_runs, tuning_from
from export.repository import build_repository, is_current
from serving.runtime import ct_tensor, rgb_tensor
from serving.server import Ports, TritonServer, free_ports
from training.synth.plan import SynthConfig, photo_size
from training.synth.writer import CONFIG_FILE, generate


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """The runs and the cells a serving benchmark sends (serving, soak, gateway)."""

    p.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        help="trained runs (default runs/standard, else runs/quick, else the quick preset is trained)",
    )
    p.add_argument(
        "--untrained",
        metavar="PRESET",
        help="instead of trained runs: a preset's networks (quick, standard, full) with "
        "random weights, for speed alone (written to build/untrained/PRESET)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="AI-Hub-layout folder to take cells from (default: a generated set of --ct-size "
        "slices and --rgb-size photos)",
    )
    p.add_argument(
        "--ct-size", type=int, default=4000, help="side of the generated CT slices (default 4000, what the line sends)"
    )
    p.add_argument(
        "--rgb-size", type=photo_size, default=(1920, 1080), help="generated photos WIDTHxHEIGHT (default 1920x1080)"
    )
    p.add_argument("--cells", type=int, default=32, help="distinct cells sent, cycled (default 32)")


def add_served_arguments(p: argparse.ArgumentParser) -> None:
    """What a benchmark that serves the cells through its own tritonserver takes: the runs and
    cells, the repository it builds and serves, the results folder and the serving tuning."""

    add_cell_arguments(p)
    p.add_argument(
        "--repository", type=Path, default=Path("build/bench_repository"), help="repository to build and serve"
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="results folder (default benchmarks/results)"
    )
    add_tuning_arguments(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(p)
    p.add_argument(
        "--concurrency",
        type=positive_ints,
        default=[1, 2, 4, 8, 16],
        help="requests in flight to sweep (default 1,2,4,8,16)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="load-generator seconds per concurrency (default 10)")
    p.add_argument(
        "--perf-interval", type=int, default=4000, help="perf_analyzer measurement window, ms (default 4000)"
    )
    p.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="seconds per in-process measurement (default 10)"
    )
    p.add_argument("--batches", type=positive_ints, default=[1, 8], help="in-process batch sizes (default 1,8)")
    p.add_argument(
        "--no-heatmaps",
        dest="heatmaps",
        action="store_false",
        help="the load generator leaves out CT_CAM and RGB_ERROR_MAP "
        "(by default it asks for them, as the original path "
        "computed Grad-CAM for every cell)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("perf_analyzer", "original", "torch", "end_to_end"),
        help="parts to leave out",
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/bench_repository"),
        help="repository to build and serve (default build/bench_repository)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="results folder (default benchmarks/results)"
    )

    p.add_argument(
        "--takt",
        type=float,
        default=0.0,
        help="serve with the gRPC front shedding what it would not answer within this many seconds (as "
        "`make serve` does with 2); the load generator's client retries a refused cell (default 0: no shedding)",
    )
    add_tuning_arguments(p)  # the repository's serving knobs, as for `python -m export serve`
    return p


def line_set(ct_size: int = 4000, rgb_size: tuple[int, int] = (1920, 1080), batteries: int = 11) -> Path:
    """build/bench_data/ct<ct>_rgb<w>x<h>: a synthetic set at these sizes, written once (3 slices and a
    photo per battery; 8 in 10 slices JPEG, 1 in 10 16-bit TIFF, 1 in 10 DICOM)."""

    data = Path("build/bench_data") / f"ct{ct_size}_rgb{rgb_size[0]}x{rgb_size[1]}"
    if not (data / CONFIG_FILE).exists():
        print(f"generating {batteries} batteries of CT {ct_size} px, photos {rgb_size[0]}x{rgb_size[1]} into {data}")
        generate(
            data,
            SynthConfig(
                batteries=batteries,
                seed=11,
                ct_size=ct_size,
                rgb_width=rgb_size[0],
                rgb_height=rgb_size[1],
                slices_per_axis=1,
                photos_per_battery=1,
                rgb_defect_rate=0.5,
                ct_formats={"jpeg": 0.8, "tiff16": 0.1, "dicom": 0.1},
            ),
        )
    return data


def line_cells(data: Path, count: int) -> list:
    """`count` cells of an AI-Hub-layout folder, spread over its batteries and axes, loaded."""
    cells, _ = pair_cells(data, progress=False)
    if not cells:
        raise SystemExit(f"error: no cells in {data}")
    step = max(1, len(cells) // count)
    return [c.load() for c in cells[::step][:count]]


def _cells(args):
    data = args.data or line_set(args.ct_size, args.rgb_size)
    return data, line_cells(data, args.cells)


def prepare(args):
    """(runs, data folder, cells, tuning) of a benchmark's options, with the repository built if stale."""

    if args.untrained:
        runs = untrained_runs(args.untrained, Path("build/untrained") / args.untrained)
    else:
        runs = resolve_runs(args.runs)
    data, cells = _cells(args)
    tuning = tuning_from(args)
    if not is_current(args.repository, runs, "python-ort", args.rule, tuning):
        print(f"building {args.repository} from {', '.join(map(str, runs))} with {tuning}")
        build_repository(runs, "python-ort", args.repository, args.rule, tuning)
    return runs, data, cells, tuning


def results_folder(args, name: str) -> Path:
    """benchmarks/results/<name>-<time>/ (under --out), made."""
    folder = args.out / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def results_folder_and_server(args, name: str, **server):
    """(benchmarks/results/<name>-<time>/, a started tritonserver on free ports serving args.repository,
    logging there); `server`: more TritonServer options (front, takt)."""

    folder = results_folder(args, name)
    server = TritonServer(args.repository, Ports(*free_ports(3)), log_path=folder / "tritonserver.log", **server)
    server.start(timeout=300)
    return folder, server


def run(args) -> Path:

    runs, data, cells, tuning = prepare(args)
    pipeline = TorchPipeline(runs)
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [str(r) for r in runs],
        "untrained": args.untrained,
        "data": str(data),
        "cells": len(cells),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "tuning": {k: v for k, v in vars(tuning).items() if k != "limits"},
    }

    print("machine: SGEMM and model FLOPs")
    results["machine"] = measure.machine() | {
        "sgemm_gflops": measure.sgemm_gflops(seconds=min(2.0, args.baseline_seconds))
    }
    ct_flops = measure.flops_per_image(pipeline.ct_graph, example_inputs(pipeline.ct_info, 1))
    rgb_flops = measure.flops_per_image(pipeline.rgb_graph, example_inputs(pipeline.rgb_info, 1))
    results["models"] = {
        "ct_input": pipeline.ct_facts.input_size,
        "rgb_input": pipeline.rgb_facts.input_size,
        "ct_gflop_per_image": ct_flops / 1e9,
        "rgb_gflop_per_image": rgb_flops / 1e9,
        "gflop_per_cell": (ct_flops + rgb_flops) / 1e9,
    }
    print(
        f"  SGEMM {results['machine']['sgemm_gflops']:.1f} GFLOP/s; CT {ct_flops / 1e9:.2f} + RGB "
        f"{rgb_flops / 1e9:.2f} GFLOP per cell"
    )

    ct_info, rgb_info = pipeline.ct_facts, pipeline.rgb_facts
    ct_x = np.stack([ct_tensor(c.ct, pipeline.ct_facts) for c in cells])
    meta = np.array([c.meta for c in cells], np.float32)
    rgb_x = np.stack([rgb_tensor(c.rgb, pipeline.rgb_facts) for c in cells])
    base = {"onnxruntime": [], "torch": []}
    print("in-process baselines")
    pre = measure.preprocess_cells_per_s(cells, pipeline.ct_facts, pipeline.rgb_facts, args.baseline_seconds)
    base["preprocess"] = [pre]
    print(
        f"  decode + preprocess (one core): {pre['cells_per_s']:7.1f} cells/s (CT {pre['ct_images_per_s']:.1f}/s, "
        f"RGB {pre['rgb_images_per_s']:.1f}/s)"
    )
    for b in args.batches:
        row = measure.ort_cells_per_s(
            args.repository / "ct_classifier/1/model.onnx",
            args.repository / "rgb_autoencoder/1/model.onnx",
            ct_x,
            meta,
            rgb_x,
            b,
            args.baseline_seconds,
        )
        base["onnxruntime"].append(row)
        print(f"  onnxruntime batch {b:>2}: {row['cells_per_s']:7.1f} cells/s")
        if "torch" not in args.skip:
            row = measure.torch_cells_per_s(pipeline, ct_x, meta, rgb_x, b, args.baseline_seconds)
            base["torch"].append(row)
            print(f"  pytorch     batch {b:>2}: {row['cells_per_s']:7.1f} cells/s")
    if "original" not in args.skip:
        row = measure.original_cells_per_s(pipeline, cells, args.baseline_seconds)
        base["original"] = [row]
        steps = ", ".join(f"{k.replace('_', ' ')} {v * 1000:.0f} ms" for k, v in row["seconds_per_step"].items())
        print(
            "  the original system's path (batch 1, 2 torch threads, pytorch-grad-cam per cell): "
            f"{row['cells_per_s']:.3f} cells/s "
            f"({steps})"
        )
    results["in_process"] = base
    del pipeline
    if "end_to_end" not in args.skip:
        row = measure.inprocess_cells_per_s(
            args.repository / "ct_classifier/1/model.onnx",
            args.repository / "rgb_autoencoder/1/model.onnx",
            cells,
            ct_info,
            rgb_info,
            args.baseline_seconds,
            batch=max(args.batches),
        )
        base["end_to_end"] = [row]
        print(
            f"  in-process end to end ({row['processes']} processes, batch {row['batch']}): {row['cells_per_s']:.2f} "
            "cells/s"
        )

    http, grpc, metrics = free_ports(3)
    server = TritonServer(
        args.repository, Ports(http, grpc, metrics), log_path=args.out / "tritonserver.log", takt=args.takt
    )
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"tritonserver on localhost:{grpc}")
    server.start(timeout=300)
    try:
        before = stats.snapshot(server.grpc_url)
        results["loadgen"] = loadgen.sweep(
            server.grpc_url, cells, args.concurrency, args.seconds, heatmaps=args.heatmaps
        )
        results["server_steps"] = stats.per_cell(before, stats.snapshot(server.grpc_url))
        missing = "left out (--skip)" if "perf_analyzer" in args.skip else perf.available()
        if missing:
            print(f"  perf_analyzer not run: {missing}")
            results["perf_analyzer"] = {"skipped": missing}
        else:
            unmeasured: list[
                dict
            ] = []  # concurrencies perf_analyzer could not measure stably, with the loadgen's figures
            results["perf_analyzer"] = {
                m: perf.run(
                    server.grpc_url,
                    f"http://localhost:{metrics}/metrics",
                    m,
                    cells,
                    args.concurrency,
                    args.perf_interval,
                    args.out / "perf_analyzer",
                    unmeasured=unmeasured,
                )
                for m in (api.INSPECT, api.INSPECT_CT, api.INSPECT_RGB)
            }
            loadgen_at = {row["concurrency"]: row for row in results["loadgen"]}
            for point in unmeasured:
                if point["model"] == api.INSPECT and point["concurrency"] in loadgen_at:
                    point["loadgen"] = loadgen_at[point["concurrency"]]
            results["perf_analyzer_unmeasured"] = unmeasured
    finally:
        server.stop()
    return write_results(results, args.out)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    folder = run(args)
    print((folder / "summary.md").read_text())
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
