"""python -m training.data: look at a data set and split it by battery.

  python -m training.data scan DIR            # counts per class, every problem found
  python -m training.data split DIR --out DIR/splits --seed 0
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from core.aihub import scan
from training.data.split import DEFAULT_FRACTIONS, SPLITS, split_dataset, write_split


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three numbers, e.g. 0.7,0.1,0.2") from None
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three non-negative numbers summing to 1")
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.data", description="Scan an AI Hub battery data set (real or synthetic) and split it by battery.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="read every label and image; print counts and problems")
    s.add_argument("data", type=Path)
    s.add_argument("--verify", action="store_true", help="decode every image fully (slow on the real set)")
    s.add_argument("--problems", type=int, default=20, help="how many problems to list (all are counted)")
    sp = sub.add_parser("split", help="write train/val/test battery lists (70/10/20, stratified, seeded)")
    sp.add_argument("data", type=Path)
    sp.add_argument("--out", type=Path, required=True, help="folder for train.txt, val.txt, test.txt and split.json")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--fractions", type=_fractions, default=DEFAULT_FRACTIONS, help="train,val,test (default 0.7,0.1,0.2)")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} is not a folder", file=sys.stderr)
        return 2
    ds = scan(args.data, verify_images=getattr(args, "verify", False))
    print(ds.summary())
    if args.command == "scan":
        for problem in ds.report.problems[: args.problems]:
            print(f"  {problem}")
        hidden = len(ds.report.problems) - args.problems
        if hidden > 0:
            print(f"  ... and {hidden} more")
        return 0
    if not ds.ct and not ds.rgb:
        print(f"error: no usable images under {args.data}", file=sys.stderr)
        return 1
    assignment = split_dataset(ds, args.fractions, args.seed)
    out = write_split(assignment, args.out, args.seed, args.fractions)
    slices = Counter(assignment[r.battery_key] for r in ds.ct)
    photos = Counter(assignment[r.battery_key] for r in ds.rgb)
    batteries = Counter(assignment.values())
    print(f"{'split':<6} {'batteries':>9} {'CT slices':>9} {'photos':>7}")
    for name in SPLITS:
        print(f"{name:<6} {batteries[name]:>9} {slices[name]:>9} {photos[name]:>7}")
    print(f"wrote {out}/{{train,val,test}}.txt and split.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
