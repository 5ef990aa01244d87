"""Shared fixtures: quiet TensorFlow, a seeded generator, the examples, the JUnit schema,
Keras's custom-object registry restored after a test, and the session's Keras 2 files (written
by one tf-keras subprocess)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers have no terminal but are handed COLUMNS=80 and LINES=24: convdiff
    # would take them for a terminal's size. Its output here goes to a pipe, as in a serial run.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

import numpy as np
import pytest


def _keep_compiled_code_in_the_user_cache() -> None:
    """Every test points convdiff's cache root at its own directory (see ``_tree_cache``), and
    the convdiff processes that tests start inherit it. The compiled kernels' machine code
    does not depend on the test: NUMBA_CACHE_DIR (which convdiff leaves to the user when set)
    keeps it in the user's cache for this process and every child, compiled once, not once per
    child (seconds each)."""
    from convdiff.cachedir import cache_dir

    numba_cache = cache_dir("numba")
    if numba_cache is not None:
        os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache))


_keep_compiled_code_in_the_user_cache()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


@pytest.fixture(scope="session")
def examples():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _tree_cache(_session_cache, monkeypatch):
    """The tests reveal into one tree cache of their own (``auto``, the default order),
    never the user's: shared by the tests of a process, as a user's runs share theirs, so
    that each distinct layer problem is revealed once. A test about revealing itself asks
    for ``fresh_tree_cache`` (or passes ``cache=False``).

    The compiled chains' numba cache is placed once per process, when they are first loaded:
    loading them first keeps it in the user's cache (no recompilation per test session)."""
    from convdiff import accel

    accel.enabled()
    monkeypatch.setenv("CONVDIFF_CACHE_DIR", str(_session_cache))


@pytest.fixture
def fresh_tree_cache(tmp_path, monkeypatch):
    """An empty tree cache for this test alone: its first run reveals every problem."""
    path = tmp_path / "fresh-cache"
    monkeypatch.setenv("CONVDIFF_CACHE_DIR", str(path))
    return path


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


# Runs the registered Keras 2 writers one after another, each in a namespace of its own.
_KERAS2_DRIVER = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
jobs, tests = json.load(open(sys.argv[1])), sys.argv[2]
for out, source in jobs:
    os.makedirs(out, exist_ok=True)
    sys.argv = ["-c", out, tests]
    exec(compile(source, out, "exec"), {"__name__": "__main__"})
"""


@pytest.fixture(scope="session")
def keras2_files(tmp_path_factory):
    """``keras2_files(name)``: the directory the Keras 2 writer ``name``
    (support.keras2_writer) wrote its files into. All registered writers run at the first
    request, in one tf-keras subprocess."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from support import KERAS2_WRITERS

    root = tmp_path_factory.mktemp("keras2")
    written: set[str] = set()

    def get(name: str) -> Path:
        if name not in KERAS2_WRITERS:
            raise KeyError(f"no Keras 2 writer {name!r} is registered (support.keras2_writer)")
        if name not in written:
            jobs = [(str(root / n), s) for n, s in KERAS2_WRITERS.items() if n not in written]
            (root / "jobs.json").write_text(json.dumps(jobs))
            tests = str(Path(__file__).parent)
            args = [sys.executable, "-c", _KERAS2_DRIVER, str(root / "jobs.json"), tests]
            done = subprocess.run(args, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            written.update(n for n in KERAS2_WRITERS)
        return root / name

    return get


@pytest.fixture(scope="session")
def keras2_dir(keras2_files):
    """Keras 2 (tf-keras) .h5 files: tests/test_compat.py's cases and every model_zoo model
    (``zoo_NAME.h5``), with inputs and tf-keras's outputs (the writer "zoo")."""
    return keras2_files("zoo")
