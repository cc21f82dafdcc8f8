"""The contracts that travel through model configs: serving facts and image limits, one
to/from pair each."""

from __future__ import annotations

import json

import pytest

from core.decode import Limits
from core.facts import ServingFacts
from core.labels import CT_CLASSES
from ensemble.rule import load_rule


def ct_info(**kw) -> dict:
    """A CT checkpoint's info as training writes it (with keys serving does not need)."""
    return {
        "kind": "ct_classifier",
        "input_size": 160,
        "normalization": {"mean": 0.2, "std": 0.25},
        "class_names": list(CT_CLASSES),
        "temperature": 0.48,
        "arch": "resnet18_late_fusion",
        "config": {"epochs": 45},
        "data": "data/standard",
    } | kw


def test_serving_facts_survive_the_model_config_and_drop_what_serving_does_not_need():
    facts = ServingFacts.from_dict(ct_info())
    assert (facts.input_size, facts.in_chans, facts.normalization.mean, facts.normalization.std) == (160, 1, 0.2, 0.25)
    assert facts.class_names == CT_CLASSES and facts.temperature == 0.48
    text = facts.to_json()
    assert "config" not in json.loads(text) and "data" not in json.loads(text)
    assert ServingFacts.from_json(text) == facts
    assert json.loads(text)["normalization"] == {"mean": 0.2, "std": 0.25}  # the stored form is unchanged


def test_serving_facts_refuse_what_serving_cannot_work_with():
    with pytest.raises(ValueError, match="unknown network kind"):
        ServingFacts.from_dict(ct_info(kind="detector"))
    with pytest.raises(ValueError, match="normalization and class names"):
        ServingFacts.from_dict(ct_info(normalization=None))
    with pytest.raises(ValueError, match="input_size must be positive"):
        ServingFacts.from_dict(ct_info(input_size=0))


def test_the_rule_takes_the_autoencoders_threshold_from_its_facts():
    rgb = ServingFacts.from_dict(
        {
            "kind": "rgb_autoencoder",
            "input_size": 128,
            "threshold": 0.31,
            "thresholds": {"f1": 0.31, "roc": 0.27},
            "threshold_method": "f1",
        }
    )
    assert rgb.in_chans == 3 and rgb.normalization is None
    assert load_rule(rgb, CT_CLASSES).rgb_threshold == pytest.approx(0.31)
    assert load_rule(rgb, CT_CLASSES, rgb_threshold_method="roc").rgb_threshold == pytest.approx(0.27)
    with pytest.raises(ValueError, match="no calibrated threshold"):
        load_rule(ServingFacts(kind="rgb_autoencoder", input_size=128, in_chans=3), CT_CLASSES)


def test_limits_survive_the_model_config_and_a_missing_one_keeps_its_default():
    limits = Limits(max_bytes=1_000_000, max_pixels=4_000_000, min_side=32)
    params = limits.to_parameters()
    assert all(isinstance(v, str) for v in params.values())  # Triton's string parameters
    assert Limits.from_parameters(params) == limits
    assert Limits.from_parameters({"max_image_bytes": "5"}) == Limits(max_bytes=5)
