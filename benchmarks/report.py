"""Benchmark results: JSON, a flat CSV, two plots and a Markdown summary whose headline is ratios."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from core import interface as api

# Triton end to end against the best in-process end-to-end pipeline on the same cores (the
# serving overhead), and against the original system's per-cell path (the product's gain).
# Triton against ONNX Runtime on preprocessed tensors is reported as the networks-only view.
TARGETS = {"triton_vs_inprocess": 0.95, "triton_vs_original": 20.0}


def headline(r: dict) -> dict:
    """The ratios the targets are stated in, from one run's results."""
    ort = max(row["cells_per_s"] for row in r["in_process"]["onnxruntime"])
    # Triton end to end: the better of its two clients on `inspect` (the Python load generator
    # spends a share of these same cores on its own side; perf_analyzer, in C++, less)
    clients = [("load generator", row["cells_per_s"]) for row in r["loadgen"]]
    pa = r.get("perf_analyzer", {}).get(api.INSPECT)
    if isinstance(pa, list):
        clients += [("perf_analyzer", row["cells_per_s"]) for row in pa]
    client, triton = max(clients, key=lambda c: c[1], default=("none", 0.0))
    gflop = r["models"]["gflop_per_cell"]
    h = {
        "triton_cells_per_s": triton,
        "triton_client": client,
        "onnxruntime_cells_per_s": ort,
        "triton_vs_onnxruntime": triton / ort,
        "sgemm_gflops": r["machine"]["sgemm_gflops"],
        "onnxruntime_gflops": ort * gflop,
        "triton_gflops": triton * gflop,
    }
    h["onnxruntime_vs_sgemm"] = h["onnxruntime_gflops"] / h["sgemm_gflops"]
    h["triton_vs_sgemm"] = h["triton_gflops"] / h["sgemm_gflops"]
    if r["in_process"].get("torch"):
        h["torch_cells_per_s"] = max(row["cells_per_s"] for row in r["in_process"]["torch"])
    if r["in_process"].get("original"):
        h["original_cells_per_s"] = r["in_process"]["original"][0]["cells_per_s"]
        h["triton_vs_original"] = triton / h["original_cells_per_s"]
    if r["in_process"].get("end_to_end"):
        h["inprocess_cells_per_s"] = max(row["cells_per_s"] for row in r["in_process"]["end_to_end"])
        h["triton_vs_inprocess"] = triton / h["inprocess_cells_per_s"]
    return h


def _rows(r: dict) -> list[dict]:
    rows = []
    for kind, entries in r["in_process"].items():
        rows += [
            {
                "path": f"in-process {kind}",
                "model": "cell",
                "batch": e["batch"],
                "concurrency": "",
                "cells_per_s": e["cells_per_s"],
            }
            for e in entries
        ]
    rows += [
        {
            "path": "triton loadgen",
            "model": "inspect",
            "batch": 1,
            **{k: e.get(k, "") for k in ("concurrency", "cells_per_s", "p50_ms", "p90_ms", "p99_ms", "errors")},
        }
        for e in r["loadgen"]
    ]
    for model, entries in r["perf_analyzer"].items():
        if isinstance(entries, list):
            rows += [
                {
                    "path": "triton perf_analyzer",
                    "model": model,
                    "batch": 1,
                    **{
                        k: e[k]
                        for k in (
                            "concurrency",
                            "cells_per_s",
                            "p50_ms",
                            "p90_ms",
                            "p99_ms",
                            "server_queue_ms",
                            "server_compute_ms",
                        )
                    },
                }
                for e in entries
            ]
    return rows


