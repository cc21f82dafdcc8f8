"""The gRPC front of a local tritonserver 2.51: clients may cancel, the server never sees it.

tritonserver 2.51 (the server the nvidia-pytriton wheel carries, what runs here and in CI)
crashes with Signal 11 when a gRPC request is cancelled while its answer is being sent: the
ensemble's response reaches the gRPC frontend after the frontend released the request's
state (Triton's issue 7368, fixed from 25.01 on; pull requests 7840, 8078 and 8220). A
client's deadline that passes mid-request, an explicit cancel or a dropped connection is
such a cancellation, so one impatient client could take the server, and every other
station's requests in flight, down (reproduced: rounds of 16 requests with deadlines
between 5 ms and the answer time crash it within 3-7 rounds).

The front answers the public gRPC port and forwards every call, byte for byte and with
its metadata (the admin key), to tritonserver on a loopback port, without a deadline.
When a client goes away, its call here ends, but the forwarded request runs to its end
and its answer is dropped: tritonserver never receives a cancellation. Everything else
(status codes, messages, message sizes, TLS) is as tritonserver's own gRPC endpoint. The
NGC image of docker/ runs a release with the fix and needs no front.

    python -m serving.front --listen 0.0.0.0:8001 --backend 127.0.0.1:18001

The front also sheds overload (`--takt SECONDS`): a request that could not be answered
within the takt, judged by how late the last answers came, is refused at once with
UNAVAILABLE "overloaded: ..." instead of waiting in a queue (`Admission`); a client retries
it on another replica. Measured: docs/operations.md ("Overload").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import time
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
BACKEND_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# the headers gRPC itself sets per hop; everything else (the admin key, user headers) is forwarded
HOP_HEADERS = {"user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "te", "content-type"}


def methods() -> dict[str, tuple[bool, bool]]:
    """'/inference.GRPCInferenceService/ModelInfer' -> (client streaming, server streaming), from Triton's proto."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {f"/{SERVICE}/{m.name}": (m.client_streaming, m.server_streaming) for m in service.methods}


INFER = f"/{SERVICE}/ModelInfer"
STAGED_SUFFIX = "_staged"  # core.interface.STAGED_SUFFIX: a release under trial, never the line's


