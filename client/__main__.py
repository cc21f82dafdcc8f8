"""python -m client inspect|inspect-dir|review|probe|gateway|plc-sim

  inspect --ct CT.png --meta cell,z --rgb PHOTO.png     one cell, a readable verdict (or --json)
  inspect-dir DIR --out results.jsonl                   every cell of an AI-Hub-layout folder, with a
                                                        progress bar, JSONL results and a summary
                                                        (exit status 1 if any cell was rejected)
  ... --explain [DIR]                                   also a JSON + HTML report per flagged cell
                                                        (Grad-CAM, error map; --vlm, --grounding add
                                                        a VLM finding and GroundingDINO boxes) and an
                                                        index page, written off the hot path
  review                                                the review station (a web page)
  probe                                                 one synthetic cell through inspect: exit 0 if sound
  gateway --config gateway.yaml                         the line gateway: PLC (OPC UA) -> Triton -> PLC
  plc-sim --config gateway.yaml --data DIR              a simulated PLC to try the gateway with

The service is `make serve` (tritonserver on localhost:8001 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from client import channel, metrics
from client.archive import LineArchive, Retention
from client.dataset import load_cells, pair_cells
from client.explain import Case
from client.explain.cli import add_arguments as add_explain_arguments
from client.explain.cli import build_pipeline
from client.gateway.cli import add_parsers as add_gateway_parsers
from client.inspection import CellError, Inspection, InspectionFailed, in_words, is_input_refusal, parse_meta
from client.lifecycle.cli import add_parsers as add_models_parsers
from client.probe import probe_grpc
from client.refusal import placement, why
from client.service import InspectionClient
from core.interface import NOT_INSPECTABLE, VERDICT_NAMES

EXPLAIN_BESIDE_OUT = "<folder of --out>/explain"


def _client(args):

    heatmaps = getattr(args, "heatmaps", None) is not None or getattr(args, "explain", None) is not None
    tls = getattr(args, "tls_ca", None)
    if tls is not None and not tls.is_file():
        raise SystemExit(f"error: --tls-ca {tls} does not exist")
    client = InspectionClient(
        args.url,
        timeout=args.timeout,
        heatmaps=heatmaps,
        ssl=tls is not None,
        root_certificates=str(tls) if tls else None,
    )
    if not client.ready():
        raise SystemExit(f"error: no ready inspection service at {args.url} (start it with 'make serve')")
    return client


def cmd_review(args) -> int:

    env = dict(
        os.environ,
        BATTERY_REVIEW_URL=args.url,
        BATTERY_REVIEW_METRICS=args.metrics_url,
        BATTERY_REVIEW_RUN=str(args.run),
        BATTERY_REVIEW_EXPLAIN=args.explain_options,
        BATTERY_REVIEW_TLS_CA=str(args.tls_ca or ""),
    )
    app = Path(__file__).with_name("review") / "app.py"
    print(f"review station on http://{args.address}:{args.port} (service {args.url}); Ctrl-C stops it", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(args.port),
        "--server.address",
        args.address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
    # streamlit takes this process's place, so a stop signal (Ctrl-C, a service manager's
    # SIGTERM) reaches the server itself rather than leaving it running behind a launcher
    os.execve(sys.executable, cmd, env)


def cmd_probe(args) -> int:

    tls = args.tls_ca
    reason, seconds = probe_grpc(
        args.url, args.timeout, ssl=tls is not None, root_certificates=str(tls) if tls else None
    )
    if reason:
        print(
            f"FAILED: inspect at {args.url} did not answer the probe cell soundly ({seconds * 1000:.0f} ms): {reason}",
            file=sys.stderr,
        )
        return 1
    print(f"ok: inspect at {args.url} answered the probe cell in {seconds * 1000:.0f} ms")
    return 0


def cmd_inspect(args) -> int:
    try:
        meta = parse_meta(args.meta)
        ct, rgb = args.ct.read_bytes(), args.rgb.read_bytes()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with _client(args) as client:
        try:
            result = client.inspect(ct, meta, rgb, cell_id=args.ct.stem)
        except InspectionFailed as e:
            print(f"error: the service rejected the cell: {e.error.message}", file=sys.stderr)
            return 1
        explained = _explain_one(args, client, result, ct, meta, rgb) if args.explain and result.flagged else None
    if args.heatmaps:
        _save_heatmaps(result, args.heatmaps)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(f"cell        CT {args.ct} + RGB {args.rgb}")
        print(result.describe())
        if args.heatmaps:
            print(f"heatmaps    {args.heatmaps}/{result.cell_id}_ct_cam.png, {result.cell_id}_rgb_error.png")
    if args.explain and not result.flagged:
        print("explanation not written: the cell is normal", file=sys.stderr)
    elif explained:
        print(f"report      {args.explain / explained['report']}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _explain_one(args, client, result, ct: bytes, meta, rgb: bytes) -> dict:

    info = client.serving_info()
    pipeline = build_pipeline(args, title=result.cell_id)
    future = pipeline.submit(
        Case(result, ct, meta, rgb, info["ct"], info["rgb"], {"ct_path": str(args.ct), "rgb_path": str(args.rgb)})
    )
    pipeline.close()
    return future.result()


def _save_heatmaps(result, folder: Path) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    cam = np.clip(result.ct_cam, 0, 1)
    Image.fromarray((cam * 255).astype(np.uint8)).save(folder / f"{result.cell_id}_ct_cam.png")
    emap = result.rgb_error_map
    scaled = emap / max(float(emap.max()), 1e-12)
    Image.fromarray((scaled * 255).astype(np.uint8)).save(folder / f"{result.cell_id}_rgb_error.png")


def cmd_inspect_dir(args) -> int:

    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    cells, report = pair_cells(args.dir, progress=not args.quiet)
    if args.limit:
        cells = cells[: args.limit]
    if not cells:
        print(
            f"error: no cells in {args.dir}: {report['ct_slices']} CT slices, {report['photos']} photos "
            "(a cell is a CT slice with a photo of the same battery)",
            file=sys.stderr,
        )
        return 2
    with_labels = all(c.ct_label for c in cells)
    verdicts, errors, confusion = Counter(), Counter(), np.zeros((len(VERDICT_NAMES),) * 2, int)
    reasons = Counter()  # why cells were refused as not inspectable
    kept = Counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.local:
        from client.offline import LocalInspector  # noqa: PLC0415 - torch and the trained runs: only for --local

        connect = LocalInspector(args.local)
    else:
        connect = _client(args)
    explain = None
    if args.explain == Path(EXPLAIN_BESIDE_OUT):
        args.explain = args.out.parent / "explain"
    if args.explain:
        explain = build_pipeline(args, title=str(args.dir))
    info = connect.serving_info() if args.explain else _serving_info(connect)  # explanations need them
    archive = None
    if args.keep:
        archive = LineArchive(
            args.keep, Retention(args.keep_sample, args.keep_max_gb, args.keep_max_days), seed=args.keep_seed
        )
    with connect as client, open(args.out, "w") as out:
        start = time.perf_counter()
        bar = tqdm(total=len(cells), unit="cell", desc="inspect", disable=args.quiet)
        for cell, result in zip(cells, client.iter_inspect(load_cells(cells), concurrency=args.concurrency)):
            row = {
                "cell_id": cell.cell_id,
                "ct_path": str(cell.ct_path),
                "rgb_path": str(cell.rgb_path),
                "meta": list(cell.meta),
            }
            row |= result.to_dict()
            refused_input = isinstance(result, CellError) and is_input_refusal(result.message)
            if refused_input or (isinstance(result, Inspection) and not result.inspectable):
                if refused_input:  # the preprocessing refused an image: a refusal, not a fault
                    row["refusal"] = in_words(result.message)
                row["placement"] = placement(cell.ct_path.read_bytes(), cell.rgb_path.read_bytes(), info)
                reasons[why(row)] += 1
            if with_labels:
                row["label"] = {
                    "ct_class": cell.ct_label,
                    "rgb_anomalous": cell.rgb_anomalous,
                    "expected_verdict": VERDICT_NAMES[cell.expected_verdict],
                }
            out.write(json.dumps(row) + "\n")
            if archive is not None and isinstance(result, Inspection):
                reason = archive.wants(result)
                if reason:
                    archive.keep(
                        cell.load(), result, reason, source={"ct_path": row["ct_path"], "rgb_path": row["rgb_path"]}
                    )
                    kept[reason] += 1
            if refused_input:
                verdicts[VERDICT_NAMES[NOT_INSPECTABLE]] += 1
                confusion[cell.expected_verdict, NOT_INSPECTABLE] += 1
            elif isinstance(result, CellError):
                errors[result.kind] += 1
            else:
                verdicts[result.verdict] += 1
                confusion[cell.expected_verdict, result.verdict_code] += 1
                if explain is not None and result.flagged:
                    extra = {"ct_path": str(cell.ct_path), "rgb_path": str(cell.rgb_path)}
                    if with_labels:
                        extra["expected_verdict"] = row["label"]["expected_verdict"]
                        extra["labels"] = cell.labels()
                    explain.submit(
                        Case(
                            result,
                            cell.ct_path.read_bytes(),
                            cell.meta,
                            cell.rgb_path.read_bytes(),
                            info["ct"],
                            info["rgb"],
                            extra,
                        )
                    )
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
    answered = sum(verdicts.values())
    how = "in-process PyTorch" if args.local else f"concurrency {args.concurrency}"
    print(f"\n{len(cells)} cells in {seconds:.1f} s: {len(cells) / seconds:.1f} cells/s ({how})")
    for name in VERDICT_NAMES:
        print(f"  {name:<16} {verdicts[name]:>6}")
    for reason, n in reasons.most_common():
        print(f"    refused: {reason:<40} {n:>6}")
    for kind, n in errors.items():
        print(f"  error {kind:<10} {n:>6}")
    if with_labels and answered:
        agree = int(np.trace(confusion))
        refused = int(confusion[:, NOT_INSPECTABLE].sum())
        print(
            f"agreement with the labels: {agree}/{answered} = {agree / answered:.3f}  (rows: expected, columns: "
            "verdict; "
            f"the {refused} cells refused as not inspectable count as disagreement)"
        )
        print("  " + " " * 16 + "".join(f"{n[:8]:>10}" for n in VERDICT_NAMES))
        for i, name in enumerate(VERDICT_NAMES[:NOT_INSPECTABLE]):  # a labelled cell is never expected to be refused
            print(f"  {name:<16}" + "".join(f"{v:>10}" for v in confusion[i]))
    print(f"wrote {args.out}")
    if archive is not None:
        print(
            f"kept {kept['flagged']} flagged and {kept['sample']} sampled normal cells in {args.keep} "
            f"({archive.size_bytes / 2**20:.1f} MiB in all; review them with python -m client review --run {args.keep})"
        )
    if explain is not None:
        entries = explain.close(progress=not args.quiet)
        _print_explained(entries, args.explain)
    return 0 if not errors else 1


def _serving_info(connect) -> dict | None:
    """The served models' facts (the placement ranges a refusal is measured against); None where the
    service cannot say."""
    try:
        return connect.serving_info()
    except Exception:  # noqa: BLE001 - a refusal row is still written, without the ranges
        return None


def _print_explained(entries: list[dict], folder: Path) -> None:
    missing = Counter((name, reason) for e in entries for name, reason in e.get("reasons", {}).items())
    print(f"explained {len(entries)} flagged cells: {folder / 'index.html'}")
    for (name, reason), n in missing.most_common():
        print(f"  {name} unavailable for {n} cells: {reason}")


def _url(text: str) -> str:
    """--url as given, once it reads as one address, several, or a dns:/// name."""
    try:
        channel.target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        type=_url,
        default="localhost:8001",
        help="Triton gRPC address (default localhost:8001); several replicas: HOST:PORT,HOST:PORT,... or "
        "dns:///NAME:PORT (every address of the name); cells are spread over them",
    )
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    common.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="connect over TLS, trusting this CA (or self-signed) certificate"
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", parents=[common], help="inspect one cell")
    i.add_argument("--ct", type=Path, required=True, help="CT slice: PNG, JPEG, TIFF (8/16-bit) or DICOM")
    i.add_argument("--meta", required=True, help="battery_type,slice_axis: cell|module,x|y|z (or 0|1,0|1|2)")
    i.add_argument("--rgb", type=Path, required=True, help="exterior photo: PNG or JPEG")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.add_argument("--heatmaps", type=Path, metavar="DIR", help="also save CT_CAM and RGB_ERROR_MAP as PNGs into DIR")
    add_explain_arguments(i, "explain")
    i.set_defaults(func=cmd_inspect, local=None)
    d = sub.add_parser("inspect-dir", parents=[common], help="inspect every cell of a data set folder")
    d.add_argument(
        "dir", type=Path, help="AI-Hub-layout folder (Training/Validation trees or flat images + JSON labels)"
    )
    d.add_argument(
        "--out", type=Path, default=Path("results/results.jsonl"), help="JSONL output (default results/results.jsonl)"
    )
    d.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    d.add_argument("--limit", type=int, help="inspect only the first N cells")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve this run's Prometheus metrics (requests, errors, latency, verdicts, explanation backlog) on PORT",
    )
    d.add_argument(
        "--local",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="no server: run these checkpoints in-process with PyTorch (same decoding, preprocessing and rule)",
    )
    d.add_argument(
        "--keep",
        type=Path,
        metavar="ARCHIVE",
        help="keep every flagged cell and a sample of the normal ones in this line archive, as training data "
        "(docs/lifecycle.md)",
    )
    d.add_argument(
        "--keep-sample", type=float, default=0.05, metavar="SHARE", help="share of normal cells kept (default 0.05)"
    )
    d.add_argument("--keep-max-gb", type=float, default=50.0, help="archive size limit (default 50)")
    d.add_argument("--keep-max-days", type=float, default=365.0, help="unreviewed cells older go (default 365)")
    d.add_argument("--keep-seed", type=int, help=argparse.SUPPRESS)  # the sample's random seed (tests)
    add_explain_arguments(d, EXPLAIN_BESIDE_OUT)
    d.set_defaults(func=cmd_inspect_dir, heatmaps=None)
    rv = sub.add_parser(
        "review", parents=[common], help="the review station: a web page to inspect cells and review a run (Streamlit)"
    )
    rv.add_argument(
        "--run",
        type=Path,
        default=Path("results"),
        help="run folder to review, where inspect-dir wrote results.jsonl (default results)",
    )
    rv.add_argument(
        "--metrics-url",
        default="http://localhost:8002/metrics",
        help="Triton's metrics (default http://localhost:8002/metrics)",
    )
    rv.add_argument("--port", type=int, default=8501, help="web page port (default 8501)")
    rv.add_argument(
        "--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)"
    )
    rv.add_argument(
        "--explain-options",
        default="",
        metavar="'OPTIONS'",
        help='explanation backends as for --explain, e.g. "--vlm gemini" or '
        '"--grounding transformers --grounding-weights DIR"',
    )
    rv.set_defaults(func=cmd_review)
    pr = sub.add_parser(
        "probe", parents=[common], help="send one synthetic cell through inspect: exit 0 if answered soundly, 1 if not"
    )
    pr.set_defaults(func=cmd_probe)

    add_gateway_parsers(sub)
    add_models_parsers(sub)
    args = p.parse_args(argv)
    if getattr(args, "metrics_port", None):
        try:
            metrics.serve(args.metrics_port)
        except OSError as e:
            raise SystemExit(f"error: cannot serve metrics on port {args.metrics_port}: {e}") from None
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
