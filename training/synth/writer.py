"""Render a plan into the AI Hub folder layout, in parallel, byte-for-byte reproducibly."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from core.aihub import ct_stem, layout_dirs, rgb_stem
from training.synth import raster
from training.synth.ct import CTSliceSpec, render_ct_slice
from training.synth.plan import BatteryPlan, SynthConfig, make_plan
from training.synth.rgb import RGBPhotoSpec, render_rgb_photo

CONFIG_FILE = "synth_config.json"
PLACES = ("Line 1, cell plant", "Line 2, cell plant", "Module assembly A", "Module assembly B")


def _battery_info(spec, data_type: str) -> dict:
    """data_info fields shared by all images of a battery (date, place, application)."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(spec.battery_id, 98)))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return {
        "data_type": data_type,
        "battery_ids": spec.battery_id,
        "application": "EV" if rng.random() < 0.7 else "ESS",
        "type": spec.battery_type,
        "form": spec.form,
        "date": f"2023.{month:02d}.{day:02d}",
        "place": PLACES[int(rng.integers(len(PLACES)))],
    }


def _image_id(spec, stream: int) -> int:
    return int(
        np.random.SeedSequence(spec.seed, spawn_key=(spec.battery_id, stream)).generate_state(1)[0] % 900_000 + 100_000
    )


def _label(info: dict, outline, defects, width: int, height: int, file_name: str, image_id: int) -> dict:
    return {
        "data_info": info,
        "swelling": {"swelling": False, "battery_outline": raster.flat(outline)},
        "defects": [{"id": i + 1, "name": d.name, "points": raster.flat(d.polygon)} for i, d in enumerate(defects)]
        or None,
        "image_info": {
            "width": width,
            "height": height,
            "file_name": file_name,
            "id": image_id,
            "is_normal": not defects,
        },
    }


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never leave a half-written image behind a label


def dicom_bytes(pixels: np.ndarray, bits_stored: int | None = None, with_pixels: bool = True) -> bytes:
    """A monochrome CT DICOM file (explicit VR little endian) of a 2-D uint8/uint16 slice."""

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[pixels.tobytes()[:4096].hex()])
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


CT_SUFFIX = {"jpeg": ".jpg", "tiff16": ".tif", "dicom": ".dcm"}


def ct_format(spec: CTSliceSpec, weights: dict) -> str:
    """The format a slice is written in: drawn by weight from its own random stream (7)."""
    names = sorted(weights)
    p = np.array([weights[n] for n in names], np.float64)
    return names[int(spec.rng(7).choice(len(names), p=p / p.sum()))] if len(names) > 1 else names[0]


def encode_ct(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """An 8-bit slice as a station would send it: JPEG, 16-bit TIFF (x 257) or 16-bit DICOM."""
    if fmt == "dicom":
        return dicom_bytes(image.astype(np.uint16) * 257)
    buf = io.BytesIO()
    if fmt == "tiff16":
        Image.fromarray(image.astype(np.uint16) * 257).save(buf, format="TIFF")
    else:
        Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_ct(job: tuple[Path, str, CTSliceSpec, str]) -> str:
    root, subset, spec, fmt = job
    image_dir, label_dir = layout_dirs(root, subset, "ct")
    stem = ct_stem(spec.battery_type, spec.form, spec.battery_id, spec.axis, spec.slice_index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage's FOV warning for objects touching the rim
        ct = render_ct_slice(spec)
    quality = int(spec.rng(5).integers(82, 96))
    data = encode_ct(ct.image, fmt, quality)
    name = stem + CT_SUFFIX[fmt]
    info = _battery_info(spec, "ct") | {"distance": None, "degree": None, "roi": list(ct.roi)}
    label = _label(
        info,
        ct.outline,
        ct.defects,
        spec.size,
        spec.size,
        name,
        _image_id(spec, 1000 + "xyz".index(spec.axis) * 1000 + spec.slice_index),
    )
    _write(image_dir / name, data)
    _write(label_dir / f"{stem}.json", json.dumps(label, ensure_ascii=False, indent=1).encode())
    return stem


def write_rgb(job: tuple[Path, str, RGBPhotoSpec]) -> str:
    root, subset, spec = job
    image_dir, label_dir = layout_dirs(root, subset, "rgb")
    stem = rgb_stem(spec.battery_type, spec.form, spec.battery_id, spec.index)
    photo = render_rgb_photo(spec)
    buf = io.BytesIO()
    Image.fromarray(photo.image, mode="RGB").save(buf, format="PNG", compress_level=3)
    info = _battery_info(spec, "rgb") | {"distance": photo.distance, "degree": list(photo.degree), "roi": None}
    label = _label(
        info, photo.outline, photo.defects, spec.width, spec.height, stem + ".png", _image_id(spec, 5000 + spec.index)
    )
    _write(image_dir / f"{stem}.png", buf.getvalue())
    _write(label_dir / f"{stem}.json", json.dumps(label, ensure_ascii=False, indent=1).encode())
    return stem


def _run(job):
    kind = job[0]
    return (write_ct if kind == "ct" else write_rgb)(job[1:])


def generate(
    out: str | os.PathLike, cfg: SynthConfig, workers: int | None = None, progress: bool = True
) -> list[BatteryPlan]:
    """Write the synthetic data set of `cfg` under `out`; returns the plan it followed."""
    out = Path(out)
    plans = make_plan(cfg)
    for subset in ("Training", "Validation"):
        for modality in ("ct", "rgb"):
            for d in layout_dirs(out, subset, modality):
                d.mkdir(parents=True, exist_ok=True)
    jobs = []
    for p in plans:
        jobs += [("ct", out, p.subset, s, ct_format(s, cfg.ct_formats)) for s in p.ct_slices]
        jobs += [("rgb", out, p.subset, s) for s in p.photos]
    # Big photos first so the pool does not end waiting on a straggler.
    jobs.sort(key=lambda j: 0 if j[0] == "rgb" else 1)
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=f"synth {cfg.batteries} batteries", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            _run(job)
            bar.update()
    else:
        # fork shares the imported modules; each task is independent and seeded by its spec.
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_run, jobs, chunksize=1):
                bar.update()
    bar.close()
    config = asdict(cfg)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return plans
