"""Soak and burst: does the service hold a line's load for hours, and survive a rush?

    python -m benchmarks soak [--minutes 10] [--fraction 0.8] [--burst 3]

1. saturation: cells/s at 16 requests in flight (or --saturation N to skip);
2. soak: an open-loop stream at `fraction` x saturation (cells arrive on a fixed schedule,
   as on a line, whether or not earlier ones are answered) for `--minutes`, with the server's
   memory (PSS of tritonserver and its Python-backend processes) sampled every few seconds;
   targets: 0 failed cells, memory growth under 5% from the end of the first minute to the end;
3. burst: `burst` x saturation for `--burst-seconds`; every cell must get an answer or a clear
   error (a full queue is refused at once: "Exceeds maximum queue size"), and the server must
   be alive and answer normally afterwards.

Clients do not retry here, so every refusal is counted. Results: benchmarks/results/soak-<time>/
(soak.json, summary.md). Not part of `make test`; `tests/integration/test_benchmarks.py` runs it for seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks import loadgen
from benchmarks.serving import add_cell_arguments, prepare, results_folder_and_server
from client.inspection import CellError
from client.service import AsyncInspectionClient, Backoff
from export.options import add_tuning_arguments
from serving.server import malloc_library

TARGET_FAILURES = 0
TARGET_MEMORY_GROWTH = 0.05


def _pss(pid: int) -> int:
    """Proportional set size: the process's private pages plus its share of pages it shares."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def memory_by_process(pid: int) -> dict[str, int]:
    """Memory per process of the server (PSS): tritonserver itself and each backend stub, named
    by its model instance (e.g. ct_classifier_0_0), so a growth can be placed.

    PSS, not RSS: the Python backend hands tensors over in shared memory mapped by both
    tritonserver and the stub, and every stub maps the same libraries; summed RSS counts those
    pages once per process, summed PSS once in all."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            pss = _pss(p)
            args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
            children = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        except (OSError, StopIteration):
            continue  # exited meanwhile
        stub = b"triton_python_backend_stub" in args[0]
        name = args[-3].decode() if stub and len(args) >= 3 else Path(args[0].decode()).name
        out[name] = out.get(name, 0) + pss
        todo += [int(c) for c in children]
    return out


async def open_loop(url: str, cells, rate: float, seconds: float, on_tick=None, timeout: float = 30.0) -> dict:
    """Send cells at `rate` per second for `seconds` (not waiting for answers); per-cell outcome and latency."""

    latencies, errors = [], Counter()
    examples: dict[str, str] = {}
    async with AsyncInspectionClient(url, heatmaps=False, timeout=timeout, backoff=Backoff(retries=0)) as client:

        async def one(cell):
            t0 = time.perf_counter()
            r = (await client.inspect_many([cell], concurrency=1))[0]
            if isinstance(r, CellError):
                errors[r.kind] += 1
                examples.setdefault(r.kind, r.message[:200])
            else:
                latencies.append(time.perf_counter() - t0)

        tasks, start, i = [], time.perf_counter(), 0
        next_tick = start
        while True:
            due = start + i / rate
            now = time.perf_counter()
            if due - start >= seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(cells[i % len(cells)])))
            i += 1
            if on_tick and time.perf_counter() >= next_tick:
                on_tick(time.perf_counter() - start)
                next_tick += 2.0
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    out = {
        "rate": rate,
        "seconds": round(elapsed, 2),
        "sent": i,
        "answered": len(latencies),
        "errors": dict(errors),
        "error_examples": examples,
        "answered_per_s": len(latencies) / elapsed,
    }
    if len(lat):
        out |= {f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 99)} | {"max_ms": float(lat.max())}
    return out


def parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="python -m benchmarks soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(p)
    p.add_argument(
        "--repository", type=Path, default=Path("build/bench_repository"), help="repository to build and serve"
    )
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--fraction", type=float, default=0.8, help="soak rate as a fraction of saturation (default 0.8)")
    p.add_argument("--saturation", type=float, help="cells/s at saturation, if known (default: measured first)")
    p.add_argument("--saturation-seconds", type=float, default=15.0, help="seconds to measure saturation (default 15)")
    p.add_argument("--burst", type=float, default=3.0, help="burst rate as a multiple of saturation (default 3)")
    p.add_argument("--burst-seconds", type=float, default=20.0, help="burst length (default 20)")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="results folder (default benchmarks/results)"
    )
    add_tuning_arguments(p)
    return p


def run(args) -> Path:

    runs, data, cells, tuning = prepare(args)
    folder, server = results_folder_and_server(args, "soak")
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [str(r) for r in runs],
        "data": str(data),
        "cells": len(cells),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "tuning": {k: v for k, v in vars(tuning).items() if k != "limits"},
        "allocator": str(malloc_library() or "glibc malloc"),
    }
    try:
        if args.saturation:
            saturation = args.saturation
        else:
            row = loadgen.sweep(server.grpc_url, cells, [16], args.saturation_seconds, progress=lambda *_: None)[0]
            saturation = row["cells_per_s"]
        result["saturation_cells_per_s"] = saturation
        print(f"saturation: {saturation:.1f} cells/s")
        pid = server.process.pid
        memory: list[tuple[float, int]] = []
        seconds = args.minutes * 60
        rate = args.fraction * saturation
        print(f"soak: {rate:.1f} cells/s for {seconds:.0f} s")

        by_process = {}

        def tick(t):  # one walk over the processes gives both the total and, once, the baseline per process
            places = memory_by_process(pid)
            memory.append((round(t, 1), sum(places.values())))
            if "baseline" not in by_process and t >= min(60.0, seconds / 4):
                by_process["baseline"] = places
            if len(memory) % 15 == 0:
                print(f"  {t:6.0f} s  server memory {memory[-1][1] / 2**20:.0f} MiB", flush=True)

        result["soak"] = asyncio.run(open_loop(server.grpc_url, cells, rate, seconds, on_tick=tick))
        by_process["end"] = memory_by_process(pid)
        memory.append((seconds, sum(by_process["end"].values())))
        base = next((m for t, m in memory if t >= min(60.0, seconds / 4)), memory[0][1])
        result["memory"] = {
            "samples": memory,
            "baseline_bytes": base,
            "end_bytes": memory[-1][1],
            "growth": memory[-1][1] / base - 1 if base else 0.0,
            "by_process": {
                name: {"baseline": by_process.get("baseline", {}).get(name, 0), "end": end}
                for name, end in by_process["end"].items()
            },
        }
        burst_rate = args.burst * saturation
        print(f"burst: {burst_rate:.1f} cells/s for {args.burst_seconds:.0f} s")
        result["burst"] = asyncio.run(open_loop(server.grpc_url, cells, burst_rate, args.burst_seconds))
        result["after_burst"] = {"server_alive": server.process.poll() is None, "ready": server.ready()}
        result["after_burst"] |= asyncio.run(open_loop(server.grpc_url, cells, max(1.0, rate / 4), 5.0))
    finally:
        server.stop()
    (folder / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    (folder / "summary.md").write_text(summary(result))
    return folder


def summary(r: dict) -> str:
    soak, burst, after, mem = r["soak"], r["burst"], r["after_burst"], r["memory"]
    failures = sum(soak["errors"].values())
    lines = [
        f"# Soak and burst, {r['started']}",
        "",
        f"Runs {', '.join(r['runs'])}; {r['cells']} cells of {r['data']}; allocator {r.get('allocator', '?')}; "
        f"warm-up at load: {'on' if r['tuning'].get('warmup', False) else 'off'}.",
        "",
        "| check | value | target |",
        "|---|---|---|",
        f"| failed cells in the soak ({soak['sent']} sent at {soak['rate']:.1f}/s for {soak['seconds']:.0f} s, "
        f"{r['settings']['fraction']:.0%} of saturation {r['saturation_cells_per_s']:.1f}/s) | **{failures}** | "
        f"{TARGET_FAILURES} ({'met' if failures <= TARGET_FAILURES else 'missed'}) |",
        f"| server memory growth (end of the first minute -> end) | **{mem['growth']:+.1%}** "
        f"({mem['baseline_bytes'] / 2**20:.0f} -> {mem['end_bytes'] / 2**20:.0f} MiB) | < {TARGET_MEMORY_GROWTH:.0%} "
        f"({'met' if mem['growth'] < TARGET_MEMORY_GROWTH else 'missed'}) |",
        f"| soak latency p50 / p99 / max | {soak.get('p50_ms', float('nan')):.0f} / "
        f"{soak.get('p99_ms', float('nan')):.0f} / "
        f"{soak.get('max_ms', float('nan')):.0f} ms | |",
        f"| burst ({burst['sent']} sent at {burst['rate']:.1f}/s for {burst['seconds']:.0f} s): answered / refused | "
        f"{burst['answered']} / {sum(burst['errors'].values())} {dict(burst['errors'])} | every cell answered or "
        "refused |",
        f"| after the burst: server alive, ready, cells answered | {after['server_alive']}, {after['ready']}, "
        f"{after['answered']} of {after['sent']} | all |",
    ]
    growth = sorted(mem.get("by_process", {}).items(), key=lambda kv: kv[1]["baseline"] - kv[1]["end"])
    if growth:
        lines += ["", "Server memory by process (end of the first minute -> end):", ""]
        lines += [f"- {name}: {v['baseline'] / 2**20:.0f} -> {v['end'] / 2**20:.0f} MiB" for name, v in growth]
    if burst["error_examples"]:
        lines += ["", "Burst refusals, one message per kind:", ""] + [
            f"- `{k}`: {v}" for k, v in burst["error_examples"].items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    folder = run(args)
    print((folder / "summary.md").read_text())
    print(f"results in {folder}")
    r = json.loads((folder / "soak.json").read_text())
    ok = (
        sum(r["soak"]["errors"].values()) <= TARGET_FAILURES
        and r["after_burst"]["server_alive"]
        and r["after_burst"]["ready"]
        and r["burst"]["answered"] + sum(r["burst"]["errors"].values()) == r["burst"]["sent"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