def model_name(request: bytes) -> str:
    """The model a serialized ModelInferRequest names, read from its first field without parsing
    the rest (the images): field 1, `model_name`, which every client serializes first."""
    if len(request) < 2 or request[0] != 0x0A:
        return service_pb2.ModelInferRequest.FromString(request).model_name
    length, shift, i = 0, 0, 1
    while i < len(request):
        byte = request[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    return request[i : i + length].decode("utf-8", "replace")


class FrontMetrics:
    """What the front does, for Prometheus (`--metrics-port`): inference requests by model and outcome
    (answered, error, overloaded: refused at once, gone: the client left before the answer), the
    requests in flight and the limit in force (0: none yet)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge  # noqa: PLC0415 - only with a port

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "battery_front_requests",
            "Inference requests through the gRPC front, by model and outcome",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge("battery_front_in_flight", "Inference requests in flight", registry=self.registry)
        self.limit = Gauge(
            "battery_front_limit",
            "Requests in flight the server answers within the takt, as learnt (0: no limit yet)",
            registry=self.registry,
        )
        for model in ("inspect", "inspect_ct", "inspect_rgb"):
            for outcome in OUTCOMES:
                self.requests.labels(model, outcome)

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server  # noqa: PLC0415

        start_http_server(port, registry=self.registry)

    def count(self, model: str, outcome: str, admission: Admission) -> None:
        self.requests.labels(model, outcome).inc()
        self.in_flight.set(admission.in_flight)
        self.limit.set(admission.limit or 0)


OUTCOMES = ("answered", "error", "overloaded", "gone")


class Admission:
    """Whether a new request can still be answered within the takt: a limit on requests in flight,
    learnt from the answers' own times (so it follows the load, the models and the CPU it runs on).

    The limit is adjusted as TCP adjusts its window (additive increase, multiplicative decrease),
    against a target answer time of half the takt (a margin for the tail): an answer later than
    the target cuts the limit to 0.8 x what it was (at most once per answer time, so a burst of
    late answers from one congested moment counts once); an answer within the target while the
    limit was reached raises it by 1/limit (one place per limit's worth of answers). A request
    that finds the limit reached is refused at once. A staged release's request (shadow or
    comparison traffic) is admitted only within half the limit, so it never takes the line's
    last places. Until the first late answer there is no limit.
    """

    def __init__(self, takt: float):
        self.takt = takt
        self.target = 0.5 * takt
        self.in_flight = 0
        self.window: float | None = None  # the limit, before rounding down
        self.last_cut = float("-inf")
        self.admitted = self.refused = 0

    @property
    def limit(self) -> int | None:
        return None if self.window is None else max(1, int(self.window))

    def admit(self, model: str) -> str | None:
        """None to admit the request, else why it is refused."""
        limit = self.limit
        if limit is not None and model.endswith(STAGED_SUFFIX):
            limit = max(1, limit // 2)
        if self.takt > 0 and limit is not None and self.in_flight >= limit:
            self.refused += 1
            return (
                f"overloaded: {self.in_flight} requests in flight, as many as this server answers within the "
                f"takt of {self.takt:g} s; send it to another replica or again later"
            )
        self.admitted += 1
        self.in_flight += 1
        return None

    def done(self, started: float, ahead: int, now: float) -> None:
        self.in_flight -= 1
        if self.takt <= 0:
            return
        took = now - started
        if took > self.target:
            if now - self.last_cut > took:
                base = ahead + 1 if self.window is None else self.window
                self.window = max(1.0, 0.8 * base)
                self.last_cut = now
        elif self.window is not None and ahead + 1 >= self.limit:
            self.window += 1.0 / self.window


class Forwarder(grpc.GenericRpcHandler):
    """Every method of Triton's gRPC service, forwarded to `backend` and shielded from cancellation."""

    def __init__(self, backend: str, takt: float = 0.0, metrics: FrontMetrics | None = None):
        # reconnect within 0.1-0.5 s, not gRPC's default backoff of up to 2 minutes: tritonserver is on
        # loopback, and a channel waiting out its backoff would refuse every call for a server that is up
        self.channel = grpc.aio.insecure_channel(backend, options=UNLIMITED + BACKEND_RECONNECT)
        self.admission = Admission(takt)
        self.metrics = metrics
        self.methods = methods()
        self.detached: set[asyncio.Future] = set()  # forwarded calls whose client went away
        self.absorbed = 0  # cancellations kept from the server

    def service(self, details):
        kind = self.methods.get(details.method)
        if kind is None:
            return None  # UNIMPLEMENTED, as tritonserver answers an unknown method
        if kind == (False, False):
            return grpc.unary_unary_rpc_method_handler(self._unary(details.method))
        return grpc.stream_stream_rpc_method_handler(self._stream(details.method))

    def _count(self, model: str, outcome: str) -> None:
        if self.metrics is not None and model:
            self.metrics.count(model, outcome, self.admission)

    def _detach(self, future: asyncio.Future) -> None:
        self.absorbed += 1
        self.detached.add(future)
        future.add_done_callback(self.detached.discard)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed: no "never retrieved" noise

    def _unary(self, method: str):
        call = self.channel.unary_unary(method)
        infer = method == INFER

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            model = model_name(request) if infer else ""
            if infer:
                refused = self.admission.admit(model)
                if refused:
                    self._count(model, "overloaded")
                    await context.abort(grpc.StatusCode.UNAVAILABLE, refused)
                started, ahead = time.monotonic(), self.admission.in_flight - 1
            answer = asyncio.ensure_future(call(request, metadata=_metadata(context)))
            if infer:
                answer.add_done_callback(lambda _: self.admission.done(started, ahead, time.monotonic()))
            try:
                reply = await asyncio.shield(answer)
                self._count(model, "answered")
                return reply
            except asyncio.CancelledError:
                if not answer.done():
                    self._detach(answer)
                self._count(model, "gone")
                raise
            except grpc.aio.AioRpcError as e:
                self._count(model, "error")
                await context.abort(e.code(), plain(e.details() or ""))

        return forward

    def _stream(self, method: str):
        call = self.channel.stream_stream(method)

        async def forward(requests, context: grpc.aio.ServicerContext):
            upstream = call(metadata=_metadata(context))

            async def send():
                async for request in requests:
                    await upstream.write(request)
                await upstream.done_writing()

            sender = asyncio.ensure_future(send())
            try:
                async for response in upstream:
                    yield response
                await sender
            except asyncio.CancelledError:
                # the client went away: close the stream's sending side and let the server finish
                sender.cancel()
                self._detach(asyncio.ensure_future(_drain(upstream)))
                raise
            except grpc.aio.AioRpcError as e:
                sender.cancel()
                await context.abort(e.code(), e.details() or "")

        return forward


async def _drain(upstream) -> None:
    with contextlib.suppress(Exception):
        await upstream.done_writing()
    with contextlib.suppress(Exception):
        async for _ in upstream:
            pass


_TRITON_PREFIX = re.compile(r"^(\[request id: [^\]]*\] )?(in ensemble '[^']*', )?")


def plain(message: str) -> str:
    """An error message as the model that refused the request wrote it: without the prefixes
    tritonserver puts before it (`[request id: ...] `, `in ensemble 'inspect', `)."""
    return _TRITON_PREFIX.sub("", message, count=1)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


async def _watch(pid: int, stop: asyncio.Event, every: float = 0.2) -> None:
    """Set `stop` when tritonserver exits: a front that kept answering UNAVAILABLE for a dead server
    would look alive to clients (gRPC keeps sending to a connected replica, and counts its errors
    against it), where a closed port sends them to the other replicas at once and a restarted
    server is found within a reconnection."""
    while process_alive(pid):
        await asyncio.sleep(every)
    stop.set()


def _metadata(context) -> tuple:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k not in HOP_HEADERS)


