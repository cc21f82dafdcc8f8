"""python -m export onnx|repository|tensorrt|serve

  onnx RUN... --out DIR       export checkpoints to ONNX (opset 17, dynamic batch), parity-checked
  repository --runs RUN...    write the Triton model repository for a runtime
  tensorrt REPOSITORY         build TensorRT engines for a --runtime tensorrt repository (on its GPU)
  serve                       train (quick preset) if no runs exist, build the repository if stale,
                              start tritonserver in the foreground (what `make serve` runs)
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

DEFAULT_PRESETS = (Path("runs/standard"), Path("runs/quick"))


def _has_runs(folder: Path) -> bool:
    return (folder / "ct" / "checkpoint.pt").exists() and (folder / "rgb" / "checkpoint.pt").exists()


def cmd_onnx(args) -> int:
    from export.onnx_export import export_run

    for run in args.runs:
        e = export_run(run, args.out, check=not args.no_check)
        parity = "; ".join(f"batch {b}: max diff {max(d.values()):.1e}" for b, d in e.parity.items())
        print(f"wrote {e.onnx_path} ({e.onnx_path.stat().st_size / 2**20:.1f} MiB) and {e.onnx_path.with_suffix('.json').name}"
              + (f"; ONNX Runtime vs PyTorch {parity}" if parity else ""))
    return 0


def tuning_from(args):
    from export.repository import Tuning

    from training.decode import Limits

    given = {"max_batch_size": args.max_batch_size, "max_queue_delay_us": args.queue_delay_us, "max_queue_size": args.max_queue_size,
             "preprocess_instances": args.preprocess_instances, "network_instances": args.network_instances,
             "intra_op_threads": args.threads, "precision": args.precision,
             "calibration": str(args.calibration) if args.calibration else None, "warmup": False if args.no_warmup else None}
    limits = {"max_bytes": args.max_image_bytes, "max_pixels": args.max_image_pixels}
    if any(v is not None for v in limits.values()):
        if any(v is not None and v < 1 for v in limits.values()):
            raise ValueError("--max-image-bytes and --max-image-pixels must be positive")
        given["limits"] = Limits(**{k: v for k, v in limits.items() if v is not None})
    return Tuning(**{k: v for k, v in given.items() if v is not None})


def cmd_repository(args) -> int:
    from export.repository import build_repository

    manifest = build_repository(args.runs, args.runtime, args.out, args.rule, tuning_from(args))
    print(f"wrote {args.out} ({args.runtime}): {', '.join(manifest['models'])}")
    if "todo" in manifest:
        print(f"note: {manifest['todo']}")
    return 0


def resolve_runs(runs: list[Path] | None) -> list[Path]:
    """The runs given, else the first trained preset, else the quick preset trained now."""
    if runs:
        return runs
    for preset in DEFAULT_PRESETS:
        if _has_runs(preset):
            return [preset]
    from training.preset import main as preset_main

    print("no trained models in runs/standard or runs/quick: training the quick preset on synthetic data (about 6 minutes)")
    preset_main(["quick"])
    return [Path("runs/quick")]


def quality_line(runs: list[Path]) -> str | None:
    """What the served models reach on fresh test data, from a preset folder's summary.json; None if unknown."""
    import json

    for run in runs:
        summary = Path(run) / "summary.json"
        if not summary.exists():
            continue
        s = json.loads(summary.read_text())
        ct, rgb = s.get("results", {}).get("ct", {}), s.get("results", {}).get("rgb", {})
        if not ct or not rgb:
            continue
        line = (f"models of the {s.get('preset')} preset: CT macro-F1 {ct['macro_f1']:.2f}, RGB image AUROC "
                f"{rgb['image_roc_auc']:.2f} on fresh test data ({s.get('test_data')})")
        if s.get("preset") == "quick":
            line += ("\n  these are demonstration models, not good enough to inspect cells: "
                     "train the standard preset (make train-standard, about 1 h 45 min on 2 cores) and serve it")
        return line
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    from export.repository import build_repository, is_current
    from export.server import Access, Ports, TritonServer, malloc_library

    access = Access.from_environment(args.tls_cert, args.tls_key)
    runs = resolve_runs(args.runs)
    tuning = tuning_from(args)
    if args.rebuild or not is_current(args.repository, runs, "python-ort", args.rule, tuning):
        print(f"building {args.repository} from {', '.join(map(str, runs))}")
        build_repository(runs, "python-ort", args.repository, args.rule, tuning)
    else:
        print(f"{args.repository} is up to date with {', '.join(map(str, runs))}")
    quality = quality_line(runs)
    if quality:
        print(quality)
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    server = TritonServer(args.repository, ports, extra=access.arguments())
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop: the same clean shutdown as Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)
    print("starting tritonserver ...", flush=True)
    try:
        server.start(timeout=args.start_timeout, foreground=True)
        tls = f" --tls-ca {args.tls_cert}" if args.tls_cert else ""
        print(f"\nready: gRPC localhost:{ports.grpc}  HTTP localhost:{ports.http}  metrics http://localhost:{ports.metrics}/metrics\n"
              f"access: {access.describe()}\n"
              f"memory: {_allocator(malloc_library())}\n"
              f"try:   python -m client inspect --ct CT.png --meta cell,z --rgb PHOTO.png --url localhost:{ports.grpc}{tls}\n"
              "stop:  Ctrl-C", flush=True)
        return _watch(server, args.watchdog, ports, args.start_timeout)
    except KeyboardInterrupt:
        print("\nstopping tritonserver ...", flush=True)
        server.stop()
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        server.stop()
        return 1


