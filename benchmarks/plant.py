"""A plant on several Triton replicas: stations -> gateway -> replicas, with faults under load.

    python -m benchmarks plant [--replicas 2] [--stations 4] [--rate 4] [--phase-s 20]

Real tritonservers on loopback, each on its own copy of the repository fitted to the cores it
is pinned to (`--cores`, default one core each, round robin over the machine's), the line
gateway as its own process (`python -m client gateway`) with every replica in `triton.url`,
and a simulated PLC (asyncua) raising each station's Trigger on a fixed schedule. While the
line runs, in phases of `--phase-s` seconds:

  steady     all replicas up (the traffic per replica is compared here)
  kill       replica 1 killed (SIGKILL: its requests in flight fail)
  restart    replica 1 started again
  drain      replica 2 stopped as an orchestrator stops it (SIGTERM: it refuses new requests
             while it finishes the ones it has), then started again
  rollout    a new release promoted on each replica in turn (staged on every replica before the
             start: the served runs exported again; promoted through the repository API with
             the admin key), so for a while the replicas answer with different releases
  after      all replicas up on the new release

Every trigger must get exactly one answer: the PLC's side counts lost cells (triggered, never
answered) and cells answered twice. Reported per phase: cells triggered, trigger-to-answer
p50/p99/max, errors, and the inferences each replica answered (from its own metrics).

Results: benchmarks/results/plant-<time>/ (plant.json, summary.md, each replica's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from client.dataset import pair_cells
from client.gateway.config import load_config
from client.gateway.simulator import PlcSimulator, Result, run_line
from core import interface as api
from export import release
from export.spec import fit_to_cores
from serving.server import ADMIN_KEY_ENV, Access, Ports, TritonServer, free_ports

PHASES = ("steady", "kill", "restart", "drain", "rollout", "after")
_SUCCESS = re.compile(r'^nv_inference_request_success\{model="' + api.INSPECT + r'",version="\d+"\} (\d+)', re.M)


def cpu_lists(n: int, cores: str | None) -> list[str | None]:
    """Each replica's CPU list: `cores` as "0;1" (one entry per replica, cycled), or one core
    each, round robin over the cores this process may use; [None] * n for "none" (unpinned)."""
    if cores == "none":
        return [None] * n
    if cores:
        given = [c.strip() for c in cores.split(";") if c.strip()]
        return [given[i % len(given)] for i in range(n)]
    mine = sorted(os.sched_getaffinity(0))
    return [str(mine[i % len(mine)]) for i in range(n)]


def cpu_count(cpus: str) -> int:
    """How many CPUs a taskset list names ("0", "0,2", "1-3")."""
    n = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class Replicas:
    """n tritonservers, each on its own copy of `repository` fitted to its CPUs and pinned to them,
    with the administrative APIs open to `admin_key` (for version rollouts)."""

    def __init__(
        self,
        repository: Path,
        root: Path,
        n: int,
        cpus: list[str | None],
        admin_key: str,
        stage=None,
        takt: float = 0.0,
    ) -> None:
        """`stage`: runs staged as the next release of every replica (what the rollout promotes);
        `takt`: each replica sheds what it could not answer within it (serving.front)."""
        self.admin_key = admin_key
        self.servers: list[TritonServer] = []
        if stage:
            from export.repository import stage_release  # noqa: PLC0415 - torch, for the staged release

            staged = root / "staged_repository"
            if staged.exists():
                shutil.rmtree(staged)
            shutil.copytree(repository, staged)
            stage_release(staged, stage, progress=lambda *_: None)
            repository = staged
        for i in range(n):
            folder = root / f"replica{i + 1}"
            repo = folder / "model_repository"
            if repo.exists():
                shutil.rmtree(repo)
            shutil.copytree(repository, repo)
            if cpus[i] is not None:
                fit_to_cores(repo, cpu_count(cpus[i]))
            self.servers.append(
                TritonServer(
                    repo,
                    Ports(*free_ports(3)),
                    log_path=folder / "tritonserver.log",
                    extra=Access(admin_key=admin_key).arguments(),
                    cpus=cpus[i],
                    takt=takt,
                )
            )

    @property
    def url(self) -> str:
        """Every replica's gRPC address, as the client and the gateway take them."""
        return ",".join(f"127.0.0.1:{s.ports.grpc}" for s in self.servers)

    def start(self, timeout: float = 300.0) -> Replicas:
        errors: list[BaseException] = []

        def one(s: TritonServer) -> None:
            try:
                s.start(timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - reported below, with the others stopped
                errors.append(e)

        threads = [threading.Thread(target=one, args=(s,)) for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def kill(self, i: int) -> None:
        """SIGKILL: no goodbye, requests in flight fail."""
        p = self.servers[i].process
        p.send_signal(signal.SIGKILL)
        p.wait()

    def drain(self, i: int) -> float:
        """SIGTERM, as Kubernetes or systemd stop it: it refuses new requests, finishes those it
        has and exits; the seconds that took."""
        start = time.monotonic()
        p = self.servers[i].process
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        return time.monotonic() - start

    def restart(self, i: int, timeout: float = 300.0) -> float:
        """Start a stopped replica again; the seconds until it was ready."""
        start = time.monotonic()
        self.servers[i].start(timeout=timeout)
        return time.monotonic() - start

    def promote(self, i: int) -> float:
        """Promote the staged release on replica i (export.release.promote: the line's ensembles
        re-pinned and swapped); the seconds it took."""
        server = self.servers[i]
        start = time.monotonic()
        with release.Server(server.grpc_url, self.admin_key) as admin:
            release.promote(server.repository, admin)
        return time.monotonic() - start

    def served(self) -> list[int | None]:
        """Inferences of `inspect` each replica has answered since it started (None: not answering)."""
        out: list[int | None] = []
        for s in self.servers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{s.ports.metrics}/metrics", timeout=2) as r:
                    text = r.read().decode()
                out.append(sum(int(n) for n in _SUCCESS.findall(text)))
            except OSError:
                out.append(None)
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Traffic:
    """Inferences per replica and phase, from each replica's own counter (sampled; a counter that
    went back to 0 belongs to a restarted replica and is counted from there)."""

    replicas: Replicas
    phase: str = "warm-up"
    counts: dict[str, list[int]] = field(default_factory=dict)
    _last: list[int] = field(default_factory=list)

    def sample(self) -> None:
        now = self.replicas.served()
        if not self._last:
            self._last = [0] * len(now)
        row = self.counts.setdefault(self.phase, [0] * len(now))
        for i, n in enumerate(now):
            if n is None:
                continue
            row[i] += n - self._last[i] if n >= self._last[i] else n
            self._last[i] = n

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase


def exactly_once(results: list[Result], sent_ids: list[str]) -> dict:
    """Lost (triggered, never answered) and repeated (answered more than once) cells."""
    answered = Counter(r.cell_id for r in results)
    return {
        "lost": sorted(set(sent_ids) - set(answered)),
        "twice": sorted(c for c, n in answered.items() if n > 1),
    }


def phase_latency(results: list[Result], marks: list[tuple[str, float]]) -> dict[str, dict]:
    """Per phase (by the time each cell was triggered): cells, errors, trigger-to-answer
    p50/p99/max in ms."""
    out = {}
    for k, (name, start) in enumerate(marks):
        end = marks[k + 1][1] if k + 1 < len(marks) else float("inf")
        mine = [r for r in results if start <= r.triggered < end]
        ms = np.array([r.seconds * 1000 for r in mine])
        out[name] = {
            "cells": len(mine),
            "errors": sum(1 for r in mine if r.error),
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "max_ms": float(ms.max()) if len(ms) else None,
        }
    return out


def evenness(counts: list[int]) -> float:
    """Largest relative deviation of a replica's share from the mean (0: perfectly even)."""
    mean = float(np.mean(counts))
    return float(max(abs(c - mean) for c in counts) / mean) if mean else float("inf")


async def run_plant(
    replicas: Replicas,
    cells: list[tuple],
    stations: int,
    rate: float,
    phase_s: float,
    folder: Path,
    takt_ms: float = 2000.0,
    say=print,
) -> dict:
    """Drive the line through every phase (module docstring) and return what happened."""

    plc_port, metrics_port = free_ports(2)
    config = {
        "plc": {"url": f"opc.tcp://127.0.0.1:{plc_port}/line/", "poll_ms": 5, "timeout_s": 4},
        "triton": {"url": replicas.url, "timeout_s": 30, "retry_s": [0.1, 1.0], "concurrency": 8},
        "outbox": str((folder / "outbox.sqlite").resolve()),
        "metrics_port": metrics_port,
        "stations": [
            {"name": f"station{i + 1}", "prefix": f"ns=2;s=Line1.Station{i + 1}.", "takt_ms": takt_ms}
            for i in range(stations)
        ],
    }
    cfg_path = folder / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cfg = load_config(cfg_path)
    traffic = Traffic(replicas)
    marks: list[tuple[str, float]] = []
    events: list[dict] = []

    async def phase(name: str) -> None:
        await asyncio.to_thread(traffic.enter, name)
        marks.append((name, time.monotonic()))
        say(f"  {name}")

    async def event(what: str, action, *args) -> None:
        seconds = await asyncio.to_thread(action, *args)
        events.append({"phase": marks[-1][0], "event": what, "seconds": seconds})
        say(f"    {what}" + (f": {seconds:.1f} s" if seconds is not None else ""))

    async def scenario() -> None:
        n = len(replicas.servers)
        await phase("steady")
        await asyncio.sleep(phase_s)
        await phase("kill")
        await event("replica 1 killed", replicas.kill, 0)
        await asyncio.sleep(phase_s)
        await phase("restart")
        await event("replica 1 started again (until ready)", replicas.restart, 0)
        await asyncio.sleep(phase_s)
        await phase("drain")
        await event(f"replica {min(2, n)} stopped by SIGTERM (until exited)", replicas.drain, min(1, n - 1))
        await event(f"replica {min(2, n)} started again (until ready)", replicas.restart, min(1, n - 1))
        await asyncio.sleep(phase_s / 2)
        await phase("rollout")
        for i in range(n):
            await event(f"replica {i + 1}: staged release promoted", replicas.promote, i)
            await asyncio.sleep(phase_s / (2 * n))
        await phase("after")
        await asyncio.sleep(phase_s)

    log = open(folder / "gateway.log", "wb")
    async with PlcSimulator(cfg.stations, cfg.plc.url) as sim:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "client", "gateway", "--config", str(cfg_path), "--log-level", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            warm = await run_line(sim, [(f"warm-{c[0]}", *c[1:]) for c in cells[:4]], rate=rate, count=4)
            await sim.wait_for(warm, timeout=120)
            sim.results.clear()
            stop = asyncio.Event()
            line = asyncio.create_task(run_line(sim, cells, rate, stop=stop))
            try:
                await scenario()
            finally:
                stop.set()
            sent = await line
            results = await sim.wait_for(sent, timeout=120)
            traffic.enter("end")
        finally:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
            log.close()
    # the ids run_line gave the cells it sent (cycled cells get "#round")
    sent_ids = [cells[k % len(cells)][0] + (f"#{k // len(cells)}" if k >= len(cells) else "") for k in range(sent)]
    return {
        "sent": sent,
        "answered": len(results),
        "results": results,
        "phases": phase_latency(results, marks),
        "events": events,
        "traffic": {k: v for k, v in traffic.counts.items() if k in PHASES},
        "exactly_once": exactly_once(results, sent_ids),
    }


def parser() -> argparse.ArgumentParser:
    from benchmarks.serving import add_served_arguments  # noqa: PLC0415 - torch only for the command

    p = argparse.ArgumentParser(
        prog="python -m benchmarks plant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--replicas", type=int, default=2, help="tritonserver replicas (default 2)")
    p.add_argument(
        "--cores",
        help='each replica\'s CPUs as taskset lists separated by ";" (e.g. "0;1" or "0-1;2-3"), cycled; '
        '"none" leaves them unpinned (default: one core each, round robin)',
    )
    p.add_argument("--stations", type=int, default=4, help="stations, each with its own trigger (default 4)")
    p.add_argument("--rate", type=float, default=4.0, help="cells per second over all stations (default 4)")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds of each phase (default 20)")
    p.add_argument("--takt-ms", type=float, default=2000.0, help="each station's takt budget (default 2000)")
    add_served_arguments(p)
    return p


def machine_line(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['instruction_set']}"


def summary(r: dict) -> str:
    eo = r["exactly_once"]
    lines = [
        f"# Plant: {r['settings']['stations']} stations, {r['settings']['rate']:g} cells/s, "
        f"{r['settings']['replicas']} replicas",
        "",
        f"Machine: {r['machine']}. Replica CPUs: {', '.join(str(c) for c in r['cpus'])}.",
        "",
        f"Triggered {r['sent']}, answered {r['answered']}: **{len(eo['lost'])} lost, {len(eo['twice'])} answered "
        f"twice**, {sum(p['errors'] for p in r['phases'].values())} answered with an error.",
        "",
        "| phase | cells | errors | p50 ms | p99 ms | max ms | inferences per replica |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in PHASES:
        p = r["phases"].get(name)
        if p is None:
            continue
        t = r["traffic"].get(name, [])

        def ms(v):
            return "-" if v is None else f"{v:.0f}"

        lines.append(
            f"| {name} | {p['cells']} | {p['errors']} | {ms(p['p50_ms'])} | {ms(p['p99_ms'])} | {ms(p['max_ms'])} | "
            f"{' / '.join(map(str, t))} |"
        )
    lines += [
        "",
        f"Steady phase: the replicas' shares deviate at most {r['steady_evenness']:.1%} from even.",
        "",
        "| event | seconds |",
        "|---|---:|",
        *[f"| {e['event']} | {e['seconds']:.1f} |" for e in r["events"] if e["seconds"] is not None],
    ]
    return "\n".join(lines) + "\n"


def write_results(out: dict, folder: Path, settings: dict, cpus: list, machine: str) -> str:
    """plant.json and summary.md in `folder` from what run_plant returned; the summary's text."""
    steady = out["traffic"].get("steady", [])
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "cpus": cpus,
        "settings": {k: v for k, v in settings.items() if k != "func"},
        "sent": out["sent"],
        "answered": out["answered"],
        "phases": out["phases"],
        "events": out["events"],
        "traffic": out["traffic"],
        "steady_evenness": evenness(steady) if steady else float("nan"),
        "exactly_once": out["exactly_once"],
    }
    text = summary(result)
    (folder / "summary.md").write_text(text)
    (folder / "plant.json").write_text(json.dumps(result, indent=2, default=str))
    return text


def main(argv=None) -> int:
    from benchmarks import measure  # noqa: PLC0415
    from benchmarks.serving import prepare  # noqa: PLC0415

    args = parser().parse_args(argv)
    if args.replicas < 2:
        raise SystemExit("error: --replicas must be at least 2 (the phases stop one while the others serve)")
    runs, data, _, _ = prepare(args)
    folder = args.out / time.strftime("plant-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    cpus = cpu_lists(args.replicas, args.cores)
    key = os.environ.get(ADMIN_KEY_ENV) or "plant-" + os.urandom(12).hex()
    print(f"plant: {args.replicas} replicas on CPUs {cpus}, {args.stations} stations, {args.rate:g} cells/s")
    replicas = Replicas(args.repository, folder, args.replicas, cpus, key, stage=runs).start()
    try:
        paired, _ = pair_cells(data, progress=False)
        step = max(1, len(paired) // args.cells)
        cells = [(c.cell_id, str(c.ct_path.resolve()), str(c.rgb_path.resolve()), c.meta) for c in paired[::step]]
        out = asyncio.run(
            run_plant(replicas, cells[: args.cells], args.stations, args.rate, args.phase_s, folder, args.takt_ms)
        )
    finally:
        replicas.stop()
    text = write_results(out, folder, vars(args), cpus, machine_line(measure.machine()))
    print(text)
    print(f"results: {folder}")
    eo = out["exactly_once"]
    return 1 if eo["lost"] or eo["twice"] else 0
