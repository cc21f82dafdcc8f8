"""Command-line value types shared by the benchmarks."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]; an argparse type that refuses anything but positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
