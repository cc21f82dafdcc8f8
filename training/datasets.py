"""Turn reader records into model-ready arrays, preprocessed once (in parallel) and cached in memory."""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.aihub import CTRecord, RGBRecord
from core.preprocess import CT_MEAN, CT_STD, Crop, encoded_ct_input, encoded_rgb_input, polygon_mask_in_input


@dataclass
class CTArrays:
    images: np.ndarray  # (N, 1, S, S) float16, normalised
    meta: np.ndarray  # (N, 2) float32
    labels: np.ndarray  # (N,) int64
    crops: list[Crop]
    masks: np.ndarray | None = None  # (N, S, S) uint8: 1 inside a labelled defect polygon
    placements: list = field(default_factory=list)  # what the battery search saw per image (None: nothing found)


@dataclass
class RGBArrays:
    images: np.ndarray  # (N, 3, S, S) float16 in 0..1
    anomalous: np.ndarray  # (N,) bool
    crops: list[Crop]
    placements: list = field(default_factory=list)  # what the battery search saw per image (None: nothing found)


def _ct_one(args):
    path, size, mean, std, dtype = args
    facts: list = []
    x, crop = encoded_ct_input(Path(path).read_bytes(), size, mean, std, facts_out=facts)  # as the server reads it
    return x.astype(dtype, copy=False), crop, facts[0]


def _rgb_one(args):
    path, size, dtype = args
    facts: list = []
    x, crop = encoded_rgb_input(Path(path).read_bytes(), size, facts_out=facts)
    return x.astype(dtype, copy=False), crop, facts[0]


def _map(fn, jobs, desc: str, workers: int | None, progress: bool):
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 8:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="img", disable=not progress)]
    with mp.get_context("fork").Pool(workers) as pool:
        return list(
            tqdm(pool.imap(fn, jobs, chunksize=4), total=len(jobs), desc=desc, unit="img", disable=not progress)
        )


def defect_masks(records, crops: list[Crop], size: int) -> np.ndarray:
    """(N, size, size) uint8 masks of each record's defect polygons in model-input coordinates."""
    masks = np.zeros((len(records), size, size), np.uint8)
    for i, (r, crop) in enumerate(zip(records, crops)):
        for d in r.defects:
            masks[i] |= polygon_mask_in_input(d.xy(), crop, size)
    return masks


def load_ct(
    records: list[CTRecord],
    size: int,
    mean: float = CT_MEAN,
    std: float = CT_STD,
    workers: int | None = None,
    progress: bool = True,
    with_masks: bool = False,
    dtype=np.float16,
) -> CTArrays:
    """`dtype`: float16 keeps a training set in memory; float32 is exactly what the server feeds the network."""
    jobs = [(r.path, size, mean, std, dtype) for r in records]
    out = _map(_ct_one, jobs, f"preprocess CT {size}px", workers, progress)
    images = np.stack([x for x, _, _ in out]) if out else np.zeros((0, 1, size, size), dtype)
    crops = [c for _, c, _ in out]
    return CTArrays(
        images=images,
        meta=np.array([r.meta for r in records], np.float32).reshape(-1, 2),
        labels=np.array([r.label_index for r in records], np.int64),
        crops=crops,
        masks=defect_masks(records, crops, size) if with_masks else None,
        placements=[f for _, _, f in out],
    )


def load_rgb(
    records: list[RGBRecord], size: int, workers: int | None = None, progress: bool = True, dtype=np.float16
) -> RGBArrays:
    out = _map(_rgb_one, [(r.path, size, dtype) for r in records], f"preprocess RGB {size}px", workers, progress)
    images = np.stack([x for x, _, _ in out]) if out else np.zeros((0, 3, size, size), dtype)
    return RGBArrays(
        images=images,
        anomalous=np.array([not r.is_normal for r in records], bool),
        crops=[c for _, c, _ in out],
        placements=[f for _, _, f in out],
    )
