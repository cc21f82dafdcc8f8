"""Changing the model on a running line, against a real tritonserver: stage a release, compare it,
shadow it from the line gateway, promote it and roll it back under traffic with no failed
request; a challenger trained on shuffled labels is refused by the promotion rule; the audit
trail and the per-release metrics say what happened.

The champion is a small CT classifier fitted to the data set's cells (it knows them); the
shuffled challenger is the same network fitted to the same cells with their labels shuffled
(it knows nothing). Both are seeded; the rule's decision rests on a gap of far more than its
margins (accuracy 1.0 against about 0.2 on the fitted cells), not on a close call.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from prometheus_client import REGISTRY, generate_latest

from client.dataset import pair_cells
from client.gateway.config import parse_config
from client.gateway.gateway import Gateway
from client.gateway.simulator import PlcSimulator, run_line
from client.inspection import CellError, Inspection
from client.lifecycle import audit
from client.lifecycle.rule import RULE_FILE
from client.service import Backoff, InspectionClient
from core import interface as api
from core.labels import CT_CLASSES
from core.preprocess import encoded_ct_input
from core.reviewed import read_results
from export import release
from export.release import read_state
from export.repository import build_repository
from serving.server import Access, Ports, TritonServer, free_ports
from tests.integration.test_gateway import _config, _sent
from tests.integration.test_monitoring import DASHBOARD, PROMETHEUS_DIR, _metric_names, _scrape
from tests.support.tiny_models import make_fitted_ct_run, make_rgb_run

KEY = "lifecycle-test-key"
STAGED = api.INSPECT + api.STAGED_SUFFIX


@pytest.fixture(scope="module")
def line(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("lifecycle")
    cells, _ = pair_cells(small_dataset[0], progress=False)
    x = np.stack([encoded_ct_input(c.ct_path.read_bytes(), 64)[0] for c in cells])
    meta = np.array([c.meta for c in cells], np.float32)
    labels = np.array([CT_CLASSES.index(c.ct_label) for c in cells])
    runs = {
        "good": make_fitted_ct_run(root / "ct_good", x, meta, labels),
        "shuffled": make_fitted_ct_run(root / "ct_shuffled", x, meta, np.random.default_rng(0).permutation(labels)),
        "rgb": make_rgb_run(root / "rgb", size=64, threshold=0.05),
    }
    repo = root / "model_repository"
    build_repository([runs["good"], runs["rgb"]], "python-ort", repo, progress=lambda *_: None)
    server = TritonServer(
        repo, Ports(*free_ports(3)), log_path=root / "tritonserver.log", extra=Access(admin_key=KEY).arguments()
    )
    server.start(timeout=180)
    try:
        yield {"server": server, "repo": repo, "runs": runs, "cells": cells, "data": small_dataset[0], "root": root}
    finally:
        server.stop()


def _models(line, *args, check: bool = True, key: str = KEY) -> subprocess.CompletedProcess:
    """python -m client models ARGS against the module's server and repository."""
    cmd = [sys.executable, "-m", "client", "models", *args, "--repository", str(line["repo"])]
    cmd += ["--url", line["server"].grpc_url, "--by", "test"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"TRITON_ADMIN_KEY": key})
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _small_rule(folder: Path) -> Path:
    """The shipped promotion rule with its minimum test set lowered to the 36 cells of the small data set."""
    rule = yaml.safe_load(RULE_FILE.read_text())
    rule["test"]["min_cells"] = 30
    path = folder / "promotion.yaml"
    path.write_text(yaml.safe_dump(rule))
    return path


def _release_answering(url: str, cell) -> int:
    with InspectionClient(url, heatmaps=False) as c:
        return c.inspect_many([cell.load()])[0].model_versions["release"]


