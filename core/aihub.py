"""Reader for the AI Hub "battery defect image" dataset (71687) layout.

Reads the extracted `Training/` and `Validation/` trees, or any flat folder of images with
same-stem JSON labels beside them (or anywhere below the root: images and labels are
paired by file stem). Bad data never stops a scan: each problem is recorded with its file
name and counted, and the scan goes on.

CT labels are per battery, as in the original work: a battery is porosity if any of its
slices shows porosity, and a module takes the worst of resin overflow > porosity > normal.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from PIL import Image
from tqdm import tqdm

from core.labels import (
    BATTERY_TYPES,
    CT_CLASS_INDEX,
    CT_DEFECT_NAMES,
    FORMS,
    RGB_DEFECT_NAMES,
    SLICE_AXES,
    ct_class_name,
    finding_of,
    worst_finding,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".dcm")

CT_NAME = re.compile(
    r"^CT_(?P<type>cell|module)_(?P<form>pouch|cylindrical)_(?P<id>\d+)_(?P<axis>[xyz])_(?P<slice>\d+)$"
)
RGB_NAME = re.compile(r"^RGB_(?P<type>cell|module)_(?P<form>pouch|cylindrical)_(?P<id>\d+)_(?P<index>\d+)$")

# Folder names of the extracted archives (Validation uses VS_/VL_ for TS_/TL_).
SOURCE_DIR = "01.원천데이터"
LABEL_DIR = "02.라벨링데이터"
ARCHIVES = {
    ("ct", "images"): "S_CT_Datasets_images",
    ("ct", "label"): "L_CT_Datasets_label",
    ("rgb", "images"): "S_Exterior_Img_Datasets_images",
    ("rgb", "label"): "L_Exterior_Img_Datasets_label",
}


# a CT file name that says its battery type and slice axis: AI Hub's, or any CT_<type>_..._<axis>_<slice>
_CT_META_NAME = re.compile(r"^CT_(?P<type>cell|module)_.*_(?P<axis>[xyz])_(?P<slice>\d+)$", re.IGNORECASE)


def meta_from_name(filename: str) -> tuple[str, str] | None:
    """(battery_type, slice_axis) from a CT slice's file name ("CT_module_pouch_012_z_004.jpg" ->
    ("module", "z")), or None where the name does not say."""
    m = _CT_META_NAME.match(Path(filename).stem)
    return (m["type"].lower(), m["axis"].lower()) if m else None


def ct_stem(battery_type: str, form: str, battery_id: int, axis: str, slice_index: int) -> str:
    return f"CT_{battery_type}_{form}_{battery_id:03d}_{axis}_{slice_index:03d}"


def rgb_stem(battery_type: str, form: str, battery_id: int, index: int) -> str:
    return f"RGB_{battery_type}_{form}_{battery_id:04d}_{index:03d}"


def layout_dirs(root: Path, subset: str, modality: str) -> tuple[Path, Path]:
    """(image folder, label folder) of a modality ('ct' | 'rgb') in a Training/Validation tree."""
    prefix = "T" if subset == "Training" else "V"
    images = root / subset / SOURCE_DIR / (prefix + ARCHIVES[(modality, "images")])
    labels = root / subset / LABEL_DIR / (prefix + ARCHIVES[(modality, "label")])
    return images, labels


def battery_key(battery_type: str, form: str, battery_id: int) -> str:
    """The unit of splitting: every image of one physical battery shares it."""
    return f"{battery_type}_{form}_{battery_id:04d}"


@dataclass(frozen=True)
class DefectPolygon:
    name: str
    points: tuple[int, ...]  # x1, y1, x2, y2, ...

    def xy(self) -> list[tuple[int, int]]:
        return list(zip(self.points[0::2], self.points[1::2]))


@dataclass(frozen=True)
class CTRecord:
    path: Path
    label_path: Path
    battery_id: int
    battery_type: str
    form: str
    axis: str
    slice_index: int
    label: str  # one of CT_CLASSES, per battery
    defects: tuple[DefectPolygon, ...]  # what this slice shows
    outline: tuple[int, ...]
    roi: tuple[int, ...] | None
    width: int
    height: int
    subset: str  # "Training" | "Validation" | "" (flat folder)

    @property
    def battery_key(self) -> str:
        return battery_key(self.battery_type, self.form, self.battery_id)

    @property
    def label_index(self) -> int:
        return CT_CLASS_INDEX[self.label]

    @property
    def meta(self) -> tuple[float, float]:
        """The classifier's metadata input: [battery_type, slice_axis]."""
        return float(BATTERY_TYPES.index(self.battery_type)), float(SLICE_AXES.index(self.axis))


@dataclass(frozen=True)
class RGBRecord:
    path: Path
    label_path: Path
    battery_id: int
    battery_type: str
    form: str
    index: int
    is_normal: bool
    defects: tuple[DefectPolygon, ...]
    outline: tuple[int, ...]
    distance: float | None
    degree: tuple[float, ...] | None
    width: int
    height: int
    subset: str

    @property
    def battery_key(self) -> str:
        return battery_key(self.battery_type, self.form, self.battery_id)


