"""gRPC clients of the inspection service: `InspectionClient` (sync) and `AsyncInspectionClient`.

with InspectionClient("localhost:8001") as client:     # or "host1:8001,host2:8001", or "dns:///name:8001"
    result = client.inspect(ct_bytes, "cell,z", rgb_bytes)
    print(result.verdict, result.confidence)
    results = client.inspect_many(cells, concurrency=8)   # one Inspection or CellError per cell, in order

Several replicas are balanced and failed over by gRPC itself (client/channel.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio
from tritonclient.utils import InferenceServerException

from client import channel, metrics
from client.inspection import Cell, CellError, Inspection, InspectionFailed, error_kind, parse_meta
from core import interface as api
from core.facts import CONFIG_KEY, ServingFacts

HEATMAPS = (api.CT_CAM, api.RGB_ERROR_MAP)


def build_inputs(cells: list[Cell]) -> list[grpcclient.InferInput]:
    """The `inspect` request for a batch of cells."""
    n = len(cells)
    ct = grpcclient.InferInput(api.CT_IMAGE, [n, 1], "BYTES")
    ct.set_data_from_numpy(np.array([[c.ct] for c in cells], dtype=object))
    meta = grpcclient.InferInput(api.CT_META, [n, 2], "FP32")
    meta.set_data_from_numpy(np.array([c.meta for c in cells], dtype=np.float32).reshape(n, 2))
    rgb = grpcclient.InferInput(api.RGB_IMAGE, [n, 1], "BYTES")
    rgb.set_data_from_numpy(np.array([[c.rgb] for c in cells], dtype=object))
    return [ct, meta, rgb]


def requested_outputs(heatmaps: bool) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(n) for n in api.INSPECT_OUTPUTS if heatmaps or n not in HEATMAPS]


def cell_error(exc: Exception, cell_id: str) -> CellError:
    if isinstance(exc, InferenceServerException):
        return CellError(cell_id, error_kind(exc), exc.message() or str(exc))
    return CellError(cell_id, type(exc).__name__, str(exc))


def _failed(exc: InferenceServerException, cells: list[Cell]) -> InspectionFailed:
    return InspectionFailed(cell_error(exc, cells[0].cell_id if len(cells) == 1 else ""))


def _as_error(exc: Exception, cell: Cell) -> CellError:
    """What `inspect_many` puts in a failed cell's place: the service's reason, or the transport's."""
    return exc.error if isinstance(exc, InspectionFailed) else cell_error(exc, cell.cell_id)


def _results(result, cells: list[Cell], heatmaps: bool) -> list[Inspection]:
    names = [n for n in api.INSPECT_OUTPUTS if heatmaps or n not in HEATMAPS]
    outputs = {n: result.as_numpy(n) for n in names}
    return [Inspection.from_outputs(outputs, i, c.cell_id) for i, c in enumerate(cells)]


_CELL_NAMED = re.compile(r"\bcell (\d+): ")


def _refused_cell(error: CellError, n: int) -> tuple[int, CellError] | None:
    """(index, that cell's own error) when the service refused a request of n cells because of one named cell."""
    m = _CELL_NAMED.search(error.message)
    if error.kind != "invalid_argument" or m is None or not 0 <= int(m.group(1)) < n:
        return None
    return int(m.group(1)), dataclasses.replace(error, message=error.message[m.end() :])


STOPPING = (
    "is not healthy",  # a crashed Python-backend process
    "has no available versions",  # a stopping server unloading its models (NOT_FOUND)
)


def retryable(error: CellError) -> bool:
    """A fault of the service rather than of the cell (unreachable, restarting or stopping, a
    crashed backend process): worth sending again after a pause. A refused cell is never retried."""
    return error.kind == "unavailable" or any(s in error.message for s in STOPPING)


class Backoff:
    """Pauses between attempts: `first` seconds, doubling up to `longest`, with jitter so that
    many clients do not come back at the same instant."""

    def __init__(self, retries: int = 5, first: float = 0.5, longest: float = 8.0):
        if retries < 0 or first <= 0 or longest < first:
            raise ValueError("retries must be >= 0 and 0 < first <= longest")
        self.retries, self.first, self.longest = retries, first, longest

    def pause(self, attempt: int) -> float:
        return min(self.first * 2**attempt, self.longest) * random.uniform(0.5, 1.0)


