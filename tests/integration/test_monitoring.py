"""Monitoring end to end: a real Prometheus (Debian's package) with the shipped rules scrapes a
real tritonserver and a client's metrics endpoint; the shipped config, rules and dashboard are
checked with promtool and against a live scrape."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from client import metrics as client_metrics
from client.dataset import pair_cells
from client.explain.case import Case
from client.explain.explainers import CTHeatmap, RGBErrorMap
from client.explain.pipeline import ExplanationPipeline
from client.inspection import Cell, CellError
from client.service import InspectionClient
from core import interface as api
from export.repository import build_repository
from serving.server import Ports, TritonServer, free_ports
from tests.support.tiny_models import make_ct_run, make_rgb_run

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "battery-inspection.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package is not installed (make setup installs it as root)",
)
GPU_ONLY = re.compile(r"^nv_gpu_")  # Triton exports these only where it sees a GPU


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _query(prom: str, expr: str) -> list[dict]:
    out = json.loads(_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert out["status"] == "success", out
    return out["data"]["result"]


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_dataset):
    """tritonserver with tiny models, a client metrics endpoint, and Prometheus scraping both."""
    root = tmp_path_factory.mktemp("monitoring")
    repo = root / "model_repository"
    build_repository(
        [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64)],
        "python-ort",
        repo,
        progress=lambda *_: None,
    )
    http, grpc, metrics_port, client_port, prom_port, front_port = free_ports(6)
    server = TritonServer(repo, Ports(http, grpc, metrics_port, front_port), log_path=root / "tritonserver.log")
    server.start(timeout=180)
    client_metrics.serve(client_port, addr="127.0.0.1")
    procs = []
    try:
        if PROMETHEUS:
            config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
            config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
            config["rule_files"] = [
                str(PROMETHEUS_DIR / f) for f in config["rule_files"]
            ]  # the shipped rules, loaded for real
            targets = {
                "triton": f"127.0.0.1:{metrics_port}",
                "triton-front": f"127.0.0.1:{front_port}",
                "inspection-client": f"127.0.0.1:{client_port}",
            }
            assert {j["job_name"] for j in config["scrape_configs"]} == {*targets, "line-gateway"}
            config["scrape_configs"] = [
                j for j in config["scrape_configs"] if j["job_name"] in targets
            ]  # no gateway here
            for job in config["scrape_configs"]:
                job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
            (root / "prometheus.yml").write_text(yaml.safe_dump(config))
            log = open(root / "prometheus.log", "w")
            procs.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={root / 'prometheus.yml'}",
                        f"--storage.tsdb.path={root / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            _wait(lambda: _ready(f"http://127.0.0.1:{prom_port}"), 60, "Prometheus to be ready")
        cells, _ = pair_cells(small_dataset[0], progress=False)
        yield {
            "url": server.grpc_url,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "front_metrics": f"http://127.0.0.1:{front_port}/metrics",
            "client_metrics": f"http://127.0.0.1:{client_port}/metrics",
            "prom": f"http://127.0.0.1:{prom_port}",
            "cells": cells,
        }
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        server.stop()


def _ready(prom: str) -> bool:
    try:
        return "Ready" in _get(f"{prom}/-/ready")
    except OSError:
        return False


def _burst(stack, n_bad: int = 2) -> tuple[list, collections.Counter]:
    """Every cell once through `inspect`, plus some undecodable ones; the verdicts the client got."""
    cells = [Cell(c.ct_path.read_bytes(), c.meta, c.rgb_path.read_bytes(), c.cell_id) for c in stack["cells"]]
    bad = [Cell(b"not an image", (0.0, 2.0), cells[0].rgb, f"bad{i}") for i in range(n_bad)]
    with InspectionClient(stack["url"]) as client:
        results = client.inspect_many(cells + bad, concurrency=4)
    assert all(isinstance(r, CellError) and r.kind == "invalid_argument" for r in results[len(cells) :])
    good = results[: len(cells)]
    assert not any(isinstance(r, CellError) for r in good)
    battery = {c.cell_id: ("cell", "module")[int(c.meta[0])] for c in cells}
    return good, collections.Counter((r.verdict, battery[r.cell_id]) for r in good)


def _scrape(text: str) -> dict[str, float]:
    """Sample name with labels -> value, from a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@needs_prometheus
