"""python -m training.synth: write a synthetic AI Hub battery data set, or preview one.

python -m training.synth --out data/synth --batteries 100 --seed 0
python -m training.synth preview data/synth --out results/sheet.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.aihub import scan
from core.labels import CT_CLASSES
from training.synth.plan import CT_FORMATS, DEFAULT_MIX, DEFECT_VISIBILITY, SynthConfig, photo_size
from training.synth.preview import contact_sheet
from training.synth.writer import CONFIG_FILE, generate


def _weights(text: str, names, what: str) -> dict:
    """NAME=WEIGHT,... with each NAME one of `names`."""
    out = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep or name.strip() not in names:
            raise argparse.ArgumentTypeError(f"{part!r}: expected {what}=WEIGHT with {what} one of {', '.join(names)}")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: weight is not a number") from None
    return out


def _mix(text: str) -> dict:
    return _weights(text, CT_CLASSES, "CLASS")


def _formats(text: str) -> dict:
    return _weights(text, CT_FORMATS, "FORMAT")


def _visibility(text: str) -> dict:
    out = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        try:
            out[axis.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected AXIS=PROBABILITY, e.g. x=0.3") from None
        if not sep or axis.strip() not in ("x", "y", "z") or not 0 <= out[axis.strip()] <= 1:
            raise argparse.ArgumentTypeError(f"{part!r}: expected AXIS=PROBABILITY with AXIS x, y or z and 0..1")
    return {**DEFECT_VISIBILITY, **out}


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.synth",
        description="Write a synthetic battery data set in the AI Hub 71687 layout "
        "(CT slices + RGB photos with JSON labels). "
        "Use 'python -m training.synth preview DIR --out sheet.png' to look at one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (Training/ and Validation/ are created in it)"
    )
    p.add_argument("--batteries", type=int, default=100, help="number of batteries")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--ct-size", type=int, default=512, help="CT slice side in pixels (the real data is 4000)")
    p.add_argument("--rgb-size", type=photo_size, default=(1920, 1080), help="RGB photo WIDTHxHEIGHT")
    p.add_argument("--slices-per-axis", type=int, default=2, help="CT slices per battery along each of x, y, z")
    p.add_argument("--photos", type=int, default=2, help="RGB photos per battery")
    default_mix = ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items())
    p.add_argument("--mix", type=_mix, default=None, help=f"CT class mix of batteries (default {default_mix})")
    default_vis = ",".join(f"{k}={v}" for k, v in DEFECT_VISIBILITY.items())
    p.add_argument(
        "--visibility",
        type=_visibility,
        default=None,
        help=f"chance that a slice of a defective battery shows the defect, per axis (default {default_vis})",
    )
    p.add_argument("--rgb-defect-rate", type=float, default=0.3, help="share of batteries with exterior defects")
    p.add_argument(
        "--ct-formats",
        type=_formats,
        default=None,
        metavar="FMT=W,...",
        help="CT slice formats by weight, of jpeg, tiff16, dicom (default jpeg=1; e.g. jpeg=8,tiff16=1,dicom=1)",
    )
    p.add_argument("--workers", type=int, default=None, help="parallel workers (default: all cores)")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _preview_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.synth preview",
        description="Draw a contact sheet of a data set "
        "(AI Hub layout, real or synthetic): every CT class and both RGB defect kinds, polygons outlined.",
    )
    p.add_argument("data", type=Path, help="data set folder")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "preview":
        args = _preview_parser().parse_args(argv[1:])
        if not args.data.is_dir():
            print(f"error: {args.data} is not a folder", file=sys.stderr)
            return 2
        ds = scan(args.data)
        print(ds.summary())
        print(f"wrote {contact_sheet(ds, args.out)}")
        return 0
    if argv and argv[0] == "generate":
        argv = argv[1:]
    args = _generate_parser().parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(
            f"error: {out} is not empty; choose another --out or pass --force to overwrite"
            + (" (it holds a synthetic data set)" if (out / CONFIG_FILE).exists() else ""),
            file=sys.stderr,
        )
        return 2
    try:
        cfg = SynthConfig(
            batteries=args.batteries,
            seed=args.seed,
            ct_size=args.ct_size,
            rgb_width=args.rgb_size[0],
            rgb_height=args.rgb_size[1],
            slices_per_axis=args.slices_per_axis,
            photos_per_battery=args.photos,
            mix=args.mix or dict(DEFAULT_MIX),
            rgb_defect_rate=args.rgb_defect_rate,
            visibility=args.visibility or dict(DEFECT_VISIBILITY),
            ct_formats=args.ct_formats or {"jpeg": 1.0},
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    plans = generate(out, cfg, workers=args.workers, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    n_ct = sum(len(p.ct_slices) for p in plans)
    n_rgb = sum(len(p.photos) for p in plans)
    print(f"wrote {len(plans)} batteries ({n_ct} CT slices, {n_rgb} RGB photos) to {out} in {elapsed:.1f} s")
    counts = {c: sum(p.ct_class == c for p in plans) for c in CT_CLASSES}
    print("  batteries by CT class: " + ", ".join(f"{c} {k}" for c, k in counts.items()))
    print(f"  batteries with exterior defects: {sum(bool(p.rgb_defects) for p in plans)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
