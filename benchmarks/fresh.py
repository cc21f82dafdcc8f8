"""python -m benchmarks ood --fresh [--runs runs/quick] [--seeds 11001,...]

How many good cells does the gate refuse that it was never shown? Fresh sets are generated
with seeds the project has not used (printed), with the generator's **default configuration**
and with the preset's, at each size (CT slice side and photo width x height; the line's is
4000 and 1920 x 1080), each CT slice paired with its own battery's photo, and every cell goes
through the served preprocessing and networks as the server runs them (in process). A cell
is refused when either input is: the battery search found nothing, the placement check
refused it, or its `CT_OOD` / `RGB_OOD` is 1 or more.

Refusals are counted by every subgroup the generator draws: image size, configuration, seed,
battery kind, slice axis, CT class, normal or defective, and for the photo its bench colour,
light direction, camera distance, elevation and azimuth; each with a 95% Wilson interval.
Targets: <= 1% of the cells overall, <= 2% in every subgroup. Each refused cell is listed with
the reason the server gives.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from tqdm import tqdm

from client.dataset import pair_cells
from core.aihub import battery_key, scan
from core.decode import ImageError
from export.local import TorchPipeline
from serving.runtime import ct_tensor, rgb_tensor
from training.config import load_config
from training.preset import synth_config
from training.synth.plan import SynthConfig, make_plan
from training.synth.rgb import photo_conditions
from training.synth.writer import CONFIG_FILE, generate

SEEDS = (11001, 11002, 11003, 11004, 11005)  # not used by any preset, test set or calibration set
SIZES = ((256, (480, 270)), (512, (960, 540)), (4000, (1920, 1080)))
OVERALL_TARGET = 0.01
SUBGROUP_TARGET = 0.02


def parse_sizes(text: str) -> tuple:
    """'256:480x270,4000:1920x1080' -> ((256, (480, 270)), (4000, (1920, 1080)))."""
    out = []
    for part in text.split(","):
        ct, _, photo = part.partition(":")
        w, _, h = photo.lower().partition("x")
        if not (ct.isdigit() and w.isdigit() and h.isdigit()):
            raise ValueError(f"{part!r}: expected CT_SIDE:WIDTHxHEIGHT, e.g. 4000:1920x1080")
        out.append((int(ct), (int(w), int(h))))
    return tuple(out)


def fresh_sets(root: Path, preset: str, seeds, sizes, batteries: int, progress: bool = True) -> list[dict]:
    """Generate (once) a set per seed, configuration and size under `root`; [{path, config, seed, size}]."""
    data = load_config(preset)["data"]
    out = []
    for seed in seeds:
        for i, (ct, (w, h)) in enumerate(sizes):
            # each size and configuration its own draw (one seed for both configurations would draw the same
            # batteries, scenes and cameras twice), still named by the seed
            s = int(seed) * 10 + 2 * i
            dims = {"ct_size": ct, "rgb_width": w, "rgb_height": h}
            for name, cfg in (
                ("default", SynthConfig(batteries=batteries, seed=s, **dims)),
                (preset, replace(synth_config(data, s + 1, batteries), **dims)),
            ):
                path = root / f"{name}-{ct}-{w}x{h}-seed{cfg.seed}"
                if not (path / CONFIG_FILE).exists():
                    generate(path, cfg, progress=progress)
                out.append({"path": path, "config": name, "seed": int(seed), "size": f"{ct} / {w}x{h}"})
    return out


_PIPELINE: TorchPipeline | None = None


def _prepare(job):
    """(tensor or None, reason or None) of one image through the served preprocessing."""
    kind, path = job
    facts = _PIPELINE.ct_facts if kind == "ct" else _PIPELINE.rgb_facts
    try:
        return (ct_tensor if kind == "ct" else rgb_tensor)(Path(path).read_bytes(), facts), None
    except (ImageError, ValueError) as e:
        return None, str(e)


def _scores(pipeline: TorchPipeline, kind: str, paths: list[Path], metas, progress: bool) -> list[tuple]:
    """[(score or None, reason or None)] per image: the served preprocessing and network."""
    global _PIPELINE
    _PIPELINE = pipeline
    jobs = [(kind, p) for p in paths]
    workers = min(os.cpu_count() or 1, 4)
    desc = "CT slices" if kind == "ct" else "photos"
    with mp.get_context("fork").Pool(workers) as pool:
        prepared = list(
            tqdm(pool.imap(_prepare, jobs, chunksize=2), total=len(jobs), desc=desc, unit="img", disable=not progress)
        )
    out: list[tuple] = [(None, reason) for _, reason in prepared]
    kept = [i for i, (x, _) in enumerate(prepared) if x is not None]
    graph = pipeline.ct_graph if kind == "ct" else pipeline.rgb_graph
    for a in range(0, len(kept), 16):
        part = kept[a : a + 16]
        args = [torch.from_numpy(np.stack([prepared[i][0] for i in part]))]
        if kind == "ct":
            args.append(torch.tensor([metas[i] for i in part], dtype=torch.float32))
        with torch.no_grad():
            ood = graph(*args)[2][:, 0].numpy()
        for i, v in zip(part, ood):
            score = float(v)
            reason = None
            if score >= 1:
                what = "CT slice" if kind == "ct" else "photo"
                reason = f"{what} out of distribution (score {score:.2f} >= 1)"
            out[i] = (score, reason)
    return out


def _bins(v: float, edges, names) -> str:
    return names[int(np.searchsorted(edges, v, side="right"))]


def _photo_attributes(path: Path) -> dict:
    """(rgb path -> the photo's drawn conditions) for a generated set."""
    cfg = SynthConfig(**json.loads((path / CONFIG_FILE).read_text()))
    out = {}
    for plan in make_plan(cfg):
        key = battery_key(plan.battery_type, plan.form, plan.battery_id)
        for spec in plan.photos:
            c = photo_conditions(spec)
            out[(key, spec.index)] = {
                "bench": c["bench"],
                "light": _bins(c["light_dir"], (-0.3, 0.3), ("from the left", "from the front", "from the right")),
                "distance": _bins(c["distance"], (317, 383), ("250-317 mm", "317-383 mm", "383-450 mm")),
                "elevation": _bins(c["elevation"], (21.7, 33.3), ("10-22 deg", "22-33 deg", "33-45 deg")),
                "azimuth": _bins(c["azimuth"] % 360, (90, 180, 270), ("0-90", "90-180", "180-270", "270-360")),
            }
    return out


def _photo_groups(ph, attrs: dict) -> dict:
    """A photo's subgroups: its battery, normal or defective, and what the generator drew for it."""
    drawn = {f"photo {k}": v for k, v in attrs[(ph.battery_key, ph.index)].items()}
    return {"battery": f"{ph.battery_type} {ph.form}", "photo": "normal" if ph.is_normal else "defective"} | drawn


def _slice_groups(sl) -> dict:
    return {"battery": f"{sl.battery_type} {sl.form}", "slice axis": sl.axis, "CT class": sl.label}


def evaluate_fresh(runs, sets: list[dict], progress: bool = True) -> dict:
    pipeline = TorchPipeline(runs)
    cells_out, images_out = [], []
    for s in tqdm(sets, desc="fresh sets", unit="set", disable=not progress):
        cells, _ = pair_cells(s["path"], progress=False)
        ds = scan(s["path"], progress=False)
        photo_of = {r.path: r for r in ds.rgb}
        slice_of = {r.path: r for r in ds.ct}
        attrs = _photo_attributes(s["path"])
        photos = sorted({c.rgb_path for c in cells})
        ct = _scores(pipeline, "ct", [c.ct_path for c in cells], [c.meta for c in cells], False)
        rgb = dict(zip(photos, _scores(pipeline, "rgb", photos, None, False)))
        common = {"size": s["size"], "configuration": s["config"], "seed": str(s["seed"])}
        for path, (score, reason) in rgb.items():
            groups = common | _photo_groups(photo_of[path], attrs)
            images_out.append(
                {
                    "image": f"{s['path'].name}/{path.name}",
                    "input": "photo",
                    "score": score,
                    "reason": reason,
                    "groups": groups,
                }
            )
        for c, (score, reason) in zip(cells, ct):
            groups = common | _slice_groups(slice_of[c.ct_path])
            images_out.append(
                {
                    "image": f"{s['path'].name}/{c.ct_path.name}",
                    "input": "CT",
                    "score": score,
                    "reason": reason,
                    "groups": groups,
                }
            )
        for c, (ct_score, ct_reason) in zip(cells, ct):
            rgb_score, rgb_reason = rgb[c.rgb_path]
            cell = {"cell": "defective" if c.expected_verdict != 0 else "normal"}
            cells_out.append(
                {
                    "cell": f"{s['path'].name}/{c.cell_id}",
                    "ct_score": ct_score,
                    "rgb_score": rgb_score,
                    "ct_reason": ct_reason,
                    "rgb_reason": rgb_reason,
                    "refused": bool(ct_reason or rgb_reason),
                    "groups": common
                    | _slice_groups(slice_of[c.ct_path])
                    | cell
                    | _photo_groups(photo_of[c.rgb_path], attrs),
                }
            )
    return summarise(cells_out, images_out, [str(r) for r in runs], sets)


def _rate(refused: int, n: int) -> dict:
    ci = binomtest(refused, n).proportion_ci(0.95, method="wilson") if n else None
    lo, hi = (float(ci.low), float(ci.high)) if ci else (0.0, 1.0)
    return {"cells": n, "refused": refused, "rate": refused / n if n else 0.0, "ci95": [lo, hi]}


def _table(rows: list[dict], refused) -> dict:
    groups: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        for dim, value in r["groups"].items():
            groups[dim][value][0] += bool(refused(r))
            groups[dim][value][1] += 1
    return {dim: {v: _rate(k, m) for v, (k, m) in sorted(vals.items())} for dim, vals in groups.items()}


def summarise(rows: list[dict], images: list[dict], runs: list[str], sets: list[dict]) -> dict:
    """Cells (a CT slice and its battery's photo; a photo serves several cells, so one refused photo
    refuses them all) and images (each slice and each photo once: what the calibration promises for)."""
    n = len(rows)
    refused = sum(r["refused"] for r in rows)
    table = _table(rows, lambda r: r["refused"])
    worst = max((g["rate"] for vals in table.values() for g in vals.values()), default=0.0)
    per_image = {
        side: {
            "overall": _rate(sum(bool(r["reason"]) for r in part), len(part)),
            "subgroups": _table(part, lambda r: r["reason"]),
        }
        for side in ("CT", "photo")
        for part in [[r for r in images if r["input"] == side]]
        if part
    }
    return {
        "runs": runs,
        "sets": [{k: str(v) for k, v in s.items()} for s in sets],
        "overall": _rate(refused, n),
        "ct": _rate(sum(bool(r["ct_reason"]) for r in rows), n),
        "photo": _rate(sum(bool(r["rgb_reason"]) for r in rows), n),
        "subgroups": table,
        "worst_subgroup_rate": worst,
        "images": per_image,
        "image_rows": images,
        "refused_cells": [
            {"cell": r["cell"], "ct": r["ct_reason"], "photo": r["rgb_reason"]} for r in rows if r["refused"]
        ],
        "targets": {"overall_max": OVERALL_TARGET, "subgroup_max": SUBGROUP_TARGET},
        "met": refused / max(n, 1) <= OVERALL_TARGET and worst <= SUBGROUP_TARGET,
    }


def markdown(result: dict) -> str:
    def pct(g):
        return f"{g['rate']:.1%} ({g['refused']}/{g['cells']}; {g['ci95'][0]:.1%}-{g['ci95'][1]:.1%})"

    lines = [
        f"Fresh cells: {result['overall']['cells']}, refused **{pct(result['overall'])}** "
        f"(CT {pct(result['ct'])}, photo {pct(result['photo'])}); targets <= {OVERALL_TARGET:.0%} overall, "
        f"<= {SUBGROUP_TARGET:.0%} per subgroup (worst {result['worst_subgroup_rate']:.1%})",
        "",
    ]

    def table(subgroups: dict) -> list[str]:
        rows = [f"| {dim} | {v} | {pct(g)} |" for dim, vals in subgroups.items() for v, g in vals.items()]
        return ["| subgroup | value | refused (count; 95% interval) |", "|---|---|---|", *rows]

    lines += table(result["subgroups"])
    for side, part in result.get("images", {}).items():
        lines += ["", f"Each {side} image once ({part['overall']['cells']} images): refused {pct(part['overall'])}", ""]
        lines += table(part["subgroups"])
    if result["refused_cells"]:
        lines += ["", "Refused cells:", ""]
        for r in result["refused_cells"]:
            lines.append(f"- {r['cell']}: {'; '.join(x for x in (r['ct'], r['photo']) if x)}")
    return "\n".join(lines)