def _plots(r: dict, h: dict, folder: Path) -> None:

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lg = r["loadgen"]
    ax.plot(
        [e["concurrency"] for e in lg],
        [e["cells_per_s"] for e in lg],
        "o-",
        label="Triton inspect (asyncio load generator)",
    )
    for model, entries in r["perf_analyzer"].items():
        if isinstance(entries, list):
            ax.plot(
                [e["concurrency"] for e in entries],
                [e["cells_per_s"] for e in entries],
                "s--",
                label=f"perf_analyzer {model}",
            )
    ax.axhline(h["onnxruntime_cells_per_s"], color="k", lw=1, label="in-process ONNX Runtime (best batch)")
    if "original_cells_per_s" in h:
        ax.axhline(h["original_cells_per_s"], color="r", lw=1, label="original-style path")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("cells (requests) / s")
    ax.set_title("Throughput against concurrency")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q in (50, 90, 99):
        ax.plot([e["cells_per_s"] for e in lg], [e.get(f"p{q}_ms", float("nan")) for e in lg], "o-", label=f"p{q}")
    for e in lg:
        ax.annotate(
            str(e["concurrency"]),
            (e["cells_per_s"], e.get("p50_ms", 0)),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, -9),
        )
    ax.set_xlabel("cells / s (Triton inspect, load generator)")
    ax.set_ylabel("latency per cell, ms")
    ax.set_title("Latency percentiles against throughput (labels: requests in flight)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)


def diagnosis(r: dict, h: dict) -> str:
    """Where the end-to-end time goes when Triton is short of the in-process networks."""
    if h.get("triton_vs_inprocess", 0.0) >= TARGETS["triton_vs_inprocess"] or not r["in_process"].get("preprocess"):
        return ""
    pre = r["in_process"]["preprocess"][0]
    instances = r.get("tuning", {}).get("preprocess_instances", 1)
    cores = r["machine"]["cores"]
    ceiling = (
        1 / (1 / pre["cells_per_s"] + cores / h["onnxruntime_cells_per_s"]) * cores
    )  # both on all cores, CPU-seconds per cell
    text = (
        "decoding and preprocessing, which the in-process ONNX Runtime figure leaves out, run at "
        f"{pre['cells_per_s']:.1f} cells/s "
        f"per core (CT {pre['ct_images_per_s']:.0f}/s, RGB {pre['rgb_images_per_s']:.0f}/s) against "
        f"{h['onnxruntime_cells_per_s']:.0f} "
        f"cells/s for the networks on all {cores} cores; with {instances} preprocessing instance(s), a cell costs "
        f"{1000 / pre['cells_per_s']:.1f} ms of one core before its networks, so this machine can give at most about "
        f"{ceiling:.0f} cells/s end to end (Triton reached {h['triton_cells_per_s']:.1f}, "
        f"{h['triton_cells_per_s'] / ceiling:.0%} of that)."
    )
    if "triton_vs_original" in h and h["triton_vs_original"] < TARGETS["triton_vs_original"]:
        text += (
            " The original-style path pays the same decoding and preprocessing per cell; the served path saves on the "
            "networks (batching, the in-graph Grad-CAM, lower precision) but not on that share."
        )
    return text


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else f"missed by {(1 - value / target) * 100:.0f}%"


def summary(r: dict, h: dict) -> str:
    m, mod = r["machine"], r["models"]
    lines = [
        f"# Serving benchmark, {r['started']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('instruction_set', 'instruction set not recorded')}; "
        f"runs {', '.join(r['runs'])}"
        + (f" (the {r['untrained']} preset's networks with random weights: speed only)" if r.get("untrained") else "")
        + f"; {r['cells']} cells of {r['data']}; CT {mod['ct_input']} px, RGB {mod['rgb_input']} px, "
        f"{mod['gflop_per_cell']:.2f} GFLOP per cell.",
        "",
        "Serving tuning: " + ", ".join(f"{k} {v}" for k, v in r.get("tuning", {}).items()) + ".",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    if "triton_vs_original" in h:
        lines.append(
            f"| Triton `inspect`{' with heatmaps' if r['settings'].get('heatmaps') else ''} ({h['triton_client']}) / "
            "the original system's "
            f"per-cell path | **{h['triton_vs_original']:.1f}** ({h['triton_cells_per_s']:.2f} / "
            f"{h['original_cells_per_s']:.3f} cells/s) | >= {TARGETS['triton_vs_original']:g} "
            f"({_verdict(h['triton_vs_original'], TARGETS['triton_vs_original'])}) |"
        )
    if "triton_vs_inprocess" in h:
        e2e = max(r["in_process"]["end_to_end"], key=lambda row: row["cells_per_s"])
        lines.append(
            f"| Triton end to end / best in-process end-to-end pipeline ({e2e['processes']} processes, batch "
            f"{e2e['batch']}) | **{h['triton_vs_inprocess']:.2f}** ({h['triton_cells_per_s']:.2f} / "
            f"{h['inprocess_cells_per_s']:.2f} cells/s) | >= {TARGETS['triton_vs_inprocess']} "
            f"({_verdict(h['triton_vs_inprocess'], TARGETS['triton_vs_inprocess'])}) |"
        )
    lines.append(
        f"| Triton end to end / in-process ONNX Runtime on preprocessed tensors (networks only) | "
        f"**{h['triton_vs_onnxruntime']:.2f}** ({h['triton_cells_per_s']:.2f} / {h['onnxruntime_cells_per_s']:.2f} "
        "cells/s) | |"
    )
    lines += [
        f"| in-process ONNX Runtime GFLOP/s / SGEMM GFLOP/s | **{h['onnxruntime_vs_sgemm']:.2f}** "
        f"({h['onnxruntime_gflops']:.1f} / {h['sgemm_gflops']:.1f}) | |",
        f"| Triton GFLOP/s / SGEMM GFLOP/s | **{h['triton_vs_sgemm']:.2f}** ({h['triton_gflops']:.1f} / "
        f"{h['sgemm_gflops']:.1f}) | |",
        "",
        "| path | batch / in flight | cells/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for row in _rows(r):
        b = row["concurrency"] if row["concurrency"] != "" else row["batch"]
        p50, p99 = row.get("p50_ms", ""), row.get("p99_ms", "")
        lines.append(
            f"| {row['path']} {row['model'] if row['model'] != 'cell' else ''} | {b} | {row['cells_per_s']:.1f} | "
            f"{p50 if p50 == '' else f'{p50:.1f}'} | {p99 if p99 == '' else f'{p99:.1f}'} |"
        )
    steps = [s for s in r.get("server_steps", []) if s["executions"]]
    if steps:
        lines += [
            "",
            "Server time per cell by model over the load generator's run (Triton's statistics; compute amortised over "
            "each dynamic batch; input and output are the tensors' copies into and out of the backend):",
            "",
            "| model | requests | mean batch | queue ms | input ms | compute ms | output ms | copies share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['model']} | {s['requests']} | {s['mean_batch']:.2f} | {s['queue_ms']:.2f} | "
            f"{s['compute_input_ms']:.3f} | "
            f"{s['compute_infer_ms']:.2f} | {s['compute_output_ms']:.3f} | {s['copy_share']:.1%} |"
            for s in steps
        ]
    why = diagnosis(r, h)
    if why:
        lines += ["", "Why: " + why]
    if isinstance(r["perf_analyzer"], dict) and "skipped" in r["perf_analyzer"]:
        lines += ["", f"perf_analyzer was not run: {r['perf_analyzer']['skipped']}"]
    for point in r.get("perf_analyzer_unmeasured", []):
        line = f"perf_analyzer could not measure {point['model']} at concurrency {point['concurrency']}: "
        line += point["reason"]
        seen = point.get("loadgen")
        if seen:
            line += f"; the load generator measured {seen['cells_per_s']:.2f} cells/s"
            line += f", p99 {seen.get('p99_ms', float('nan')):.0f} ms"
        lines += ["", line]
    return "\n".join(lines) + "\n"


def write_results(r: dict, out: Path) -> Path:
    folder = out / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    h = headline(r)
    r = {**r, "headline": h}
    (folder / "results.json").write_text(json.dumps(r, indent=1, default=str))
    rows = _rows(r)
    fields = [
        "path",
        "model",
        "batch",
        "concurrency",
        "cells_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "errors",
        "server_queue_ms",
        "server_compute_ms",
    ]
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _plots(r, h, folder)
    (folder / "summary.md").write_text(summary(r, h))
    latest = out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(folder.name)
    log = out / "tritonserver.log"
    if log.exists():
        log.rename(folder / "tritonserver.log")
    return folder
