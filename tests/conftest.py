"""Shared fixtures: one tiny synthetic city per test session."""

import shutil
from pathlib import Path

import pytest

from netvlad_tutorial.synthetic import city_is_current, make_synthetic_city
from netvlad_tutorial.utils import REPO_ROOT


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every test keeps the centroid cache in one temporary folder, never in the home folder."""
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """The tiny synthetic city (seed 0) in a temporary folder, for tests to change freely.

    `make test` has just generated the course's city (`data/synthetic_tiny`): a current one
    (`city_is_current`) is copied, not generated a second time (16 s on 2 cores).
    """
    dest = tmp_path_factory.mktemp("city") / "tiny"
    course = REPO_ROOT / "data" / "synthetic_tiny"
    if city_is_current(course, "tiny", 0):
        return Path(shutil.copytree(course, dest))
    return make_synthetic_city(dest, preset="tiny", seed=0)


@pytest.fixture(scope="session")
def micro_city(tmp_path_factory):
    """A very small synthetic city (32 x 48 images) for training tests."""
    return make_synthetic_city(tmp_path_factory.mktemp("city") / "micro", preset="micro", seed=0)
