"""python -m export onnx|repository|tensorrt|serve

onnx RUN... --out DIR       export checkpoints to ONNX (opset 17, dynamic batch), parity-checked
repository --runs RUN...    write the Triton model repository for a runtime
tensorrt REPOSITORY         build TensorRT engines for a --runtime tensorrt repository (on its GPU)
serve                       train (quick preset) if no runs exist, build the repository if stale,
                            start tritonserver in the foreground (what `make serve` runs); on a
                            first start, train the standard preset in the background and move to
                            it through stage / compare / promote (python -m training.improve)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from core import interface as api
from export.options import add_tuning_arguments, has_runs, quality_line, resolve_runs, tuning_from
from export.release import read_state
from export.spec import fit_to_cores
from export.tensorrt import TensorRTUnavailable, build_repository_engines
from serving.runtime import available_cores

# The serving image runs `fit-cores` and `tensorrt` at start and has neither torch, onnx nor
# tritonserver's Python launcher: the commands that need them import them when they run.


def cmd_onnx(args) -> int:
    from export.onnx_export import export_run  # noqa: PLC0415 - torch, see above

    for run in args.runs:
        e = export_run(run, args.out, check=not args.no_check)
        parity = "; ".join(f"batch {b}: max diff {max(d.values()):.1e}" for b, d in e.parity.items())
        print(
            f"wrote {e.onnx_path} ({e.onnx_path.stat().st_size / 2**20:.1f} MiB) and "
            f"{e.onnx_path.with_suffix('.json').name}" + (f"; ONNX Runtime vs PyTorch {parity}" if parity else "")
        )
    return 0


def cmd_repository(args) -> int:
    from export.repository import build_repository  # noqa: PLC0415 - torch, see above

    manifest = build_repository(args.runs, args.runtime, args.out, args.rule, tuning_from(args))
    print(f"wrote {args.out} ({args.runtime}): {', '.join(manifest['models'])}")
    if "todo" in manifest:
        print(f"note: {manifest['todo']}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    from export.repository import build_repository, is_current  # noqa: PLC0415 - torch, see above
    from serving.server import Access, Ports, TritonServer, malloc_library  # noqa: PLC0415 - pytriton, see above
    from serving.watchdog import watch  # noqa: PLC0415 - tritonclient.http, see above

    access = Access.from_environment(args.tls_cert, args.tls_key)
    improve = _improvement(args)
    runs = resolve_runs(args.runs)
    tuning = tuning_from(args)
    managed = _managed(args.repository)
    if managed and not args.rebuild:
        print(
            f"{args.repository} serves release {managed['serving']} of {len(managed['releases'])} (changed by "
            "python -m client models): served as it is, not rebuilt from "
            f"{', '.join(map(str, runs))} (--rebuild makes them release 1 again and drops the others)"
        )
    elif args.rebuild or not is_current(args.repository, runs, "python-ort", args.rule, tuning):
        print(f"building {args.repository} from {', '.join(map(str, runs))}")
        build_repository(runs, "python-ort", args.repository, args.rule, tuning)
    else:
        print(f"{args.repository} is up to date with {', '.join(map(str, runs))}")
    quality = quality_line(runs)
    if quality:
        print(quality)
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port, args.front_metrics_port)
    served = access
    if improve and not access.admin_key:  # the background improver stages through the administrative API
        served = dataclasses.replace(access, admin_key=secrets.token_urlsafe(32))
    server = TritonServer(args.repository, ports, extra=served.arguments(), takt=args.takt)
    improver = None
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop: the same clean shutdown as Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)
    print("starting tritonserver ...", flush=True)
    try:
        server.start(timeout=args.start_timeout, foreground=True)
        tls = f" --tls-ca {args.tls_cert}" if args.tls_cert else ""
        print(
            f"\nready: gRPC localhost:{ports.grpc}  HTTP localhost:{ports.http}  metrics http://localhost:{ports.metrics}/metrics"
            + (f" and http://localhost:{ports.front_metrics}/metrics" if ports.front_metrics else "")
            + "\n"
            f"access: {access.describe()}\n"
            f"memory: {_allocator(malloc_library())}\n"
            "try:   python -m client inspect --ct CT.png --meta cell,z --rgb PHOTO.png --url "
            f"localhost:{ports.grpc}{tls}\n"
            "stop:  Ctrl-C",
            flush=True,
        )
        if improve:
            improver = _start_improver(args, ports.grpc, served.admin_key)
        return watch(server, args.watchdog, ports, args.start_timeout)
    except KeyboardInterrupt:
        print("\nstopping tritonserver ...", flush=True)
        server.stop()
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        server.stop()
        return 1
    finally:
        if improver is not None and improver.poll() is None:
            print("stopping the background training (make serve starts it again)", flush=True)
            os.killpg(improver.pid, signal.SIGTERM)


def _improvement(args) -> bool:
    """Train the standard preset in the background and move to it? On a first start: no runs given,
    no standard runs yet, not turned off, and a server the improver can reach without TLS."""
    if args.no_improve or args.runs or has_runs(Path("runs/standard")):
        return False
    if args.tls_cert:
        print("not training the standard preset in the background: with TLS, run python -m training.improve yourself")
        return False
    return True


def _start_improver(args, grpc_port: int, key: str) -> subprocess.Popen:
    from serving.server import ADMIN_KEY_ENV  # noqa: PLC0415 - pytriton, see above

    print(
        "\nfirst start: the standard preset trains in the background (about an hour on 2 cores, at the lowest CPU "
        "priority) and then replaces these models through stage / compare / promote (docs/lifecycle.md); "
        "--no-improve turns this off\n",
        flush=True,
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.improve",
            "--url",
            f"localhost:{grpc_port}",
            "--repository",
            str(args.repository),
        ],
        env=os.environ | {ADMIN_KEY_ENV: key},
        start_new_session=True,  # its own process group: stopped with everything it started
    )


def _managed(repository: Path) -> dict | None:
    """The release state of a repository that has more than its first release (None otherwise)."""
    try:
        state = read_state(repository)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return state if len(state["releases"]) > 1 else None


def _allocator(library) -> str:
    if library:
        return f"allocator {library.name} (memory freed after a rush goes back to the system)"
    return (
        "glibc malloc (memory taken in a rush is kept after it; install libjemalloc2 for jemalloc, used automatically)"
    )


def cmd_tensorrt(args) -> int:
    try:
        built = build_repository_engines(args.repository, args.workspace_gb, args.force)
    except TensorRTUnavailable as e:
        print(f"error: cannot build TensorRT engines here: {e}", file=sys.stderr)
        return 2
    print(f"built {len(built)} engine(s) in {args.repository}" if built else f"nothing to build in {args.repository}")
    return 0


def cmd_fit_cores(args) -> int:
    if not (args.repository / api.INSPECT / "config.pbtxt").exists():
        raise FileNotFoundError(f"{args.repository} is not a built repository (no {api.INSPECT}/config.pbtxt)")
    cores = args.cores or available_cores()
    changed = fit_to_cores(args.repository, cores)
    print(
        f"{args.repository}: fitted to {cores} core(s)"
        + (f": {', '.join(changed)}" if changed else ": nothing to change")
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onnx", help="export checkpoints to ONNX with a parity check")
    o.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run folders (or checkpoint files) of the CT classifier and/or the autoencoder",
    )
    o.add_argument("--out", type=Path, required=True, help="folder for <model>.onnx and <model>.json")
    o.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    o.set_defaults(func=cmd_onnx)
    r = sub.add_parser("repository", help="write the Triton model repository")
    r.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        required=True,
        help="the CT and RGB run folders, or a preset folder with ct/ and rgb/",
    )
    r.add_argument(
        "--runtime",
        choices=["python-ort", "onnxruntime", "tensorrt"],
        default="python-ort",
        help="python-ort: Python backend + ONNX Runtime (CPU, this machine); onnxruntime / tensorrt: native "
        "backends of the NGC container (default python-ort)",
    )
    r.add_argument(
        "--out", type=Path, default=Path("model_repository"), help="repository folder (default model_repository)"
    )
    add_tuning_arguments(r)
    r.set_defaults(func=cmd_repository)
    t = sub.add_parser(
        "tensorrt", help="build TensorRT engines (model.plan) for a --runtime tensorrt repository (needs an NVIDIA GPU)"
    )
    t.add_argument("repository", type=Path, help="repository written by 'repository --runtime tensorrt'")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace in GiB (default 4)")
    t.add_argument("--force", action="store_true", help="rebuild engines that exist")
    t.set_defaults(func=cmd_tensorrt)
    f = sub.add_parser(
        "fit-cores",
        help="set a built repository's preprocessing instances and network threads for the cores "
        "this process may use (the container does this at start)",
    )
    f.add_argument("repository", type=Path, help="repository folder")
    f.add_argument("--cores", type=int, help="cores to fit (default: CPU affinity, capped by a container's CPU quota)")
    f.set_defaults(func=cmd_fit_cores)
    s = sub.add_parser("serve", help="build what is missing and run tritonserver in the foreground")
    s.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        help="run folders (default runs/standard if trained, else runs/quick, trained on first start)",
    )
    s.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="repository folder (default model_repository)"
    )
    s.add_argument("--rebuild", action="store_true", help="rebuild the repository even if it is up to date")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument(
        "--takt",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="the line's takt: a gRPC inference request that the server, judged by how late its last answers "
        "came, would not answer within it is refused at once (UNAVAILABLE 'overloaded: ...', retried by "
        "clients on another replica) instead of queueing (default 2; 0: never refuse, queue)",
    )
    s.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    s.add_argument(
        "--front-metrics-port",
        type=int,
        default=8003,
        help="the gRPC front's metrics (battery_front_*: answered, refused as overload; default 8003; 0: none)",
    )
    s.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds to wait for all models to load (default 300)"
    )
    s.add_argument(
        "--watchdog",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="every SECONDS, send a probe cell through inspect and restart tritonserver after two failures "
        "in a row (default 10; 0: off)",
    )
    s.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS with this certificate (with --tls-key)"
    )
    s.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    s.add_argument(
        "--no-improve",
        action="store_true",
        help="on a first start (no runs given, runs/standard not trained), do not train the standard preset in "
        "the background and move to it (python -m training.improve)",
    )
    add_tuning_arguments(s)
    s.set_defaults(func=cmd_serve)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
