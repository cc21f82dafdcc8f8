"""Several real tritonservers behind one client and one gateway: balanced, failing over, rolled.

Each replica is a tritonserver on its own copy of the repository, pinned to one core. The
plant test runs stations through the gateway while a replica is killed, restarted, drained
(SIGTERM) and a model version is rolled across the replicas: no cell may be lost or answered
twice, and each answer must be the one the service gives the cell when nothing goes wrong.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from benchmarks.plant import Replicas, cpu_lists, evenness, run_plant, write_results
from client.dataset import pair_cells
from client.inspection import Cell, CellError, Inspection
from client.service import Backoff, InspectionClient
from core import interface as api
from export.repository import build_repository
from tests.support.tiny_models import make_ct_run, make_rgb_run

KEY = "replicas-key-" + "Xy7" * 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("replicas")
    runs = [make_ct_run(root / "ct", size=64), make_rgb_run(root / "rgb", size=64)]
    repo = root / "model_repository"
    build_repository(runs, "python-ort", repo, progress=lambda *_: None)
    paired, _ = pair_cells(small_dataset[0], progress=False)
    return {"repo": repo, "paired": paired, "runs": runs}


def test_the_client_spreads_cells_evenly_and_a_draining_replica_fails_no_request(setup, tmp_path):
    replicas = Replicas(setup["repo"], tmp_path, 2, cpu_lists(2, None), KEY).start()
    cells = [Cell(c.ct_path.read_bytes(), c.meta, c.rgb_path.read_bytes(), c.cell_id) for c in setup["paired"]]
    try:
        # the client's own retries short (gRPC's retries do most of the work; the client's catch a
        # request whose every gRPC attempt met the stopping replica before it was left out)
        quick = Backoff(retries=3, first=0.1, longest=0.5)
        with InspectionClient(replicas.url, heatmaps=False, backoff=quick) as client:
            before = replicas.served()
            answers = client.inspect_many(cells * 2, concurrency=4)
            assert all(isinstance(a, Inspection) for a in answers), [a for a in answers if isinstance(a, CellError)]
            # tritonserver counts an inference after its answer is on the way: on a loaded machine the
            # last few reach the metrics a moment after the client has them
            deadline = time.monotonic() + 10
            while True:
                spread = [b - a for a, b in zip(before, replicas.served())]
                if sum(spread) >= len(answers) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert sum(spread) == len(answers)
            assert evenness(spread) <= 0.2, spread  # round robin: each replica every other request

            stop, results = threading.Event(), []

            def traffic(k: int) -> None:
                i = k
                while not stop.is_set():
                    results.append(client.inspect_many([cells[i % len(cells)]], concurrency=1)[0])
                    i += 4

            with ThreadPoolExecutor(4) as pool:
                for k in range(4):
                    pool.submit(traffic, k)
                time.sleep(1.0)
                drained = replicas.drain(1)  # refuses new requests while it finishes its own, then exits
                after_drain = len(results)
                time.sleep(1.0)
                stop.set()
            failed = [r for r in results if isinstance(r, CellError)]
            assert not failed, failed[:3]
            assert len(results) > after_drain, "no request was answered after the replica stopped"
            assert drained > 0
    finally:
        replicas.stop()


def test_a_plant_loses_no_cell_and_answers_none_twice_through_kill_restart_drain_and_rollout(setup, tmp_path):
    replicas = Replicas(setup["repo"], tmp_path, 2, cpu_lists(2, None), KEY, stage=setup["runs"]).start()
    chosen = setup["paired"][:12]
    try:
        with InspectionClient(replicas.url, heatmaps=False) as client:
            expected = {
                c.cell_id: (a.verdict_code, a.confidence)
                for c, a in zip(chosen, client.inspect_many([c.load() for c in chosen]))
            }
        cells = [(c.cell_id, str(c.ct_path), str(c.rgb_path), c.meta) for c in chosen]
        out = asyncio.run(run_plant(replicas, cells, stations=3, rate=6.0, phase_s=4.0, folder=tmp_path))
        assert out["exactly_once"] == {"lost": [], "twice": []}
        assert out["sent"] == out["answered"] > 100
        for r in out["results"]:
            verdict, confidence = expected[r.cell_id.split("#")[0]]
            assert (r.verdict, r.error) == (verdict, ""), r
            assert r.confidence == pytest.approx(confidence, abs=1e-5)
        traffic = out["traffic"]
        assert min(traffic["steady"]) > 0 and evenness(traffic["steady"]) <= 0.2, traffic
        assert traffic["kill"][0] == 0, traffic  # the killed replica answered nothing ...
        assert traffic["restart"][0] > 0, traffic  # ... and is back in the rotation once restarted
        assert min(traffic["after"]) > 0, traffic
        for phase in ("kill", "restart", "drain", "rollout"):
            assert out["phases"][phase]["cells"] > 0 and out["phases"][phase]["errors"] == 0, out["phases"]
        for server in replicas.servers:  # release 2 serves on every replica, release 1 stays loaded for a rollback
            with InspectionClient(server.grpc_url, heatmaps=False) as c:
                assert c.inspect_many([chosen[0].load()])[0].model_versions["release"] == 2
            with grpcclient.InferenceServerClient(server.grpc_url) as c:
                assert c.is_model_ready(api.CT_CLASSIFIER, "2") and c.is_model_ready(api.CT_CLASSIFIER, "1")
                assert not c.is_model_ready(api.INSPECT + api.STAGED_SUFFIX)
        # what the benchmark command writes from it
        settings = {"stations": 3, "rate": 6.0, "replicas": 2, "repository": tmp_path}
        text = write_results(out, tmp_path, settings, ["0", "1"], "this machine")
        assert "**0 lost, 0 answered twice**" in text and "| kill |" in text and "| rollout |" in text
        saved = json.loads((tmp_path / "plant.json").read_text())
        assert saved["exactly_once"] == {"lost": [], "twice": []} and saved["steady_evenness"] <= 0.2
    finally:
        replicas.stop()