def test_prometheus_sees_the_inspections_and_the_verdicts_the_client_got(stack):
    good, verdicts = _burst(stack)
    n = len(good)
    prom = stack["prom"]
    # Triton's own count of cells through `inspect`, as Prometheus scraped it
    _wait(
        lambda: (
            (r := _query(prom, f'nv_inference_count{{model="{api.INSPECT}"}}')) and float(r[0]["value"][1]) == n or None
        ),
        60,
        f"nv_inference_count for {api.INSPECT} to reach {n}",
    )
    failures = _query(prom, f'sum(nv_inference_request_failure{{model="{api.INSPECT}"}})')
    # the two undecodable cells, refused by the service (tritonserver 2.51 counts a refused
    # ensemble request twice, under reason OTHER; the preprocessing step's error answer once as a success)
    assert float(failures[0]["value"][1]) in (2, 4)
    # the verdict model's counts, by verdict and battery type, equal what the client was told
    series = _wait(
        lambda: (r := _query(prom, "battery_verdicts_total")) and sum(float(s["value"][1]) for s in r) == n and r,
        30,
        "battery_verdicts_total to count every cell",
    )
    seen = {(s["metric"]["verdict"], s["metric"]["battery_type"]): float(s["value"][1]) for s in series}
    assert seen == {k: float(v) for k, v in verdicts.items()}
    classes = _query(prom, "sum(battery_ct_class_total)")
    assert float(classes[0]["value"][1]) == n
    # the client's own series, through the same Prometheus
    _wait(
        lambda: (
            (r := _query(prom, 'sum(battery_client_cells_total{job="inspection-client"})'))
            and float(r[0]["value"][1]) >= n
        ),
        30,
        "the client's answered cells in Prometheus",
    )
    _wait(
        lambda: (
            (r := _query(prom, 'sum(battery_client_errors_total{job="inspection-client", kind="invalid_argument"})'))
            and float(r[0]["value"][1]) >= 2
        ),
        30,
        "the client's invalid_argument errors in Prometheus",
    )
    # the shipped rules are loaded and evaluated against the live data
    rules = json.loads(_get(f"{prom}/api/v1/rules"))["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {
        "DefectRateSpike",
        "InspectionFailures",
        "QueueTimeHigh",
        "TritonDown",
        "battery:defect_rate:ratio_rate10m",
    } <= names
    assert all(r.get("health") == "ok" for g in rules for r in g["rules"]), [
        (r["name"], r.get("lastError")) for g in rules for r in g["rules"]
    ]
    up = _query(prom, 'up{job="triton"}')
    assert float(up[0]["value"][1]) == 1


def test_verdict_metrics_on_tritons_port_match_the_answers(stack):
    before, front_before = _scrape(_get(stack["metrics"])), _scrape(_get(stack["front_metrics"]))
    good, verdicts = _burst(stack, n_bad=0)
    after, front_after = _scrape(_get(stack["metrics"])), _scrape(_get(stack["front_metrics"]))
    answered = 'battery_front_requests_total{model="inspect",outcome="answered"}'
    assert front_after[answered] - front_before.get(answered, 0.0) == len(good)  # the gRPC front counts them too
    assert front_after["battery_front_in_flight"] == 0

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    for (verdict, battery), n in verdicts.items():
        key = f'battery_verdicts_total{{battery_type="{battery}",verdict="{verdict}"}}'
        assert key in after, sorted(k for k in after if k.startswith("battery_verdicts_total"))
        assert delta(key) == n
    assert delta("battery_rgb_anomaly_score_count") == len(good)
    assert delta("battery_rgb_anomaly_score_sum") == pytest.approx(sum(r.rgb_score for r in good), rel=1e-4)
    threshold = after["battery_rgb_threshold"]
    assert threshold == pytest.approx(good[0].rgb_threshold, rel=1e-6)
    # each score lands in its bucket: the +Inf bucket holds all, the threshold's bucket those at or below it
    at_threshold = [k for k in after if k.startswith("battery_rgb_anomaly_score_bucket") and f'le="{threshold:g}"' in k]
    assert at_threshold, "a bucket bound sits on the threshold"
    assert delta(at_threshold[0]) == sum(r.rgb_score <= threshold for r in good)
    assert delta('battery_rgb_anomaly_score_bucket{le="+Inf"}') == len(good)


