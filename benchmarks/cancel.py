"""Clients that give up: requests to `inspect` cancelled at random moments, and whether the server lives.

Every round sends 16 requests, each given up in one of four ways a line meets:

  deadline      tritonclient with a deadline drawn between 5 ms and 1.5x the answer time
  cancel        tritonclient without a deadline, cancelled explicitly at such a moment
  raw_deadline  a stub generated from Triton's grpc_service.proto (no tritonclient), with such a deadline
  dropped       the raw stub on a connection of its own, closed at such a moment

Rounds are paced to the server's speed (a round's work, at the answer time measured alone,
spread over the cores), so cancellations land while requests are queued, computed and answered.
After each round the server must still run; after the last, every one of a set of ordinary
requests must be answered.

  python -m benchmarks cancel [--requests 2000] [--untrained full] [--no-front]

`--no-front` serves with tritonserver's own gRPC endpoint (no serving.front), to measure how
soon tritonserver 2.51 crashes without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import threading
import time
from collections import Counter, defaultdict

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from client.inspection import Cell
from client.service import build_inputs, requested_outputs
from core import interface as api

WAYS = ("deadline", "cancel", "raw_deadline", "dropped")


def raw_request(cell: Cell) -> service_pb2.ModelInferRequest:
    """One cell's `inspect` request built from the proto alone, as an integrator without tritonclient would."""
    request = service_pb2.ModelInferRequest(model_name=api.INSPECT)
    for name, datatype, shape in (
        (api.CT_IMAGE, "BYTES", [1, 1]),
        (api.CT_META, "FP32", [1, 2]),
        (api.RGB_IMAGE, "BYTES", [1, 1]),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    # BYTES in raw_input_contents: each element as a 4-byte little-endian length and the bytes
    request.raw_input_contents.append(struct.pack("<I", len(cell.ct)) + cell.ct)
    request.raw_input_contents.append(np.asarray(cell.meta, np.float32).reshape(1, 2).tobytes())
    request.raw_input_contents.append(struct.pack("<I", len(cell.rgb)) + cell.rgb)
    return request


def _code(error) -> str:
    if error is None:
        return "answered"
    code = error.code() if hasattr(error, "code") and callable(error.code) else None
    if code is not None:
        return code.name
    status = error.status() if hasattr(error, "status") else None
    return str(status or type(error).__name__).replace("StatusCode.", "")


def answer_time(url: str, cells: list[Cell], tries: int = 3) -> float:
    """Median seconds for one cell alone (after one request to warm up)."""
    with grpcclient.InferenceServerClient(url) as client:
        times = []
        for k in range(tries + 1):
            t0 = time.perf_counter()
            client.infer(api.INSPECT, build_inputs([cells[k % len(cells)]]), outputs=requested_outputs(True))
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def storm(
    url: str,
    cells: list[Cell],
    requests: int,
    exited=lambda: None,
    per_round: int = 16,
    seed: int = 0,
    cores: int | None = None,
    later: int = 8,
    progress=print,
) -> dict:
    """Send `requests` cancelled requests in rounds, then `later` ordinary ones.

    `exited()` says why the server stopped (None while it runs); the storm stops at the first
    round after which it did."""
    rng = random.Random(seed)
    t = answer_time(url, cells)
    cores = cores or len(os.sched_getaffinity(0))
    period = per_round * t / cores
    outcomes: dict[str, Counter] = defaultdict(Counter)
    lock = threading.Lock()
    pending: list[threading.Event] = []
    client = grpcclient.InferenceServerClient(url)
    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    timers: list[threading.Timer] = []

    def finisher(way: str, done: threading.Event):
        """Records the request's outcome once: its answer, its error, or the client's own cancel."""

        def finish(code: str):
            with lock:
                if done.is_set():
                    return
                outcomes[way][code] += 1
                done.set()

        return finish

    def moment() -> float:
        return rng.uniform(0.005, 1.5 * t)

    def later_on(seconds: float, action):
        timer = threading.Timer(seconds, action)
        timer.start()
        timers.append(timer)

    def on_future(finish):
        return lambda f: finish("CANCELLED" if f.cancelled() else _code(f.exception()))

    def send(way: str, cell: Cell):
        done = threading.Event()
        pending.append(done)
        finish = finisher(way, done)
        if way in ("deadline", "cancel"):
            ctx = client.async_infer(
                api.INSPECT,
                build_inputs([cell]),
                lambda result, error: finish(_code(error)),
                outputs=requested_outputs(True),
                client_timeout=moment() if way == "deadline" else None,
            )
            if way == "cancel":  # tritonclient calls no callback for a request it cancelled
                later_on(moment(), lambda: (ctx.cancel(), finish("CANCELLED")))
        elif way == "raw_deadline":
            stub.ModelInfer.future(raw_request(cell), timeout=moment()).add_done_callback(on_future(finish))
        else:  # dropped: a connection of its own, closed under the request
            own = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1)])
            future = service_pb2_grpc.GRPCInferenceServiceStub(own).ModelInfer.future(raw_request(cell))
            future.add_done_callback(on_future(finish))
            later_on(moment(), own.close)

    started, rounds, gone = time.perf_counter(), 0, None
    sent = 0
    while sent < requests and gone is None:
        round_start = time.perf_counter()
        for _ in range(min(per_round, requests - sent)):
            send(rng.choice(WAYS), rng.choice(cells))
            sent += 1
        for done in pending:
            done.wait(timeout=30 + 2 * t)
        pending.clear()
        rounds += 1
        time.sleep(max(0.0, period - (time.perf_counter() - round_start)))
        gone = exited()
        if rounds % 10 == 0 or gone:
            progress(f"  round {rounds}: {sent} requests given up so far; server {'gone: ' + gone if gone else 'up'}")
    for timer in timers:
        timer.join()
    answered = 0
    if gone is None:
        time.sleep(min(30.0, 4 * period))  # what the server still computes for clients that left
        for k in range(later):
            try:
                client.infer(api.INSPECT, build_inputs([cells[k % len(cells)]]), outputs=requested_outputs(True))
                answered += 1
            except Exception as e:  # counted: a later request that fails is the finding
                progress(f"  later request {k} failed: {e}")
        gone = exited()
    client.close()
    channel.close()
    return {
        "answer_s": round(t, 4),
        "requests": sent,
        "rounds": rounds,
        "seconds": round(time.perf_counter() - started, 1),
        "outcomes": {w: dict(c) for w, c in sorted(outcomes.items())},
        "server_exit": gone,
        "later_sent": later,
        "later_answered": answered,
    }


