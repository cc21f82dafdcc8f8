"""Line-size images to model inputs: decoding and preprocessing, one core, per format.

  python -m benchmarks decode [--data DIR] [--images 8] [--ct-sizes 160,512] [--rgb-sizes 128,256]

What a line sends: 4000 x 4000 CT slices (JPEG, 16-bit TIFF, DICOM; PNG for reference) and
1920 x 1080 photos (PNG, JPEG), each through the served function (`encoded_ct_input`,
`encoded_rgb_input`) at the networks' input sizes. Medians over the images, each timed after
one untimed call, on one core (the functions are single-threaded). Without --data the images
are drawn by the synthetic generator (about 2 s each) and encoded in every format; with it,
the CT slices and photos of an AI-Hub-layout folder are taken as they are.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.measure import machine
from benchmarks.options import positive_ints
from core.aihub import scan
from core.decode import open_ct, open_rgb, sniff
from core.preprocess import encoded_ct_input, encoded_rgb_input
from training.synth.ct import CTSliceSpec, render_ct_slice
from training.synth.rgb import RGBPhotoSpec, render_rgb_photo
from training.synth.writer import encode_ct

# Targets (ms, median of line-size images, one core): what keeps preprocessing off the
# critical path at line speed.
TARGETS_MS = {("ct", "jpeg"): 30.0, ("ct", "tiff16"): 150.0, ("rgb", "png"): 55.0, ("rgb", "jpeg"): 15.0}


def synthetic_images(n: int, progress=print) -> dict[tuple[str, str], list[bytes]]:
    """n line-size CT slices and n photos from the generator, encoded in every format a station may send."""

    forms = [("cell", "pouch"), ("module", "cylindrical"), ("module", "pouch"), ("cell", "cylindrical")]
    out: dict[tuple[str, str], list[bytes]] = {}
    for i in range(n):
        kind, form = forms[i % len(forms)]
        progress(f"  drawing line-size image {i + 1} of {n} ({kind}, {form})")
        ct = render_ct_slice(CTSliceSpec(i + 1, kind, form, "xyz"[i % 3], 3 + i, "porosity", i % 2 == 0, 4000, 7)).image
        for fmt in ("jpeg", "tiff16", "dicom"):
            out.setdefault(("ct", fmt), []).append(encode_ct(ct, fmt, quality=90))
        buf = io.BytesIO()
        Image.fromarray(ct).save(buf, format="PNG", compress_level=3)
        out.setdefault(("ct", "png"), []).append(buf.getvalue())
        photo = render_rgb_photo(
            RGBPhotoSpec(i + 1, kind, form, 1, ("Damaged",) if i % 3 == 0 else (), 1920, 1080, 7)
        ).image
        for fmt, kw in (("png", {"compress_level": 3}), ("jpeg", {"quality": 92})):
            buf = io.BytesIO()
            Image.fromarray(photo).save(buf, format=fmt.upper(), **kw)
            out.setdefault(("rgb", fmt), []).append(buf.getvalue())
    return out


def folder_images(root: Path, n: int) -> dict[tuple[str, str], list[bytes]]:
    """Up to n images per (modality, format) of an AI-Hub-layout folder."""

    ds = scan(root, progress=False)
    out: dict[tuple[str, str], list[bytes]] = {}
    for modality, records in (("ct", ds.ct), ("rgb", ds.rgb)):
        for r in records:
            data = r.path.read_bytes()
            fmt = sniff(data)
            fmt = "tiff16" if fmt == "tiff" else fmt
            if len(out.setdefault((modality, fmt), [])) < n:
                out[(modality, fmt)].append(data)
    return out


def measure(images: dict[tuple[str, str], list[bytes]], ct_sizes, rgb_sizes) -> list[dict]:

    rows = []
    for (modality, fmt), datas in sorted(images.items()):
        source = (open_ct if modality == "ct" else open_rgb)(datas[0])
        for size in ct_sizes if modality == "ct" else rgb_sizes:
            fn = (
                (lambda d, s=size: encoded_ct_input(d, s))
                if modality == "ct"
                else (lambda d, s=size: encoded_rgb_input(d, s))
            )
            times = []
            for data in datas:
                fn(data)  # untimed: caches, first-touch of the buffers
                start = time.perf_counter()
                fn(data)
                times.append(time.perf_counter() - start)
            ms = 1000 * float(np.median(times))
            target = TARGETS_MS.get((modality, fmt))
            rows.append(
                {
                    "modality": modality,
                    "format": fmt,
                    "image": f"{source.width}x{source.height}",
                    "input": size,
                    "images": len(datas),
                    "mb": round(float(np.mean([len(d) for d in datas])) / 1e6, 2),
                    "median_ms": round(ms, 1),
                    "p90_ms": round(1000 * float(np.percentile(times, 90)), 1),
                    "target_ms": target,
                    "met": None if target is None else ms <= target,
                }
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, help="AI-Hub-layout folder of line-size images (default: draw them)")
    p.add_argument("--images", type=int, default=8, help="images per format (default 8)")
    p.add_argument(
        "--ct-sizes",
        type=positive_ints,
        default=[160, 512],
        help="CT input sizes (default 160,512: standard and full presets)",
    )
    p.add_argument("--rgb-sizes", type=positive_ints, default=[128, 256], help="RGB input sizes (default 128,256)")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="results folder (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")

    images = folder_images(args.data, args.images) if args.data else synthetic_images(args.images)
    if not images:
        raise SystemExit(f"error: no images in {args.data}")
    rows = measure(images, args.ct_sizes, args.rgb_sizes)
    m = machine()
    print(
        f"\nline-size images -> model input, one core, median of each format's images; {m['cpu']}, "
        f"{m['instruction_set']}"
    )
    print(f"{'image':<6} {'format':<7} {'size':>10} {'MB':>5} {'input':>6} {'median':>9} {'p90':>9}  target")
    for r in rows:
        verdict = "" if r["target_ms"] is None else f"<= {r['target_ms']:.0f} ms {'met' if r['met'] else 'MISSED'}"
        print(
            f"{r['modality']:<6} {r['format']:<7} {r['image']:>10} {r['mb']:>5.1f} {r['input']:>6} "
            f"{r['median_ms']:>6.1f} ms "
            f"{r['p90_ms']:>6.1f} ms  {verdict}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("decode-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