def _cell(ct_bytes, meta, rgb_bytes, cell_id) -> Cell:
    return Cell(bytes(ct_bytes), parse_meta(meta), bytes(rgb_bytes), cell_id)


class InspectionClient:
    """Synchronous client (thread-safe: `inspect_many` runs requests from a thread pool).

    `url`: one server's HOST:PORT, several replicas' (a list, or separated by commas), or
    dns:///NAME:PORT for every address of a name; requests are spread over them and moved off
    a replica that fails (client/channel.py)."""

    def __init__(
        self,
        url: str | list[str] = "localhost:8001",
        model: str = api.INSPECT,
        timeout: float = 60.0,
        heatmaps: bool = True,
        ssl: bool = False,
        root_certificates: str | None = None,
        backoff: Backoff | None = None,
    ):
        self.url, self.model, self.timeout, self.heatmaps = url, model, timeout, heatmaps
        self.backoff = backoff or Backoff()
        self._client = grpcclient.InferenceServerClient(
            channel.target(url), ssl=ssl, root_certificates=root_certificates, channel_args=channel.channel_args()
        )

    def ready(self) -> bool:
        """Whether the server is up and the inspect model is ready."""
        try:
            return self._client.is_server_ready() and self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    def models_ready(
        self,
        names=(
            api.INSPECT,
            api.INSPECT_CT,
            api.INSPECT_RGB,
            api.PREPROCESS,
            api.CT_CLASSIFIER,
            api.RGB_AUTOENCODER,
            api.VERDICT_MODEL,
        ),
    ) -> dict[str, bool]:
        """Whether each model of the service is loaded and ready (False where the server cannot say)."""
        out = {}
        for name in names:
            try:
                out[name] = bool(self._client.is_model_ready(name))
            except InferenceServerException:
                out[name] = False
        return out

    def serving_info(self) -> dict[str, ServingFacts]:
        """The models' serving facts (input size, normalisation, classes, score definition) as
        the repository's preprocessing models hold them: {"ct": {...}, "rgb": {...}}. Explanations
        use them to draw the heatmaps on the same view of the image the models saw. They are the
        facts of the release this client's ensemble runs (the one in service, or the staged one)."""
        release = self.release()
        out = {}
        for side, model in (("ct", api.CT_PREPROCESS), ("rgb", api.RGB_PREPROCESS)):
            config = self._client.get_model_config(model, as_json=True)["config"]
            params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
            out[side] = ServingFacts.from_json(api.release_view(params, release)[CONFIG_KEY])
        return out

    def release(self) -> int:
        """The release this client's ensemble runs (the version its steps are pinned to; 1 where none is)."""
        steps = self._client.get_model_config(self.model, as_json=True)["config"]["ensemble_scheduling"]["step"]
        versions = {int(s.get("model_version", -1)) for s in steps}
        return versions.pop() if len(versions) == 1 and -1 not in versions else 1

    def inspect(self, ct_bytes: bytes, meta, rgb_bytes: bytes, cell_id: str = "") -> Inspection:
        """One cell; raises `InspectionFailed` with the service's reason on error."""
        return self.inspect_batch([_cell(ct_bytes, meta, rgb_bytes, cell_id)])[0]

    def inspect_batch(self, cells: list[Cell]) -> list[Inspection]:
        """Several cells in one request (one error fails them all: use inspect_cells or inspect_many to isolate).

        A service fault (unreachable, restarting) is retried with backoff (`backoff`); the last
        attempt's error is raised."""
        for attempt in range(self.backoff.retries + 1):
            try:
                return self._inspect_batch_once(cells)
            except InspectionFailed as e:
                if attempt == self.backoff.retries or not retryable(e.error):
                    raise
                metrics.RETRIES.labels(self.model).inc()
                time.sleep(self.backoff.pause(attempt))
        raise AssertionError("unreachable")

    def _inspect_batch_once(self, cells: list[Cell]) -> list[Inspection]:
        with metrics.request(self.model):
            try:
                result = self._client.infer(
                    self.model,
                    build_inputs(cells),
                    outputs=requested_outputs(self.heatmaps),
                    client_timeout=self.timeout,
                )
            except InferenceServerException as e:
                raise _failed(e, cells) from None
            results = _results(result, cells, self.heatmaps)
        metrics.answered(results)
        return results

    def inspect_cells(self, cells: list[Cell]) -> list[Inspection | CellError]:
        """Several cells in one request, one result or one error per cell, in order.

        When the service refuses the request because of one cell (its error names "cell i"),
        that cell gets its error and the others are sent again without it; an error that names
        no cell is tried cell by cell, so exactly the bad cells get errors."""
        results: list = [None] * len(cells)
        pending = list(range(len(cells)))
        while pending:
            batch = [cells[i] for i in pending]
            try:
                for i, r in zip(pending, self.inspect_batch(batch)):
                    results[i] = r
                break
            except Exception as e:
                error = _as_error(e, batch[0])
                refused = _refused_cell(error, len(batch))
                if refused is not None:
                    k, own = refused
                    i = pending.pop(k)
                    results[i] = dataclasses.replace(own, cell_id=cells[i].cell_id)
                elif len(batch) == 1:
                    results[pending.pop()] = dataclasses.replace(error, cell_id=batch[0].cell_id)
                else:
                    for i in pending:
                        results[i] = self.inspect_cells([cells[i]])[0]
                    break
        return results

    def iter_inspect(self, cells: Iterable[Cell], concurrency: int = 8) -> Iterator[Inspection | CellError]:
        """Pipelines the cells, at most `concurrency` requests in flight; yields one result per cell, in order.

        Cells are read from the iterable only as the window moves, so a generator of cells
        over a large folder never holds more than a window of images in memory.
        """

        def one(cell: Cell) -> Inspection | CellError:
            try:
                return self.inspect_batch([cell])[0]
            except Exception as e:  # a transport failure too is this cell's error, not the end of the run
                return _as_error(e, cell)

        window: collections.deque = collections.deque()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for cell in cells:
                window.append(pool.submit(one, cell))
                if len(window) >= concurrency:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def inspect_many(self, cells: Iterable[Cell], concurrency: int = 8) -> list[Inspection | CellError]:
        return list(self.iter_inspect(cells, concurrency))

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncInspectionClient:
    """asyncio client over tritonclient.grpc.aio."""

    def __init__(
        self,
        url: str | list[str] = "localhost:8001",
        model: str = api.INSPECT,
        timeout: float = 60.0,
        heatmaps: bool = True,
        ssl: bool = False,
        root_certificates: str | None = None,
        backoff: Backoff | None = None,
    ):

        self.url, self.model, self.timeout, self.heatmaps = url, model, timeout, heatmaps
        self.backoff = backoff or Backoff()
        self._client = aio.InferenceServerClient(
            channel.target(url), ssl=ssl, root_certificates=root_certificates, channel_args=channel.channel_args()
        )

    async def ready(self) -> bool:
        try:
            return await self._client.is_server_ready() and await self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    async def inspect(self, ct_bytes: bytes, meta, rgb_bytes: bytes, cell_id: str = "") -> Inspection:
        return (await self.inspect_batch([_cell(ct_bytes, meta, rgb_bytes, cell_id)]))[0]

    async def inspect_batch(self, cells: list[Cell]) -> list[Inspection]:
        for attempt in range(self.backoff.retries + 1):
            try:
                return await self._inspect_batch_once(cells)
            except InspectionFailed as e:
                if attempt == self.backoff.retries or not retryable(e.error):
                    raise
                metrics.RETRIES.labels(self.model).inc()
                await asyncio.sleep(self.backoff.pause(attempt))
        raise AssertionError("unreachable")

    async def _inspect_batch_once(self, cells: list[Cell]) -> list[Inspection]:
        with metrics.request(self.model):
            try:
                result = await self._client.infer(
                    self.model,
                    build_inputs(cells),
                    outputs=requested_outputs(self.heatmaps),
                    client_timeout=self.timeout,
                )
            except InferenceServerException as e:
                raise _failed(e, cells) from None
            results = _results(result, cells, self.heatmaps)
        metrics.answered(results)
        return results

    async def inspect_many(self, cells: Iterable[Cell], concurrency: int = 8) -> list[Inspection | CellError]:
        """One result or one CellError per cell, in order, with at most `concurrency` requests in flight."""
        limit = asyncio.Semaphore(max(1, concurrency))

        async def one(cell: Cell) -> Inspection | CellError:
            async with limit:
                try:
                    return (await self.inspect_batch([cell]))[0]
                except Exception as e:
                    return _as_error(e, cell)

        return list(await asyncio.gather(*(one(c) for c in cells)))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
