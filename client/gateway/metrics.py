"""The gateway's Prometheus metrics (prometheus-client; `metrics_port` in the configuration).

- `battery_gateway_triggers_total{station}`: cells triggered by the PLC (repeats not counted);
- `battery_gateway_repeat_triggers_total{station}`: triggers for a cell the outbox already held
  (answered from the outbox, not inspected again);
- `battery_gateway_answers_total{station, timing}`: results written to the PLC, `within_takt`
  or `late` (trigger seen -> ResultCounter written, against the station's takt);
- `battery_gateway_answer_seconds{station}`: that time, as a histogram;
- `battery_gateway_verdicts_total{station, verdict}`: results by verdict (`error` for a cell the
  service refused);
- `battery_gateway_outbox_cells{state}`: cells in the outbox by state (pending, answered,
  writing, written);
- `battery_gateway_errors_total{kind}`: plc_connect, plc_lost, plc_rejected, triton_retry
  (the service unavailable, retried), refused (a cell the service refused), image (an image
  file missing or unreadable), explain_skipped, plc_subscribe (the PLC refused the subscription:
  watched nodes are polled), archive (a cell could not be written to the line archive);
- `battery_gateway_plc_requests_total{kind}`: OPC UA Read and Write requests sent to the PLC
  (`read`, `write`): the load the gateway puts on the PLC;
- `battery_gateway_plc_connected`: 1 while the OPC UA session is up.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRIGGERS = Counter("battery_gateway_triggers", "Cells triggered by the PLC (repeats not counted)", ["station"])
REPEATS = Counter("battery_gateway_repeat_triggers", "Triggers for a cell already in the outbox", ["station"])
ANSWERS = Counter("battery_gateway_answers", "Results written to the PLC, within takt or late", ["station", "timing"])
ANSWER_SECONDS = Histogram(
    "battery_gateway_answer_seconds",
    "Trigger seen -> result written to the PLC",
    ["station"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
VERDICTS = Counter("battery_gateway_verdicts", "Results written to the PLC, by verdict", ["station", "verdict"])
OUTBOX = Gauge("battery_gateway_outbox_cells", "Cells in the outbox, by state", ["state"])
ERRORS = Counter("battery_gateway_errors", "Gateway errors by kind", ["kind"])
ERROR_KINDS = (
    "plc_connect",
    "plc_lost",
    "plc_rejected",
    "plc_subscribe",
    "triton_retry",
    "refused",
    "image",
    "explain_skipped",
    "archive",
)
PLC_REQUESTS = Counter("battery_gateway_plc_requests", "OPC UA Read and Write requests sent to the PLC", ["kind"])


def start(stations) -> None:
    """Every series at 0 from the start (rates and alerts then work before the first event)."""
    for kind in ERROR_KINDS:
        ERRORS.labels(kind)
    for kind in ("read", "write"):
        PLC_REQUESTS.labels(kind)
    for station in stations:
        TRIGGERS.labels(station)
        REPEATS.labels(station)
        for timing in ("within_takt", "late"):
            ANSWERS.labels(station, timing)


PLC_CONNECTED = Gauge("battery_gateway_plc_connected", "1 while the OPC UA session to the PLC is up")
