"""What the outputs a client asks for cost: `inspect` with all of them, without the two maps, and
with only VERDICT and CONFIDENCE (what a PLC needs), on the same server and cells.

    python -m benchmarks outputs [--concurrency 4] [--seconds 20]

Each set is sent closed-loop (`--concurrency` requests in flight, one cell each), the sets
taking turns for `--rounds` rounds of `--seconds` / `--rounds` each after a warm-up (so a
drift of the machine spreads over all of them); reported: cells/s (and its lowest and highest
round), latency p50/p99, and the bytes of an answer (the gRPC response message). Line-size
cells by default.

Results: benchmarks/results/outputs-<time>/ (outputs.json, summary.md).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient

from client.service import build_inputs
from core import interface as api

SETS = {
    "all outputs": api.INSPECT_OUTPUTS,
    "without the maps": tuple(n for n in api.INSPECT_OUTPUTS if n not in (api.CT_CAM, api.RGB_ERROR_MAP)),
    "VERDICT and CONFIDENCE": (api.VERDICT, api.CONFIDENCE),
}


def drive(url: str, cells: list, outputs, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` threads, each sending one cell at a time for `seconds`."""
    latencies: list[float] = []
    sizes: list[int] = []  # per answer
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs]

    def worker(k: int) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            i = k
            while time.monotonic() < stop:
                start = time.perf_counter()
                result = client.infer(api.INSPECT, build_inputs([cells[i % len(cells)]]), outputs=requested)
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                    sizes.append(result.get_response().ByteSize())
                i += concurrency

    began = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    ms = np.array(latencies) * 1000
    return {
        "cells": len(latencies),
        "cells_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "answer_bytes": int(np.median(sizes)),
    }


def joined(rows: list[dict], seconds: float) -> dict:
    """One set's rounds together (latency percentiles are the rounds' medians)."""
    return {
        "cells": sum(r["cells"] for r in rows),
        "cells_per_s": sum(r["cells"] for r in rows) / seconds,
        "cells_per_s_rounds": [round(r["cells_per_s"], 2) for r in rows],
        "p50_ms": float(np.median([r["p50_ms"] for r in rows])),
        "p99_ms": float(np.median([r["p99_ms"] for r in rows])),
        "answer_bytes": rows[0]["answer_bytes"],
    }


def parser() -> argparse.ArgumentParser:
    from benchmarks.serving import add_served_arguments  # noqa: PLC0415 - torch only for the command

    p = argparse.ArgumentParser(
        prog="python -m benchmarks outputs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per output set, over all rounds (default 30)")
    p.add_argument("--rounds", type=int, default=3, help="turns the sets take (default 3)")
    add_served_arguments(p)
    return p


def summary(r: dict) -> str:
    lines = [
        f"# What the outputs cost: `inspect`, {r['concurrency']} in flight, {r['seconds']:g} s each "
        f"in {r['rounds']} rounds",
        "",
        f"Machine: {r['machine']}. Cells: {r['data']}.",
        "",
        "| outputs asked for | cells/s | rounds | p50 ms | p99 ms | bytes per answer |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, row in r["sets"].items():
        spread = " / ".join(f"{v:.2f}" for v in row["cells_per_s_rounds"])
        latency = f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f}"
        lines.append(f"| {name} | {row['cells_per_s']:.2f} | {spread} | {latency} | {row['answer_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks import measure  # noqa: PLC0415
    from benchmarks.serving import prepare, results_folder_and_server  # noqa: PLC0415

    args = parser().parse_args(argv)
    _, data, cells, _ = prepare(args)
    folder, server = results_folder_and_server(args, "outputs")
    m = measure.machine()
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{m['cpu']}, {m['cores']} cores, {m['instruction_set']}",
        "data": str(data),
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "sets": {},
    }
    try:
        drive(server.grpc_url, cells, api.INSPECT_OUTPUTS, args.concurrency, min(10.0, args.seconds))  # warm-up
        rounds: dict[str, list[dict]] = {name: [] for name in SETS}
        for k in range(args.rounds):
            for name, outputs in SETS.items():
                print(f"  round {k + 1}: {name} ...", flush=True)
                rounds[name].append(
                    drive(server.grpc_url, cells, outputs, args.concurrency, args.seconds / args.rounds)
                )
        result["sets"] = {name: joined(rows, args.seconds) for name, rows in rounds.items()}
    finally:
        server.stop()
    (folder / "outputs.json").write_text(json.dumps(result, indent=2))
    text = summary(result)
    (folder / "summary.md").write_text(text)
    print(text)
    print(f"results: {folder}")
    return 0
