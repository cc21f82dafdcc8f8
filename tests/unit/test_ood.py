"""The out-of-distribution gate (training/ood.py) and verdict 4 (not_inspectable) in the rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core import interface as api
from core.decode import ImageError
from core.labels import CT_CLASSES, CT_DEFECT_CLASSES
from core.preprocess import check_frame, encoded_ct_input, encoded_rgb_input, fit_frame
from ensemble.rule import VerdictRule, decide
from serving.runtime import verdict_outputs, verdict_tally
from training.ood import (
    GaussianGate,
    border_contrast,
    calibrate,
    cross_fitted_distances,
    distances,
    fit_ct_gate_on,
    fit_gaussian,
    fit_rgb_gate_on,
    folds_of,
)

RULE = VerdictRule(class_names=CT_CLASSES, ct_defect_classes=CT_DEFECT_CLASSES, rgb_threshold=0.5)


def _clusters(seed: int = 0, n: int = 200, dim: int = 12):
    """Two classes in two groups: class 0 around +3 on axis 0 (group 0), class 1 around -3 (group 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = rng.normal(size=(n, dim))
    x[:, 0] += np.where(labels == 0, 3.0, -3.0)
    return x, labels


def test_the_exported_gate_computes_the_reference_distance_with_the_battery_type_mask():
    x, labels = _clusters()
    gate = fit_gaussian(x, labels, 2) | {"class_groups": [0, 1]}
    gate = calibrate(gate, distances(gate, x, labels), {"quantile": 0.99, "margin": 1.2})
    probe = np.concatenate([x[:8], x[:8] + 4.0])
    groups = np.r_[labels[:8], 1 - labels[:8]]
    expected = distances(gate, probe, groups) / gate["threshold"]
    got = GaussianGate(gate)(
        torch.tensor(probe, dtype=torch.float32), torch.tensor(groups, dtype=torch.float32)
    ).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_a_sample_is_far_from_the_classes_its_group_does_not_have():
    x, labels = _clusters()
    gate = fit_gaussian(x, labels, 2) | {"class_groups": [0, 1]}
    own = distances(gate, x[:50], labels[:50])
    contradicted = distances(gate, x[:50], 1 - labels[:50])  # metadata naming the other battery type
    assert np.median(contradicted) > 1.6 * np.median(own)  # sqrt(12 + 6^2) against sqrt(12): the 6-sigma gap counts
    assert (contradicted > own).mean() > 0.95


def test_calibration_puts_the_threshold_at_the_quantile_times_the_margin_and_stores_it():
    x, labels = _clusters(1)
    gate = fit_gaussian(x, labels, 2)
    d = distances(gate, x)
    calibrated = calibrate(gate, d, {"quantile": 0.9, "margin": 1.1})
    assert calibrated["threshold"] == pytest.approx(np.quantile(d, 0.9) * 1.1)
    assert calibrated["validation"]["rejected"] == pytest.approx((d >= calibrated["threshold"]).mean())
    far = distances(gate, x + 50.0)
    assert (far >= calibrated["threshold"]).all()
    with pytest.raises(ValueError, match="quantile"):
        calibrate(gate, d, {"quantile": 0.0, "margin": 1.0})
    with pytest.raises(ValueError, match="no validation images"):
        calibrate(gate, np.zeros(0), {})


def test_a_feature_that_never_varied_in_training_counts_when_it_wakes_up():
    x, labels = _clusters(2)
    x[:, 5] = 0.0  # dead in training (a ReLU channel no cell lights up)
    gate = calibrate(
        fit_gaussian(x, labels, 2), distances(fit_gaussian(x, labels, 2), x), {"quantile": 1.0, "margin": 1.0}
    )
    awake = x[:20].copy()
    awake[:, 5] = 1.0
    assert (distances(gate, awake) >= gate["threshold"]).all()


def test_border_contrast_tells_a_centred_object_from_one_cut_off_by_the_frame():
    centred = torch.zeros(1, 1, 40, 40)
    centred[:, :, 10:30, 10:30] = 1.0
    cut = torch.zeros(1, 1, 40, 40)
    cut[:, :, 20:, 20:] = 1.0
    assert border_contrast(centred).item() < -0.3
    assert border_contrast(cut).item() > border_contrast(centred).item() + 0.3


def test_an_out_of_distribution_input_makes_verdict_4_whatever_the_models_say():
    probs = np.tile(np.eye(5, dtype=np.float32)[[0]], (5, 1))  # CT normal
    probs[1] = np.eye(5)[1]  # CT porosity
    score = np.array([0.1, 0.1, 0.9, 0.1, 0.1], np.float32)
    ct_ood = np.array([0.2, 0.2, 0.2, 1.0, np.nan], np.float32)
    rgb_ood = np.array([0.3, 0.3, 1.5, 0.3, 0.3], np.float32)
    d = decide(RULE, probs, score, ct_ood, rgb_ood)
    assert d.verdict.tolist() == [0, 1, 4, 4, 4]
    assert d.out_of_distribution.tolist() == [False, False, True, True, True]
    # the confidence of a refusal: 0.6 at the threshold 1.0, +0.4 per unit past it, at most 1
    assert (
        d.confidence[2] == pytest.approx(0.8)
        and d.confidence[3] == pytest.approx(0.6)
        and d.confidence[4] == pytest.approx(1.0)
    )
    # the findings underneath are still reported
    assert d.ct_defective.tolist() == [False, True, False, False, False] and d.rgb_anomalous[2]
    # without scores nothing is refused, as before the gate
    assert decide(RULE, probs, score).verdict.tolist() == [0, 1, 2, 0, 0]
    for policy in ("and",):
        rule = VerdictRule(
            class_names=CT_CLASSES, ct_defect_classes=CT_DEFECT_CLASSES, rgb_threshold=0.5, policy=policy
        )
        assert decide(rule, probs, score, ct_ood, rgb_ood).verdict.tolist() == [0, 0, 4, 4, 4]
    assert api.VERDICT_NAMES[api.NOT_INSPECTABLE] == "not_inspectable"


def test_the_verdict_model_refuses_per_request_in_a_mixed_batch_and_counts_the_refused_input():
    probs = [np.eye(5, dtype=np.float32)[[0, 1]], None]
    scores = [np.array([[0.1], [0.1]], np.float32), np.array([[0.9]], np.float32)]
    ct_oods = [np.array([[2.0], [0.1]], np.float32), None]
    rgb_oods = [np.array([[0.1], [0.1]], np.float32), np.array([[3.0]], np.float32)]
    out = verdict_outputs(RULE, probs, scores, ct_oods, rgb_oods)
    assert out[0][api.VERDICT].ravel().tolist() == [4, 1]
    assert out[1][api.VERDICT].ravel().tolist() == [4]  # inspect_rgb: its photo alone
    assert out[0][api.CONFIDENCE][0, 0] == pytest.approx(1.0)
    tally = verdict_tally(RULE, probs, [np.array([[0, 2], [1, 0]], np.float32), None], out, scores, ct_oods, rgb_oods)
    assert sorted(tally["refused"]) == ["ct", "rgb"]
    # whole cells only: the inspect_rgb request's photo-only answer is no cell's verdict
    assert tally["verdicts"] == [("not_inspectable", "cell"), ("internal_defect", "module")]


def test_the_spread_measured_out_of_sample_is_as_wide_as_what_the_network_did_not_see():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    centre = np.where(labels == 0, 3.0, -3.0)[:, None] * np.eye(8)[0]
    memorised = centre + 0.2 * rng.normal(size=(300, 8))  # training features, pulled onto their class means
    unseen_labels = rng.integers(0, 2, 200)
    unseen = np.where(unseen_labels == 0, 3.0, -3.0)[:, None] * np.eye(8)[0] + rng.normal(size=(200, 8))
    tight = fit_gaussian(memorised, labels, 2)
    wide = fit_gaussian(memorised, labels, 2, spread=unseen[:100], spread_labels=unseen_labels[:100])
    assert wide["spread_from"] == "held-out" and wide["spread_on"] == 100
    np.testing.assert_allclose(wide["means"][0][0] / wide["scale"][0], 3.0 - memorised[:, 0].mean(), atol=0.1)
    # unseen rows lie about sqrt(8) from the class means in the held-out spread, 5x farther in the memorised one
    d_wide, d_tight = distances(wide, unseen[100:]), distances(tight, unseen[100:])
    assert 2.0 < np.median(d_wide) < 4.0 and np.median(d_tight) > 4 * np.median(d_wide)
    far = unseen[100:] + 10.0 * np.eye(8)[3]  # ten held-out standard deviations along a dimension
    assert (distances(wide, far) > np.quantile(d_wide, 0.99)).mean() > 0.95


def test_cross_fitting_scores_each_block_with_the_gate_fitted_without_it():
    assert [len(b) for b in folds_of(10, 3)] == [4, 3, 3] and np.concatenate(folds_of(10, 3)).tolist() == list(
        range(10)
    )
    rows = np.random.default_rng(5).normal(size=(40, 3))
    rows[7] += 50.0  # one outlier: scored far when held out, since the spread of the others does not include it
    fitted_on = []

    def fit(rest):
        fitted_on.append(set(rest.tolist()))
        return fit_gaussian(rows[rest], spread=None)

    d = cross_fitted_distances(fit, rows, None, 4)
    assert len(fitted_on) == 4 and all(7 not in f for f in fitted_on if 0 not in f)
    assert all(len(f) == 30 for f in fitted_on)
    assert d[7] > 10 * np.median(np.delete(d, 7))
    in_sample = distances(fit_gaussian(rows), rows)
    assert d[7] > 2 * in_sample[7]  # in sample, the outlier widened its own Gaussian


def test_the_ct_gate_with_validation_labels_is_calibrated_on_cross_fitted_distances():
    rng = np.random.default_rng(6)
    train_meta = np.array([[0, k % 3] for k in range(90)], np.float32)
    labels = np.zeros(90, np.int64)
    train = 0.1 * rng.normal(size=(90, 6))  # memorised
    val_meta = np.array([[0, k % 3] for k in range(60)], np.float32)
    val = rng.normal(size=(60, 6))
    groups = [0, 0, 0, 0, 0]
    cfg = {"quantile": 1.0, "margin": 1.0, "folds": 5}
    in_sample = fit_ct_gate_on(train, labels, train_meta, val, val_meta, groups, cfg)
    out = fit_ct_gate_on(train, labels, train_meta, val, val_meta, groups, cfg, val_labels=np.zeros(60, np.int64))
    assert out["spread_from"] == "held-out" and in_sample["spread_from"] == "training"
    # the memorised spread puts unseen slices 10x farther: its threshold is 10x larger in its own units
    assert in_sample["threshold"] > 5 * out["threshold"]
    own = distances(out, val, val_meta[:, 0] * 3 + val_meta[:, 1])
    assert (own < out["threshold"]).all()  # cross-fitted distances are at least as far as the final gate's
    with pytest.raises(ValueError, match="folds"):
        calibrate(out, own, {"folds": 1})


def _slice(size=128, box=(40, 30, 90, 100), level=200):
    a = np.random.default_rng(0).normal(4, 2, (size, size)).clip(0, 255)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = level
    return a.astype(np.uint8)


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_the_placement_check_refuses_what_training_never_had_where_it_was_and_says_which_fact():
    facts = []
    for box in [(40, 30, 90, 100), (30, 30, 100, 95), (35, 40, 95, 92), (38, 28, 88, 104)]:
        encoded_ct_input(_png(_slice(box=box)), 32, facts_out=facts)
    frame = fit_frame(facts, margin=0.25)
    assert frame["fitted_on"] == 4 and set(frame["ranges"]) == {"span", "aspect", "offset", "edge", "fill"}
    span = [f["span"] for f in facts]
    lo, hi = frame["ranges"]["span"]
    assert lo == pytest.approx(min(span) - 0.25 * (max(span) - min(span)))
    assert hi == pytest.approx(max(span) + 0.25 * (max(span) - min(span)))
    assert frame["ranges"]["edge"] == [-0.25, 0.25]  # no training box touched the border: one side is allowed
    x, _ = encoded_ct_input(_png(_slice(box=(36, 32, 92, 98))), 32, frame=frame)  # another cell, placed as in training
    assert x.shape == (1, 32, 32)
    with pytest.raises(ImageError, match="CT slice: not inspectable as placed: the battery sits 54% of the way from"):
        encoded_ct_input(_png(_slice(box=(70, 70, 128, 128))), 32, frame=frame)  # cut off by the frame's corner
    with pytest.raises(ImageError, match="spans 95% of the frame, where the model knows 45%-64%"):
        encoded_ct_input(_png(_slice(box=(4, 4, 124, 124))), 32, frame=frame)  # fills the frame
    with pytest.raises(ImageError, match="no battery found"):
        check_frame(None, frame, "CT slice")
    check_frame(None, None, "CT slice")  # a model without placement ranges checks nothing


def test_an_empty_bench_photo_is_refused_by_the_placement_check():
    rng = np.random.default_rng(1)
    bench = np.clip(rng.normal(150, 2, (90, 160, 3)), 0, 255).astype(np.uint8)
    cell = bench.copy()
    cell[25:65, 50:110] = [40, 90, 160]
    facts = []
    x, _ = encoded_rgb_input(_png(cell), 32, facts_out=facts)
    frame = fit_frame(facts * 2)
    encoded_rgb_input(_png(cell), 32, frame=frame)
    with pytest.raises(ImageError, match="photo: no battery found"):
        encoded_rgb_input(_png(bench), 32, frame=frame)


def test_the_photo_gate_keeps_the_training_spread_unless_told_to_hold_it_out():
    rng = np.random.default_rng(7)
    train, val = 0.2 * rng.normal(size=(80, 5)), rng.normal(size=(40, 5))
    plain = fit_rgb_gate_on(train, val, {})
    expected = fit_gaussian(train)
    assert plain["spread_from"] == "training" and plain["precision"] == expected["precision"]
    assert plain["threshold"] == pytest.approx(np.quantile(distances(expected, val), 0.995) * 1.2)
    held = fit_rgb_gate_on(train, val, {"spread": "held-out"})
    assert held["spread_from"] == "held-out" and held["threshold"] < plain["threshold"] / 3
    with pytest.raises(ValueError, match="spread"):
        fit_rgb_gate_on(train, val, {"spread": "validation"})