@dataclass(frozen=True)
class Problem:
    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


PROBLEM_KINDS = (
    "bad_name",  # an image whose name is not CT_... or RGB_... as in the layout
    "missing_label",  # an image without a same-stem JSON
    "missing_image",  # a label JSON without its image
    "malformed_label",  # JSON that does not parse or lacks required keys/types
    "unknown_defect",  # a defect name outside the vocabulary
    "unreadable_image",  # an image that cannot be opened (or decoded, with verify)
    "inconsistent",  # label and file name or image disagree
    "duplicate",  # the same stem twice under the root
)


@dataclass
class ScanReport:
    problems: list[Problem] = field(default_factory=list)

    def add(self, path, kind: str, message: str) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.problems.append(Problem(str(path), kind, message))

    @property
    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]


@dataclass
class Dataset:
    root: Path
    ct: list[CTRecord]
    rgb: list[RGBRecord]
    report: ScanReport

    def ct_class_counts(self, per: str = "slice") -> Counter:
        if per == "battery":
            return Counter({r.battery_key: r.label for r in self.ct}.values())
        return Counter(r.label for r in self.ct)

    def summary(self) -> str:
        lines = [
            f"{self.root}: {len(self.ct)} CT slices, {len(self.rgb)} RGB photos, "
            f"{len({r.battery_key for r in self.ct} | {r.battery_key for r in self.rgb})} batteries"
        ]
        per_slice, per_battery = self.ct_class_counts(), self.ct_class_counts("battery")
        for name in CT_CLASS_INDEX:
            lines.append(f"  {name:<22} {per_slice.get(name, 0):>7} slices {per_battery.get(name, 0):>6} batteries")
        normal = sum(r.is_normal for r in self.rgb)
        lines.append(f"  RGB normal {normal}, defective {len(self.rgb) - normal}")
        counts = self.report.counts
        if counts:
            lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        else:
            lines.append("  problems: none")
        return "\n".join(lines)


