"""How long the synthetic generator takes for a data set at default sizes.

python -m benchmarks.synth_speed [--batteries 100] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from training.synth.plan import SynthConfig
from training.synth.writer import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batteries", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--keep", type=Path, help="write here and keep it (default: a temporary folder, removed)")
    args = p.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="synth_bench_"))
    cfg = SynthConfig(batteries=args.batteries)
    start = time.perf_counter()
    plans = generate(out, cfg, workers=args.workers)
    elapsed = time.perf_counter() - start
    n_ct = sum(len(p.ct_slices) for p in plans)
    n_rgb = sum(len(p.photos) for p in plans)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"batteries {args.batteries}  workers {args.workers}  cores {os.cpu_count()}")
    print(f"CT slices {n_ct} ({cfg.ct_size}x{cfg.ct_size})  RGB photos {n_rgb} ({cfg.rgb_width}x{cfg.rgb_height})")
    print(
        f"wall {elapsed:.1f} s  = {(n_ct + n_rgb) / elapsed:.2f} images/s  = {elapsed / args.batteries:.2f} s/battery  "
        f"({size / 1e6:.0f} MB written)"
    )
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
