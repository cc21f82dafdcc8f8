"""The AI Hub layout reader: trees and flat folders, per-battery labels, bad data, splits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from core.aihub import scan
from training.data.split import SPLITS, battery_strata, read_split, split_batteries, split_dataset, write_split


@pytest.fixture()
def flat_copy(small_dataset, tmp_path):
    """The small data set as one flat folder of images with JSON beside them."""
    root, _ = small_dataset
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in root.rglob("*"):
        if path.suffix in (".jpg", ".png", ".json") and path.name != "synth_config.json":
            shutil.copy(path, flat / path.name)
    return flat


def _records(ds):
    return sorted((r.path.name, r.label, r.defects, r.outline) for r in ds.ct), sorted(
        (r.path.name, r.is_normal, r.defects) for r in ds.rgb
    )


def test_flat_folder_reads_the_same_as_the_tree(small_dataset, flat_copy):
    tree = scan(small_dataset[0], progress=False)
    flat = scan(flat_copy, progress=False)
    assert flat.report.problems == []
    assert _records(flat) == _records(tree)
    assert {r.subset for r in tree.ct} == {"Training", "Validation"} and {r.subset for r in flat.ct} == {""}


def test_ct_records_carry_everything_the_classifier_needs(small_dataset):
    ds = scan(small_dataset[0], progress=False)
    r = next(r for r in ds.ct if r.battery_type == "module" and r.axis == "z")
    assert r.meta == (1.0, 2.0)
    assert r.label.startswith("module_") and r.label_index in range(5)
    assert r.roi is not None and r.roi[0] < r.roi[1] and len(r.outline) >= 8


def test_a_battery_is_labelled_by_its_worst_slice(flat_copy):
    # Take a normal module and give one of its slices resin overflow, another porosity:
    # every slice of that module becomes module_resin_overflow, other batteries are untouched.
    ds = scan(flat_copy, progress=False)
    target = next(r for r in ds.ct if r.label == "module_normal")
    siblings = [r for r in ds.ct if r.battery_key == target.battery_key]
    assert len(siblings) >= 2
    for record, name in zip(siblings, ["Porosity", "Resin overflow"]):
        label = json.loads(record.label_path.read_text())
        label["defects"] = [{"id": 1, "name": name, "points": [10, 10, 20, 10, 20, 20]}]
        label["image_info"]["is_normal"] = False
        record.label_path.write_text(json.dumps(label))
    again = scan(flat_copy, progress=False)
    assert {r.label for r in again.ct if r.battery_key == target.battery_key} == {"module_resin_overflow"}
    before = {r.path.name: r.label for r in ds.ct if r.battery_key != target.battery_key}
    assert {r.path.name: r.label for r in again.ct if r.battery_key != target.battery_key} == before


def test_each_kind_of_bad_data_is_reported_by_file_and_counted_and_the_scan_goes_on(flat_copy):
    ds = scan(flat_copy, progress=False)
    ct = sorted(ds.ct, key=lambda r: r.path.name)
    rgb = sorted(ds.rgb, key=lambda r: r.path.name)
    ct[0].label_path.unlink()  # missing JSON
    ct[1].label_path.write_text('{"data_info": {"type": "cell",')  # truncated JSON
    ct[2].path.write_bytes(b"\x00\x01 not a jpeg at all")  # unreadable image
    label = json.loads(rgb[0].label_path.read_text())
    label["defects"] = [{"id": 1, "name": "Rust", "points": [1, 1, 5, 1, 5, 5]}]  # unknown defect
    rgb[0].label_path.write_text(json.dumps(label))
    label = json.loads(ct[3].label_path.read_text())
    del label["image_info"]  # a required key missing
    ct[3].label_path.write_text(json.dumps(label))
    (flat_copy / "CT_cell_pouch_999_x_001.json").write_text("{}")  # label without image
    (flat_copy / "holiday_photo.jpg").write_bytes(ct[5].path.read_bytes())  # not our naming

    bad = scan(flat_copy, progress=False)
    counts = bad.report.counts
    assert counts == {
        "missing_label": 1,
        "malformed_label": 2,
        "unreadable_image": 1,
        "unknown_defect": 1,
        "missing_image": 1,
        "bad_name": 1,
    }
    by_kind = {p.kind: p for p in bad.report.problems}
    assert ct[0].path.name in by_kind["missing_label"].path
    assert ct[2].path.name in by_kind["unreadable_image"].path
    assert rgb[0].label_path.name in by_kind["unknown_defect"].path and "'Rust'" in by_kind["unknown_defect"].message
    malformed = " | ".join(str(p) for p in bad.report.of_kind("malformed_label"))
    assert ct[1].label_path.name in malformed and "not valid JSON" in malformed
    assert ct[3].label_path.name in malformed and "image_info" in malformed
    assert len(bad.ct) == len(ds.ct) - 4 and len(bad.rgb) == len(ds.rgb) - 1  # everything else still read
    assert "missing_label 1" in bad.summary()


def test_label_that_disagrees_with_its_file_name_is_reported(flat_copy):
    ds = scan(flat_copy, progress=False)
    record = ds.ct[0]
    label = json.loads(record.label_path.read_text())
    label["data_info"]["battery_ids"] += 500
    record.label_path.write_text(json.dumps(label))
    bad = scan(flat_copy, progress=False)
    [problem] = bad.report.problems
    assert problem.kind == "inconsistent" and "file name says" in problem.message


def test_full_verification_catches_a_truncated_image(flat_copy):
    record = scan(flat_copy, progress=False).ct[0]
    data = record.path.read_bytes()
    record.path.write_bytes(data[: len(data) // 3])
    assert scan(flat_copy, verify_images=True, progress=False).report.counts == {"unreadable_image": 1}


def test_split_never_puts_a_battery_in_two_splits(small_dataset, tmp_path):
    ds = scan(small_dataset[0], progress=False)
    assignment = split_dataset(ds, seed=4)
    write_split(assignment, tmp_path / "splits", seed=4)
    back = read_split(tmp_path / "splits")
    assert back == assignment
    members = {name: {k for k, v in back.items() if v == name} for name in SPLITS}
    assert not (
        members["train"] & members["val"] or members["train"] & members["test"] or members["val"] & members["test"]
    )
    # every image of a battery, CT or RGB, follows its battery
    for r in ds.ct + ds.rgb:
        assert r.battery_key in back
    assert len(back) == len({r.battery_key for r in ds.ct})


def test_leaking_split_files_are_refused(tmp_path):
    write_split({"cell_pouch_0001": "train", "cell_pouch_0002": "test"}, tmp_path, seed=0)
    (tmp_path / "val.txt").write_text("cell_pouch_0001\n")
    with pytest.raises(ValueError, match="cell_pouch_0001 is in both train and val"):
        read_split(tmp_path)


def test_split_is_seeded_stratified_and_near_70_10_20():
    strata = {f"b{i:04d}": ("rare" if i % 20 == 0 else "common") + ("/x" if i % 3 else "/y") for i in range(1000)}
    a = split_batteries(strata, seed=1)
    assert a == split_batteries(strata, seed=1) and a != split_batteries(strata, seed=2)
    counts = {name: sum(v == name for v in a.values()) for name in SPLITS}
    assert abs(counts["train"] - 700) <= 3 and abs(counts["val"] - 100) <= 3 and abs(counts["test"] - 200) <= 3
    rare = [k for k, s in strata.items() if s.startswith("rare")]
    assert {a[k] for k in rare} == set(SPLITS)


def test_strata_combine_ct_class_and_exterior(small_dataset):
    strata = battery_strata(scan(small_dataset[0], progress=False))
    assert all(s.split("/")[1] in ("rgb_normal", "rgb_defect") for s in strata.values())
    assert any(s.endswith("rgb_defect") for s in strata.values())


def test_split_command_prints_a_table_and_writes_files(small_dataset, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "training.data", "split", str(small_dataset[0]), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and (tmp_path / "s" / "test.txt").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "training.data", "scan", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