class _LabelError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _require(obj: dict, key: str, types, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise _LabelError("malformed_label", f"missing key {where}{key}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise _LabelError("malformed_label", f"{where}{key} has type {type(value).__name__}")
    return value


def _points(raw, where: str) -> tuple[int, ...]:
    if (
        not isinstance(raw, list)
        or len(raw) < 6
        or len(raw) % 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    ):
        raise _LabelError("malformed_label", f"{where} is not a flat list of at least 3 x, y points")
    return tuple(int(round(v)) for v in raw)


def _defects(label: dict, vocabulary: tuple[str, ...]) -> tuple[DefectPolygon, ...]:
    raw = label.get("defects")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _LabelError("malformed_label", "defects is neither null nor a list")
    out = []
    for i, d in enumerate(raw):
        name = _require(d, "name", str, f"defects[{i}].")
        if name not in vocabulary:
            raise _LabelError("unknown_defect", f"defect name {name!r} is not one of {list(vocabulary)}")
        out.append(DefectPolygon(name, _points(d.get("points"), f"defects[{i}].points")))
    return tuple(out)


def _common(label: dict, match: re.Match, image_size: tuple[int, int]) -> dict:
    info = _require(label, "data_info", dict, "")
    image_info = _require(label, "image_info", dict, "")
    battery_type = _require(info, "type", str, "data_info.")
    form = _require(info, "form", str, "data_info.")
    battery_id = _require(info, "battery_ids", int, "data_info.")
    if battery_type not in BATTERY_TYPES or form not in FORMS:
        raise _LabelError("malformed_label", f"unknown type/form {battery_type!r}/{form!r}")
    if (battery_type, form, battery_id) != (match["type"], match["form"], int(match["id"])):
        raise _LabelError(
            "inconsistent",
            f"label says {battery_type} {form} battery {battery_id}, file name says "
            f"{match['type']} {match['form']} battery {int(match['id'])}",
        )
    width = _require(image_info, "width", int, "image_info.")
    height = _require(image_info, "height", int, "image_info.")
    if (width, height) != image_size:
        raise _LabelError("inconsistent", f"label says {width}x{height}, image is {image_size[0]}x{image_size[1]}")
    is_normal = _require(image_info, "is_normal", bool, "image_info.")
    swelling = label.get("swelling") or {}
    outline_raw = swelling.get("battery_outline") if isinstance(swelling, dict) else None
    outline = _points(outline_raw, "swelling.battery_outline") if outline_raw else ()
    return dict(
        battery_type=battery_type,
        form=form,
        battery_id=battery_id,
        width=width,
        height=height,
        is_normal=is_normal,
        outline=outline,
        info=info,
    )


def _image_size(path: Path, verify: bool) -> tuple[int, int]:
    if path.suffix.lower() == ".dcm":
        ds = pydicom.dcmread(path, stop_before_pixels=not verify)
        if verify:
            ds.pixel_array  # noqa: B018 (decodes: raises on damaged pixel data)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as im:
        size = im.size
        if verify:
            im.load()
    return size


def _subset_of(path: Path, root: Path) -> str:
    for part in path.relative_to(root).parts:
        if part in ("Training", "Validation"):
            return part
    return ""


def scan(root: str | os.PathLike, verify_images: bool = False, progress: bool = True) -> Dataset:
    """Read every CT slice and RGB photo under `root`.

    `verify_images` decodes each image fully (slow on the real 500 GB set); otherwise
    only the header is read, which catches empty, foreign and truncated-header files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    report = ScanReport()
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext == ".json":
                if CT_NAME.match(stem) or RGB_NAME.match(stem):
                    if stem in labels:
                        report.add(path, "duplicate", f"label also at {labels[stem]}")
                    else:
                        labels[stem] = path
            elif ext in IMAGE_EXTENSIONS:
                if stem in images:
                    report.add(path, "duplicate", f"image also at {images[stem]}")
                else:
                    images[stem] = path
    for stem in sorted(set(labels) - set(images)):
        report.add(labels[stem], "missing_image", "label has no image with the same stem")

    ct_raw = []
    rgb: list[RGBRecord] = []
    for stem in tqdm(sorted(images), desc="scan", unit="img", disable=not progress, leave=False):
        path = images[stem]
        ct_match, rgb_match = CT_NAME.match(stem), RGB_NAME.match(stem)
        if not (ct_match or rgb_match):
            report.add(
                path,
                "bad_name",
                "name matches neither CT_{type}_{form}_{id}_{axis}_{slice} nor RGB_{type}_{form}_{id}_{index}",
            )
            continue
        if stem not in labels:
            report.add(path, "missing_label", f"no {stem}.json under {root}")
            continue
        label_path = labels[stem]
        try:
            size = _image_size(path, verify_images)
        except Exception as exc:  # PIL raises many types for broken files
            report.add(path, "unreadable_image", f"cannot read image: {exc}")
            continue
        try:
            with open(label_path, encoding="utf-8-sig") as fh:  # tolerate a BOM
                label = json.load(fh)
            if not isinstance(label, dict):
                raise _LabelError("malformed_label", "top level is not an object")
            common = _common(label, ct_match or rgb_match, size)
            subset = _subset_of(path, root)
            if ct_match:
                defects = _defects(label, CT_DEFECT_NAMES)
                roi = common["info"].get("roi")
                ct_raw.append(
                    dict(
                        path=path,
                        label_path=label_path,
                        battery_id=common["battery_id"],
                        battery_type=common["battery_type"],
                        form=common["form"],
                        axis=ct_match["axis"],
                        slice_index=int(ct_match["slice"]),
                        defects=defects,
                        outline=common["outline"],
                        roi=tuple(roi) if isinstance(roi, list) else None,
                        width=common["width"],
                        height=common["height"],
                        subset=subset,
                    )
                )
            else:
                defects = _defects(label, RGB_DEFECT_NAMES)
                info = common["info"]
                degree = info.get("degree")
                rgb.append(
                    RGBRecord(
                        path=path,
                        label_path=label_path,
                        battery_id=common["battery_id"],
                        battery_type=common["battery_type"],
                        form=common["form"],
                        index=int(rgb_match["index"]),
                        is_normal=common["is_normal"] and not defects,
                        defects=defects,
                        outline=common["outline"],
                        distance=info.get("distance"),
                        degree=tuple(degree) if isinstance(degree, list) else None,
                        width=common["width"],
                        height=common["height"],
                        subset=subset,
                    )
                )
        except _LabelError as exc:
            report.add(label_path, exc.kind, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            report.add(label_path, "malformed_label", f"not valid JSON: {exc}")
        except OSError as exc:
            report.add(label_path, "malformed_label", f"cannot read label: {exc}")
    return Dataset(root=root, ct=_label_batteries(ct_raw, report), rgb=rgb, report=report)


def _label_batteries(ct_raw: list[dict], report: ScanReport) -> list[CTRecord]:
    """Give each slice its battery's 5-class label (worst finding over all its slices)."""
    findings: dict[str, list[str]] = defaultdict(list)
    for r in ct_raw:
        key = battery_key(r["battery_type"], r["form"], r["battery_id"])
        findings[key] += [finding_of(d.name) for d in r["defects"]]
    records = []
    for r in ct_raw:
        key = battery_key(r["battery_type"], r["form"], r["battery_id"])
        try:
            label = ct_class_name(r["battery_type"], worst_finding(findings[key]))
        except ValueError as exc:
            report.add(r["label_path"], "inconsistent", str(exc))
            continue
        records.append(CTRecord(label=label, **r))
    return records
