"""Trigger-to-answer latency through the line gateway at a line rate.

    python -m benchmarks gateway [--rate 4] [--seconds 60] [--stations 2] [--takt-ms 2000] [--watch subscribe|poll]
                                 [--shadow 0,0.5 --rounds 2]

A real tritonserver (the serving benchmark's repository), the gateway as its own process
(`python -m client gateway`, as on a line PC) and a simulated PLC (asyncua's OPC UA server)
that raises each station's Trigger on a fixed schedule and times every cell from raising
Trigger to seeing its ResultCounter change: the subscription's notification (or polling),
OPC UA round trips, the outbox's synchronous commits, decoding and inference included.
Reports percentiles, the share of answers within takt, the time the PLC had to wait for its
trigger to be acknowledged, and the OPC UA requests the gateway sent the PLC per second (from
its own metrics), which is what watching the stations costs the PLC, and the CPU the gateway
and the simulated PLC used: on a small machine they take it from Triton.

With --shadow, each share of shadow traffic is run in turn (`--rounds` times, alternating, so
that a drift of the machine falls on every share alike): the served runs are staged a second
time as a release of their own (`inspect_staged`, the same networks: the shadow costs what the
line's inference costs) and the gateway sends that share of its answered cells to it. What the
PLC sees with and without it is the shadow's cost to the line.

Results: benchmarks/results/gateway-<time>/ (gateway.json, summary.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serving import add_served_arguments, prepare
from client.dataset import pair_cells
from client.gateway.config import load_config
from client.gateway.simulator import PlcSimulator, run_line
from serving.server import Ports, TritonServer, free_ports


def parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="python -m benchmarks gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=4.0, help="cells per second over all stations (default 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long cells are triggered (default 60)")
    p.add_argument("--stations", type=int, default=2, help="stations, each with its own trigger (default 2)")
    p.add_argument("--takt-ms", type=float, default=2000.0, help="each station's takt budget (default 2000)")
    p.add_argument(
        "--images",
        choices=("path", "bytes"),
        default="path",
        help="images as file paths or in ByteString nodes (default path)",
    )
    p.add_argument(
        "--watch",
        choices=("subscribe", "poll"),
        default="subscribe",
        help="the gateway's plc.watch: OPC UA subscription or polling (default subscribe)",
    )
    p.add_argument("--poll-ms", type=float, default=10.0, help="the gateway's plc.poll_ms (default 10)")
    p.add_argument(
        "--shadow",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[0.0],
        metavar="SHARES",
        help="shares of shadow traffic to a staged release, each run in turn, e.g. 0,0.5 (default 0: none)",
    )
    p.add_argument("--rounds", type=int, default=1, help="times each --shadow share is run, alternating (default 1)")
    p.add_argument(
        "--shadow-server",
        choices=("line", "own"),
        default="line",
        help="where the staged release runs: on the line's tritonserver, or on one of its own (shadow.url), the "
        "line's pinned to CPU 0 and the shadow's to CPU 1 in every run, shadowed or not (default line)",
    )
    add_served_arguments(p)
    return p


def _plc_requests(metrics_port: int) -> float:
    """The gateway's battery_gateway_plc_requests_total, reads and writes together, from its metrics port."""

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
    return sum(
        s.value
        for f in families
        if f.name == "battery_gateway_plc_requests"
        for s in f.samples
        if s.name.endswith("_total")
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(args, cfg_path: Path, cfg, sent, log: Path) -> dict:

    async with PlcSimulator(cfg.stations, cfg.plc.url) as sim:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "client", "gateway", "--config", str(cfg_path), "--log-level", "WARNING"],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            # warm-up: a few cells through the whole path before the clock starts
            warm = await run_line(sim, [(f"warm-{c[0]}", *c[1:]) for c in sent[:4]], rate=args.rate, count=4)
            await sim.wait_for(warm, timeout=120)
            sim.results.clear()
            waits: list[float] = []
            original = sim.send

            async def timed_send(*a, **k):
                waits.append(await original(*a, **k))

            sim.send = timed_send
            requests = await asyncio.to_thread(_plc_requests, cfg.metrics_port)
            cpu = {"gateway": _cpu_seconds(gateway.pid), "plc": time.process_time()}
            start = time.monotonic()
            n = await run_line(sim, sent, args.rate, seconds=args.seconds)
            results = await sim.wait_for(n, timeout=max(60.0, args.seconds))
            elapsed = time.monotonic() - start
            cpu = {"gateway": _cpu_seconds(gateway.pid) - cpu["gateway"], "plc": time.process_time() - cpu["plc"]}
            requests = await asyncio.to_thread(_plc_requests, cfg.metrics_port) - requests
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
    return {
        "sent": n,
        "answered": len(results),
        "elapsed_s": elapsed,
        "results": results,
        "ack_waits": waits,
        "plc_requests_per_s": requests / elapsed,
        "cpu_cores": {k: v / elapsed for k, v in cpu.items()},
    }