@needs_prometheus
def test_shipped_prometheus_config_and_rules_pass_promtool():
    for cmd in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run([PROMTOOL, *cmd], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert done.returncode == 0, (cmd, done.stdout, done.stderr)
        assert "SUCCESS" in done.stdout + done.stderr


PROMQL_WORDS = {
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "and",
    "or",
    "unless",
    "offset",
    "scalar",
    "max",
    "min",
    "avg",
    "count",
    "clamp_min",
    "le",
    "bool",
}


def _metric_names(expr: str, recorded: dict[str, str]) -> set[str]:
    """Metric names a PromQL expression reads (recorded rules expanded to what they read)."""
    expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)  # label matchers, strings, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.+-]*", " ", expr)  # numbers and durations (0.9, 1e-9, 10m)
    names = set()
    for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if word in PROMQL_WORDS:
            continue
        names |= _metric_names(recorded[word], recorded) if word in recorded else {word}
    return names


def _explain_one_cell(stack, out: Path) -> dict:
    """One cell through the real explanation pipeline (CAM and error-map parts), as `--explain` runs it."""

    c = stack["cells"][0]
    ct, rgb = c.ct_path.read_bytes(), c.rgb_path.read_bytes()
    with InspectionClient(stack["url"]) as client:
        result, info = client.inspect(ct, c.meta, rgb, c.cell_id), client.serving_info()
    with ExplanationPipeline([CTHeatmap(), RGBErrorMap()], out, workers=1) as pipeline:
        entry = pipeline.submit(Case(result, ct, c.meta, rgb, info["ct"], info["rgb"])).result(timeout=120)
    return entry


def test_every_dashboard_panel_reads_metrics_that_a_live_scrape_has(stack, tmp_path):

    _burst(stack, n_bad=1)
    done = REGISTRY.get_sample_value("battery_explain_parts_total", {"part": "rgb_error_map", "status": "ok"}) or 0.0
    entry = _explain_one_cell(stack, tmp_path / "explain")
    assert (
        REGISTRY.get_sample_value("battery_explain_parts_total", {"part": "rgb_error_map", "status": "ok"}) == done + 1
    ), entry
    assert REGISTRY.get_sample_value("battery_explain_backlog") == 0  # nothing left waiting
    live = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in (_get(stack["metrics"]) + _get(stack["front_metrics"]) + _get(stack["client_metrics"])).splitlines()
        if line and not line.startswith("#")
    }
    live.add("up")  # Prometheus' own series per target
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    recorded = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads(DASHBOARD.read_text())
    assert len(dashboard["panels"]) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            names = _metric_names(target["expr"], recorded)
            assert names, (panel["title"], target["expr"])
            if all(n.startswith(("battery_gateway_", "battery_shadow_")) for n in names):
                continue  # the line gateway's panels: checked against a live gateway (test_gateway, test_lifecycle)
            missing = {n for n in names if n not in live and not GPU_ONLY.match(n)}
            assert not missing, f"panel {panel['title']!r} reads {sorted(missing)}, which no live scrape has"
    # the alerts read real series too (the line gateway's are checked against a live gateway in test_gateway.py)
    gateway_groups = ("line-gateway", "model-lifecycle")  # test_gateway.py and test_lifecycle.py check them
    for rule in (r for g in rules["groups"] if g["name"] not in gateway_groups for r in g["rules"]):
        missing = {n for n in _metric_names(rule["expr"], recorded) if n not in live and not GPU_ONLY.match(n)}
        assert not missing, (rule.get("alert") or rule.get("record"), sorted(missing))


def test_client_metrics_count_requests_errors_and_latency(stack):

    samples = {
        "requests": ("battery_client_requests_total", {"model": api.INSPECT}),
        "invalid": ("battery_client_errors_total", {"model": api.INSPECT, "kind": "invalid_argument"}),
        "timed": ("battery_client_request_seconds_count", {"model": api.INSPECT}),
    }

    def read():
        return {k: REGISTRY.get_sample_value(name, labels) or 0.0 for k, (name, labels) in samples.items()}

    before = read()
    good, _ = _burst(stack, n_bad=3)
    after = read()
    assert after["requests"] - before["requests"] == len(good) + 3
    assert after["invalid"] - before["invalid"] == 3
    assert after["timed"] - before["timed"] == len(good) + 3
