"""The verdict rule of ensemble/: codes, confidence, policy, configuration."""

from __future__ import annotations

import numpy as np
import pytest

from core.facts import ServingFacts
from core.labels import CT_CLASSES, CT_DEFECT_CLASSES
from ensemble import VERDICT_NAMES, VerdictRule, decide, load_rule
from ensemble.rule import RULE_FILE, rgb_confidence, verdict_code


def rule(**kw) -> VerdictRule:
    return VerdictRule(
        **({"class_names": CT_CLASSES, "ct_defect_classes": CT_DEFECT_CLASSES, "rgb_threshold": 0.2} | kw)
    )


def rgb_facts(**kw) -> ServingFacts:
    return ServingFacts(kind="rgb_autoencoder", input_size=64, in_chans=3, **kw)


def probs(top: str, p: float = 0.7) -> np.ndarray:
    out = np.full(len(CT_CLASSES), (1 - p) / (len(CT_CLASSES) - 1))
    out[CT_CLASSES.index(top)] = p
    return out


def test_the_verdicts_follow_the_table():
    d = decide(
        rule(),
        np.stack(
            [probs("cell_normal"), probs("cell_porosity"), probs("module_normal"), probs("module_resin_overflow")]
        ),
        np.array([0.1, 0.1, 0.3, 0.3]),
    )
    assert d.names == ["normal", "internal_defect", "external_defect", "combined_defect"]
    assert d.verdict.tolist() == [0, 1, 2, 3] and d.verdict.dtype == np.int32
    assert d.ct_defective.tolist() == [False, True, False, True]
    assert d.rgb_anomalous.tolist() == [False, False, True, True]
    assert VERDICT_NAMES == ("normal", "internal_defect", "external_defect", "combined_defect", "not_inspectable")


def test_a_score_equal_to_the_threshold_is_not_anomalous():
    assert decide(rule(), probs("cell_normal")[None], np.array([0.2])).verdict.tolist() == [0]


def test_confidence_follows_the_documented_formulas():
    cells = np.stack(
        [
            probs("cell_normal", 0.9),
            probs("cell_porosity", 0.8),
            probs("cell_normal", 0.9),
            probs("module_porosity", 0.6),
        ]
    )
    scores = np.array([0.1, 0.15, 0.3, 0.5])
    d = decide(rule(), cells, scores)
    defect = cells[:, [CT_CLASSES.index(c) for c in CT_DEFECT_CLASSES]].sum(1)
    conf = 0.6 + 0.4 * np.minimum(np.abs(scores - 0.2) / 0.2, 1.0)
    np.testing.assert_allclose(d.ct_defect_probability, defect, rtol=1e-6)
    np.testing.assert_allclose(d.rgb_confidence, conf, rtol=1e-6)
    expected = [(1 - defect[0] + conf[0]) / 2, defect[1], conf[2], (defect[3] + conf[3]) / 2]
    np.testing.assert_allclose(d.confidence, expected, rtol=1e-6)


def test_rgb_confidence_is_0_6_at_the_threshold_and_saturates_at_1_on_both_sides():
    c = rgb_confidence(np.array([0.2, 0.3, 0.4, 1.0, 0.1, 0.0]), 0.2)
    np.testing.assert_allclose(c, [0.6, 0.8, 1.0, 1.0, 0.8, 1.0], rtol=1e-6)


def test_and_policy_flags_only_cells_both_models_find():
    d = decide(
        rule(policy="and"),
        np.stack([probs("cell_porosity"), probs("cell_normal"), probs("cell_porosity")]),
        np.array([0.1, 0.3, 0.3]),
    )
    assert d.verdict.tolist() == [0, 0, 3]
    assert verdict_code([True, False, True], [False, True, True], "and").tolist() == [0, 0, 3]


def test_probability_decision_uses_the_ct_threshold():
    p = probs("cell_normal", 0.55)[None]  # defect classes hold 0.3375 in all
    assert decide(rule(ct_decision="probability", ct_threshold=0.3), p, np.array([0.0])).verdict.tolist() == [1]
    assert decide(rule(ct_decision="probability", ct_threshold=0.5), p, np.array([0.0])).verdict.tolist() == [0]


def test_rule_file_is_resolved_against_the_checkpoint_threshold(tmp_path):
    info = rgb_facts(threshold=0.42, thresholds={"f1": 0.42, "roc": 0.37})
    assert load_rule(info, CT_CLASSES).rgb_threshold == pytest.approx(0.42)
    assert load_rule(info, CT_CLASSES, rgb_threshold_method="roc").rgb_threshold == pytest.approx(0.37)
    custom = tmp_path / "rule.yaml"
    custom.write_text(
        RULE_FILE.read_text().replace("rgb_threshold: null", "rgb_threshold: 0.5").replace("policy: or", "policy: and")
    )
    r = load_rule(info, CT_CLASSES, custom)
    assert (r.rgb_threshold, r.policy) == (0.5, "and")
    assert VerdictRule.from_json(r.to_json()) == r


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"policy": "xor"}, "policy"),
        ({"ct_defect_classes": ["cell_dent"]}, "subset"),
        ({"ct_decision": "vote"}, "ct_decision"),
        ({"ct_threshold": 1.5}, "ct_threshold"),
        ({"rgb_threshold": float("nan")}, "finite"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        rule(**bad)


def test_unknown_rule_keys_and_missing_threshold_methods_are_refused(tmp_path):
    path = tmp_path / "rule.yaml"
    path.write_text("policy: or\nthreshold: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_rule(rgb_facts(threshold=0.1), CT_CLASSES, path)
    with pytest.raises(ValueError, match="not in the checkpoint"):
        load_rule(rgb_facts(threshold=0.1, thresholds={"f1": 0.1}), CT_CLASSES, rgb_threshold_method="roc")
