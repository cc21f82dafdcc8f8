"""The client's own Prometheus metrics (prometheus-client), beside Triton's on the server.

    python -m client inspect-dir DIR --metrics-port 9101     # http://HOST:9101/metrics while it runs

- `battery_client_requests_total{model}`: inspection requests sent;
- `battery_client_errors_total{model, kind}`: failed requests by kind (the gRPC status:
  invalid_argument for a bad cell, unavailable, deadline_exceeded, ...);
- `battery_client_retries_total{model}`: requests sent again after a service fault;
- `battery_client_request_seconds{model}`: end-to-end latency histogram (build the request,
  wait, decode the answer);
- `battery_client_cells_total{verdict}`: cells answered, by verdict;
- `battery_explain_backlog`: flagged cells waiting for or in explanation;
- `battery_explain_parts_total{part, status}` and `battery_explain_seconds{part}`: the
  explanation workers' results (ok, unavailable, skipped) and durations.

One process-wide registry (prometheus-client's default), so every client and pipeline in a
process adds to the same series.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from client.inspection import error_kind

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("battery_client_requests", "Inspection requests sent", ["model"])
ERRORS = Counter("battery_client_errors", "Failed inspection requests, by kind (gRPC status)", ["model", "kind"])
RETRIES = Counter(
    "battery_client_retries", "Requests sent again after a service fault (unavailable, restarting)", ["model"]
)
LATENCY = Histogram(
    "battery_client_request_seconds", "End-to-end latency of an inspection request", ["model"], buckets=LATENCY_BUCKETS
)
CELLS = Counter("battery_client_cells", "Cells answered, by verdict", ["verdict"])
EXPLAIN_BACKLOG = Gauge("battery_explain_backlog", "Flagged cells waiting for or in explanation")
EXPLAIN_PARTS = Counter(
    "battery_explain_parts", "Explanation parts written, by explainer and status", ["part", "status"]
)
EXPLAIN_SECONDS = Histogram(
    "battery_explain_seconds",
    "Time one explainer took for one cell",
    ["part"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


@contextmanager
def request(model: str):
    """Count and time one request; an exception leaving the block is counted as an error of its kind."""
    REQUESTS.labels(model).inc()
    start = time.perf_counter()
    try:
        yield
    except Exception as e:
        ERRORS.labels(model, error_kind(e)).inc()
        raise
    finally:
        LATENCY.labels(model).observe(time.perf_counter() - start)


def answered(results) -> None:
    for r in results:
        CELLS.labels(r.verdict).inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose this process's metrics on http://addr:port/metrics (a daemon thread)."""
    start_http_server(port, addr=addr)
