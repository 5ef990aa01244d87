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


@pytest.fixture
def keras_registry():
    """Keras's global registry of custom objects, restored after the test: a class that a
    test's run registers (a --custom-objects file imported in-process) stays unknown to the
    tests after it."""
    import keras

    registry = keras.saving.get_custom_objects()
    before = dict(registry)
    yield registry
    registry.clear()
    registry.update(before)


@pytest.fixture(scope="session")
def junit_schema():
    """The JUnit schema (tests/fixtures/junit.xsd), or None where xmlschema is not installed
    (support.assert_valid_junit still checks the structure)."""
    try:
        import xmlschema
    except ImportError:
        return None
    from support import JUNIT_SCHEMA

    return xmlschema.XMLSchema(JUNIT_SCHEMA)


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory):
    """Keras 2 (tf-keras) .h5 files: tests/test_compat.py's cases and every model_zoo model
    (``zoo_NAME.h5``), with inputs and tf-keras's outputs, written once in one subprocess."""
    import model_zoo

    return model_zoo.save_keras2(tmp_path_factory.mktemp("keras2"))
