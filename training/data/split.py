"""Train/val/test splits by battery: no battery ever appears in two splits.

Slices of one battery are near-duplicates, so a split by image leaks and inflates every
metric. The unit here is the battery key (type, form, id), shared by a battery's CT
slices and RGB photos. Splits are stratified by what the battery is (CT class and whether
its exterior is defective) so that rare classes reach every split.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.aihub import Dataset

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def battery_strata(ds: Dataset) -> dict[str, str]:
    """battery key -> stratum (CT class or 'no_ct', plus exterior state)."""
    ct_class = {r.battery_key: r.label for r in ds.ct}
    exterior = defaultdict(lambda: "rgb_none")
    for r in ds.rgb:
        if not r.is_normal:
            exterior[r.battery_key] = "rgb_defect"
        elif exterior[r.battery_key] == "rgb_none":
            exterior[r.battery_key] = "rgb_normal"
    keys = set(ct_class) | {r.battery_key for r in ds.rgb}
    return {k: f"{ct_class.get(k, 'no_ct')}/{exterior[k]}" for k in sorted(keys)}


def split_batteries(strata: dict[str, str], fractions=DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, str]:
    """battery key -> 'train' | 'val' | 'test', seeded and stratified.

    Within each stratum the counts follow the fractions by largest remainder; leftovers
    rotate between splits across strata so that many small strata still add up to the
    requested overall fractions.
    """
    f = np.asarray(fractions, float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for key, stratum in sorted(strata.items()):
        by_stratum[stratum].append(key)
    assignment: dict[str, str] = {}
    carry = np.zeros(3)  # how far each split lags behind its share so far
    for stratum in sorted(by_stratum):
        keys = by_stratum[stratum]
        rng.shuffle(keys)
        quota = f * len(keys) + carry
        counts = np.floor(quota).astype(int)
        for i in np.argsort(-(quota - counts), kind="stable")[: len(keys) - counts.sum()]:
            counts[i] += 1
        counts = np.minimum(counts, len(keys))
        while counts.sum() > len(keys):
            counts[np.argmax(counts - quota)] -= 1
        carry = quota - counts
        pos = 0
        for name, n in zip(SPLITS, counts):
            for key in keys[pos : pos + n]:
                assignment[key] = name
            pos += n
    return assignment


def split_dataset(ds: Dataset, fractions=DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, str]:
    return split_batteries(battery_strata(ds), fractions, seed)


def write_split(assignment: dict[str, str], out_dir: str | Path, seed: int, fractions=DEFAULT_FRACTIONS) -> Path:
    """Write train.txt, val.txt, test.txt (one battery key a line) and split.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        keys = sorted(k for k, v in assignment.items() if v == name)
        (out / f"{name}.txt").write_text("".join(k + "\n" for k in keys))
    meta = {"seed": seed, "fractions": list(fractions), "unit": "battery",
            "counts": {name: sum(v == name for v in assignment.values()) for name in SPLITS}}
    (out / "split.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_split(out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    assignment: dict[str, str] = {}
    for name in SPLITS:
        path = out / f"{name}.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; write splits with 'python -m training.data split'")
        for line in path.read_text().splitlines():
            key = line.strip()
            if not key:
                continue
            if key in assignment:
                raise ValueError(f"battery {key} is in both {assignment[key]} and {name}: the split leaks")
            assignment[key] = name
    return assignment