class Traffic:
    """Clients sending the line's cells back to back, without retries of their own: a request the
    server fails while releases change shows up as a CellError."""

    def __init__(self, url: str, cells, clients: int = 3):
        self.url, self.cells, self.results, self.stop = url, cells, [], threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(k, clients)) for k in range(clients)]

    def _send(self, k: int, n: int) -> None:
        with InspectionClient(self.url, heatmaps=False, backoff=Backoff(retries=0)) as client:
            i = k
            while not self.stop.is_set():
                self.results.append(client.inspect_many([self.cells[i % len(self.cells)].load()])[0])
                i += n

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_stage_compare_promote_and_roll_back_under_traffic_with_no_failed_request(line, tmp_path):
    url, cells = line["server"].grpc_url, line["cells"]
    before = read_state(line["repo"])["serving"]
    # the line keeps its cells (inspect-dir as the gateway would): the replay set
    archive = tmp_path / "archive"
    kept = subprocess.run(
        [sys.executable, "-m", "client", "inspect-dir", str(line["data"]), "--url", url, "--out"]
        + [str(tmp_path / "run" / "results.jsonl"), "--keep", str(archive), "--keep-sample", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert len(read_results(archive)) == len(cells)  # sample 1: every cell kept, each with its release
    assert {r["model_versions"]["release"] for r in read_results(archive).values()} == {before}

    with Traffic(url, cells) as traffic:
        time.sleep(1.0)
        staged = _models(line, "stage", str(line["runs"]["good"]), str(line["runs"]["rgb"]), "--replace")
        release = read_state(line["repo"])["staged"]
        assert f"staged release {release}" in staged.stdout
        assert _release_answering(url, cells[0]) == before  # staged: the line's ensemble does not run it
        out = tmp_path / "compare"
        rule = _small_rule(tmp_path)
        _models(
            line,
            "compare",
            "--test",
            str(line["data"]),
            "--replay",
            str(archive),
            "--out",
            str(out),
            "--quiet",
            "--rule",
            str(rule),
        )
        comparison = json.loads((out / "comparison.json").read_text())
        n_promote = len(traffic.results)
        promoted = _models(line, "promote")
        assert _release_answering(url, cells[0]) == release
        n_rollback = len(traffic.results)
        back = _models(line, "rollback")
        assert _release_answering(url, cells[0]) == before
        time.sleep(1.0)
    failed = [r for r in traffic.results if isinstance(r, CellError)]
    assert not failed, failed[:3]
    assert n_promote < n_rollback < len(traffic.results)  # cells answered before, between and after the switches
    seen = {r.model_versions["release"] for r in traffic.results}
    assert seen == {before, release}, seen  # every answer names its release; traffic saw both

    # the comparison: the same networks give the same verdicts, so the rule lets the release go live
    test = comparison["sets"]["test"]
    assert test["counts"]["cells"] == len(cells) and test["counts"]["flips"] == 0
    assert test["figures"]["verdict_accuracy"]["difference_ci95"] == [0.0, 0.0]
    assert comparison["sets"]["replay"]["counts"]["cells"] == len(cells)
    assert comparison["decision"]["promote"], comparison["decision"]
    assert f"release {release} in service" in promoted.stdout
    assert f"release {before} in service again" in back.stdout

    # the audit trail: who, what, which models, on what evidence, and how long each switch took
    trail = [e for e in audit.read(line["repo"]) if e.get("release", e.get("to")) in (release, before)][-4:]
    assert [e["action"] for e in trail] == ["stage", "compare", "promote", "rollback"]
    promote = trail[2]
    assert promote["by"] == "test" and (promote["from"], promote["to"]) == (before, release)
    assert (
        promote["models"]["to"]["ct_classifier"]
        == read_state(line["repo"])["releases"][str(release)]["runs"]["ct_classifier"]["checkpoint_sha256"]
    )
    assert promote["decision"]["promote"] and not promote["forced"]
    assert promote["comparison"]["test"]["figures"]["ct_macro_f1"]["staged"] == pytest.approx(1.0)
    assert promote["training"]["runs"]["ct_classifier"]["path"] == str(line["runs"]["good"].resolve())
    assert 0 < promote["seconds"] < 30 and 0 < trail[3]["seconds"] < 30

    # per-release metrics: Triton's per-version counters, and the verdicts each release decided
    metrics = _scrape(
        urllib.request.urlopen(f"http://127.0.0.1:{line['server'].ports.metrics}/metrics").read().decode()
    )
    for version in (before, release):
        key = f'nv_inference_count{{model="{api.CT_CLASSIFIER}",version="{version}"}}'
        assert metrics.get(key, 0) > 0, key
        decided = sum(v for k, v in metrics.items() if f'battery_release_verdicts_total{{release="{version}"' in k)
        assert decided > 0, version
    status = _models(line, "status").stdout
    assert re.search(rf"\b{before}\s+in service", status) and re.search(rf"\b{release}\s+previous", status), status


def test_a_challenger_trained_on_shuffled_labels_is_refused_and_never_goes_live(line, tmp_path):
    url, cells = line["server"].grpc_url, line["cells"]
    serving = read_state(line["repo"])["serving"]
    _models(line, "stage", str(line["runs"]["shuffled"]), str(line["runs"]["rgb"]), "--replace")
    out = tmp_path / "compare"
    rule = _small_rule(tmp_path)
    shown = _models(
        line, "compare", "--test", str(line["data"]), "--out", str(out), "--quiet", "--rule", str(rule)
    ).stdout
    comparison = json.loads((out / "comparison.json").read_text())
    decision = comparison["decision"]
    assert not decision["promote"] and "REFUSED" in shown
    assert any(r.startswith("test ct_macro_f1") for r in decision["reasons"]), decision["reasons"]
    figures = comparison["sets"]["test"]["figures"]
    assert figures["ct_macro_f1"]["serving"] == pytest.approx(1.0) and figures["ct_macro_f1"]["staged"] < 0.5
    assert figures["ct_macro_f1"]["difference_ci95"][1] < 0  # worse on every resample of the batteries
    # the flips, cell by cell, as the review station reads them
    flips = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert flips and len(flips) == comparison["sets"]["test"]["counts"]["flips"]
    assert all(
        f["flip"] == f"{f['serving']['verdict']} -> {f['verdict']}" and Path(f["ct_path"]).is_file() for f in flips
    )

    refused = _models(line, "promote", check=False)
    assert refused.returncode == 2 and "promotion rule refused it" in refused.stderr
    forced = _models(line, "promote", "--force", check=False)
    assert forced.returncode == 2 and "--reason" in forced.stderr
    assert _release_answering(url, cells[0]) == serving  # nothing changed on the line
    # a switch the server refuses (a wrong admin key) leaves the repository as it was
    before = read_state(line["repo"])
    wrong = _models(line, "rollback", "--to", str(before["staged"]), check=False, key="not-the-key")
    assert wrong.returncode == 2 and "did not do it" in wrong.stderr and "Traceback" not in wrong.stderr
    assert read_state(line["repo"]) == before and release.pinned(line["repo"]) == serving
    _models(line, "discard", "--reason", "trained on shuffled labels")
    with grpcclient.InferenceServerClient(url) as c:
        assert not c.is_model_ready(STAGED)
    assert read_state(line["repo"])["staged"] is None
    assert audit.read(line["repo"])[-1]["action"] == "discard"


def test_the_gateway_shadows_a_share_of_the_line_to_the_staged_release_and_keeps_the_cells(line, tmp_path):
    """Shadow traffic from the line gateway: the PLC gets the line's answers, the staged release's are
    recorded beside them (log, metrics, archive); the shadow series are what the alert and the
    dashboard read."""
    _models(line, "stage", str(line["runs"]["shuffled"]), str(line["runs"]["rgb"]), "--replace")
    staged = read_state(line["repo"])["staged"]
    serving = read_state(line["repo"])["serving"]
    cells = line["cells"][:24]
    with InspectionClient(line["server"].grpc_url, heatmaps=False) as c:
        line_answers = {x.cell_id: a for x, a in zip(cells, c.inspect_many([x.load() for x in cells]))}
    with InspectionClient(line["server"].grpc_url, model=STAGED, heatmaps=False) as c:
        staged_answers = {x.cell_id: a for x, a in zip(cells, c.inspect_many([x.load() for x in cells]))}
    flips_expected = sum(line_answers[k].verdict_code != staged_answers[k].verdict_code for k in line_answers)
    assert flips_expected > 0  # the shuffled challenger disagrees somewhere
    cfg = _config(
        tmp_path,
        free_ports(1)[0],
        line["server"].grpc_url,
        archive={"out": str(tmp_path / "archive"), "sample": 0.0},
        shadow={"fraction": 1.0, "pending": 64},
    )
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))

    async def run():
        parsed = parse_config(cfg, tmp_path)
        sim = await PlcSimulator(parsed.stations, parsed.plc.url).start()
        stop = asyncio.Event()
        gateway = Gateway(parsed)
        task = asyncio.create_task(gateway.run(stop))
        try:
            await run_line(sim, _sent(cells), rate=8)
            results = await sim.wait_for(len(cells), timeout=120)
            log = tmp_path / "shadow.jsonl"
            deadline = time.monotonic() + 60
            while not log.exists() or len(log.read_text().splitlines()) < len(cells):
                assert time.monotonic() < deadline, "the shadow did not record every cell"
                await asyncio.sleep(0.2)
            return list(results), generate_latest(REGISTRY).decode()  # the gateway's metrics, in this process
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await sim.stop()

    results, scrape = asyncio.run(run())
    # the PLC got the line's release's answers, never the staged one's
    assert sorted(r.cell_id for r in results) == sorted(line_answers)
    for r in results:
        assert (r.verdict, r.error) == (line_answers[r.cell_id].verdict_code, "")
    rows = [json.loads(x) for x in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert {r["cell_id"] for r in rows} == set(line_answers)
    for r in rows:
        assert r["serving"]["verdict"] == line_answers[r["cell_id"]].verdict
        assert r["staged"]["verdict"] == staged_answers[r["cell_id"]].verdict
        assert r["staged"]["model_versions"]["release"] == staged
    values = _scrape(scrape)
    flips = values[f'battery_shadow_cells_total{{outcome="flip",serving="{serving}",staged="{staged}"}}']
    agree = values.get(f'battery_shadow_cells_total{{outcome="agree",serving="{serving}",staged="{staged}"}}', 0)
    assert (flips, flips + agree) == (flips_expected, len(cells))
    # flagged cells and flipped ones are kept for review, each with the release that judged it
    archived = [json.loads(x) for x in (tmp_path / "archive" / "results.jsonl").read_text().splitlines()]
    flagged = {k for k, a in line_answers.items() if isinstance(a, Inspection) and a.flagged}
    flipped = {r["cell_id"] for r in rows if r["outcome"] == "flip"}
    assert {r["cell_id"] for r in archived if r["kept"] == "flagged"} == flagged
    assert {r["cell_id"] for r in archived if r["kept"] == "shadow_flip"} == flipped
    for r in archived:
        assert r["model_versions"]["release"] == serving and (tmp_path / "archive" / r["ct_path"]).is_file()
        if r["kept"] == "shadow_flip":
            assert r["shadow"]["verdict"] == staged_answers[r["cell_id"]].verdict != r["verdict"]
    # the shipped alert and the dashboard's shadow panel read series a live gateway exports
    live = {re.split(r"[{ ]", x, maxsplit=1)[0] for x in scrape.splitlines() if x and not x.startswith("#")}
    group = next(
        g
        for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        if g["name"] == "model-lifecycle"
    )
    for rule in group["rules"]:
        assert _metric_names(rule["expr"], {}) <= live, rule["alert"]
    targets = [
        t for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Shadow") for t in p["targets"]
    ]
    shadow_targets = [t for t in targets if "battery_shadow_" in t["expr"]]
    assert shadow_targets and all(_metric_names(t["expr"], {}) <= live for t in shadow_targets)
    _models(line, "discard")


def test_the_server_restarts_from_every_state_the_lifecycle_leaves_and_after_a_crash_mid_lifecycle(line, tmp_path):
    """Stage, compare, promote, rollback and discard each leave the repository in a state a new
    tritonserver starts from, serving the same release (as `make serve`, the watchdog and the
    container do after a stop or a crash); so does a server killed while a release is staged."""
    repo = tmp_path / "model_repository"
    build_repository([line["runs"]["good"], line["runs"]["rgb"]], "python-ort", repo, progress=lambda *_: None)
    server = TritonServer(
        repo, Ports(*free_ports(3)), log_path=tmp_path / "tritonserver.log", extra=Access(admin_key=KEY).arguments()
    )
    own = {"server": server, "repo": repo}
    cell = line["cells"][0]

    def restarted(kill: bool = False) -> int:
        """The release `inspect` answers with after a stop (or a SIGKILL) and a new start."""
        if kill:
            server.process.kill()
            server.process.wait()
        server.stop()
        server.start(timeout=180)
        return _release_answering(server.grpc_url, cell)

    server.start(timeout=180)
    try:
        _models(own, "stage", str(line["runs"]["good"]), str(line["runs"]["rgb"]))
        staged = read_state(repo)["staged"]
        _models(own, "compare", "--test", str(line["data"]), "--out", str(tmp_path / "c"), "--quiet")
        assert [p.name for p in repo.iterdir() if p.is_dir() and not (p / "config.pbtxt").exists()] == []
        assert restarted(kill=True) == 1  # killed mid-lifecycle, with a release staged and compared
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            assert c.is_model_ready(STAGED)  # the staged release comes back too
        _models(own, "discard")
        assert restarted() == 1
        _models(own, "stage", str(line["runs"]["good"]), str(line["runs"]["rgb"]))
        staged = read_state(repo)["staged"]
        _models(own, "promote", "--force", "--reason", "restart test")
        assert restarted() == staged
        _models(own, "rollback")
        # a folder that is no model (a person's backup, an older version's comparisons) is left alone
        (repo / "comparisons").mkdir()
        (repo / "comparisons" / "release-2.json").write_text("{}")
        assert restarted() == 1
    finally:
        server.stop()


def test_a_first_start_moves_itself_to_the_better_models_through_stage_compare_and_promote(line, tmp_path):
    """`python -m training.improve` (what a first `make serve` starts in the background once its
    quick models serve): with the better runs trained, it stages them, compares them with the release
    in service on fresh labelled data, and promotes them because the rule allows it; the line then
    answers with the new release and the audit trail says who did it. Against a release the rule
    refuses it stops with the release staged and the line unchanged."""
    repo = tmp_path / "model_repository"
    build_repository([line["runs"]["shuffled"], line["runs"]["rgb"]], "python-ort", repo, progress=lambda *_: None)
    server = TritonServer(
        repo, Ports(*free_ports(3)), log_path=tmp_path / "tritonserver.log", extra=Access(admin_key=KEY).arguments()
    )
    better = tmp_path / "runs" / "standard"  # a trained preset folder: ct/, rgb/ and summary.json
    better.mkdir(parents=True)
    (better / "ct").symlink_to(line["runs"]["good"])
    (better / "rgb").symlink_to(line["runs"]["rgb"])
    (better / "summary.json").write_text(json.dumps({"preset": "standard", "results": {}}))

    def improve(runs: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "training.improve", "--runs", str(runs), "--url", server.grpc_url]
        cmd += ["--repository", str(repo), "--test-data", str(line["data"]), "--rule", str(_small_rule(tmp_path))]
        cmd += ["--nice", "0"]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"TRITON_ADMIN_KEY": KEY}
        )

    server.start(timeout=180)
    try:
        assert _release_answering(server.grpc_url, line["cells"][0]) == 1
        done = improve(better)
        log = (better / "improve.log").read_text()
        assert done.returncode == 0, done.stdout + log[-3000:]
        assert "trained already" in done.stdout and "in service now" in done.stdout
        assert [s for s in ("$ python -m client models stage", "compare", "promote") if s not in log] == []
        state = read_state(repo)
        assert state["serving"] == 2 and state.get("staged") is None
        assert _release_answering(server.grpc_url, line["cells"][0]) == 2
        entries = [json.loads(x) for x in (repo / "audit.jsonl").read_text().splitlines()]
        assert [e["action"] for e in entries] == ["stage", "compare", "promote"]
        assert {e["by"] for e in entries} == {"first start"}

        worse = tmp_path / "runs" / "worse"  # the shuffled classifier against the good one now in service
        worse.mkdir()
        (worse / "ct").symlink_to(line["runs"]["shuffled"])
        (worse / "rgb").symlink_to(line["runs"]["rgb"])
        (worse / "summary.json").write_text(json.dumps({"preset": "standard", "results": {}}))
        done = improve(worse)
        assert done.returncode == 1 and "refused" in done.stdout, done.stdout
        state = read_state(repo)
        assert state["serving"] == 2 and state["staged"] == 3
        assert _release_answering(server.grpc_url, line["cells"][0]) == 2
    finally:
        server.stop()
