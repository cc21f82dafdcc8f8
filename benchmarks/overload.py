"""Overload: the line sends more cells than the server can inspect; what is answered, in what time,
and what is refused.

For one replica pinned to one core, the benchmark first measures what it carries (closed loop,
4 requests in flight: cells/s), then offers open-loop arrivals (evenly spaced, as a line's
takt sends them) at multiples of that:

  one replica, a bare tritonclient (no retries): answered, refused at once (UNAVAILABLE
      "overloaded"), and how long an answer and a refusal took
  two replicas (one core each) behind the project's InspectionClient, which sends a refused
      cell to the other replica: cells lost (no answer at all) and the answers' p50/p99

  python -m benchmarks overload [--untrained full] [--takt 2] [--loads 0.5,1,2] [--seconds 30]

Every replica sheds with --takt (serving.front); `--takt 0` shows the same load queueing instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import tritonclient.grpc.aio as aio
from tritonclient.utils import InferenceServerException

from client.inspection import Cell, CellError
from client.service import AsyncInspectionClient, Backoff, build_inputs, requested_outputs
from core import interface as api

ADMIN = "overload-benchmark-key"


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


async def _closed_loop(url: str, cells: list[Cell], concurrency: int, seconds: float) -> float:
    """Cells/s answered with `concurrency` requests in flight (after a 2 s warm-up)."""
    answered, stop_at, count_from = 0, time.perf_counter() + 2 + seconds, time.perf_counter() + 2
    async with AsyncInspectionClient(url, heatmaps=False, backoff=Backoff(retries=20, first=0.05, longest=0.5)) as c:

        async def worker(k: int):
            nonlocal answered
            i = k
            while time.perf_counter() < stop_at:
                result = await c.inspect_batch([cells[i % len(cells)]])
                if time.perf_counter() >= count_from and result:
                    answered += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return answered / seconds


async def _offer(send, cells: list[Cell], rate: float, seconds: float) -> list[tuple[str, float]]:
    """Evenly spaced arrivals at `rate` cells/s for `seconds`; (outcome, seconds) per cell."""
    tasks, start = [], time.perf_counter()
    n = max(1, int(rate * seconds))
    for k in range(n):
        await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(send(cells[k % len(cells)])))
    return list(await asyncio.gather(*tasks))


def _row(outcomes: list[tuple[str, float]], offered: float, takt: float) -> dict:
    answered = np.array([t for o, t in outcomes if o == "answered"]) * 1000
    refused = np.array([t for o, t in outcomes if o == "refused"]) * 1000
    row = {
        "offered_cells_per_s": round(offered, 3),
        "cells": len(outcomes),
        "answered": len(answered),
        "refused": len(refused),
        "lost": sum(1 for o, _ in outcomes if o == "lost"),
    }
    if len(answered):
        row |= {f"answer_p{q}_ms": round(float(np.percentile(answered, q)), 1) for q in (50, 99)}
        row["answered_within_takt"] = round(float(np.mean(answered <= takt * 1000)), 4)
    if len(refused):
        row |= {f"refusal_p{q}_ms": round(float(np.percentile(refused, q)), 1) for q in (50, 99)}
    return row


async def one_replica(url: str, cells: list[Cell], rate: float, seconds: float, takt: float) -> dict:
    """A bare tritonclient, no retries: what one replica answers and refuses."""
    async with aio.InferenceServerClient(url) as client:

        async def send(cell: Cell):
            t0 = time.perf_counter()
            try:
                await client.infer(api.INSPECT, build_inputs([cell]), outputs=requested_outputs(False))
                return "answered", time.perf_counter() - t0
            except InferenceServerException as e:
                kind = "refused" if "overloaded" in (e.message() or "") else "lost"
                return kind, time.perf_counter() - t0

        return _row(await _offer(send, cells, rate, seconds), rate, takt)


async def replicas(url: str, cells: list[Cell], rate: float, seconds: float, takt: float) -> dict:
    """The project's client over several replicas: a refused cell goes to another one."""
    async with AsyncInspectionClient(url, heatmaps=False, backoff=Backoff(retries=5, first=0.1, longest=1.0)) as c:

        async def send(cell: Cell):
            t0 = time.perf_counter()
            result = (await c.inspect_many([cell], concurrency=1))[0]
            return ("lost" if isinstance(result, CellError) else "answered"), time.perf_counter() - t0

        return _row(await _offer(send, cells, rate, seconds), rate, takt)


def parser() -> argparse.ArgumentParser:
    from benchmarks.serving import add_served_arguments  # noqa: PLC0415 - torch only for the command

    p = argparse.ArgumentParser(
        prog="python -m benchmarks overload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_served_arguments(p)
    p.add_argument("--takt", type=float, default=2.0, help="seconds within which a cell must be answered (default 2)")
    p.add_argument(
        "--loads",
        type=_floats,
        default=[0.5, 1.0, 2.0],
        help="one replica's offered load, x its capacity (default 0.5,1,2)",
    )
    p.add_argument(
        "--replica-loads",
        type=_floats,
        default=[1.5],
        help="two replicas' offered load, x ONE replica's capacity (default 1.5)",
    )
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of arrivals per load (default 30)")
    p.add_argument(
        "--capacity-seconds", type=float, default=20.0, help="seconds of the capacity measurement (default 20)"
    )
    return p


def main(argv=None) -> int:
    from benchmarks.measure import machine  # noqa: PLC0415
    from benchmarks.plant import Replicas, cpu_lists  # noqa: PLC0415
    from benchmarks.serving import prepare, results_folder  # noqa: PLC0415

    args = parser().parse_args(argv)
    _, data, cells, _ = prepare(args)
    folder = results_folder(args, "overload")
    cpus = cpu_lists(2, None)
    result = {"takt_s": args.takt, "data": str(data), "machine": machine(), "one_replica": [], "two_replicas": []}
    with Replicas(args.repository, folder, 1, cpus[:1], ADMIN, takt=args.takt).start() as one:
        capacity = asyncio.run(_closed_loop(one.url, cells, 4, args.capacity_seconds))
        result["capacity_cells_per_s"] = round(capacity, 3)
        print(f"one replica on core {cpus[0]}: carries {capacity:.2f} cells/s (4 in flight)")
        for load in args.loads:
            row = asyncio.run(one_replica(one.url, cells, load * capacity, args.seconds, args.takt)) | {"load": load}
            result["one_replica"].append(row)
            print(f"  {load:g}x: {json.dumps(row)}", flush=True)
    with Replicas(args.repository, folder, 2, cpus, ADMIN, takt=args.takt).start() as two:
        for load in args.replica_loads:
            row = asyncio.run(replicas(two.url, cells, load * capacity, args.seconds, args.takt)) | {"load": load}
            result["two_replicas"].append(row)
            print(f"  two replicas, {load:g}x one's capacity: {json.dumps(row)}", flush=True)
    (folder / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
