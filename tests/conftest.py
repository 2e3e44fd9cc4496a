"""Shared fixtures: one tiny synthetic city per test session."""

import pytest

from netvlad_tutorial.synthetic import make_synthetic_city


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every test keeps the centroid cache in one temporary folder, never in the home folder."""
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """The tiny synthetic city (seed 0), generated once into a temporary folder."""
    return make_synthetic_city(tmp_path_factory.mktemp("city") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def micro_city(tmp_path_factory):
    """A very small synthetic city (32 x 48 images) for training tests."""
    return make_synthetic_city(tmp_path_factory.mktemp("city") / "micro", preset="micro", seed=0)