def _allocator(library) -> str:
    if library:
        return f"allocator {library.name} (memory freed after a rush goes back to the system)"
    return ("glibc malloc (memory taken in a rush is kept after it; install libjemalloc2 for jemalloc, "
            "used automatically)")


def cmd_tensorrt(args) -> int:
    from export.tensorrt import TensorRTUnavailable, build_repository_engines

    try:
        built = build_repository_engines(args.repository, args.workspace_gb, args.force)
    except TensorRTUnavailable as e:
        print(f"error: cannot build TensorRT engines here: {e}", file=sys.stderr)
        return 2
    print(f"built {len(built)} engine(s) in {args.repository}" if built else f"nothing to build in {args.repository}")
    return 0


def _watch(server, interval: float, ports, start_timeout: float) -> int:
    """Wait on tritonserver; every `interval` seconds send a probe cell through `inspect` (HTTP,
    loopback) and restart the server after two failures in a row, or when it exits by itself.
    (Health endpoints stay green when a Python-backend process dies; only inference shows it.)"""
    import subprocess

    from client.probe import probe_http

    if interval <= 0:
        return server.process.wait()
    failures, restarts = 0, 0
    while True:
        try:
            code = server.process.wait(timeout=interval)
            reason = f"tritonserver exited with code {code}"
        except subprocess.TimeoutExpired:
            reason, _ = probe_http(f"127.0.0.1:{ports.http}", timeout=max(5.0, interval))
            failures = failures + 1 if reason else 0
            if failures < 2:
                continue
            reason = f"the inference probe failed twice: {reason}"
        restarts += 1
        if restarts > 5:
            print(f"watchdog: {reason}; giving up after 5 restarts", file=sys.stderr, flush=True)
            server.stop()
            return 1
        print(f"watchdog: {reason}; restarting tritonserver (restart {restarts})", flush=True)
        server.stop()
        server.start(timeout=start_timeout, foreground=True)
        print("watchdog: tritonserver is ready again", flush=True)
        failures = 0


def cmd_fit_cores(args) -> int:
    from ensemble import interface as api
    from export.serving import available_cores
    from export.spec import fit_to_cores

    if not (args.repository / api.INSPECT / "config.pbtxt").exists():
        raise FileNotFoundError(f"{args.repository} is not a built repository (no {api.INSPECT}/config.pbtxt)")
    cores = args.cores or available_cores()
    changed = fit_to_cores(args.repository, cores)
    print(f"{args.repository}: fitted to {cores} core(s)" + (f": {', '.join(changed)}" if changed else ": nothing to change"))
    return 0


