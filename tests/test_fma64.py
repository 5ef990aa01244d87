"""float64 fused multiply-add in NumPy (``floats.fma64``) and the ``exact`` order on float64
operands, against exact rationals (Python's ``float(Fraction)`` rounds correctly) and, where
numba is installed, against the processor's own FMA."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from convdiff import accel, floats
from convdiff.orders import Order, reduce_terms

F64 = np.dtype(np.float64)


def _fma_reference(c: float, a: float, b: float) -> float:
    """IEEE fusedMultiplyAdd of finite float64 values, from exact rationals: an exact zero is
    -0 only when ``c`` and ``a*b`` are both -0; a nonzero result that rounds to zero keeps its
    sign."""
    product = Fraction(a) * Fraction(b)
    exact = Fraction(c) + product
    if exact == 0:
        negative_product = product == 0 and (math.copysign(1, a) * math.copysign(1, b) < 0)
        both_negative_zero = c == 0 and math.copysign(1, c) < 0 and negative_product
        return -0.0 if both_negative_zero else 0.0
    value = float(exact)  # int / int: correctly rounded by Python, subnormals included
    return value if value != 0 else math.copysign(0.0, exact)


def _fma_operands(rng: np.random.Generator, n: int, scale: int):
    a = rng.standard_normal(n) * 2.0 ** (rng.integers(-30, 30, n) + scale)
    b = rng.standard_normal(n) * 2.0 ** (rng.integers(-30, 30, n) + scale)
    # half of the addends nearly cancel the product (the hard case for a fused step)
    near = -(a * b) * (1 + rng.standard_normal(n) * 2.0**-40)
    other = rng.standard_normal(n) * 2.0 ** (2 * scale + rng.integers(-60, 60, n))
    return np.where(rng.random(n) < 0.5, near, other), a, b


@pytest.mark.parametrize("scale", [0, 200, -480, -540, 500])
def test_fma64_is_the_correctly_rounded_fused_step(scale, rng):
    """Products and results at every scale: normal, near Dekker's limits (products near
    2**-968, operands near 2**995), subnormal results, overflow."""
    with np.errstate(over="ignore"):
        c, a, b = _fma_operands(rng, 3000, scale)
    c = np.where(np.isfinite(c), c, 1.0)
    got = floats.fma64(c, a, b)
    want = []
    for ci, ai, bi in zip(c.tolist(), a.tolist(), b.tolist(), strict=True):
        try:
            want.append(_fma_reference(ci, ai, bi))
        except OverflowError:  # beyond float64's range after rounding
            want.append(math.inf if Fraction(ci) + Fraction(ai) * Fraction(bi) > 0 else -math.inf)
    np.testing.assert_array_equal(got.view(np.uint64), np.array(want).view(np.uint64))


SPECIAL = [0.0, -0.0, 1.0, -1.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
SPECIAL += [-1.7976931348623157e308, 1e-300, 3.0, 1e300, -1e-170, 1e154, 2.0**-537]


def test_fma64_signed_zeros_and_extremes():
    """Every combination of zeros, subnormals and extremes, bit for bit (signs of zero too)."""
    cs, as_, bs = (np.array(v) for v in zip(*itertools.product(SPECIAL, repeat=3), strict=True))
    with np.errstate(over="ignore"):
        got = floats.fma64(cs, as_, bs)
    want = []
    for c, a, b in zip(cs.tolist(), as_.tolist(), bs.tolist(), strict=True):
        try:
            want.append(_fma_reference(c, a, b))
        except OverflowError:
            want.append(math.inf if Fraction(c) + Fraction(a) * Fraction(b) > 0 else -math.inf)
    np.testing.assert_array_equal(got.view(np.uint64), np.array(want).view(np.uint64))


def test_fma64_infinities_and_nans():
    """IEEE's rules where an operand is not finite: NaN in, NaN out; inf * 0 is NaN; inf
    meets -inf as NaN; a finite product added to an infinity leaves it (even one whose float64
    product overflows)."""
    inf, nan = math.inf, math.nan
    cases = [
        ((nan, 1.0, 1.0), nan),
        ((1.0, nan, 1.0), nan),
        ((1.0, inf, 0.0), nan),
        ((1.0, inf, 2.0), inf),
        ((-inf, inf, 2.0), nan),
        ((inf, -inf, -2.0), inf),
        ((-inf, 1e200, 1e200), -inf),  # a*b overflows float64 but is a finite real
        ((inf, 1.0, 1.0), inf),
        ((1.0, 1e200, 1e200), inf),  # overflow of the result
        ((-1e308, 1e200, 1e200), inf),
    ]
    with np.errstate(over="ignore", invalid="ignore"):
        for (c, a, b), want in cases:
            got = float(floats.fma64(np.array(c), np.array(a), np.array(b)))
            assert (math.isnan(got) and math.isnan(want)) or got == want, (c, a, b, got)


def test_fma64_matches_the_hardware():
    """Against the processor's own fused multiply-add (LLVM's, through numba) on every
    combination of special values, NaN and infinities included."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    import numba

    from convdiff._compiled import fma

    @numba.njit
    def hardware(c, a, b, out):
        for i in range(c.size):
            out[i] = fma(a[i], b[i], c[i])

    values = [*SPECIAL, math.inf, -math.inf, math.nan]
    cs, as_, bs = (np.array(v) for v in zip(*itertools.product(values, repeat=3), strict=True))
    want = np.empty_like(cs)
    hardware(cs, as_, bs, want)
    with np.errstate(all="ignore"):
        got = floats.fma64(cs, as_, bs)
    same = (got.view(np.uint64) == want.view(np.uint64)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), list(zip(cs[~same], as_[~same], bs[~same], strict=True))[:5]


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([1e300, 1e300, -1e300], [1e10, 1e10, -1e10], math.inf),  # exact sum beyond float64
        ([1e300, -1e300, 1.0], [1e10, 1e10, 3.0], 3.0),  # products overflow, cancel exactly
        ([1e308, 1e308, -1e308], [1.0, 1.0, 1.0], 1e308),  # the running sum overflows
        ([math.inf, 1.0], [1.0, 3.0], math.inf),
        ([math.inf, -math.inf], [1.0, 1.0], math.nan),
        ([0.1, 0.2, -0.3], [3.0, 3.0, 3.0], 3 * (Fraction(0.1) + Fraction(0.2) - Fraction(0.3))),
    ],
)
def test_exact_order_on_float64_operands(a, b, want):
    """``exact`` sums float64 products exactly (their rounding errors included), and leaves
    infinities to IEEE."""
    got = reduce_terms(np.array(a)[:, None], np.array(b)[:, None], Order(name="exact"), F64)
    if isinstance(want, Fraction):
        want = float(want)
    assert got.shape == (1,)
    assert (math.isnan(got[0]) and math.isnan(want)) or got[0] == want
