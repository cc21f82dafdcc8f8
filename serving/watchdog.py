"""Keep a tritonserver answering: probe it with a known cell, restart it when inference fails.

Health endpoints stay green when a Python-backend process dies; only inference shows it (see
`core.probe`). `python -m export serve --watchdog SECONDS` runs `watch` around the server it
started.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import tritonclient.http as httpclient

from core import interface as api
from core.probe import check, probe_images
from serving.server import Ports, TritonServer


def probe_http(url: str, timeout: float = 10.0) -> tuple[str | None, float]:
    """(None or the reason it failed, seconds) for the probe cell through `inspect` over Triton's HTTP
    endpoint (plain, so the watchdog beside the server can use it while gRPC runs TLS), without retries."""
    ct, meta, rgb = probe_images()
    start = time.perf_counter()
    try:
        with httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout) as client:
            inputs = []
            for name, array, dtype in (
                (api.CT_IMAGE, np.array([[ct]], object), "BYTES"),
                (api.CT_META, np.array([meta], np.float32), "FP32"),
                (api.RGB_IMAGE, np.array([[rgb]], object), "BYTES"),
            ):
                t = httpclient.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array, binary_data=True)
                inputs.append(t)
            outputs = [
                httpclient.InferRequestedOutput(n, binary_data=True) for n in (api.VERDICT, api.CT_PROBS, api.RGB_SCORE)
            ]
            result = client.infer(api.INSPECT, inputs, outputs=outputs)
            reason = check(result.as_numpy(api.VERDICT), result.as_numpy(api.CT_PROBS), result.as_numpy(api.RGB_SCORE))
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
    return reason, time.perf_counter() - start


def watch(server: TritonServer, interval: float, ports: Ports, start_timeout: float) -> int:
    """Wait on tritonserver; every `interval` seconds send a probe cell through `inspect` (HTTP,
    loopback) and restart the server after two failures in a row, or when it exits by itself.
    (Health endpoints stay green when a Python-backend process dies; only inference shows it.)"""
    if interval <= 0:
        return server.process.wait()
    failures, restarts = 0, 0
    while True:
        try:
            code = server.process.wait(timeout=interval)
            reason = f"tritonserver exited with code {code}"
        except subprocess.TimeoutExpired:
            reason = server.exited()  # its gRPC front (serving.front) may have gone
            if reason is None:
                reason, _ = probe_http(f"127.0.0.1:{ports.http}", timeout=max(5.0, interval))
                failures = failures + 1 if reason else 0
                if failures < 2:
                    continue
                reason = f"the inference probe failed twice: {reason}"
        restarts += 1
        if restarts > 5:
            print(f"watchdog: {reason}; giving up after 5 restarts", file=sys.stderr, flush=True)
            server.stop()
            return 1
        print(f"watchdog: {reason}; restarting tritonserver (restart {restarts})", flush=True)
        server.stop()
        server.start(timeout=start_timeout, foreground=True)
        print("watchdog: tritonserver is ready again", flush=True)
        failures = 0
