"""The gateway: PLC trigger -> outbox -> Triton `inspect` -> PLC result, losing no cell.

Per station, over OPC UA (node names are the defaults under the station's prefix):

1. The PLC writes the cell's fields (CellId, CtPath + RgbPath or CtImage + RgbImage, and
   BatteryType + SliceAxis unless the station's `meta` is fixed), then sets Trigger = true.
2. The gateway reads them, records the cell in the outbox (durable, before anything else)
   and acknowledges the trigger by setting Trigger = false: the PLC may load the next cell.
3. The cell goes to Triton; while Triton is unavailable it is retried with backoff, for as
   long as it takes (the outbox keeps it across restarts). A cell the service refuses (an
   undecodable image, say) is answered with `error_code` and the reason in Error.
4. Results are written in trigger order: ResultCellId, Verdict, Confidence and Error in one
   write, then ResultCounter + 1 in a second, so a PLC that watches ResultCounter reads a
   whole result. With `handshake` (default) the gateway first waits until the PLC has copied
   the previous ResultCounter into ResultAck, so no result is overwritten unread.
5. Flagged cells are queued for explanation (the explanation pipeline) after their answer
   is recorded; the PLC's answer never waits for it.
6. After its answer is recorded, a cell may also be kept in the line archive (`archive`:
   every flagged cell and a sample of the others, as training data) and sent to a staged
   release as shadow traffic (`shadow.fraction`); neither delays the PLC's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import time
from pathlib import Path

from client.archive import LineArchive, Retention
from client.explain import Case
from client.explain.cli import add_arguments, build_pipeline
from client.gateway import metrics
from client.gateway.config import GatewayConfig, Station, Triton
from client.gateway.outbox import Outbox, Row
from client.gateway.plc import PlcLink, PlcRejected, PlcUnavailable
from client.inspection import Cell, CellError, Inspection
from client.lifecycle.shadow import Shadow
from client.service import AsyncInspectionClient, Backoff, InspectionClient, retryable
from core import interface as api
from core.interface import VERDICT_NAMES

log = logging.getLogger("battery.gateway")

SERVICE_FAULTS = ("unavailable", "deadline_exceeded", "resource_exhausted", "cancelled")
COUNTER_MODULUS = 2**32  # ResultCounter wraps like a PLC's UDInt


def service_fault(error: CellError) -> bool:
    """A fault of the service (down, restarting, overloaded), not of the cell: retried until answered."""

    return retryable(error) or error.kind in SERVICE_FAULTS


class ImageUnavailable(Exception):
    pass


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.outbox = Outbox(cfg.outbox)
        self.plc = PlcLink(cfg.plc)
        for st in cfg.stations:  # the nodes the PLC changes: subscribed to at each connection
            self.plc.watch(st.nodes["trigger"], only_true=True)
            if st.handshake:
                self.plc.watch(st.nodes["result_ack"])
        self.stations = {s.name: s for s in cfg.stations}
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._wake = {s.name: asyncio.Event() for s in cfg.stations}
        self._explaining = cfg.explain.out is not None
        self._explain_wake = asyncio.Event()  # a flagged cell was recorded, or a report finished
        self.pipeline = None
        self.triton = None
        self.heat = None  # the explanations' client (heatmaps)
        self._inflight: set[asyncio.Task] = set()  # requests to Triton under way
        a = cfg.archive
        self.archive = LineArchive(a.out, Retention(a.sample, a.max_gb, a.max_days)) if a.out else None
        self._archiving: set[asyncio.Task] = set()
        sh = cfg.shadow
        self.shadow = (
            Shadow(sh.fraction, sh.log or cfg.outbox.with_name("shadow.jsonl"), sh.pending) if sh.fraction > 0 else None
        )
        self.shadow_client = None
        metrics.start(self.stations)

    # ------------------------------------------------------------------ running
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or the task is cancelled)."""

        stop = stop or asyncio.Event()
        t = self.cfg.triton
        self.triton = triton_client(t, heatmaps=False, backoff=Backoff(retries=0))
        if self._explaining:
            self.heat = triton_client(t, heatmaps=True, backoff=Backoff(retries=0))
        if self.shadow is not None:
            self.shadow_client = triton_client(
                t,
                backoff=Backoff(retries=0),
                model=self.cfg.shadow.model,
                timeout=self.cfg.shadow.timeout_s,
                url=self.cfg.shadow.url,
            )
        resumed = self.outbox.pending()
        for row in resumed:
            self._queue.put_nowait(row.id)
        depth = self.outbox.depth()
        if resumed or depth["answered"] or depth["writing"]:
            log.info(
                "outbox %s: resuming %d pending and %d answered cells",
                self.cfg.outbox,
                len(resumed),
                depth["answered"] + depth["writing"],
            )
        tasks = [asyncio.create_task(self.plc.run(), name="plc")]
        tasks += [asyncio.create_task(self._intake(s), name=f"intake-{s.name}") for s in self.cfg.stations]
        tasks += [asyncio.create_task(self._writer(s), name=f"writer-{s.name}") for s in self.cfg.stations]
        tasks += [asyncio.create_task(self._infer_worker(), name=f"infer-{i}") for i in range(t.concurrency)]
        tasks.append(asyncio.create_task(self._gauges(), name="gauges"))
        if self._explaining:
            tasks.append(asyncio.create_task(self._explainer(), name="explain"))
        if self.shadow is not None:
            tasks.append(asyncio.create_task(self._shadower(), name="shadow"))
        waiter = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception():  # a bug, not a fault of the PLC or Triton: stop loudly
                    raise task.exception()
        finally:
            for task in [waiter, *tasks]:
                task.cancel()
            await asyncio.gather(waiter, *tasks, return_exceptions=True)
            # requests already sent are let finish (their cells stay pending in the outbox and are
            # answered after the next start): cancelling a request in flight can crash
            # tritonserver 2.51 (docs/operations.md, "Faults")
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=t.timeout_s)
            if self._archiving:  # cells being written to the archive are written whole
                await asyncio.wait(self._archiving, timeout=60)
            await self.triton.close()
            if self.shadow_client is not None:
                await self.shadow_client.close()
            if self.heat is not None:
                await self.heat.close()
            if self.pipeline is not None:
                await asyncio.to_thread(self.pipeline.close)
            self.outbox.close()

    async def _sent(self, call):
        """Await a request to Triton that a stop does not cancel once sent (see run)."""
        task = asyncio.ensure_future(call)
        self._inflight.add(task)

        def done(t: asyncio.Task) -> None:
            self._inflight.discard(t)
            if not t.cancelled():
                t.exception()  # seen: a request whose caller was stopped fails quietly

        task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _gauges(self) -> None:
        last_prune = 0.0
        while True:
            if time.monotonic() - last_prune > 600:
                self.outbox.prune(self.cfg.outbox_keep_days * 86400)
                last_prune = time.monotonic()
            for state, n in self.outbox.depth().items():
                metrics.OUTBOX.labels(state).set(n)
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ PLC -> outbox
    async def _intake(self, st: Station) -> None:
        trigger = st.nodes["trigger"]
        changed = self.plc.watch(trigger)
        while True:
            try:
                changed.clear()  # before the read: a change reported during it is not missed
                (raised,) = await self.plc.read([trigger])
                if not raised:
                    await self.plc.wait_change(changed)
                    continue
                values = dict(zip(st.input_roles, await self.plc.read([st.nodes[r] for r in st.input_roles])))
                row, new = self._record(st, values)
                # on its way before the acknowledgement, which may fail: the PLC then raises the
                # same trigger again, and the outbox knows it
                if new:
                    metrics.TRIGGERS.labels(st.name).inc()
                    if row.state == "pending":
                        self._queue.put_nowait(row.id)
                    else:
                        self._wake[st.name].set()
                elif row.acked:
                    metrics.REPEATS.labels(st.name).inc()
                    log.info("station %s: cell %s triggered again; answered from the outbox", st.name, row.cell_id)
                    self._wake[st.name].set()
                # else: recorded and queued before (by this process, or at start after a restart), never acknowledged
                await self.plc.write([(trigger, False)])  # acknowledged: the PLC may load the next cell
                self.outbox.acknowledged(row.id)
            except PlcUnavailable:
                await self.plc.wait_ready()
            except PlcRejected as e:
                metrics.ERRORS.labels("plc_rejected").inc()
                log.error("station %s: %s (check the node ids and types in the configuration)", st.name, e)
                await asyncio.sleep(1.0)

    def _record(self, st: Station, values: dict) -> tuple[Row, bool]:
        """The trigger in the outbox; a trigger whose fields cannot make a request is recorded
        already answered with the error, so the PLC still gets exactly one answer for it."""
        cell_id = str(values.get("cell_id") or "").strip()
        problem = None if cell_id else "empty CellId"
        cell_id = cell_id or f"unnamed-{time.time_ns()}"
        meta = st.meta
        if meta is None:
            try:
                meta = (float(values["battery_type"]), float(values["slice_axis"]))
                if meta[0] not in (0, 1) or meta[1] not in (0, 1, 2):
                    raise ValueError
            except (TypeError, ValueError):
                problem = problem or (
                    f"BatteryType/SliceAxis {values.get('battery_type')!r}/{values.get('slice_axis')!r}: "
                    "expected 0 (cell) or 1 (module) and 0, 1 or 2 (x, y, z)"
                )
                meta = (float("nan"), float("nan"))
        if st.images == "path":
            images = {"ct_path": values.get("ct_path") or None, "rgb_path": values.get("rgb_path") or None}
            if not problem and not (images["ct_path"] and images["rgb_path"]):
                problem = "CtPath or RgbPath is empty"
        else:
            images = {
                "ct_image": bytes(values.get("ct_image") or b""),
                "rgb_image": bytes(values.get("rgb_image") or b""),
            }
            if not problem and not (images["ct_image"] and images["rgb_image"]):
                problem = "CtImage or RgbImage is empty"
        row, new = self.outbox.record(st.name, cell_id, meta, **images)
        if new and problem:
            metrics.ERRORS.labels("refused").inc()
            log.warning("station %s: cell %s refused: %s", st.name, cell_id, problem)
            self.outbox.answer(row.id, self.cfg.error_code, 0.0, problem)
            row = self.outbox.get(row.id)
        return row, new

    # ------------------------------------------------------------------ outbox -> Triton
    async def _images(self, st: Station, row: Row) -> tuple[bytes, bytes]:
        if st.images == "bytes":
            return row.ct_image, row.rgb_image
        paths = [Path(p) for p in (row.ct_path, row.rgb_path)]
        if st.image_root is not None:
            paths = [p if p.is_absolute() else st.image_root / p for p in paths]
        for attempt in range(3):  # a shared folder may show a file a moment after the PLC names it
            try:
                return tuple(await asyncio.gather(*(asyncio.to_thread(p.read_bytes) for p in paths)))
            except OSError as e:
                if attempt == 2:
                    raise ImageUnavailable(f"cannot read {e.filename}: {e.strerror}") from None
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _infer_worker(self) -> None:
        first, longest = self.cfg.triton.retry_s
        while True:
            row = self.outbox.get(await self._queue.get())
            if row is None or row.state != "pending":
                continue
            st = self.stations.get(row.station)
            if st is None:  # a station removed from the configuration while its cells waited
                self.outbox.answer(row.id, self.cfg.error_code, 0.0, f"station {row.station} is no longer configured")
                continue
            try:
                ct, rgb = await self._images(st, row)
            except ImageUnavailable as e:
                metrics.ERRORS.labels("image").inc()
                log.warning("station %s: cell %s: %s", st.name, row.cell_id, e)
                self.outbox.answer(row.id, self.cfg.error_code, 0.0, str(e))
                self._wake[st.name].set()
                continue
            cell = Cell(ct, row.meta, rgb, row.cell_id)
            pause = first
            while True:
                (result,) = await self._sent(self.triton.inspect_many([cell], concurrency=1))
                if not (isinstance(result, CellError) and service_fault(result)):
                    break
                metrics.ERRORS.labels("triton_retry").inc()
                log.warning(
                    "cell %s: service fault (%s: %s); again in %.1f s",
                    row.cell_id,
                    result.kind,
                    result.message[:120],
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(longest, pause * 2)
            if isinstance(result, CellError):
                metrics.ERRORS.labels("refused").inc()
                log.warning("station %s: cell %s refused by the service: %s", st.name, row.cell_id, result.message)
                self.outbox.answer(row.id, self.cfg.error_code, 0.0, f"{result.kind}: {result.message}")
            else:
                explain = result.flagged and self._explaining
                if explain and self.outbox.waiting_explanation() >= self.cfg.explain.backlog:
                    explain = False  # the explainers are slower than the line: this one is skipped
                    metrics.ERRORS.labels("explain_skipped").inc()
                    log.warning(
                        "cell %s: not explained: %d flagged cells already wait (explain.backlog)",
                        row.cell_id,
                        self.cfg.explain.backlog,
                    )
                self.outbox.answer(
                    row.id, result.verdict_code, result.confidence, None, result.to_dict(), explain=explain
                )
                if explain:
                    self._explain_wake.set()
                self._wake[st.name].set()  # the PLC's answer first; the archive and the shadow after it
                self._keep(cell, result, st.name, row)
                if self.shadow is not None:
                    self.shadow.offer(cell, result, st.name)
            self._wake[st.name].set()

    def _keep(self, cell: Cell, result: Inspection, station: str, row: Row, reason: str | None = None, extra=None):
        """Keep the cell in the line archive (if it wants it), in a thread, without holding the caller."""
        if self.archive is None:
            return
        reason = reason or self.archive.wants(result)
        if reason is None:
            return
        source = {"ct_path": row.ct_path, "rgb_path": row.rgb_path} if row is not None and row.ct_path else None
        task = asyncio.create_task(asyncio.to_thread(self.archive.keep, cell, result, reason, station, source, extra))
        self._archiving.add(task)
        task.add_done_callback(self._archived)

    def _archived(self, task: asyncio.Task) -> None:
        self._archiving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.ERRORS.labels("archive").inc()
            log.warning("line archive: a cell was not kept: %s", task.exception())

    async def _shadower(self) -> None:
        """Shadow cells, one at a time, to the staged release (on `shadow.url`, the line's Triton by
        default); recorded beside the line's answer."""
        while True:
            cell, answer, station, _ = await self.shadow.next()
            (staged,) = await self._sent(self.shadow_client.inspect_many([cell], concurrency=1))
            outcome = await asyncio.to_thread(self.shadow.record, cell, answer, staged, station)
            if outcome == "flip":  # a cell the staged release would judge otherwise: kept for review
                self._keep(cell, answer, station, None, "shadow_flip", {"shadow": staged.to_dict()})
            elif outcome == "error" and isinstance(staged, CellError) and staged.kind in ("not_found", "unavailable"):
                await asyncio.sleep(5.0)  # no release staged (or it is loading): try again later

    # ------------------------------------------------------------------ outbox -> PLC
    async def _writer(self, st: Station) -> None:
        wake = self._wake[st.name]
        while True:
            row = self.outbox.next_to_write(st.name)
            if row is None or row.state == "pending":
                wake.clear()
                try:
                    async with asyncio.timeout(0.5):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                await self._write(st, row)
            except PlcUnavailable:
                await self.plc.wait_ready()
            except PlcRejected as e:
                metrics.ERRORS.labels("plc_rejected").inc()
                log.error("station %s: cannot write the result of %s: %s", st.name, row.cell_id, e)
                await asyncio.sleep(1.0)

    async def _write(self, st: Station, row: Row) -> None:
        n = st.nodes
        if row.state == "writing":  # interrupted (a restart, a lost connection): does the PLC have it already?
            cell_id, counter = await self.plc.read([n["result_cell_id"], n["result_counter"]])
            if cell_id == row.cell_id and counter == row.counter:
                self._written(st, row)
                return
        if st.handshake:
            acked = self.plc.watch(n["result_ack"])
            while True:
                acked.clear()
                ack, counter = await self.plc.read([n["result_ack"], n["result_counter"]])
                if ack == counter:
                    break
                await self.plc.wait_change(acked)
        else:
            (counter,) = await self.plc.read([n["result_counter"]])
        following = (int(counter or 0) + 1) % COUNTER_MODULUS
        self.outbox.writing(row.id, following)
        values = [(n["result_cell_id"], row.cell_id), (n["verdict"], row.verdict), (n["confidence"], row.confidence)]
        if "error" in n:  # a refused request's reason, or why a cell is not inspectable (verdict 4)
            values.append((n["error"], row.error or row.answer_dict.get("refusal", "")))
        await self.plc.write(values)
        await self.plc.write([(n["result_counter"], following)])
        self._written(st, self.outbox.get(row.id))

    def _written(self, st: Station, row: Row) -> None:
        self.outbox.written(row.id)
        seconds = time.time() - row.triggered_at
        metrics.ANSWER_SECONDS.labels(st.name).observe(seconds)
        metrics.ANSWERS.labels(st.name, "within_takt" if seconds * 1000 <= st.takt_ms else "late").inc()
        verdict = VERDICT_NAMES[row.verdict] if row.error is None and 0 <= row.verdict < len(VERDICT_NAMES) else "error"
        metrics.VERDICTS.labels(st.name, verdict).inc()

    # ------------------------------------------------------------------ explanations
    async def _explainer(self) -> None:
        """Flagged cells waiting in the outbox, oldest first: the service's heatmaps for the cell,
        then the explanation pipeline (its own worker threads). A cell leaves the outbox's waiting
        list when its report is written, so after a stop or a crash the next start explains the
        cells the last one had not (a report being written at a crash is written again)."""

        p = argparse.ArgumentParser(prog="explain options", add_help=False)
        add_arguments(p, str(self.cfg.explain.out))
        options = p.parse_args(shlex.split(self.cfg.explain.options))
        options.explain, options.explain_backlog = self.cfg.explain.out, self.cfg.explain.backlog
        # the gateway runs for days: its index is kept current, and a restart adds to it
        self.pipeline = await asyncio.to_thread(build_pipeline, options, "gateway", index_every_s=10.0, resume=True)
        info = None
        in_flight: set[int] = set()  # submitted to the pipeline, report not yet written
        most = max(
            1, min(2 * self.pipeline.workers, self.cfg.explain.backlog)
        )  # the rest wait in the outbox, not in memory
        first, longest = self.cfg.triton.retry_s
        pause = first

        def reported(row_id: int) -> None:
            in_flight.discard(row_id)
            if not self.outbox.closed:
                self.outbox.explained(row_id)
            self._explain_wake.set()

        heat = self.heat  # lives as long as the gateway: run() closes it once the requests under way are done
        while True:
            self._explain_wake.clear()
            waiting = [r for r in self.outbox.to_explain(most + len(in_flight)) if r.id not in in_flight]
            if not waiting or len(in_flight) >= most:
                try:
                    async with asyncio.timeout(5.0):
                        await self._explain_wake.wait()
                except TimeoutError:
                    pass
                continue
            row = waiting[0]
            try:
                st = self.stations.get(row.station)
                if st is None:
                    raise ImageUnavailable(f"station {row.station} is no longer configured")
                ct, rgb = await self._images(st, row)
                if info is None:
                    info = await asyncio.to_thread(_serving_info, self.cfg.triton)
                inspection: Inspection = await self._sent(heat.inspect(ct, row.meta, rgb, row.cell_id))
            except Exception as e:
                error = getattr(e, "error", None)
                if (isinstance(error, CellError) and service_fault(error)) or (
                    info is None and not isinstance(e, ImageUnavailable)
                ):
                    log.warning(
                        "cell %s: explanation waits for the service (%s); again in %.1f s", row.cell_id, e, pause
                    )
                    await asyncio.sleep(pause)  # the cell stays in the outbox's waiting list
                    pause = min(longest, pause * 2)
                    continue
                metrics.ERRORS.labels("explain_skipped").inc()
                log.warning("cell %s: not explained: %s", row.cell_id, e)
                self.outbox.explained(row.id)
                continue
            pause = first
            in_flight.add(row.id)
            done = asyncio.wrap_future(
                self.pipeline.submit(
                    Case(
                        inspection,
                        ct,
                        row.meta,
                        rgb,
                        info["ct"],
                        info["rgb"],
                        {"station": row.station, "ct_path": row.ct_path, "rgb_path": row.rgb_path},
                    )
                )
            )
            done.add_done_callback(lambda _, row_id=row.id: reported(row_id))


def _tls(t: Triton) -> dict:
    return {"ssl": t.tls_ca is not None, "root_certificates": str(t.tls_ca) if t.tls_ca else None}


def triton_client(
    t: Triton, heatmaps: bool = False, backoff=None, model: str = api.INSPECT, timeout=None, url: str | None = None
):
    """The asyncio client for the configuration's Triton (address, timeout, TLS), or another address of it."""

    return AsyncInspectionClient(
        url or t.url, model=model, timeout=timeout or t.timeout_s, heatmaps=heatmaps, backoff=backoff, **_tls(t)
    )


def _serving_info(t: Triton) -> dict:
    """The models' serving facts (input sizes, normalisation) that explanation reports need."""

    with InspectionClient(t.url, timeout=t.timeout_s, **_tls(t)) as client:
        return client.serving_info()
