"""`python -m client gateway` and `python -m client plc-sim`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

from prometheus_client import start_http_server

from client.channel import addresses
from client.dataset import pair_cells
from client.gateway.config import ConfigError, load_config
from client.gateway.gateway import Gateway, triton_client
from client.gateway.plc import open_session
from client.gateway.simulator import PlcSimulator, run_line

EXAMPLE = Path(__file__).with_name("example.yaml")


def add_parsers(sub) -> None:
    g = sub.add_parser(
        "gateway",
        help="the line gateway: PLC (OPC UA) triggers -> Triton -> verdicts on the PLC",
        description=f"Run the line gateway. Start from {EXAMPLE} (every option is explained there).",
    )
    g.add_argument(
        "--config", type=Path, required=True, help="gateway YAML (PLC, stations and their nodes, Triton, outbox)"
    )
    g.add_argument(
        "--check",
        action="store_true",
        help="read every configured node once, check Triton is ready, and exit (0: all good, 1: something to fix)",
    )
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    g.set_defaults(func=cmd_gateway)
    s = sub.add_parser(
        "plc-sim",
        help="a simulated line PLC (OPC UA server) that triggers cells of a data set folder",
        description="Serve the configuration's stations at plc.url and trigger cells from an AI-Hub-layout "
        "folder at a line rate, printing each result the gateway writes back.",
    )
    s.add_argument(
        "--config", type=Path, required=True, help="the gateway's YAML (stations and node ids are taken from it)"
    )
    s.add_argument("--data", type=Path, required=True, help="AI-Hub-layout folder whose cells are sent (cycled)")
    s.add_argument("--rate", type=float, default=1.0, help="cells per second over all stations (default 1)")
    s.add_argument("--count", type=int, help="stop after this many cells (default: until Ctrl-C)")
    s.set_defaults(func=cmd_plc_sim)


def _load(path: Path):

    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_gateway(args) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if args.log_level != "DEBUG":  # asyncua logs every request at INFO
        logging.getLogger("asyncua").setLevel(logging.WARNING)
    cfg = _load(args.config)
    if args.check:
        return asyncio.run(_check(cfg))

    if cfg.metrics_port:
        try:
            start_http_server(cfg.metrics_port)
        except OSError as e:
            raise SystemExit(f"error: cannot serve metrics on port {cfg.metrics_port}: {e}") from None

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(cfg)
        print(
            f"gateway: PLC {cfg.plc.url}, stations {', '.join(s.name for s in cfg.stations)}, Triton {cfg.triton.url}, "
            f"outbox {cfg.outbox}"
            + (f", metrics :{cfg.metrics_port}" if cfg.metrics_port else "")
            + "; Ctrl-C stops it",
            flush=True,
        )
        await gateway.run(stop)
        print("gateway stopped; unfinished cells stay in the outbox and resume at the next start", flush=True)

    asyncio.run(main())
    return 0


async def _check(cfg) -> int:

    problems = 0
    try:
        client = await open_session(cfg.plc)
    except Exception as e:
        print(f"PLC {cfg.plc.url}: cannot connect: {e or type(e).__name__}")
        return 1
    try:
        for st in cfg.stations:
            for role, node_id in st.nodes.items():
                try:
                    node = client.get_node(node_id)
                    value = await node.read_value()
                    vtype = await node.read_data_type_as_variant_type()
                    shown = f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else repr(value)
                    print(f"  ok    {st.name:<12} {role:<15} {node_id:<45} {vtype.name:<10} {shown[:40]}")
                except Exception as e:
                    problems += 1
                    print(f"  FAIL  {st.name:<12} {role:<15} {node_id:<45} {e or type(e).__name__}")
    finally:
        await client.disconnect()
    t = cfg.triton
    replicas = addresses(t.url)  # each replica of a list on its own; a dns:/// name as a whole
    for url in replicas if len(replicas) > 1 else [t.url]:
        async with triton_client(dataclasses.replace(t, url=url)) as c:
            ready = await c.ready()
        print(
            f"  {'ok  ' if ready else 'FAIL'}  Triton {url}: "
            f"{'inspect is ready' if ready else 'not ready (start it with make serve)'}"
        )
        problems += not ready
    print("all good" if not problems else f"{problems} problem(s)")
    return 0 if not problems else 1


def cmd_plc_sim(args) -> int:

    cfg = _load(args.config)
    if args.rate <= 0:
        raise SystemExit("error: --rate must be positive")
    cells, _ = pair_cells(args.data, progress=False)
    if not cells:
        raise SystemExit(f"error: no cells in {args.data}")
    paths = any(s.images == "path" for s in cfg.stations)
    sent = [
        (
            c.cell_id,
            str(c.ct_path.resolve()) if paths else c.ct_path.read_bytes(),
            str(c.rgb_path.resolve()) if paths else c.rgb_path.read_bytes(),
            c.meta,
        )
        for c in cells
    ]

    async def main():
        async with PlcSimulator(cfg.stations, cfg.plc.url) as sim:
            print(
                f"simulated PLC at {cfg.plc.url}: {len(cfg.stations)} station(s), {len(cells)} cells of {args.data} at "
                f"{args.rate:g}/s; Ctrl-C stops it",
                flush=True,
            )
            shown = 0

            async def report():
                nonlocal shown
                while True:
                    for r in sim.results[shown:]:
                        print(
                            f"{r.station:<12} {r.cell_id:<40} verdict {r.verdict:>2}  confidence {r.confidence:.3f}  "
                            f"{r.seconds * 1000:7.0f} ms {r.error}",
                            flush=True,
                        )
                    shown = len(sim.results)
                    await asyncio.sleep(0.2)

            printer = asyncio.create_task(report())
            try:
                n = await run_line(sim, sent, args.rate, count=args.count)
                await sim.wait_for(n, timeout=60)
                await asyncio.sleep(0.3)
            finally:
                printer.cancel()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
