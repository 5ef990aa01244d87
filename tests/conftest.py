"""Shared fixtures: quiet TensorFlow, a seeded generator."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


@pytest.fixture(scope="session")
def examples():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _tree_cache(tmp_path_factory, monkeypatch):
    """Every test reveals into its own tree cache (``--order auto``), never the user's.

    The compiled chains' numba cache is placed once per process, when they are first loaded:
    loading them first keeps it in the user's cache (no recompilation per test session)."""
    from convdiff import accel

    accel.enabled()
    monkeypatch.setenv("CONVDIFF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
