"""What the export commands and the benchmarks that build repositories share: the serving-tuning
options and their typed form `Tuning`, the runs to serve by default, the quality line of a preset.

Light on purpose (no torch, no onnx): `python -m export` parses its options with it in the
serving image too, where only `fit-cores` and `tensorrt` run."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.decode import Limits
from serving.runtime import available_cores, preprocess_instances_for

DEFAULT_PRESETS = (Path("runs/standard"), Path("runs/quick"))
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Tuning:
    """Serving knobs that are not facts of the models."""

    max_batch_size: int = 16
    max_queue_delay_us: int = 2000
    # Requests waiting per model beyond which Triton refuses new ones at once ("Exceeds maximum
    # queue size", UNAVAILABLE, which clients retry with backoff) instead of letting latency grow
    # without bound in a burst.
    max_queue_size: int = 256
    # Decoding and preprocessing are single-threaded Python: one process per core for them.
    # Each network may use every core, with ONNX Runtime's waiting threads asleep rather than
    # spinning (serving.runtime.OrtRunner), so that whichever step has work takes the idle
    # cores: measured on 2 cores at line size (`python -m benchmarks serving`), the full
    # preset's networks gave 4.6 cells/s against 4.2 with one thread per network, the quick
    # ones 16.5 against 17.1 (within the runs' noise). Cores are those this process may use
    # (its CPU affinity and container quota), so a container follows the cores it is given.
    preprocess_instances: int = field(default_factory=lambda: preprocess_instances_for(available_cores()))
    network_instances: int = 1
    intra_op_threads: int = field(default_factory=lambda: available_cores())  # per network instance (python-ort)
    limits: Limits = Limits()
    precision: str = (
        "fp32"  # fp32 | fp16 (GPU) | int8 (static QDQ quantisation of the convolutions), export/quantize.py
    )
    calibration: str | None = None  # INT8 calibration images (AI-Hub folder); default: the CT run's training data
    # Warm each network up at load with every batch size from max_batch_size down to 1. Measured
    # (quick models, ONNX Runtime's CPU arena): memory stops growing only once every batch size
    # has run; without warm-up a 20-minute soak grew 15-20% in steps as rushes made larger
    # batches. Costs about a second of load time per network here.
    warmup: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def has_runs(folder: Path) -> bool:
    return (folder / "ct" / "checkpoint.pt").exists() and (folder / "rgb" / "checkpoint.pt").exists()


def tuning_from(args: argparse.Namespace) -> Tuning:
    given = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.queue_delay_us,
        "max_queue_size": args.max_queue_size,
        "preprocess_instances": args.preprocess_instances,
        "network_instances": args.network_instances,
        "intra_op_threads": args.threads,
        "precision": args.precision,
        "calibration": str(args.calibration) if args.calibration else None,
        "warmup": False if args.no_warmup else None,
    }
    limits = {"max_bytes": args.max_image_bytes, "max_pixels": args.max_image_pixels}
    if any(v is not None for v in limits.values()):
        if any(v is not None and v < 1 for v in limits.values()):
            raise ValueError("--max-image-bytes and --max-image-pixels must be positive")
        given["limits"] = Limits(**{k: v for k, v in limits.items() if v is not None})
    return Tuning(**{k: v for k, v in given.items() if v is not None})


def resolve_runs(runs: list[Path] | None) -> list[Path]:
    """The runs given, else the first trained preset, else the quick preset trained now."""
    if runs:
        return runs
    for preset in DEFAULT_PRESETS:
        if has_runs(preset):
            return [preset]
    from training.preset import main as preset_main  # noqa: PLC0415 - torch: not in the serving image

    print(
        "no trained models in runs/standard or runs/quick: training the quick preset on synthetic data (about 7 "
        "minutes on 2 cores, then 7-10 to calibrate its gate on held-out cells of line size)"
    )
    preset_main(["quick"])
    return [Path("runs/quick")]


def quality_line(runs: list[Path]) -> str | None:
    """What the served models reach on fresh test data, from a preset folder's summary.json; None if unknown."""
    for run in runs:
        summary = Path(run) / "summary.json"
        if not summary.exists():
            continue
        s = json.loads(summary.read_text())
        ct, rgb = s.get("results", {}).get("ct", {}), s.get("results", {}).get("rgb", {})
        if not ct or not rgb:
            continue
        line = (
            f"models of the {s.get('preset')} preset: CT macro-F1 {ct['macro_f1']:.2f}, RGB image AUROC "
            f"{rgb['image_roc_auc']:.2f} on fresh test data ({s.get('test_data')})"
        )
        if s.get("preset") == "quick":
            line += (
                "\n  these are demonstration models, not good enough to inspect cells: a first start trains the "
                "standard preset in the background and moves to it (about an hour on 2 cores; make train-standard "
                "does it by hand)"
            )
        return line
    return None


def add_tuning_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving tuning")
    g.add_argument("--max-batch-size", type=int, default=16, help="max_batch_size of every model (default 16)")
    g.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching max queue delay (default 2000)")
    g.add_argument(
        "--max-queue-size",
        type=int,
        help="requests waiting per model beyond which new ones are refused at once (default 256; 0: no limit)",
    )
    g.add_argument(
        "--preprocess-instances",
        type=int,
        help="instances of each preprocessing model (default: one per core, at most 4)",
    )
    g.add_argument("--network-instances", type=int, help="instances of each network (default 1)")
    g.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads per network instance (default and 0: every core this process may use)",
    )
    g.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        help="network precision (default fp32; fp16: for GPU "
        "deployments; int8: static QDQ quantisation of the "
        "convolutions, calibrated on images)",
    )
    g.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="images to calibrate INT8 on and to check FP16/INT8 "
        "against FP32, an AI-Hub-layout folder (default: the "
        "data the CT run was trained on)",
    )
    g.add_argument("--rule", type=Path, help="verdict rule YAML (default ensemble/rule.yaml)")
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="do not run each network on zeros at every batch size when it "
        "loads (faster load; memory then grows during the first rushes)",
    )
    g.add_argument(
        "--max-image-bytes", type=int, metavar="N", help="refuse an encoded image over N bytes (default 67108864)"
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="refuse an image over N pixels, read from its header before decoding (default 50000000)",
    )
