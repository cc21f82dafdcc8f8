"""The line gateway against asyncua's own OPC UA server as the PLC and a real tritonserver.

At the end of every run the PLC side must hold exactly one result per triggered cell, equal
to what the service answers for that cell directly: through a normal flow, a burst, Triton
down then up, the PLC's connection cut then restored, and the gateway killed mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client import REGISTRY

from client.dataset import pair_cells
from client.gateway import metrics
from client.gateway.config import ConfigError, load_config, parse_config
from client.gateway.gateway import Gateway
from client.gateway.outbox import SCHEMA, Outbox
from client.gateway.simulator import PlcSimulator, run_line
from client.service import InspectionClient
from core.preprocess import encoded_ct_input
from export.repository import build_repository
from serving.server import Ports, TritonServer, free_ports
from tests.integration.test_monitoring import DASHBOARD, PROMETHEUS_DIR, _metric_names
from tests.support.fake_gemini import FakeGemini, answer, delay
from tests.support.tcp_proxy import TcpProxy
from tests.support.tiny_models import make_ct_run, make_rgb_run

ERROR = -1


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("gateway")
    every, _ = pair_cells(small_dataset[0], progress=False)
    ct_x = np.stack([encoded_ct_input(c.ct_path.read_bytes(), 64)[0] for c in every])
    meta = np.array([c.meta for c in every], np.float32)
    # an out-of-distribution gate calibrated on the data set's cells: they pass, noise does not
    runs = [
        make_ct_run(root / "ct", size=64, images=torch.from_numpy(ct_x), meta=torch.from_numpy(meta), gate=True),
        make_rgb_run(root / "rgb", size=64, threshold=0.05),
    ]
    repo = root / "model_repository"
    build_repository(runs, "python-ort", repo, progress=lambda *_: None)
    server = TritonServer(repo, Ports(*free_ports(3)), log_path=root / "tritonserver.log")
    server.start(timeout=180)
    cells, _ = pair_cells(small_dataset[0], progress=False)
    cells = cells[:24]
    with InspectionClient(server.grpc_url, heatmaps=False) as c:
        answers = c.inspect_many([x.load() for x in cells])
    expected = {x.cell_id: (a.verdict_code, a.confidence) for x, a in zip(cells, answers)}
    try:
        yield {"server": server, "cells": cells, "expected": expected, "root": root}
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _service_survives(request):
    """A test during which the shared tritonserver died says so, with how it ended and its log."""
    yield
    if "service" in request.fixturenames:
        server = request.getfixturevalue("service")["server"]
        code = server.process.poll()
        assert code is None, f"tritonserver exited with code {code} during this test{server._log_hint()}"


def _port() -> int:
    return free_ports(1)[0]


def _config(tmp_path: Path, plc_port: int, triton_url: str, stations=("s1", "s2"), images="path", **extra) -> dict:
    return {
        "plc": {
            "url": f"opc.tcp://127.0.0.1:{plc_port}/line/",
            "poll_ms": 5,
            "reconnect_s": [0.2, 1.0],
            "timeout_s": 2,
        },
        "triton": {"url": triton_url, "timeout_s": 10, "retry_s": [0.2, 1.0]},
        "outbox": str(tmp_path / "outbox.sqlite"),
        "metrics_port": None,
        "error_code": ERROR,
        "stations": [{"name": s, "prefix": f"ns=2;s=Line1.{s}.", "images": images, "takt_ms": 3000} for s in stations],
    } | extra


def _sent(cells, images="path"):
    if images == "path":
        return [(c.cell_id, str(c.ct_path), str(c.rgb_path), c.meta) for c in cells]
    return [(c.cell_id, c.ct_path.read_bytes(), c.rgb_path.read_bytes(), c.meta) for c in cells]


def _check_exactly_once(results, expected: dict, sent_ids) -> None:
    counts = Counter((r.station, r.cell_id) for r in results)
    assert not [k for k, n in counts.items() if n > 1], (
        f"results written twice: {[k for k, n in counts.items() if n > 1]}"
    )
    assert sorted(r.cell_id for r in results) == sorted(sent_ids)
    for r in results:
        base = r.cell_id.split("#")[0]
        if base in expected:
            verdict, confidence = expected[base]
            assert (r.verdict, r.error) == (verdict, ""), r
            assert r.confidence == pytest.approx(confidence, abs=1e-5)
    for station in {r.station for r in results}:  # every station's counter went up by one per result
        counters = [r.counter for r in results if r.station == station]
        assert counters == list(range(1, len(counters) + 1))


async def _with_gateway(cfg_dict, body, base=Path("."), subscriptions=True):
    cfg = parse_config(cfg_dict, base)
    sim = await PlcSimulator(cfg.stations, cfg.plc.url).start()
    if not subscriptions:  # a PLC that refuses them (BadTooManySubscriptions)
        sim.server.iserver.max_subscriptions = 0
    stop = asyncio.Event()
    gateway = Gateway(cfg)
    task = asyncio.create_task(gateway.run(stop))
    try:
        return await body(sim, cfg)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await sim.stop()


def _waiting_explanation(path: Path) -> int:
    """Flagged cells the gateway has yet to explain, read beside it (read-only)."""

    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM cells WHERE explain=1").fetchone()[0]


def _value(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def test_normal_flow_gives_each_cell_the_services_verdict_once_and_refused_cells_an_error(service, tmp_path):
    cells = service["cells"][:10]
    before = {s: _value(metrics.TRIGGERS, s) for s in ("s1", "s2")}

    (tmp_path / "not-an-image.png").write_bytes(b"these bytes are no image")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)).save(tmp_path / "noise.png")

    async def body(sim, cfg):
        n = await run_line(sim, _sent(cells), rate=20)
        await sim.send("s1", "broken-ct", str(tmp_path / "not-an-image.png"), str(cells[0].rgb_path), (0, 2))
        await sim.send("s2", "missing", str(tmp_path / "nowhere.png"), str(cells[0].rgb_path), (0, 2))
        await sim.send("s1", "", str(cells[0].ct_path), str(cells[0].rgb_path), (0, 2))  # no cell id
        await sim.send("s2", "noise-ct", str(tmp_path / "noise.png"), str(cells[0].rgb_path), (0, 2))  # not a cell
        results = await sim.wait_for(n + 4, timeout=60)
        await _until(lambda: _waiting_explanation(tmp_path / "outbox.sqlite") == 0, timeout=60)
        return results

    cfg = _config(tmp_path, _port(), service["server"].grpc_url, explain={"out": str(tmp_path / "explain")})
    results = asyncio.run(_with_gateway(cfg, body))
    good = [r for r in results if r.cell_id in service["expected"]]
    _check_exactly_once(good, service["expected"], [c.cell_id for c in cells])
    assert all(r.seconds < 3.0 for r in good), [round(r.seconds, 3) for r in good]
    bad = {r.cell_id: r for r in results if r.cell_id not in service["expected"]}
    assert bad["broken-ct"].verdict == ERROR and "invalid_argument" in bad["broken-ct"].error
    assert (
        bad["missing"].verdict == ERROR
        and "cannot read" in bad["missing"].error
        and "nowhere.png" in bad["missing"].error
    )
    unnamed = [r for r in bad.values() if r.cell_id.startswith("unnamed-")]
    assert len(unnamed) == 1 and unnamed[0].verdict == ERROR and unnamed[0].error == "empty CellId"
    # not a cell: verdict 4 on the PLC, the reason in Error
    assert bad["noise-ct"].verdict == 4 and "CT slice out of distribution" in bad["noise-ct"].error, bad["noise-ct"]
    assert sum(_value(metrics.TRIGGERS, s) - before[s] for s in ("s1", "s2")) == len(cells) + 4
    outbox = Outbox(tmp_path / "outbox.sqlite")
    assert outbox.depth() == {"pending": 0, "answered": 0, "writing": 0, "written": len(cells) + 4}
    # flagged cells were explained off the PLC's path: a report each, with the service's heatmaps
    index = json.loads((tmp_path / "explain" / "index.json").read_text())
    flagged = {r.cell_id for r in good if r.verdict != 0} | {"noise-ct"}
    assert {e["cell_id"] for e in index["entries"]} == flagged
    for entry in index["entries"]:
        assert set(entry["parts"].values()) == {"ok"}, entry
        report = json.loads((tmp_path / "explain" / entry["json"]).read_text())
        assert report["source"]["station"] in ("s1", "s2")


def test_flagged_cells_left_unexplained_at_a_stop_are_explained_once_after_the_restart(service, tmp_path, monkeypatch):

    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    cells = service["cells"][:10]
    flagged = sorted(c.cell_id for c in cells if service["expected"][c.cell_id][0] != 0)
    assert len(flagged) >= 4
    outbox, explain = tmp_path / "outbox.sqlite", tmp_path / "explain"

    def listed() -> list[str]:
        index = explain / "index.json"
        return sorted(e["cell_id"] for e in json.loads(index.read_text())["entries"]) if index.exists() else []

    async def line(sim, cfg):
        return await sim.wait_for(await run_line(sim, _sent(cells), rate=20), timeout=60)

    async def nothing_left(sim, cfg):  # no new cell: the restarted gateway finds the rest in its outbox
        await _until(lambda: _waiting_explanation(outbox) == 0, timeout=90)

    with FakeGemini([delay(0.8, answer("Porosity near the top of the slice."))]) as gemini:  # a slow VLM
        cfg = _config(
            tmp_path,
            _port(),
            service["server"].grpc_url,
            explain={"out": str(explain), "options": f"--vlm gemini --gemini-url {gemini.url} --explain-workers 1"},
        )
        results = asyncio.run(_with_gateway(cfg, line))
        _check_exactly_once(
            results, service["expected"], [c.cell_id for c in cells]
        )  # the PLC did not wait for reports
        left, done = _waiting_explanation(outbox), listed()  # stopped: the reports under way were finished
        assert left > 0 and len(done) + left == len(flagged), (left, done)
        asyncio.run(_with_gateway(cfg, nothing_left))
        assert listed() == flagged  # every flagged cell once in the index, which the restart added to
    # and none was explained twice: one report folder per cell, one VLM request per flagged side of each
    reports = [json.loads(p.read_text()) for p in (explain / "cells").glob("*/report.json")]
    assert len(reports) == len(flagged)
    assert len(gemini.requests) == sum(len({"ct", "rgb"} & set(r["explanations"]["vlm"]["data"])) for r in reports)


def test_a_cell_triggered_again_is_answered_from_the_outbox_without_a_second_inspection(service, tmp_path):

    cell = service["cells"][0]

    def counts():
        return (
            _value(metrics.TRIGGERS, "s1"),
            _value(metrics.REPEATS, "s1"),
            REGISTRY.get_sample_value("battery_client_requests_total", {"model": "inspect"}) or 0.0,
        )

    async def body(sim, cfg):
        await sim.send("s1", cell.cell_id, str(cell.ct_path), str(cell.rgb_path), cell.meta)
        await sim.wait_for(1, timeout=60)
        before = counts()
        await sim.send("s1", cell.cell_id, str(cell.ct_path), str(cell.rgb_path), cell.meta)  # the PLC asks again
        return await sim.wait_for(2, timeout=60), before, counts()

    results, before, after = asyncio.run(
        _with_gateway(_config(tmp_path, _port(), service["server"].grpc_url, stations=("s1",)), body)
    )
    assert [(r.cell_id, r.verdict, r.counter) for r in results] == [
        (cell.cell_id, service["expected"][cell.cell_id][0], 1),
        (cell.cell_id, service["expected"][cell.cell_id][0], 2),
    ]
    assert after[0] == before[0] and after[1] == before[1] + 1  # a repeat, not a new trigger
    assert after[2] == before[2]  # and no second request to Triton
    assert Outbox(tmp_path / "outbox.sqlite").rows()[0].repeats == 1


def test_a_cell_whose_acknowledgement_fails_is_still_answered_once(service, tmp_path):
    """The trigger is recorded, then writing Trigger = false fails (here: the PLC refuses the
    write for a while); the cell must still be inspected and answered, once."""
    cell = service["cells"][2]

    async def body(sim, cfg):
        trigger = sim.lines["s1"].nodes["trigger"]
        await trigger.set_writable(False)
        await sim.write("s1", "cell_id", cell.cell_id)
        await sim.write("s1", "ct_path", str(cell.ct_path))
        await sim.write("s1", "rgb_path", str(cell.rgb_path))
        await sim.write("s1", "battery_type", int(cell.meta[0]))
        await sim.write("s1", "slice_axis", int(cell.meta[1]))
        sim.lines["s1"].sent[cell.cell_id] = time.monotonic()
        await sim.write("s1", "trigger", True)
        answered = await sim.wait_for(1, timeout=30)  # answered although the trigger is still up
        still_up = await sim.read("s1", "trigger")
        await trigger.set_writable(True)
        await _until(lambda: Outbox(tmp_path / "outbox.sqlite").rows()[0].acked == 1)
        await asyncio.sleep(0.5)
        return answered, still_up, list(sim.results)

    answered, still_up, results = asyncio.run(
        _with_gateway(_config(tmp_path, _port(), service["server"].grpc_url, stations=("s1",)), body)
    )
    assert still_up and [r.cell_id for r in answered] == [cell.cell_id]
    assert [(r.cell_id, r.verdict) for r in results] == [(cell.cell_id, service["expected"][cell.cell_id][0])]


def test_images_in_byte_string_nodes_and_a_burst_are_answered_in_trigger_order(service, tmp_path):
    cells = service["cells"]

    async def body(sim, cfg):
        n = await run_line(sim, _sent(cells, "bytes"), rate=1000, count=48)  # as fast as the handshake allows
        return await sim.wait_for(n, timeout=120)

    results = asyncio.run(_with_gateway(_config(tmp_path, _port(), service["server"].grpc_url, images="bytes"), body))
    sent = [c.cell_id for c in cells] + [f"{c.cell_id}#1" for c in cells]
    _check_exactly_once(results, service["expected"], sent)
    for station in ("s1", "s2"):  # a station's results come back in the order its cells were triggered
        order = [r.cell_id for r in results if r.station == station]
        assert order == [s for i, s in enumerate(sent) if i % 2 == (station == "s2")]


def test_cells_triggered_while_triton_is_down_are_answered_when_it_returns(service, tmp_path):
    cells = service["cells"][:6]
    server = service["server"]
    retries = _value(metrics.ERRORS, "triton_retry")

    async def body(sim, cfg):
        await asyncio.to_thread(server.stop)
        try:
            n = await run_line(sim, _sent(cells), rate=50)
            # every trigger is acknowledged and recorded although nothing can answer it
            await asyncio.sleep(2.0)
            for s in ("s1", "s2"):
                assert not await sim.read(s, "trigger")
            assert sim.results == []
            assert Outbox(tmp_path / "outbox.sqlite").depth()["pending"] == len(cells)
        finally:
            await asyncio.to_thread(server.start, 180)
        return await sim.wait_for(n, timeout=60)

    results = asyncio.run(_with_gateway(_config(tmp_path, _port(), server.grpc_url), body))
    _check_exactly_once(results, service["expected"], [c.cell_id for c in cells])
    assert _value(metrics.ERRORS, "triton_retry") > retries


def test_a_cut_plc_connection_loses_no_cell_and_writes_none_twice(service, tmp_path):
    cells = service["cells"][:16]

    async def run():
        plc_port = _port()
        proxy = await TcpProxy(plc_port).start()
        cfg = _config(tmp_path, plc_port, service["server"].grpc_url)
        cfg["plc"]["url"] = f"opc.tcp://127.0.0.1:{proxy.port}/line/"  # the gateway reaches the PLC through the proxy
        cfg["plc"]["recheck_ms"] = 60_000  # cells flow after a cut only if the subscription is made again
        parsed = parse_config(cfg)
        sim = await PlcSimulator(parsed.stations, f"opc.tcp://127.0.0.1:{plc_port}/line/").start()
        stop = asyncio.Event()
        gateway = Gateway(parsed)
        task = asyncio.create_task(gateway.run(stop))

        async def cuts():  # twice while cells flow; neither side is stopped
            for _ in range(2):
                await _until(lambda: gateway.plc.connected)
                await asyncio.sleep(0.4)
                proxy.cut()
                await asyncio.sleep(1.5)
                proxy.restore()

        try:
            await _until(lambda: gateway.plc.connected)
            cutter = asyncio.create_task(cuts())
            n = await run_line(sim, _sent(cells), rate=4)
            await cutter
            results = await sim.wait_for(n, timeout=60)
            await _until(lambda: gateway.plc.connected)  # and it is connected again at the end
            assert gateway.plc.subscribed
            return results, gateway.plc.sessions
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await sim.stop()
            await proxy.stop()

    results, sessions = asyncio.run(run())
    _check_exactly_once(results, service["expected"], [c.cell_id for c in cells])
    assert sessions >= 3  # connected, and again after each cut


@pytest.mark.parametrize("watch, plc_subscribes", [("subscribe", True), ("poll", True), ("subscribe", False)])
def test_a_subscribed_gateway_reads_the_plc_when_it_changes_and_a_polling_one_every_period(
    service, tmp_path, watch, plc_subscribes
):
    cells = service["cells"][:8]
    reads = metrics.PLC_REQUESTS.labels("read")
    refused = _value(metrics.ERRORS, "plc_subscribe")

    async def body(sim, cfg):
        await _until(lambda: reads._value.get() > 0)
        await asyncio.sleep(1.0)  # the first read of each station is done
        idle = reads._value.get()
        await asyncio.sleep(2.0)  # no cell: what does watching two stations cost the PLC?
        idle = (reads._value.get() - idle) / 2.0
        n = await run_line(sim, _sent(cells), rate=8)
        return idle, await sim.wait_for(n, timeout=30)

    # subscribed, the nodes are read again only after a minute: the notifications alone move the cells
    cfg = _config(tmp_path, _port(), service["server"].grpc_url) | {}
    cfg["plc"] |= {"watch": watch, "poll_ms": 5, "recheck_ms": 60_000}
    idle, results = asyncio.run(_with_gateway(cfg, body, subscriptions=plc_subscribes))
    _check_exactly_once(results, service["expected"], [c.cell_id for c in cells])
    assert all(r.seconds < 3.0 for r in results), [round(r.seconds, 3) for r in results]
    if watch == "subscribe" and plc_subscribes:
        assert idle == 0, f"{idle} reads/s while nothing changed"
    else:  # two Trigger nodes every 5 ms (up to 400/s, less a read's time); a PLC without subscriptions is polled
        assert idle > 50, f"{idle} reads/s"
    assert _value(metrics.ERRORS, "plc_subscribe") - refused == (0 if plc_subscribes or watch == "poll" else 1)


def _start_gateway(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "client", "gateway", "--config", str(config)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_gateway_killed_mid_run_resumes_from_its_outbox(service, tmp_path):
    """SIGKILL with cells in every state: answered but not taken by the PLC (it is busy), and
    pending because Triton cannot be reached; the restarted gateway finishes them all."""
    cells = service["cells"][:20]
    log = tmp_path / "gateway.log"

    async def run():
        triton = await TcpProxy(int(service["server"].grpc_url.rsplit(":", 1)[1])).start()
        cfg = _config(tmp_path, _port(), f"127.0.0.1:{triton.port}", metrics_port=metrics_port)
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(cfg))
        parsed = load_config(config)
        sim = await PlcSimulator(parsed.stations, parsed.plc.url).start()
        gateway = _start_gateway(config, log)
        try:
            await run_line(sim, _sent(cells[:6]), rate=6)
            assert len(await sim.wait_for(6, timeout=90)) == 6
            sim.hold = True  # the PLC leaves results unread: answered cells wait in the outbox
            await run_line(sim, _sent(cells[6:14]), rate=10)  # 4 per station: 1 written, 3 waiting
            await _until(lambda: _depth(tmp_path)["answered"] + _depth(tmp_path)["writing"] >= 6)
            triton.cut()  # and Triton is out of reach: new cells stay pending
            await run_line(sim, _sent(cells[14:18]), rate=10)
            await _until(lambda: _depth(tmp_path)["pending"] >= 4)
            os.killpg(gateway.pid, signal.SIGKILL)  # no clean shutdown: as a power cut or an OOM kill
            gateway.wait()
            states = _depth(tmp_path)
            triton.restore()
            sim.hold = False
            restarted = _start_gateway(config, log)
            try:
                await run_line(sim, _sent(cells[18:]), rate=6)
                await sim.wait_for(len(cells), timeout=90)
                await asyncio.sleep(1.5)  # nothing more may arrive; the outbox gauges are refreshed each second
                scrape = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
                )
                return list(sim.results), states, scrape
            finally:
                restarted.send_signal(signal.SIGTERM)
                assert restarted.wait(30) == 0, log.read_text()[-3000:]
        finally:
            if gateway.poll() is None:
                os.killpg(gateway.pid, signal.SIGKILL)
            await sim.stop()
            await triton.stop()

    metrics_port = _port()
    results, states, scrape = asyncio.run(run())
    assert states["pending"] >= 4 and states["answered"] + states["writing"] >= 6, states
    _check_exactly_once(results, service["expected"], [c.cell_id for c in cells])
    text = log.read_text()
    assert "resuming" in text and "gateway stopped" in text, text[-3000:]
    # the restarted gateway's own metrics: its outbox is empty of work, its PLC session up
    assert (
        'battery_gateway_outbox_cells{state="written"} 20.0' in scrape
        and 'battery_gateway_outbox_cells{state="pending"} 0.0' in scrape
    )
    assert "battery_gateway_plc_connected 1.0" in scrape
    answered = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("battery_gateway_answers_total{")
    )
    assert answered == len(cells) - states["written"]  # what this process wrote: all the first one had not
    # the shipped alert rules for the gateway read series that a live gateway exports

    live = {
        re.split(r"[{ ]", line, maxsplit=1)[0] for line in scrape.splitlines() if line and not line.startswith("#")
    } | {"up"}
    group = next(
        g for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] if g["name"] == "line-gateway"
    )
    for rule in group["rules"]:
        assert _metric_names(rule["expr"], {}) <= live, (rule["alert"], _metric_names(rule["expr"], {}) - live)
    # and so do the dashboard's gateway panels

    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Line gateway")]
    assert len(panels) == 4
    for target in (t for p in panels for t in p["targets"]):
        names = _metric_names(target["expr"], {})
        assert names and all(n.startswith("battery_gateway_") for n in names) and names <= live, (
            target["expr"],
            names - live,
        )


def _depth(folder: Path) -> dict:

    with sqlite3.connect(folder / "outbox.sqlite") as db:
        return {"pending": 0, "answered": 0, "writing": 0, "written": 0} | dict(
            db.execute("SELECT state, COUNT(*) FROM cells GROUP BY state").fetchall()
        )


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_a_plc_with_user_authentication_gets_the_password_from_the_environment_and_never_in_the_log(
    service, tmp_path, monkeypatch, caplog
):
    secret = "plc-pass-" + "Xy7" * 6
    cell = service["cells"][1]

    async def run(password: str, seconds: float):
        monkeypatch.setenv("BATTERY_TEST_PLC_PASSWORD", password)
        raw = _config(tmp_path, _port(), service["server"].grpc_url, stations=("s1",))
        raw["plc"] |= {"user": "gateway", "password_env": "BATTERY_TEST_PLC_PASSWORD"}
        raw["outbox"] = str(tmp_path / f"outbox-{len(password)}.sqlite")
        cfg = parse_config(raw)
        sim = await PlcSimulator(cfg.stations, cfg.plc.url, users={"gateway": secret}).start()
        stop = asyncio.Event()
        gateway = Gateway(cfg)
        task = asyncio.create_task(gateway.run(stop))
        try:
            await sim.send("s1", cell.cell_id, str(cell.ct_path), str(cell.rgb_path), cell.meta, timeout=seconds)
            return await sim.wait_for(1, timeout=seconds), gateway.plc.sessions
        except TimeoutError:
            return [], gateway.plc.sessions
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await sim.stop()

    caplog.set_level("DEBUG")
    results, sessions = asyncio.run(run(secret, 60))
    assert sessions == 1 and [(r.cell_id, r.verdict) for r in results] == [
        (cell.cell_id, service["expected"][cell.cell_id][0])
    ]
    connects = _value(metrics.ERRORS, "plc_connect")
    results, sessions = asyncio.run(run("a-wrong-password", 3))  # refused: no session, no cell taken
    assert results == [] and sessions == 0 and _value(metrics.ERRORS, "plc_connect") > connects
    assert "cannot connect" in caplog.text
    assert secret not in caplog.text and "a-wrong-password" not in caplog.text


def test_check_reads_every_node_and_names_the_ones_that_are_wrong(service, tmp_path):
    port = _port()
    cfg = _config(tmp_path, port, service["server"].grpc_url, stations=("s1",))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    cfg["stations"][0]["nodes"] = {"verdict": "ns=2;s=Line1.s1.NoSuchNode"}
    dead = f"127.0.0.1:{_port()}"  # a second replica where nothing listens: each replica is checked
    cfg["triton"]["url"] = [service["server"].grpc_url, dead]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))

    async def run():
        sim = await PlcSimulator(load_config(good).stations, f"opc.tcp://127.0.0.1:{port}/line/").start()
        try:
            outs = []
            for path in (good, bad):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "client",
                    "gateway",
                    "--config",
                    str(path),
                    "--check",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                out, _ = await proc.communicate()
                outs.append((proc.returncode, out.decode()))
            return outs
        finally:
            await sim.stop()

    (ok_code, ok_out), (bad_code, bad_out) = asyncio.run(run())
    assert ok_code == 0 and "all good" in ok_out and ok_out.count("  ok ") == 13, ok_out
    assert bad_code == 1 and "FAIL" in bad_out and "NoSuchNode" in bad_out, bad_out
    assert f"ok    Triton {service['server'].grpc_url}: inspect is ready" in bad_out, bad_out
    assert f"FAIL  Triton {dead}: not ready" in bad_out, bad_out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"plc": {}}, "plc.url is required"),
        ({"stations": []}, "at least one station"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"stations": [{"name": "a"}]}, "no node id for trigger"),
        ({"stations": [{"name": "a", "prefix": "ns=2;s=A.", "meta": [3, 1]}]}, "meta is [battery_type"),
        ({"stations": [{"name": "a", "prefix": "ns=2;s=A.", "images": "film"}]}, "images must be 'path' or 'bytes'"),
        (
            {"stations": [{"name": "a", "prefix": "ns=2;s=A.", "nodes": {"trigga": "ns=2;s=T"}}]},
            "unknown node role(s) trigga",
        ),
        ({"stations": [{"name": "a", "prefix": "p."}, {"name": "a", "prefix": "q."}]}, "names must be unique"),
        ({"plc": {"url": "opc.tcp://x:4840", "watch": "push"}}, "plc.watch must be 'subscribe' or 'poll'"),
        ({"plc": {"url": "opc.tcp://x:4840", "recheck_ms": 0}}, "must be positive"),
        ({"plc": {"url": "opc.tcp://x:4840", "password_env": "BATTERY_TEST_UNSET_PASSWORD", "user": "u"}}, None),
    ],
)
def test_configuration_mistakes_are_named(change, message, tmp_path):
    base = {"plc": {"url": "opc.tcp://127.0.0.1:4840"}, "stations": [{"name": "a", "prefix": "ns=2;s=A."}]}
    if message is None:  # a password from an unset variable fails when it is needed, by name
        cfg = parse_config(base | change)
        os.environ.pop("BATTERY_TEST_UNSET_PASSWORD", None)
        with pytest.raises(ConfigError, match="BATTERY_TEST_UNSET_PASSWORD is not set"):
            _ = cfg.plc.password
        return
    with pytest.raises(ConfigError) as e:
        parse_config(base | change)
    assert message in str(e.value)


def test_the_error_node_can_be_left_out_even_under_a_prefix():
    base = {
        "plc": {"url": "opc.tcp://127.0.0.1:4840"},
        "stations": [{"name": "a", "prefix": "ns=2;s=A.", "nodes": {"error": None}}],
    }
    nodes = parse_config(base).stations[0].nodes
    assert "error" not in nodes and nodes["verdict"] == "ns=2;s=A.Verdict"


def test_the_example_configuration_loads_with_every_node_named():
    cfg = load_config(Path("client/gateway/example.yaml"))
    assert cfg.stations[0].nodes["trigger"] == "ns=2;s=Line1.Station1.Trigger"
    assert set(cfg.stations[0].nodes) == {
        "trigger",
        "cell_id",
        "ct_path",
        "rgb_path",
        "battery_type",
        "slice_axis",
        "result_cell_id",
        "verdict",
        "confidence",
        "result_counter",
        "result_ack",
        "error",
    }


def test_the_outbox_keeps_one_row_per_cell_and_survives_reopening(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    row, new = box.record("s1", "c1", (0, 2), "a.png", "b.png")
    assert new and row.state == "pending"
    again, new = box.record("s1", "c1", (0, 2), "a.png", "b.png")
    assert not new and again.id == row.id and again.state == "pending"
    assert box.record("s2", "c1", (0, 2), "a.png", "b.png")[1]  # another station's cell of that id is another cell
    box.answer(row.id, 1, 0.9)
    box.writing(row.id, 7)
    box.close()
    box = Outbox(tmp_path / "o.sqlite")
    kept = box.get(row.id)
    assert (kept.state, kept.verdict, kept.counter) == ("writing", 1, 7)
    assert box.next_to_write("s1").id == row.id
    box.written(row.id)
    same, new = box.record("s1", "c1", (0, 2), "a.png", "b.png")  # never acknowledged: the same trigger, seen again
    assert not new and same.state == "written" and same.repeats == 0
    box.acknowledged(row.id)
    repeat, new = box.record("s1", "c1", (0, 2), "a.png", "b.png")  # the PLC asks again: answered again, not inspected
    assert not new and repeat.state == "answered" and repeat.repeats == 1 and repeat.verdict == 1
    assert box.depth() == {"pending": 1, "answered": 1, "writing": 0, "written": 0}


def test_a_cell_to_explain_keeps_its_images_until_explained_and_an_older_outbox_gains_the_column(tmp_path):

    old = SCHEMA.replace(
        "    explain INTEGER NOT NULL DEFAULT 0,\n", ""
    )  # an outbox written before explanations were kept
    assert "explain" not in old
    with closing(sqlite3.connect(tmp_path / "o.sqlite")) as db:
        db.executescript(old)
        db.execute("INSERT INTO cells (station, cell_id, triggered_at, state) VALUES ('s1', 'before', 0, 'written')")
        db.commit()
    box = Outbox(tmp_path / "o.sqlite")
    assert box.rows()[0].explain == 0 and box.waiting_explanation() == 0
    flagged, _ = box.record("s1", "flagged", (0, 2), ct_image=b"ct", rgb_image=b"rgb")
    normal, _ = box.record("s1", "normal", (0, 2), ct_image=b"ct", rgb_image=b"rgb")
    box.answer(flagged.id, 3, 0.9, explain=True)
    box.answer(normal.id, 0, 0.9)
    assert [r.cell_id for r in box.to_explain()] == ["flagged"] and box.waiting_explanation() == 1
    for row in (flagged, normal):
        box.written(row.id)
    assert (box.get(flagged.id).ct_image, box.get(normal.id).ct_image) == (b"ct", None)  # kept for the explainer
    box.explained(flagged.id)
    assert box.get(flagged.id).ct_image is None and box.get(flagged.id).rgb_image is None and box.to_explain() == []


def test_plc_sim_command_triggers_a_data_set_and_prints_what_the_gateway_answers(service, small_dataset, tmp_path):
    cfg = _config(tmp_path, _port(), service["server"].grpc_url)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg))

    async def run():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "client",
            "plc-sim",
            "--config",
            str(config),
            "--data",
            str(small_dataset[0]),
            "--rate",
            "8",
            "--count",
            "6",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        first = await asyncio.wait_for(proc.stdout.readline(), 60)  # the PLC is up
        assert b"simulated PLC at" in first, first
        stop = asyncio.Event()
        task = asyncio.create_task(Gateway(load_config(config)).run(stop))
        out = first
        try:
            while out.count(b" verdict ") < 6:  # the answers, as the PLC saw them
                line = await asyncio.wait_for(proc.stdout.readline(), 90)
                if not line:
                    break
                out += line
            try:
                out += await asyncio.wait_for(proc.stdout.read(), 30)  # then it exits by itself
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is
                out += await asyncio.wait_for(proc.stdout.read(), 10)
                pytest.fail(f"plc-sim answered but did not exit within 30 s:\n{out.decode()}")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            if proc.returncode is None:
                proc.kill()
        return proc.returncode, out.decode()

    code, out = asyncio.run(run())
    assert code == 0, out
    lines = [line.split() for line in out.splitlines() if " verdict " in line]
    assert len(lines) == 6, out
    for station, cell_id, _, verdict, *_ in lines:
        assert station in ("s1", "s2") and int(verdict) == service["expected"][cell_id][0]