def parser() -> argparse.ArgumentParser:
    from benchmarks.serving import add_served_arguments  # noqa: PLC0415 - torch only for the command

    p = argparse.ArgumentParser(
        prog="python -m benchmarks cancel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_served_arguments(p)
    p.add_argument("--requests", type=int, default=2000, help="requests given up in all (default 2000)")
    p.add_argument("--per-round", type=int, default=16, help="requests per round (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ways and moments (default 0)")
    p.add_argument(
        "--no-front", dest="front", action="store_false", help="tritonserver's own gRPC endpoint, without serving.front"
    )
    return p


def main(argv=None) -> int:
    from benchmarks.measure import machine  # noqa: PLC0415
    from benchmarks.serving import prepare, results_folder_and_server  # noqa: PLC0415

    args = parser().parse_args(argv)
    _, data, cells, _ = prepare(args)
    folder, server = results_folder_and_server(args, "cancel", front=args.front)
    front = "with" if args.front else "without"
    print(f"{front} the gRPC front; {args.requests} requests given up, {args.per_round} a round")
    try:
        result = storm(server.grpc_url, cells, args.requests, server.exited, args.per_round, args.seed)
    finally:
        server.stop()
    result |= {"front": args.front, "data": str(data), "machine": machine()}
    (folder / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"results in {folder}")
    return 0 if result["server_exit"] is None and result["later_answered"] == result["later_sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
