"""The synthetic generator: layout, labels, determinism, class mix, defects where labelled."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from core.aihub import CT_NAME, RGB_NAME, scan
from core.decode import decode_ct
from core.labels import CT_CLASSES
from tests.conftest import SMALL
from training.synth import raster
from training.synth.ct import CTSliceSpec, render_ct_slice
from training.synth.plan import SynthConfig, allocate, make_plan
from training.synth.rgb import RGBPhotoSpec, render_rgb_photo
from training.synth.writer import generate


def _tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_matches_the_aihub_tree(small_dataset):
    root, plans = small_dataset
    ct_images = sorted(root.glob("*/01.원천데이터/?S_CT_Datasets_images/*.jpg"))
    rgb_images = sorted(root.glob("*/01.원천데이터/?S_Exterior_Img_Datasets_images/*.png"))
    assert len(ct_images) == sum(len(p.ct_slices) for p in plans)
    assert len(rgb_images) == sum(len(p.photos) for p in plans)
    for img in ct_images + rgb_images:
        assert CT_NAME.match(img.stem) or RGB_NAME.match(img.stem), img.name
        kind = "CT" if img.stem.startswith("CT_") else "Exterior_Img"
        subset = img.parts[-4]
        label = root / subset / "02.라벨링데이터" / f"{subset[0]}L_{kind}_Datasets_label" / f"{img.stem}.json"
        assert label.exists(), label


def test_label_json_has_the_aihub_keys_and_types(small_dataset):
    root, _ = small_dataset
    labels = sorted(root.rglob("CT_*.json"))[:3] + sorted(root.rglob("RGB_*.json"))[:3]
    for path in labels:
        label = json.loads(path.read_text())
        assert set(label) == {"data_info", "swelling", "defects", "image_info"}
        info = label["data_info"]
        assert set(info) == {
            "data_type",
            "battery_ids",
            "application",
            "type",
            "form",
            "date",
            "place",
            "distance",
            "degree",
            "roi",
        }
        assert isinstance(info["battery_ids"], int) and info["type"] in ("cell", "module")
        assert info["form"] in ("pouch", "cylindrical")
        assert len(info["date"]) == 10 and info["date"][4] == "."
        assert isinstance(label["swelling"]["swelling"], bool)
        outline = label["swelling"]["battery_outline"]
        assert all(isinstance(v, int) for v in outline) and len(outline) % 2 == 0 and len(outline) >= 6
        image_info = label["image_info"]
        assert set(image_info) == {"width", "height", "file_name", "id", "is_normal"}
        assert image_info["file_name"] == path.stem + (".jpg" if path.stem.startswith("CT_") else ".png")
        assert image_info["is_normal"] == (label["defects"] is None)
        if path.stem.startswith("CT_"):
            assert info["data_type"] == "ct" and info["distance"] is None and len(info["roi"]) == 2
        else:
            assert info["data_type"] == "rgb" and isinstance(info["distance"], float) and len(info["degree"]) == 2
        for d in label["defects"] or []:
            assert set(d) == {"id", "name", "points"} and all(isinstance(v, int) for v in d["points"])


def test_reader_reads_exactly_what_the_generator_drew(small_dataset):
    root, plans = small_dataset
    ds = scan(root, progress=False)
    assert ds.report.problems == []
    by_stem = {r.path.stem: r for r in ds.ct}
    assert len(by_stem) == sum(len(p.ct_slices) for p in plans)
    for plan in plans:
        for spec in plan.ct_slices:
            rec = by_stem[
                f"CT_{spec.battery_type}_{spec.form}_{spec.battery_id:03d}_{spec.axis}_{spec.slice_index:03d}"
            ]
            assert rec.label == plan.ct_class
            assert (rec.battery_type, rec.form, rec.axis, rec.subset) == (
                spec.battery_type,
                spec.form,
                spec.axis,
                plan.subset,
            )
            drawn = render_ct_slice(spec)
            assert [d.name for d in rec.defects] == [d.name for d in drawn.defects]
            assert [d.points for d in rec.defects] == [tuple(raster.flat(d.polygon)) for d in drawn.defects]
            assert rec.outline == tuple(raster.flat(drawn.outline))
            with Image.open(rec.path) as im:
                assert im.mode == "L" and im.size == (spec.size, spec.size)
    rgb_by_stem = {r.path.stem: r for r in ds.rgb}
    for plan in plans:
        for spec in plan.photos:
            rec = rgb_by_stem[f"RGB_{spec.battery_type}_{spec.form}_{spec.battery_id:04d}_{spec.index:03d}"]
            drawn = render_rgb_photo(spec)
            assert rec.is_normal == (not plan.rgb_defects)
            assert [(d.name, d.points) for d in rec.defects] == [
                (d.name, tuple(raster.flat(d.polygon))) for d in drawn.defects
            ]
            assert {d.name for d in rec.defects} == set(plan.rgb_defects)
            assert rec.degree == drawn.degree and rec.distance == drawn.distance


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    cfg = SynthConfig(batteries=3, seed=11, **SMALL)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, cfg, workers=1, progress=False)
    generate(b, cfg, workers=2, progress=False)  # worker count must not matter
    generate(c, SynthConfig(batteries=3, seed=12, **SMALL), workers=1, progress=False)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


@pytest.mark.parametrize("total", [7, 40, 101])
def test_class_counts_follow_the_requested_mix(total):
    mix = {
        "cell_normal": 0.4,
        "cell_porosity": 0.1,
        "module_normal": 0.2,
        "module_porosity": 0.2,
        "module_resin_overflow": 0.1,
    }
    counts = allocate(mix, total)
    assert sum(counts.values()) == total
    for name, weight in mix.items():
        assert abs(counts[name] - weight * total) < 1, (name, counts)
    plans = make_plan(SynthConfig(batteries=total, mix=mix, **SMALL))
    assert {c: sum(p.ct_class == c for p in plans) for c in CT_CLASSES} == counts


def test_generated_classes_are_what_the_reader_labels(small_dataset, small_config):
    root, plans = small_dataset
    per_battery = scan(root, progress=False).ct_class_counts("battery")
    assert dict(per_battery) == {c: n for c, n in allocate(small_config.mix, small_config.batteries).items() if n}


def test_every_defective_battery_shows_its_defect_on_some_slice_and_x_slices_often_do_not():
    plans = make_plan(SynthConfig(batteries=200, seed=5, **SMALL, mix={"cell_porosity": 1.0}))
    assert all(any(s.show_defect for s in p.ct_slices) for p in plans)
    shown = {axis: np.mean([s.show_defect for p in plans for s in p.ct_slices if s.axis == axis]) for axis in "xyz"}
    assert shown["x"] < 0.45 < shown["y"]


def test_visibility_per_axis_is_configurable_and_validated():
    cfg = SynthConfig(
        batteries=30, seed=2, **SMALL, mix={"module_porosity": 1.0}, visibility={"x": 0.0, "y": 1.0, "z": 0.0}
    )
    slices = [s for p in make_plan(cfg) for s in p.ct_slices]
    assert not any(s.show_defect for s in slices if s.axis != "y")
    assert all(s.show_defect for s in slices if s.axis == "y")
    with pytest.raises(ValueError, match="visibility"):
        SynthConfig(visibility={"x": 1.5, "y": 1.0, "z": 1.0})


def _mean_abs_diff(a, b, mask):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[mask].mean())


CT_CASES = [
    ("cell", "pouch", "porosity", "y"),
    ("cell", "pouch", "porosity", "x"),
    ("cell", "pouch", "porosity", "z"),
    ("cell", "cylindrical", "porosity", "z"),
    ("cell", "cylindrical", "porosity", "y"),
    ("module", "pouch", "porosity", "y"),
    ("module", "cylindrical", "porosity", "z"),
    ("module", "pouch", "resin_overflow", "y"),
    ("module", "pouch", "resin_overflow", "z"),
    ("module", "cylindrical", "resin_overflow", "x"),
    ("module", "cylindrical", "resin_overflow", "z"),
]


@pytest.mark.parametrize("battery_type,form,finding,axis", CT_CASES)
def test_ct_defects_are_inside_their_polygons(battery_type, form, finding, axis):
    for battery_id in range(1, 4):
        spec = CTSliceSpec(battery_id, battery_type, form, axis, 5, finding, True, 256, 0)
        with_defect, clean = render_ct_slice(spec), render_ct_slice(spec, with_defects=False)
        assert with_defect.defects, "a slice that shows a defect has a labelled polygon"
        for d in with_defect.defects:
            inside = raster.polygon_mask(d.polygon, with_defect.image.shape)
            if inside.sum() < 12:  # a pore of a few pixels: partial volume hides most of it
                continue
            assert _mean_abs_diff(with_defect.image, clean.image, inside) > 10, (spec, d.polygon.tolist())
        anywhere = np.zeros(clean.image.shape, bool)
        for d in with_defect.defects:
            anywhere |= raster.polygon_mask(d.polygon, clean.image.shape)
        far = ~np.asarray(Image.fromarray(anywhere).filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(15)))
        assert _mean_abs_diff(with_defect.image, clean.image, far) < 2.0


@pytest.mark.parametrize("battery_type,form", [("cell", "cylindrical"), ("cell", "pouch"), ("module", "pouch")])
@pytest.mark.parametrize("kind", ["Damaged", "Pollution"])
def test_rgb_defects_are_inside_their_polygons(battery_type, form, kind):
    for battery_id in range(1, 4):
        spec = RGBPhotoSpec(battery_id, battery_type, form, 1, (kind,), 480, 270, 0)
        photo, clean = render_rgb_photo(spec), render_rgb_photo(spec, with_defects=False)
        assert photo.defects and {d.name for d in photo.defects} == {kind}
        changed = np.zeros(clean.image.shape[:2], bool)  # every pixel a polygon touches
        for d in photo.defects:
            inside = raster.polygon_mask(d.polygon, clean.image.shape[:2])
            box, cov = raster.polygon_coverage(d.polygon, clean.image.shape[:2])
            changed[box] |= cov > 0
            assert _mean_abs_diff(photo.image, clean.image, inside) > 6, (spec, d.kind)
        assert np.array_equal(photo.image[~changed & ~_grow(changed, 3)], clean.image[~changed & ~_grow(changed, 3)])


def _grow(mask, px):

    return ndimage.binary_dilation(mask, iterations=px)


def test_normal_rgb_photo_has_no_defects_and_normal_ct_slice_none():
    photo = render_rgb_photo(RGBPhotoSpec(1, "cell", "pouch", 1, (), 192, 108, 0))
    assert photo.defects == []
    ct = render_ct_slice(CTSliceSpec(1, "module", "pouch", "y", 1, "normal", False, 128, 0))
    assert ct.defects == []


def test_command_line_writes_a_data_set_and_a_preview(tmp_path):
    out = tmp_path / "set"
    cmd = [
        sys.executable,
        "-m",
        "training.synth",
        "--out",
        str(out),
        "--batteries",
        "5",
        "--seed",
        "1",
        "--ct-size",
        "128",
        "--rgb-size",
        "192x108",
        "--slices-per-axis",
        "1",
        "--photos",
        "1",
        "--mix",
        "cell_porosity=1,module_resin_overflow=1",
        "--workers",
        "1",
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 5 batteries (15 CT slices, 5 RGB photos)" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr  # nothing overwritten by accident
    sheet = tmp_path / "sheet.png"
    done = subprocess.run(
        [sys.executable, "-m", "training.synth", "preview", str(out), "--out", str(sheet)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(sheet) as im:
        assert im.width > 1000 and im.height > 1000


def test_command_line_rejects_a_bad_mix_with_a_clear_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "training.synth", "--out", str(tmp_path / "x"), "--mix", "cell_swollen=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "cell_swollen=1" in done.stderr and "cell_normal" in done.stderr


def test_large_slices_are_drawn_small_and_enlarged_with_their_labels():
    # 2100 px: drawn at 700 (k = 3) and enlarged; the defect is where its label says, at full size
    spec = CTSliceSpec(2, "cell", "pouch", "y", 5, "porosity", True, 2100, 0)
    big, clean = render_ct_slice(spec), render_ct_slice(spec, with_defects=False)
    small = render_ct_slice(CTSliceSpec(2, "cell", "pouch", "y", 5, "porosity", True, 700, 0))
    assert big.image.shape == (2100, 2100) and big.image.dtype == np.uint8
    assert len(big.defects) == len(small.defects) > 0
    for d, s in zip(big.defects, small.defects):
        np.testing.assert_allclose(d.polygon, np.rint(s.polygon * 3), atol=1)
        inside = raster.polygon_mask(d.polygon, big.image.shape)
        assert _mean_abs_diff(big.image, clean.image, inside) > 10
    assert big.roi[0] == small.roi[0] * 3 and abs(big.roi[1] - (small.roi[1] * 3 + 2)) <= 1
    # the enlarged picture is the small one plus fine grain
    assert np.abs(np.asarray(Image.fromarray(big.image).reduce(3), np.float32) - small.image).mean() < 4


def test_ct_slices_are_written_in_the_formats_asked_for_and_read_back(tmp_path):

    generate(
        tmp_path,
        SynthConfig(
            batteries=3,
            seed=2,
            ct_size=96,
            rgb_width=96,
            rgb_height=64,
            slices_per_axis=2,
            photos_per_battery=1,
            ct_formats={"jpeg": 1, "tiff16": 1, "dicom": 1},
        ),
        workers=1,
        progress=False,
    )
    records = scan(tmp_path, progress=False).ct
    suffixes = {r.path.suffix for r in records}
    assert len(records) == 18 and suffixes == {".jpg", ".tif", ".dcm"}
    for r in records:
        pixels = decode_ct(r.path.read_bytes())
        assert pixels.shape == (96, 96) and pixels.dtype == (np.uint8 if r.path.suffix == ".jpg" else np.uint16)
    with pytest.raises(ValueError, match="ct_formats"):
        SynthConfig(ct_formats={"gif": 1})
