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
