"""NVIDIA perf_analyzer (from the tritonclient wheel) against the ensembles, with real
encoded images as input data and the server's metrics collected.

perf_analyzer needs libb64 (Debian package libb64-0d) and libcudart (PyPI package
nvidia-cuda-runtime-cu12, no GPU needed); `available()` says what is missing.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from client.inspection import Cell
from core import interface as api


def binary() -> Path | None:
    found = Path(sys.executable).with_name("perf_analyzer")
    return found if found.exists() else (Path(p) if (p := shutil.which("perf_analyzer")) else None)


def _cudart_dir() -> str | None:
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415 - only to locate libcudart for perf_analyzer

        return str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
    except ImportError:
        return None


def environment() -> dict:
    env = dict(os.environ)
    cudart = _cudart_dir()
    if cudart:
        env["LD_LIBRARY_PATH"] = cudart + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def available() -> str | None:
    """None when perf_analyzer runs here, else what is missing."""
    exe = binary()
    if exe is None:
        return "perf_analyzer is not installed (it comes with the tritonclient wheel)"
    try:
        run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=environment(), timeout=30)
    except OSError as e:
        return f"perf_analyzer does not start: {e}"
    if "error while loading shared libraries" in run.stderr:
        lib = run.stderr.split("error while loading shared libraries:")[1].split(":")[0].strip()
        hint = {
            "libb64.so.0d": "apt-get install libb64-0d",
            "libcudart.so.12": "pip install nvidia-cuda-runtime-cu12",
        }.get(lib, "")
        return f"perf_analyzer needs {lib}" + (f" ({hint})" if hint else "")
    return None


def input_data(cells: list[Cell], model: str, path: Path) -> Path:
    """perf_analyzer's --input-data JSON: one entry per cell, images as base64 of the raw BYTES
    tensor content (each element prefixed by its 4-byte little-endian length, as on the wire)."""

    def b64(data: bytes) -> dict:
        return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()}

    entries = []
    for c in cells:
        e = {}
        if model in (api.INSPECT, api.INSPECT_CT):
            e[api.CT_IMAGE] = b64(c.ct)
            e[api.CT_META] = {"content": list(map(float, c.meta)), "shape": [2]}
        if model in (api.INSPECT, api.INSPECT_RGB):
            e[api.RGB_IMAGE] = b64(c.rgb)
        entries.append(e)
    path.write_text(json.dumps({"data": entries}))
    return path


def run(
    url: str,
    metrics_url: str,
    model: str,
    cells: list[Cell],
    concurrencies,
    interval_ms: int,
    work: Path,
    progress=print,
    unmeasured: list | None = None,
) -> list[dict]:
    """One perf_analyzer sweep of `model`; a row per concurrency with throughput, latency and server-side times.

    A concurrency perf_analyzer cannot measure (no stable measurement within its trials, or any
    other failure) is left out of the rows and recorded in `unmeasured` with perf_analyzer's
    reason: the sweep goes on, and the run keeps what it measured."""
    work.mkdir(parents=True, exist_ok=True)
    data = input_data(cells, model, work / f"{model}_input.json")
    report = work / f"{model}_perf.csv"
    steps = sorted(set(concurrencies))
    rows = []
    for c in steps:  # one call per level: perf_analyzer's range takes a fixed step only
        cmd = [
            str(binary()),
            "-m",
            model,
            "-u",
            url,
            "-i",
            "grpc",
            "--input-data",
            str(data),
            "--concurrency-range",
            f"{c}:{c}",
            "--measurement-interval",
            str(interval_ms),
            "--stability-percentage",
            "50",
            "--max-trials",
            "6",
            "-f",
            str(report),
            "--collect-metrics",
            "--metrics-url",
            metrics_url,
            "--metrics-interval",
            str(max(100, interval_ms // 2)),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=environment(), timeout=max(120, 20 * interval_ms / 1000)
        )
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()
            reason = next(
                (line for line in said.splitlines() if "stable measurement" in line and "concurrency" in line),
                said.splitlines()[-1] if said else f"exit code {done.returncode}",
            )
            progress(f"  perf_analyzer {model:<12} concurrency {c:>3}: not measured ({reason})")
            if unmeasured is not None:
                unmeasured.append({"model": model, "concurrency": c, "reason": reason})
            continue
        with open(report) as f:
            row = next(csv.DictReader(f))
        parsed = {
            "model": model,
            "concurrency": c,
            "cells_per_s": float(row["Inferences/Second"]),
            **{f"p{q}_ms": float(row[f"p{q} latency"]) / 1000 for q in (50, 90, 99)},
            "server_queue_ms": float(row["Server Queue"]) / 1000,
            "server_compute_ms": (
                float(row["Server Compute Input"])
                + float(row["Server Compute Infer"])
                + float(row["Server Compute Output"])
            )
            / 1000,
        }
        progress(
            f"  perf_analyzer {model:<12} concurrency {c:>3}: {parsed['cells_per_s']:7.1f}/s  p50 "
            f"{parsed['p50_ms']:7.1f} ms  "
            f"p99 {parsed['p99_ms']:7.1f} ms"
        )
        rows.append(parsed)
    return rows
