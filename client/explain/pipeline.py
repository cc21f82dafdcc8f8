"""Explain flagged cells off the hot path: a bounded pool of workers, one report per cell.

    pipeline = ExplanationPipeline(explainers, "results/explain", workers=2)
    for result in client.iter_inspect(cells):           # verdicts flow on
        if result.flagged:
            pipeline.submit(Case(result, ...))           # returns at once
    entries = pipeline.close()                           # waits, writes index.html

`submit` never blocks the caller: when `max_backlog` cells are already waiting, the cell
gets a report that says its explanations were skipped and why. An explainer that raises
marks its own part unavailable with the reason; the other parts and the report are still
written. `submit` returns a `concurrent.futures.Future` (await it with
`asyncio.wrap_future`, or use `explain`) that resolves to the cell's index entry.

The workers run at a lower CPU priority (`nice`, Linux threads are scheduled one by one),
so on a small machine shared with the server they take the CPU the inspections leave.

A long-running caller (the line gateway) passes `index_every_s`, so index.json and
index.html are rewritten while cells are explained (at most that often, and whenever the
pipeline runs dry) rather than only at `close`, and `resume=True`, so a restart adds to the
reports already in `out_dir` instead of replacing their index.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from client import metrics
from client.explain.case import Case
from client.explain.report import write_cell_report, write_index

log = logging.getLogger("battery.explain")


@dataclass
class Part:
    """One explainer's result for one cell."""

    name: str
    status: str  # ok | unavailable | skipped
    data: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # role -> file name in the cell's folder
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def cell_folder_name(cell_id: str, taken: set[str]) -> str:
    """A file-system-safe, unique folder name for a cell id (ids may hold '/')."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", cell_id).strip("._") or "cell"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _lower_priority(niceness: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)  # this thread only, on Linux
    except (AttributeError, OSError):
        pass


class ExplanationPipeline:
    def __init__(
        self,
        explainers,
        out_dir: str | Path,
        workers: int = 2,
        max_backlog: int = 256,
        title: str = "",
        nice: int = 10,
        index_every_s: float | None = None,
        resume: bool = False,
    ):
        if workers < 1 or max_backlog < 1:
            raise ValueError("workers and max_backlog must be at least 1")
        self.explainers = list(explainers)
        self.workers = workers
        self.out_dir = Path(out_dir)
        self.title = title
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(
            workers, thread_name_prefix="explain", initializer=_lower_priority, initargs=(nice,)
        )
        self._slots = threading.BoundedSemaphore(max_backlog)
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._futures: list[Future] = []
        self._pending = 0
        self.entries: list[dict] = []
        self.index_every_s = index_every_s
        self._index_written = 0.0
        if resume:
            self._resume()

    def _resume(self) -> None:
        """The entries of the index already in out_dir (their folder names stay taken)."""
        index = self.out_dir / "index.json"
        if not index.exists():
            return
        try:
            held = json.loads(index.read_text())
        except (OSError, ValueError) as e:  # keep the unreadable file for a person to look at
            index.replace(index.with_name(f"index.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.json"))
            log.warning("%s could not be read (%s); kept aside, a new index is started", index, e)
            return
        for entry in [*held.get("entries", []), *held.get("failed_reports", [])]:
            self.entries.append(entry)
            if "report" in entry:
                self._names.add(entry["report"].split("/")[-2])

    @property
    def backlog(self) -> int:
        """Cells submitted and not yet explained."""
        return self._pending

    def submit(self, case: Case) -> Future:
        with self._lock:
            folder = self.out_dir / "cells" / cell_folder_name(case.cell_id, self._names)
        if not self._slots.acquire(blocking=False):
            reason = "explanation backlog full: the explainers are slower than the line; cell skipped"
            parts = [Part(e.name, "skipped", reason=reason) for e in self.explainers]
            future: Future = Future()
            future.set_result(self._finish(case, parts, folder))
            return future
        with self._lock:
            self._pending += 1
        metrics.EXPLAIN_BACKLOG.inc()
        future = self._pool.submit(self._explain, case, folder)
        future.add_done_callback(self._release)
        with self._lock:
            self._futures.append(future)
        return future

    async def explain(self, case: Case) -> dict:
        """`submit` for asyncio code: the cell's index entry once its report is written."""
        return await asyncio.wrap_future(self.submit(case))

    def _release(self, _future) -> None:
        with self._lock:
            self._pending -= 1
        metrics.EXPLAIN_BACKLOG.dec()
        self._slots.release()

    def _explain(self, case: Case, folder: Path) -> dict:
        parts = []
        for explainer in self.explainers:
            start = time.perf_counter()
            try:
                data, files = explainer.explain(case, folder)
                part = Part(explainer.name, "ok", data, files)
            except Exception as e:  # one explainer's failure is its own part's
                reason = str(e) or type(e).__name__
                part = Part(explainer.name, "unavailable", reason=reason, data={"error_type": type(e).__name__})
                if not isinstance(e, RuntimeError):  # an unexpected error: keep where it came from
                    part.data["trace"] = traceback.format_exception_only(type(e), e)[-1].strip()
            part.seconds = round(time.perf_counter() - start, 3)
            parts.append(part)
        return self._finish(case, parts, folder)

    def _finish(self, case: Case, parts: list[Part], folder: Path) -> dict:
        for part in parts:
            metrics.EXPLAIN_PARTS.labels(part.name, part.status).inc()
            if part.status != "skipped":
                metrics.EXPLAIN_SECONDS.labels(part.name).observe(part.seconds)
        entry = write_cell_report(case, parts, folder, self.out_dir)
        with self._lock:
            self.entries.append(entry)
            # while running: when due, or when this was the last cell in flight
            if self.index_every_s is not None and (
                time.monotonic() - self._index_written >= self.index_every_s or self._pending <= 1
            ):
                self._write_index()
        return entry

    def _write_index(self) -> None:  # with self._lock held
        write_index(self.out_dir, self.entries, self.explainers, self.title)
        self._index_written = time.monotonic()

    def close(self, progress: bool = False) -> list[dict]:
        """Wait for every submitted cell, write index.html and index.json; the index entries."""
        with self._lock:
            futures = list(self._futures)
        if progress and futures:
            with tqdm(total=len(futures), unit="cell", desc="explain") as bar:
                for f in futures:
                    f.exception()
                    bar.update()
        self._pool.shutdown(wait=True)
        for f in futures:
            if f.exception() is not None:  # a failure writing a report: say so, keep the others
                self.entries.append({"cell_id": "?", "error": f"report not written: {f.exception()}"})
        with self._lock:
            self._write_index()
        return self.entries

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