def add_tuning_arguments(p) -> None:
    g = p.add_argument_group("serving tuning")
    g.add_argument("--max-batch-size", type=int, default=16, help="max_batch_size of every model (default 16)")
    g.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching max queue delay (default 2000)")
    g.add_argument("--max-queue-size", type=int, help="requests waiting per model beyond which new ones are refused at once "
                                                      "(default 256; 0: no limit)")
    g.add_argument("--preprocess-instances", type=int, help="instances of each preprocessing model (default: one per core, at most 4)")
    g.add_argument("--network-instances", type=int, help="instances of each network (default 1)")
    g.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per network instance (default and 0: every core this "
                                                "process may use)")
    g.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="network precision (default fp32; fp16: for GPU "
                                                                         "deployments; int8: static QDQ quantisation of the "
                                                                         "convolutions, calibrated on images)")
    g.add_argument("--calibration", type=Path, metavar="DIR", help="images to calibrate INT8 on and to check FP16/INT8 "
                                                                   "against FP32, an AI-Hub-layout folder (default: the "
                                                                   "data the CT run was trained on)")
    g.add_argument("--rule", type=Path, help="verdict rule YAML (default ensemble/rule.yaml)")
    g.add_argument("--no-warmup", action="store_true", help="do not run each network on zeros at every batch size when it "
                                                           "loads (faster load; memory then grows during the first rushes)")
    g.add_argument("--max-image-bytes", type=int, metavar="N", help="refuse an encoded image over N bytes (default 67108864)")
    g.add_argument("--max-image-pixels", type=int, metavar="N", help="refuse an image over N pixels, read from its header "
                                                                       "before decoding (default 50000000)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onnx", help="export checkpoints to ONNX with a parity check")
    o.add_argument("runs", nargs="+", type=Path, help="run folders (or checkpoint files) of the CT classifier and/or the autoencoder")
    o.add_argument("--out", type=Path, required=True, help="folder for <model>.onnx and <model>.json")
    o.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    o.set_defaults(func=cmd_onnx)
    r = sub.add_parser("repository", help="write the Triton model repository")
    r.add_argument("--runs", nargs="+", type=Path, required=True, help="the CT and RGB run folders, or a preset folder with ct/ and rgb/")
    r.add_argument("--runtime", choices=["python-ort", "onnxruntime", "tensorrt"], default="python-ort",
                   help="python-ort: Python backend + ONNX Runtime (CPU, this machine); onnxruntime / tensorrt: native "
                        "backends of the NGC container (default python-ort)")
    r.add_argument("--out", type=Path, default=Path("model_repository"), help="repository folder (default model_repository)")
    add_tuning_arguments(r)
    r.set_defaults(func=cmd_repository)
    t = sub.add_parser("tensorrt", help="build TensorRT engines (model.plan) for a --runtime tensorrt repository (needs an NVIDIA GPU)")
    t.add_argument("repository", type=Path, help="repository written by 'repository --runtime tensorrt'")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace in GiB (default 4)")
    t.add_argument("--force", action="store_true", help="rebuild engines that exist")
    t.set_defaults(func=cmd_tensorrt)
    f = sub.add_parser("fit-cores", help="set a built repository's preprocessing instances and network threads for the cores "
                                         "this process may use (the container does this at start)")
    f.add_argument("repository", type=Path, help="repository folder")
    f.add_argument("--cores", type=int, help="cores to fit (default: CPU affinity, capped by a container's CPU quota)")
    f.set_defaults(func=cmd_fit_cores)
    s = sub.add_parser("serve", help="build what is missing and run tritonserver in the foreground")
    s.add_argument("--runs", nargs="+", type=Path, help="run folders (default runs/standard if trained, else runs/quick, "
                   "trained on first start)")
    s.add_argument("--repository", type=Path, default=Path("model_repository"), help="repository folder (default model_repository)")
    s.add_argument("--rebuild", action="store_true", help="rebuild the repository even if it is up to date")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    s.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for all models to load (default 300)")
    s.add_argument("--watchdog", type=float, default=10.0, metavar="SECONDS",
                   help="every SECONDS, send a probe cell through inspect and restart tritonserver after two failures "
                        "in a row (default 10; 0: off)")
    s.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS with this certificate (with --tls-key)")
    s.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
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