async def serve(
    listen: str,
    backend: str,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    takt: float = 0.0,
    metrics_port: int = 0,
    max_connection_age: float = 0.0,
    backend_pid: int | None = None,
) -> None:
    metrics = FrontMetrics() if metrics_port else None
    if metrics:
        metrics.serve(metrics_port)
    forwarder = Forwarder(backend, takt, metrics)
    options = list(UNLIMITED)
    if max_connection_age > 0:  # clients reconnect at this age, resolving a DNS name again (new replicas)
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age * 500)),
        ]
    server = grpc.aio.server(handlers=[forwarder], options=options)
    if tls_cert:
        credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    shed = f", shedding what cannot be answered within {takt:g} s" if takt > 0 else ""
    print(f"front: {listen} -> tritonserver {backend}{shed}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(_watch(backend_pid, stop)) if backend_pid else None
    await stop.wait()
    if watcher is not None and watcher.done():  # tritonserver is gone: so is this endpoint, at once
        print(f"front: tritonserver (pid {backend_pid}) exited; stopping", flush=True)
        await server.stop(grace=0)
        return
    await server.stop(grace=5)
    if forwarder.detached:  # let tritonserver finish what it was given rather than cancel it
        await asyncio.wait(list(forwarder.detached), timeout=10)
    a = forwarder.admission
    print(
        f"front: stopped; {forwarder.absorbed} cancellation(s) kept from tritonserver, "
        f"{a.admitted} inference request(s) admitted, {a.refused} refused as overload",
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.front",
        description="Forward Triton's gRPC service to a tritonserver on loopback, never passing a client's "
        "cancellation on (tritonserver 2.51 can crash on one).",
    )
    p.add_argument("--listen", required=True, help="address to serve, e.g. 0.0.0.0:8001")
    p.add_argument("--backend", required=True, help="tritonserver's gRPC address, e.g. 127.0.0.1:18001")
    p.add_argument(
        "--takt",
        type=float,
        default=0.0,
        help="refuse at once (UNAVAILABLE, 'overloaded: ...') an inference request that would not be answered "
        "within this many seconds, judged by how late the last answers came (default 0: never)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve battery_front_* metrics for Prometheus here (default: none)"
    )
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="close client connections at this age (half as long again to finish their calls), so that "
        "clients of a DNS name find new replicas (default 0: never)",
    )
    p.add_argument(
        "--backend-pid", type=int, help="tritonserver's process: the front stops when it exits (default: never)"
    )
    p.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this certificate (PEM) ...")
    p.add_argument("--tls-key", type=Path, help="... and this key")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("TLS needs both --tls-cert and --tls-key")
    try:
        asyncio.run(
            serve(
                args.listen,
                args.backend,
                args.tls_cert,
                args.tls_key,
                args.takt,
                args.metrics_port,
                args.max_connection_age,
                args.backend_pid,
            )
        )
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
