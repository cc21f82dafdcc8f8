"""INT8 against FP32 for the CT classifier: in-process ONNX Runtime throughput and macro-F1
on a test split, side by side (targets: >= 1.8x throughput, <= 1 point macro-F1 loss).

  python -m benchmarks int8 [--runs RUN...] [--test DIR] [--calibration DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import f1_score

from benchmarks.measure import ct_images_per_s_and_probs, machine
from core.aihub import scan
from export.onnx_export import export_run
from export.options import resolve_runs
from export.quantize import calibration_tensors, quantize_int8
from export.repository import classify_runs
from serving.runtime import ct_tensor
from training.checkpoint import load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks int8", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", nargs="+", type=Path, help="trained runs (default runs/standard, else runs/quick)")
    p.add_argument("--test", type=Path, help="test folder (default data/standard_test or data/quick_test)")
    p.add_argument("--calibration", type=Path, help="calibration folder (default: the CT run's training data)")
    p.add_argument("--batch", type=int, default=8, help="batch for the throughput measurement (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput measurement (default 5)")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="results folder (default benchmarks/results)"
    )
    args = p.parse_args(argv)

    runs = classify_runs(resolve_runs(args.runs))
    test = args.test or next((d for d in (Path("data/standard_test"), Path("data/quick_test")) if d.is_dir()), None)
    if test is None:
        raise SystemExit("error: no test folder: give --test DIR")
    _, info = load_checkpoint(runs["ct_classifier"])
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_run(runs["ct_classifier"], Path(tmp), check=False)
        fp32, facts = exported.onnx_path, exported.facts
        int8 = quantize_int8(
            fp32, Path(tmp) / "int8.onnx", calibration_tensors(args.calibration or info["data"], facts, None)
        )
        records = scan(test, progress=False).ct
        x = np.stack([ct_tensor(r.path.read_bytes(), facts) for r in records])
        meta = np.array([r.meta for r in records], np.float32)
        labels = np.array([r.label_index for r in records])
        out = {
            "machine": machine(),
            "runs": {k: str(v) for k, v in runs.items()},
            "test": str(test),
            "slices": len(records),
            "batch": args.batch,
            "input_size": facts.input_size,
        }
        for name, path in (("fp32", fp32), ("int8", int8)):
            s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            images_per_s, probs = ct_images_per_s_and_probs(s, x, meta, args.batch, args.seconds)
            out[name] = {
                "images_per_s": images_per_s,
                "macro_f1": float(f1_score(labels, probs.argmax(1), average="macro")),
                "top_class": probs.argmax(1).tolist(),
            }
    speedup = out["int8"]["images_per_s"] / out["fp32"]["images_per_s"]
    loss = (out["fp32"]["macro_f1"] - out["int8"]["macro_f1"]) * 100
    same = float(np.mean(np.array(out["fp32"].pop("top_class")) == np.array(out["int8"].pop("top_class"))))
    out |= {"speedup": speedup, "macro_f1_loss_points": loss, "same_top_class": same}
    m = out["machine"]
    print(
        f"CT classifier ({out['input_size']} px) on {len(records)} slices of {test}, ONNX Runtime batch {args.batch}, "
        f"{m['cpu']}, {m['cores']} cores, {m['instruction_set']}:"
    )
    print(f"  FP32 {out['fp32']['images_per_s']:.1f} images/s, macro-F1 {out['fp32']['macro_f1']:.4f}")
    print(f"  INT8 {out['int8']['images_per_s']:.1f} images/s, macro-F1 {out['int8']['macro_f1']:.4f}")
    print(
        f"  speed-up {speedup:.2f}x (target >= 1.8), macro-F1 loss {loss:.2f} points (target <= 1), same top class "
        f"{same:.1%}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int8-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
