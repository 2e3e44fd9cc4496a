"""Shared fixtures: one tiny synthetic city per test session."""

import pytest

from netvlad_tutorial.synthetic import make_synthetic_city


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """The tiny synthetic city (seed 0), generated once into a temporary folder."""
    return make_synthetic_city(tmp_path_factory.mktemp("city") / "tiny", preset="tiny", seed=0)
