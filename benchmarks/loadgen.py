"""The project's own load generator: asyncio gRPC clients keeping N requests in flight.

Each request is one cell (encoded CT + metadata + encoded photo) to `inspect`, as the
line sends it; latency is measured end to end, from before the request is built to the
decoded answer. Reports cells/s and latency percentiles per concurrency.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from client.inspection import Cell, CellError
from client.service import AsyncInspectionClient


async def _drive(url: str, cells: list[Cell], concurrency: int, seconds: float, heatmaps: bool, warmup: float) -> dict:
    latencies: list[float] = []
    errors = 0
    async with AsyncInspectionClient(url, heatmaps=heatmaps) as client:
        start = time.perf_counter()
        cpu_start = None
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def worker(k: int):
            nonlocal errors, cpu_start
            i = k
            while time.perf_counter() < stop_at:
                cell = cells[i % len(cells)]
                i += concurrency
                t0 = time.perf_counter()
                if cpu_start is None and t0 >= measure_from:
                    cpu_start = time.process_time()
                result = (await client.inspect_many([cell], concurrency=1))[0]
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if isinstance(result, CellError):
                        errors += 1
                    else:
                        latencies.append(t1 - t0)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - measure_from
        client_cpu = time.process_time() - (cpu_start if cpu_start is not None else time.process_time())
    lat = np.array(latencies) * 1000
    out = {
        "concurrency": concurrency,
        "cells": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "cells_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "client_cores": client_cpu / elapsed if elapsed > 0 else 0.0,
    }  # CPU the load generator itself used, in cores
    if len(lat):
        out |= {f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 99)} | {"mean_ms": float(lat.mean())}
    return out


def sweep(
    url: str,
    cells: list[Cell],
    concurrencies,
    seconds: float,
    heatmaps: bool = False,
    warmup: float = 1.0,
    progress=print,
) -> list[dict]:
    rows = []
    for c in concurrencies:
        row = asyncio.run(_drive(url, cells, c, seconds, heatmaps, warmup))
        progress(
            f"  loadgen concurrency {c:>3}: {row['cells_per_s']:7.1f} cells/s  p50 "
            f"{row.get('p50_ms', float('nan')):7.1f} ms  "
            f"p99 {row.get('p99_ms', float('nan')):7.1f} ms  errors {row['errors']}  client "
            f"{row['client_cores']:.2f} cores"
        )
        rows.append(row)
    return rows
