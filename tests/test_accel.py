"""The compiled FMA chains (:mod:`convdiff.accel`, numba) against the NumPy engine, bit for bit.

Each engine is also checked on its own against exact rational references in
tests/test_orders.py (whose every test runs on both engines).
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
@pytest.mark.parametrize("dt_name", ["float32"])
@pytest.mark.parametrize(
    "order", ["sequential", "reverse", "pairwise", "blocked:7", "eigen", "sequential/nofma"]
)
def test_compiled_chains_give_the_numpy_engines_bits(layout, dt_name, order, rng, monkeypatch):
    """The compiled path against the NumPy engine on layouts with every broadcast pattern,
    including float32 results in the subnormal range (scaled operands)."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    dt = np.dtype(dt_name)
    name, _, nofma = order.partition("/")
    parsed = parse_order(name, fma=not nofma)
    (sa, sb) = LAYOUTS[layout]
    for scale in (0, -64):
        a = (rng.standard_normal(sa) * 2.0**scale).astype(dt)
        b = (rng.standard_normal(sb) * 2.0**scale).astype(dt)
        compiled = reduce_terms(a, b, parsed, dt)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CONVDIFF_NUMBA", "0")
            plain = reduce_terms(a, b, parsed, dt)
        assert compiled.dtype == plain.dtype
        np.testing.assert_array_equal(
            compiled.view(f"u{dt.itemsize}"), plain.view(f"u{dt.itemsize}")
        )


def test_other_dtypes_are_left_to_the_numpy_engine():
    a = np.ones((4, 1, 1, 3), np.float64)
    assert accel.operands(a, a, np.dtype(np.float32)) is None  # wider operands
    assert accel.operands(a, a, np.dtype(np.float64)) is None  # its FMA is not emulated
    assert accel.operands(a.astype(np.float16), a.astype(np.float16), np.float16) is None
