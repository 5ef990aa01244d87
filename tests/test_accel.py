"""The compiled FMA chains (:mod:`convdiff.accel`, numba) against the NumPy engine, bit for bit.

Each engine is also checked on its own against exact rational references in
tests/test_orders.py (every case there whose reduction runs compiled chains runs on both
engines; the others reach the NumPy engine only).
"""

from __future__ import annotations

import numpy as np
import pytest

from convdiff import accel
from convdiff.orders import parse_order, reduce_terms

# Operand layouts of real reductions: (a shape, b shape), terms first.
LAYOUTS = {
    "conv": ((200, 300, 1), (200, 1, 24)),  # positions x channels
    "conv-wide": ((40, 7, 1), (40, 1, 900)),  # few positions, many channels
    "depthwise": ((9, 50, 16), (9, 1, 16)),  # both vary along the channels
    "dense-batch1": ((300, 1, 1), (300, 1, 70)),
    "elementwise": ((33, 500), (33, 500)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dt_name", ["float32", "float64"])
@pytest.mark.parametrize(
    "order", ["sequential", "reverse", "pairwise", "blocked:7", "eigen", "sequential/nofma"]
)
def test_compiled_chains_give_the_numpy_engines_bits(layout, dt_name, order, rng, monkeypatch):
    """The compiled path against the NumPy engine on layouts with every broadcast pattern,
    including results in the subnormal range (scaled operands)."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    dt = np.dtype(dt_name)
    name, _, nofma = order.partition("/")
    parsed = parse_order(name, fma=not nofma)
    (sa, sb) = LAYOUTS[layout]
    # float32 operands near 2**-64 give results in the subnormal range. In float64 (operands
    # near 2**-540) every such step takes fma64's exact-rational path, one element at a time:
    # a few scattered tiny operands cover it (the exact references in test_orders cover the
    # subnormal results).
    for scale in (0, -64 if dt == np.float32 else -540):
        a = rng.standard_normal(sa) * 2.0 ** (scale * _tiny(rng, sa, dt))
        b = rng.standard_normal(sb) * 2.0 ** (scale * _tiny(rng, sb, dt))
        a, b = a.astype(dt), b.astype(dt)
        compiled = reduce_terms(a, b, parsed, dt)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CONVDIFF_NUMBA", "0")
            plain = reduce_terms(a, b, parsed, dt)
        assert compiled.dtype == plain.dtype
        np.testing.assert_array_equal(
            compiled.view(f"u{dt.itemsize}"), plain.view(f"u{dt.itemsize}")
        )


def _tiny(rng: np.random.Generator, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    """Where operands get the small scale: all of them in float32, 5% in float64."""
    return np.ones(shape) if dt == np.float32 else (rng.random(shape) < 0.05).astype(float)


def test_other_dtypes_are_left_to_the_numpy_engine():
    a = np.ones((4, 1, 1, 3), np.float64)
    assert accel.operands(a, a, np.dtype(np.float32)) is None  # wider operands
    f32 = a.astype(np.float32)
    assert accel.operands(f32, f32, np.dtype(np.float64)) is None  # narrower: exact products
    assert accel.operands(a.astype(np.float16), a.astype(np.float16), np.float16) is None


def test_float32_and_float64_chains_are_compiled():
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    for dt in (np.float32, np.float64):
        a = np.ones((4, 1, 1, 3), dt)
        assert accel.operands(a, a, np.dtype(dt)) is not None


def test_compiled_code_is_cached_outside_the_package(tmp_path):
    """numba's cache goes to convdiff's user cache directory: a cache inside the installed
    package survives a reinstall and shadowed an editable install (a namespace package
    without ``__version__``)."""
    import subprocess
    import sys
    from pathlib import Path

    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    code = (
        "import numpy as np; from convdiff import accel, _compiled\n"
        "a = np.ones((3, 1, 1, 4), np.float32); acc = np.zeros((1, 1, 4))\n"
        "accel.fma_chain(*accel.operands(a, a, np.dtype(np.float32)), acc, range(3), True)\n"
        "assert (acc == 3).all(); print(_compiled.__file__)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    env |= {"CONVDIFF_CACHE_DIR": str(tmp_path), "CONVDIFF_NUMBA": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cached = list((tmp_path / "numba").rglob("*.nbi"))
    assert cached, "no numba index in the user cache directory"
    package = Path(done.stdout.strip()).parent
    beside = [
        p for p in package.rglob("*.nb[ic]") if p.stat().st_mtime >= cached[0].stat().st_mtime
    ]
    assert not beside, beside
