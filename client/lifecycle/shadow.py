"""Shadow traffic: a share of the line's cells also goes to the staged release, off the PLC's path.

The line gateway answers the PLC first; only then does a cell (with probability `fraction`)
join the shadow queue, which one worker sends to `inspect_staged`. The staged answer is
recorded beside the one the line got, never returned. The queue is short (`pending`): when
the staged release cannot keep up, cells are skipped (counted), so shadow traffic never grows
into a backlog that competes with the line.

Metrics (prometheus-client, on the gateway's metrics port):
- `battery_shadow_cells_total{serving, staged, outcome}`: shadowed cells by outcome: `agree`
  (same verdict), `flip` (another verdict), `error` (the staged release failed the cell or
  none is staged), `skipped` (the queue was full); `serving`/`staged` are release numbers;
- `battery_shadow_flips_total{serving, staged, serving_verdict, staged_verdict}`: the flips by verdict pair.

The alert ShadowDisagreement (docker/prometheus/alerts.yml) fires when more than the
configured share of shadowed cells flip.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

from prometheus_client import Counter

from client.inspection import Cell, CellError, Inspection

CELLS = Counter(
    "battery_shadow_cells", "Cells shadowed to the staged release, by outcome", ["serving", "staged", "outcome"]
)
FLIPS = Counter(
    "battery_shadow_flips",
    "Shadowed cells whose verdict the staged release would change, by verdict pair",
    ["serving", "staged", "serving_verdict", "staged_verdict"],
)
OUTCOMES = ("agree", "flip", "error", "skipped")


def _release(result: Inspection | CellError | None) -> str:
    if isinstance(result, Inspection) and result.model_versions.get("release") is not None:
        return str(result.model_versions["release"])
    return ""


class Shadow:
    """The shadow queue, what it records, and its metrics; the caller sends the cells (`next`, `record`)."""

    def __init__(self, fraction: float, log: str | Path | None, pending: int = 16, seed: int | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"shadow fraction must be within 0..1, got {fraction}")
        self.fraction = fraction
        self.log = Path(log) if log else None
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=pending)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        for outcome in OUTCOMES:  # at 0 from the start: rates and alerts exist before the first cell
            CELLS.labels("", "", outcome)

    def offer(self, cell: Cell, answer: Inspection, station: str = "") -> bool:
        """Queue the cell for the staged release with probability `fraction`; never blocks."""
        if self.fraction <= 0 or self._random.random() >= self.fraction:
            return False
        try:
            self.queue.put_nowait((cell, answer, station, time.time()))
            return True
        except asyncio.QueueFull:
            CELLS.labels(_release(answer), "", "skipped").inc()
            return False

    async def next(self) -> tuple[Cell, Inspection, str, float]:
        return await self.queue.get()

    def record(self, cell: Cell, answer: Inspection, staged: Inspection | CellError, station: str = "") -> str:
        """Count and log one shadowed cell; returns its outcome."""
        serving, staged_release = _release(answer), _release(staged)
        if isinstance(staged, CellError):
            outcome = "error"
        else:
            outcome = "agree" if staged.verdict_code == answer.verdict_code else "flip"
        CELLS.labels(serving, staged_release, outcome).inc()
        if outcome == "flip":
            FLIPS.labels(serving, staged_release, answer.verdict, staged.verdict).inc()
        if self.log is not None:
            row = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cell_id": cell.cell_id,
                "station": station,
                "outcome": outcome,
                "serving": answer.to_dict(),
                "staged": staged.to_dict(),
            }
            with self._lock, open(self.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        return outcome
