"""Shared fixtures: small synthetic data sets, generated once per test worker."""

from __future__ import annotations

import pytest

from training.synth.plan import SynthConfig
from training.synth.writer import generate

SMALL = dict(ct_size=128, rgb_width=192, rgb_height=108, slices_per_axis=1, photos_per_battery=1)


@pytest.fixture(scope="session")
def small_config() -> SynthConfig:
    return SynthConfig(batteries=12, seed=3, rgb_defect_rate=0.5, **SMALL)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_config):
    """(root, plan) of a 12-battery data set in the AI Hub layout."""
    root = tmp_path_factory.mktemp("synth")
    plans = generate(root, small_config, workers=1, progress=False)
    return root, plans
