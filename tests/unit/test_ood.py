"""The out-of-distribution gate (training/ood.py) and verdict 4 (not_inspectable) in the rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import interface as api
from core.labels import CT_CLASSES, CT_DEFECT_CLASSES
from ensemble.rule import VerdictRule, decide
from serving.runtime import verdict_outputs, verdict_tally
from training.ood import GaussianGate, border_contrast, calibrate, distances, fit_gaussian

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
    assert ("not_inspectable", "cell") in tally["verdicts"] and ("not_inspectable", "unknown") in tally["verdicts"]
