"""The parts of changing a model that need no server: releases in a repository's configs, what a
review teaches, the line archive's retention, the comparison's figures and the promotion rule."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from client.archive import LineArchive, Retention
from client.inspection import Cell, Inspection
from client.lifecycle import compare
from client.lifecycle.rule import decide, load_rule
from core import interface as api
from core.aihub import meta_from_name
from core.labels import CT_CLASSES
from core.reviewed import ReviewedLabel, append_review, labels_of, read_results, reviewed_cells
from export import release as rel
from export.spec import EnsembleSpec, ModelSpec, Step, Tensor, parse_pbtxt, to_pbtxt
from training.data.reviewed import held_out, reviewed_examples


def test_each_release_reads_its_own_parameters_and_the_shared_ones():
    params = {"rule@1": "r1", "rule@2": "r2", "release@2": "{}", "max_image_bytes": "9"}
    assert api.release_view(params, 1) == {"rule": "r1", "max_image_bytes": "9"}
    assert api.release_view(params, "2") == {"rule": "r2", "release": "{}", "max_image_bytes": "9"}
    assert api.release_view({"rule": "old"}, 3) == {"rule": "old"}  # a repository from before releases


def _repository(tmp_path: Path, dims: int = 8) -> Path:
    t = Tensor(api.CT_TENSOR, "FP32", (1, dims, dims))
    model = ModelSpec(api.CT_PREPROCESS, (t,), (t,), parameters={"serving_info@1": "a", "max": "1"}, versions=(1,))
    ensemble = EnsembleSpec(api.INSPECT, (t,), (t,), (Step(api.CT_PREPROCESS, {t.name: t.name}, {t.name: "x"}, 1),))
    ensemble = EnsembleSpec(api.INSPECT, (t,), (Tensor("x", "FP32", (1, dims, dims)),), ensemble.steps)
    for spec in (model, ensemble):
        (tmp_path / spec.name).mkdir(parents=True, exist_ok=True)
        (tmp_path / spec.name / "config.pbtxt").write_text(to_pbtxt(spec))
    return tmp_path


def test_a_release_is_added_beside_the_others_and_one_of_other_shapes_is_refused(tmp_path):
    repo = _repository(tmp_path)
    t = Tensor(api.CT_TENSOR, "FP32", (1, 8, 8))
    new = ModelSpec(api.CT_PREPROCESS, (t,), (t,), parameters={"serving_info@2": "b", "max": "7"}, versions=(2,))
    text = rel.merged_configs(repo, [new], 2, keep=(1, 2))[api.CT_PREPROCESS]
    cfg = parse_pbtxt(text)
    assert list(cfg.version_policy.specific.versions) == [1, 2]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"serving_info@1": "a", "serving_info@2": "b", "max": "1"}  # the repository's own settings stay
    other = Tensor(api.CT_TENSOR, "FP32", (1, 16, 16))
    bigger = ModelSpec(api.CT_PREPROCESS, (other,), (other,), parameters={"serving_info@2": "b"}, versions=(2,))
    with pytest.raises(ValueError, match="another input size"):
        rel.merged_configs(repo, [bigger], 2, keep=(1, 2))


def test_ensembles_are_pinned_to_one_release_and_the_staged_one_runs_another(tmp_path):
    repo = _repository(tmp_path)
    assert rel.pinned(repo) == 1
    assert rel.write_staged_ensembles(repo, 2) == rel.STAGED
    assert rel.pinned(repo, rel.STAGED) == 2 and rel.pinned(repo) == 1
    assert rel.pin(repo, 2, names=(api.INSPECT,)) == [api.INSPECT] and rel.pinned(repo) == 2
    assert rel.pin(repo, 2, names=(api.INSPECT,)) == []  # already there: nothing to reload
    rel.remove_staged_ensembles(repo)
    assert not (repo / rel.STAGED).exists()


def test_the_file_name_of_an_ai_hub_slice_says_its_battery_type_and_axis():
    assert meta_from_name("CT_module_pouch_012_z_004.jpg") == ("module", "z")
    assert meta_from_name("/x/CT_cell_cylindrical_003_x_017.dcm") == ("cell", "x")
    assert meta_from_name("CT_module_line3_y_12.tif") == ("module", "y")
    assert meta_from_name("slice.png") is None and meta_from_name("RGB_cell_pouch_0003_001.png") is None


ROW = {"meta": [1.0, 2.0], "ct_class": "module_porosity", "ct_ood": 0.2, "rgb_ood": 0.1}


@pytest.mark.parametrize(
    ("verdict", "decision", "ood", "labels"),
    [
        ("internal_defect", "false_alarm", {}, ("module_normal", None)),
        ("internal_defect", "confirmed", {}, ("module_porosity", None)),
        ("external_defect", "false_alarm", {}, (None, True)),
        ("external_defect", "confirmed", {}, (None, False)),
        ("combined_defect", "false_alarm", {}, ("module_normal", True)),
        ("combined_defect", "confirmed", {}, ("module_porosity", False)),
        ("not_inspectable", "false_alarm", {"rgb_ood": 1.4}, (None, True)),
        ("not_inspectable", "confirmed", {"ct_ood": 2.0}, (None, None)),
    ],
)
def test_a_review_teaches_only_the_input_the_cell_was_flagged_for(verdict, decision, ood, labels):
    assert labels_of(ROW | {"verdict": verdict} | ood, decision) == labels


def _answer(verdict: str, cell_id: str = "c", ct_class: str = "cell_porosity", release: int = 1) -> Inspection:
    code = api.VERDICT_CODES[verdict]
    probs = {c: (0.9 if c == ct_class else 0.025) for c in CT_CLASSES}
    return Inspection(cell_id, verdict, code, 0.9, probs, 0.5, 0.4, model_versions={"release": release})


def _cell(i: int) -> Cell:
    return Cell(b"\x89PNG\r\n\x1a\n" + bytes([i]) * 100, (0.0, 2.0), b"\xff\xd8\xff" + bytes([i]) * 50, f"b{i}/s{i}")


def test_the_archive_keeps_flagged_cells_and_a_sample_with_what_judged_them(tmp_path):
    archive = LineArchive(tmp_path, Retention(sample=0.25), seed=1)
    kept = [archive.offer(_cell(i), _answer("normal" if i % 2 else "internal_defect", f"b{i}/s{i}")) for i in range(40)]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    flagged = [r for r in rows if r["kept"] == "flagged"]
    assert len(flagged) == 20 and sum(k is not None for k in kept) == len(rows)
    assert 0 < len(rows) - 20 < 20  # a sample of the 20 normal ones
    first = rows[0]
    assert (tmp_path / first["ct_path"]).read_bytes() == _cell(0).ct and first["ct_path"].endswith("ct.png")
    assert first["rgb_path"].endswith("rgb.jpg") and first["model_versions"] == {"release": 1}
    assert first["meta"] == [0.0, 2.0] and first["verdict"] == "internal_defect"
    again = archive.keep(_cell(0), _answer("internal_defect", "b0/s0"), "flagged")  # the same cell again: beside it
    assert again.name.endswith("~2") and len(read_results(tmp_path)) == len(rows)  # the index keeps the last per id


def test_retention_removes_the_oldest_unreviewed_cells_first_and_reviewed_ones_last(tmp_path):
    archive = LineArchive(tmp_path, Retention(sample=0.0, max_gb=1.0, max_days=30))
    folders = [archive.keep(_cell(i), _answer("internal_defect", f"b{i}/s{i}"), "flagged") for i in range(6)]
    old = time.time() - 40 * 86400
    for i in (0, 1, 2):  # three cells from 40 days ago, in a folder of their day
        day = tmp_path / time.strftime("%Y-%m-%d", time.localtime(old))
        day.mkdir(exist_ok=True)
        target = day / folders[i].name
        folders[i].rename(target)
        rows = (
            (tmp_path / "results.jsonl")
            .read_text()
            .replace(str(folders[i].relative_to(tmp_path)), str(target.relative_to(tmp_path)))
        )
        (tmp_path / "results.jsonl").write_text(rows)
        os.utime(target, (old, old))
    append_review(tmp_path, ReviewedLabel("b1/s1", "false_alarm", "internal_defect"))
    removed = archive.prune()
    left = read_results(tmp_path)
    assert removed == 2 and set(left) == {"b1/s1", "b3/s3", "b4/s4", "b5/s5"}  # the old reviewed one stays
    assert all((tmp_path / r["ct_path"]).is_file() for r in left.values())
    # over the size limit: unreviewed first (oldest first), then reviewed
    archive.retention = Retention(sample=0.0, max_gb=2.5 * 160 / 2**30, max_days=30)
    archive.prune()
    assert set(read_results(tmp_path)) == {"b1/s1", "b5/s5"}
    archive.retention = Retention(sample=0.0, max_gb=161 / 2**30, max_days=30)  # room for one cell: the reviewed one
    archive.prune()
    assert set(read_results(tmp_path)) == {"b1/s1"}


def test_training_takes_the_reviewed_cells_and_holds_a_stable_share_out(tmp_path):
    archive = LineArchive(tmp_path, Retention(sample=0.0))
    for i in range(60):
        verdict = ("internal_defect", "external_defect", "combined_defect")[i % 3]
        archive.keep(_cell(i), _answer(verdict, f"b{i}/s{i}"), "flagged")
        if i < 50:  # the last ten are not reviewed: no labels
            append_review(tmp_path, ReviewedLabel(f"b{i}/s{i}", ("false_alarm", "confirmed")[i % 2], verdict))
    cells = {c.cell_id: c for c in reviewed_cells(tmp_path)}
    assert len(cells) == 50
    examples = reviewed_examples([tmp_path])
    assert set(examples.held) == {k for k in cells if held_out(k)} and 0 < len(examples.held) < 25
    assert set(examples.held).isdisjoint(examples.trained)
    labels = sorted({r.label for r in examples.ct})
    assert labels == ["cell_normal", "cell_porosity"]  # false alarms normal, confirmed the service's class
    assert all(r.is_normal for r in examples.rgb) and examples.rgb  # photos reviewed as false alarms
    confirmed_photo_only = [k for k, c in cells.items() if c.verdict == "external_defect" and c.decision == "confirmed"]
    assert confirmed_photo_only and not set(confirmed_photo_only) & set(examples.trained)  # nothing to learn from


def _case(i: int, group: str, expected: int, serving: str, staged: str, ct_label: str = "cell_normal"):
    c = compare.Case(f"{group}/{i}", group, Path("ct"), Path("rgb"), (0.0, 2.0), expected, ct_label, False)
    c.answers = {"serving": _answer(serving, c.cell_id, ct_label), "staged": _answer(staged, c.cell_id, ct_label)}
    return c


def test_identical_releases_differ_by_nothing_on_every_resample_and_the_rule_lets_it_through():
    cases = [_case(i, f"b{i // 3}", 0, "normal", "normal") for i in range(120)]
    figures = compare.figures(cases, compare.LABELLED, rounds=200)
    assert figures["verdict_accuracy"]["difference_ci95"] == [0.0, 0.0]
    part = {"counts": compare.counts(cases), "figures": figures, "flips": compare.flips(cases, "test")}
    decision = decide({"sets": {"test": part}}, load_rule())
    assert decision["promote"], decision


def test_a_release_worse_on_the_labels_is_refused_with_the_figure_that_failed():
    # the staged release flags 30 of 120 normal cells (10 batteries of 3) that the one in service passes
    cases = [_case(i, f"b{i // 3}", 0, "normal", "internal_defect" if i < 30 else "normal") for i in range(120)]
    figures = compare.figures(cases, compare.LABELLED | compare.PER_CLASS, rounds=300)
    per_class = figures["recall normal"]  # per class too: the normal cells' share answered normal
    assert (per_class["serving"], per_class["staged"]) == (1.0, 0.75) and per_class["difference_ci95"][1] < 0
    assert np.isnan(figures["recall internal_defect"]["serving"])  # no such cells: undefined, not 0
    fa = figures["false_alarm_rate"]
    assert (fa["serving"], fa["staged"]) == (0.0, 0.25) and fa["difference_ci95"][0] > 0
    part = {"counts": compare.counts(cases), "figures": figures, "flips": compare.flips(cases, "test")}
    decision = decide({"sets": {"test": part}}, load_rule())
    assert not decision["promote"]
    assert any(r.startswith("test false_alarm_rate") for r in decision["reasons"])
    assert part["counts"]["flips"] == 30 and all(f["worse"] and not f["better"] for f in part["flips"])
    # too few cells to decide on are a reason too
    few = cases[:12]
    small = {"counts": compare.counts(few), "figures": compare.figures(few, compare.LABELLED, rounds=50)}
    assert "fewer than the 100" in " ".join(decide({"sets": {"test": small}}, load_rule())["reasons"])


def test_the_interval_resamples_batteries_not_cells():
    # one battery of 30 slices is all wrong for the staged release, 29 other batteries of 3 slices are right:
    # the interval must be as wide as one battery in 30 makes it, not as narrow as 30 slices of 117 would
    cases = [_case(i, "big", 0, "normal", "internal_defect") for i in range(30)]
    cases += [_case(100 + i, f"b{i // 3}", 0, "normal", "normal") for i in range(87)]
    low, high = compare.figures(cases, compare.LABELLED, rounds=400)["false_alarm_rate"]["difference_ci95"]
    assert low == 0.0  # resamples without the big battery happen (about 1 in 3)
    assert high > 0.45  # and with it twice or more


def test_a_replay_that_changes_too_many_verdicts_is_refused():
    cases = [_case(i, f"c{i}", None, "normal", "internal_defect" if i < 60 else "normal") for i in range(100)]
    test = [_case(i, f"b{i // 3}", 0, "normal", "normal") for i in range(120)]
    comparison = {
        "sets": {
            "test": {"counts": compare.counts(test), "figures": compare.figures(test, compare.LABELLED, rounds=50)},
            "replay": {"counts": compare.counts(cases), "figures": {}},
        }
    }
    decision = decide(comparison, load_rule())
    assert not decision["promote"] and "60.0% of recent line cells change verdict" in decision["reasons"][0]


def test_the_shipped_rule_has_a_margin_for_every_figure_it_names():
    rule = load_rule()
    assert set(rule["test"]["margins"]) == set(compare.LABELLED)
    assert set(rule["reviewed"]["margins"]) <= set(compare.REVIEWED)
    assert all(0 <= m < 0.1 for m in rule["test"]["margins"].values())
    assert np.isfinite(rule["replay"]["max_flip_rate"])