def _latency(results, takt_ms: float) -> tuple[dict, float]:
    lat = np.array([r.seconds for r in results]) * 1000
    if not len(lat):
        return {}, 0.0
    return {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)} | {"max": float(lat.max())}, float(
        np.mean(lat <= takt_ms)
    )


def _staged_copy(args, runs, folder: Path) -> Path:
    """The benchmark's repository with the served runs staged again as a release of their own."""
    from export.repository import stage_release  # noqa: PLC0415 - torch: only for --shadow

    repo = folder / "model_repository"
    shutil.copytree(args.repository, repo)
    stage_release(repo, runs, args.rule, progress=lambda *_: None)
    return repo


def run(args) -> Path:

    runs, data, cells, _ = prepare(args)
    folder = args.out / time.strftime("gateway-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    if any(f > 0 for f in args.shadow):
        args.repository = _staged_copy(args, runs, folder)
    own = args.shadow_server == "own"
    server = TritonServer(
        args.repository, Ports(*free_ports(3)), log_path=folder / "tritonserver.log", cpus="0" if own else None
    )
    server.start(timeout=300)
    shadow_server = None
    if own:
        shadow_repo = folder / "shadow_repository"
        shutil.copytree(args.repository, shadow_repo)
        shadow_server = TritonServer(
            shadow_repo, Ports(*free_ports(3)), log_path=folder / "tritonserver-shadow.log", cpus="1"
        )
        shadow_server.start(timeout=300)
    paired, _ = pair_cells(data, progress=False)
    step = max(1, len(paired) // args.cells)
    chosen = paired[::step][: args.cells]
    sent = [
        (
            c.cell_id,
            str(c.ct_path.resolve()) if args.images == "path" else c.ct_path.read_bytes(),
            str(c.rgb_path.resolve()) if args.images == "path" else c.rgb_path.read_bytes(),
            c.meta,
        )
        for c in chosen
    ]
    legs = []
    try:
        for round_ in range(args.rounds):
            for share in args.shadow:
                tag = f"shadow{share:g}-round{round_ + 1}"
                plc_port, metrics_port = free_ports(2)
                config = {
                    "plc": {
                        "url": f"opc.tcp://127.0.0.1:{plc_port}/line/",
                        "watch": args.watch,
                        "poll_ms": args.poll_ms,
                    },
                    "triton": {"url": server.grpc_url},
                    "outbox": str((folder / f"outbox-{tag}.sqlite").resolve()),  # a fresh outbox: no cell is a repeat
                    "metrics_port": metrics_port,
                    "shadow": {
                        "fraction": share,
                        "log": str((folder / f"shadow-{tag}.jsonl").resolve()),
                        "pending": 16,
                        "url": shadow_server.grpc_url if shadow_server else None,
                    },
                    "stations": [
                        {
                            "name": f"station{i + 1}",
                            "prefix": f"ns=2;s=Line1.Station{i + 1}.",
                            "images": args.images,
                            "takt_ms": args.takt_ms,
                        }
                        for i in range(args.stations)
                    ],
                }
                cfg_path = folder / f"gateway-{tag}.yaml"
                cfg_path.write_text(yaml.safe_dump(config))
                cfg = load_config(cfg_path)
                print(
                    f"gateway: {args.stations} station(s), {args.rate:g} cells/s for {args.seconds:g} s, takt "
                    f"{args.takt_ms:g} ms, watching by {args.watch}, shadow share {share:g} (round {round_ + 1})"
                )
                out = asyncio.run(_drive(args, cfg_path, cfg, sent, folder / f"gateway-{tag}.log"))
                log = folder / f"shadow-{tag}.jsonl"
                shadowed = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
                legs.append((share, round_ + 1, out, shadowed))
    finally:
        server.stop()
        if shadow_server is not None:
            shadow_server.stop()
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [str(r) for r in runs],
        "data": str(data),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "legs": [],
    }
    for share, round_, out, shadowed in legs:
        counts: dict[tuple, int] = {}
        for r in out["results"]:
            counts[(r.station, r.cell_id)] = counts.get((r.station, r.cell_id), 0) + 1
        latency, within = _latency(out["results"], args.takt_ms)
        waits = np.array(out["ack_waits"]) * 1000
        result["legs"].append(
            {
                "shadow": share,
                "round": round_,
                "sent": out["sent"],
                "answered": out["answered"],
                "elapsed_s": out["elapsed_s"],
                "duplicates": sum(n - 1 for n in counts.values() if n > 1),
                "errors": sum(1 for r in out["results"] if r.error),
                "plc_requests_per_s": out["plc_requests_per_s"],
                "cpu_cores": out["cpu_cores"],
                "within_takt": within,
                "latency_ms": latency,
                "ack_wait_ms": {f"p{q}": float(np.percentile(waits, q)) for q in (50, 99)} if len(waits) else {},
                "shadowed": len(shadowed),
                "shadow_outcomes": {
                    o: sum(1 for x in shadowed if x["outcome"] == o) for o in ("agree", "flip", "error")
                },
            }
        )
    (folder / "gateway.json").write_text(json.dumps(result, indent=1, default=str))
    (folder / "summary.md").write_text(summary(result))
    return folder


def summary(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"# Gateway: trigger to answer, {r['started']}",
        "",
        f"{s['stations']} station(s), {s['rate']:g} cells/s for {s['seconds']:g} s per run, images as {s['images']}, "
        f"takt {s['takt_ms']:g} ms, watching by {s['watch']} ({s['poll_ms']:g} ms); runs {', '.join(r['runs'])}; "
        + (
            "the staged release on a tritonserver of its own (CPU 1; the line's on CPU 0)."
            if s.get("shadow_server") == "own"
            else "the staged release on the line's tritonserver."
        ),
        "",
        "| shadow share (round) | triggered / answered / duplicates / errors | trigger -> result p50 / p90 / p99 / max "
        "| within takt | PLC ack wait p50 / p99 | OPC UA requests | CPU gateway / PLC "
        "| shadowed (agree / flip / error) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for leg in r["legs"]:
        lat, ack, cores, o = leg["latency_ms"], leg["ack_wait_ms"], leg["cpu_cores"], leg["shadow_outcomes"]
        latency = f"{lat['p50']:.0f} / {lat['p90']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} ms" if lat else "-"
        waits = f"{ack['p50']:.0f} / {ack['p99']:.0f} ms" if ack else "-"
        lines.append(
            f"| {leg['shadow']:g} ({leg['round']}) | {leg['sent']} / {leg['answered']} / {leg['duplicates']} / "
            f"{leg['errors']} | {latency} | {leg['within_takt']:.1%} | {waits} | {leg['plc_requests_per_s']:.0f} /s | "
            f"{cores['gateway']:.2f} / {cores['plc']:.2f} | {leg['shadowed']} ({o['agree']} / {o['flip']} / "
            f"{o['error']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.stations < 1 or args.poll_ms <= 0 or args.rounds < 1:
        raise SystemExit("error: --rate, --seconds and --poll-ms must be positive, --stations and --rounds at least 1")
    if any(not 0 <= f <= 1 for f in args.shadow):
        raise SystemExit(f"error: --shadow shares must be within 0..1, got {args.shadow}")
    folder = run(args)
    print((folder / "summary.md").read_text())
    print(f"results in {folder}")
    r = json.loads((folder / "gateway.json").read_text())
    return 0 if all(x["answered"] == x["sent"] and not x["duplicates"] for x in r["legs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
