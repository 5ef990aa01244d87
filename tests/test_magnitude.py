"""The terms' magnitude ``sum |a_k| |b_k|`` computed in float32 (convdiff.magnitude): its
upper bound is never below the exact magnitude (exact rationals), and not far above it."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from convdiff.magnitude import product_magnitude
from convdiff.numerics import Bounded
from convdiff.orders import contract


def _exact_magnitudes(a: np.ndarray, b: np.ndarray) -> list[Fraction]:
    """``sum_k |a_k| |b_k|`` of (K, n) and (K, 1) operands, exactly, one per output."""
    a_terms = [[Fraction(abs(float(v))) for v in row] for row in a]
    b_terms = [Fraction(abs(float(row[0]))) for row in b]
    return [
        sum((row[j] * w for row, w in zip(a_terms, b_terms, strict=True)), Fraction(0))
        for j in range(a.shape[1])
    ]


def _operands(rng, terms: int, outputs: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((terms, outputs))
    b = rng.standard_normal((terms, 1))
    if kind == "subnormal":  # float32 products below 2**-126, many below 2**-149
        a, b = a * 2.0**-70, b * 2.0**-70
    elif kind == "mixed":  # scales from 2**-80 to 2**40, some products subnormal
        a = a * 2.0 ** rng.integers(-80, 40, a.shape)
        b = b * 2.0 ** rng.integers(-60, 20, b.shape)
    elif kind == "relu":  # non-negative inputs with exact zeros
        a = np.maximum(a, 0)
    return a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("kind", ["normal", "subnormal", "mixed", "relu"])
@pytest.mark.parametrize("terms", [1, 2, 9, 300, 2500])
def test_upper_bound_covers_the_exact_magnitude(terms, kind, rng):
    a, b = _operands(rng, terms, 5, kind)
    scale, upper = product_magnitude(a, b, float32_exact=True)
    exact = _exact_magnitudes(a, b)
    u = 2.0**-24
    for j, s in enumerate(exact):
        assert Fraction(float(upper[j])) >= s, (j, float(upper[j]), float(s))
        # and not loose: the float32 sum's own error (K u) times the inflation (2 (K + 2) u),
        # plus the underflow allowance
        slack = s * (1 + 4 * (terms + 2) * u) + Fraction(terms) * Fraction(2) ** -146
        assert Fraction(float(upper[j])) <= slack
        # what reports show is the float32 sum: within K u of the exact magnitude
        assert abs(Fraction(float(scale[j])) - s) <= s * terms * u + terms * Fraction(2) ** -149


def test_float32_overflow_leaves_the_product_to_float64(rng):
    """Products beyond float32's range (finite in float64) fall back to the float64 product."""
    a = np.full((4, 3), 2.0**100)
    b = np.full((4, 1), 2.0**60)
    scale, upper = product_magnitude(a, b, float32_exact=True)
    np.testing.assert_array_equal(scale, np.full(3, 4 * 2.0**160))
    np.testing.assert_array_equal(upper, scale)


def test_operands_that_are_not_float32_numbers_take_float64(rng):
    a = rng.standard_normal((50, 4))  # float64 numbers: not cast to float32
    b = rng.standard_normal((50, 1))
    scale, upper = product_magnitude(a, b, float32_exact=False)
    want = contract(np.abs(a), np.abs(b))
    np.testing.assert_array_equal(scale, want)
    np.testing.assert_array_equal(upper, want)


def test_only_float32_numbers_are_marked_and_moving_keeps_the_mark(rng):
    nx = Bounded("float32")
    x = nx.track(rng.standard_normal((3, 4)).astype(np.float32))
    assert x.float32_exact
    assert nx.move(lambda v: np.pad(v, 1), x).float32_exact
    assert not Bounded("float64").track(rng.standard_normal((3, 4))).float32_exact
    assert not nx.add(x, x).float32_exact  # a float64 result of arithmetic


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
def test_dot_bound_never_below_the_float64_magnitudes(mode, rng):
    """Bounded.dot on float32 inputs (the float32 magnitude) against the same dot on the
    same values held as float64 numbers (the float64 magnitude): the bound is never smaller,
    and larger only by the inflation."""
    terms = 700
    a = rng.standard_normal((terms, 40)).astype(np.float32)
    b = rng.standard_normal((terms, 1)).astype(np.float32)
    err = 0.0 if mode == "isolated" else np.abs(rng.standard_normal(a.shape)) * 2.0**-20
    nx = Bounded("float32")
    narrow = nx.dot(nx.track(a, err), nx.track(b))
    wide_a = nx.track(a, err)
    wide_a.float32_exact = False
    wide = nx.dot(wide_a, nx.track(b))
    np.testing.assert_array_equal(narrow.value, wide.value)
    assert (narrow.err >= wide.err).all()
    assert (narrow.err <= wide.err * (1 + 4 * terms * 2.0**-24)).all()
    np.testing.assert_allclose(narrow.scale, wide.scale, rtol=terms * 2.0**-24)


@pytest.mark.parametrize("accumulators", [("float32", "float32"), ("float32", "float16")])
@pytest.mark.parametrize("special", [False, True])
def test_reduction_error_is_the_formula_bit_for_bit(accumulators, special, rng):
    """Bounded._reduction_error (in place, the final rounding's term skipped where it is +0)
    against the formula it evaluates: ``prop + spread + k eta``, then ``err + final_units
    (|value| + err) + eta_sum``."""
    nx = Bounded("float32", accumulators)
    value = rng.standard_normal(1000) * 100
    spread = np.abs(rng.standard_normal(1000))
    prop = np.abs(rng.standard_normal(1000)) * 1e-3
    if special:
        value[::97], value[5::97], spread[7::89] = np.inf, np.nan, np.inf
    for p in (prop, np.broadcast_to(np.float64(0.0), ())):
        with np.errstate(invalid="ignore"):  # 0 * inf and NaN: part of the formula
            want = p + spread + 300 * nx.acc_eta
            want = want + nx.final_units * (np.abs(value) + want) + nx.eta_sum
            got = nx._reduction_error(value, p, spread.copy(), 300)
        np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))


def _bounded_dot(a, b, nx: Bounded, compiled: bool, monkeypatch):
    """``nx.dot`` of two tracked operands, through the compiled magnitude and bound or through
    product_magnitude and the NumPy formulas."""
    from convdiff import magnitude, numerics

    with monkeypatch.context() as patch:
        if not compiled:
            patch.setattr(numerics, "product_bound", lambda *args: None)
        else:
            seen = []
            bound = magnitude.product_bound
            patch.setattr(numerics, "product_bound", lambda *a: seen.append(bound(*a)) or seen[-1])
        # float32 arrays: Bounded.track marks them exactly known float32 numbers
        out = nx.dot(nx.track(a.astype(np.float32)), nx.track(b.astype(np.float32)), "hwc")
    if compiled:
        assert seen and seen[0] is not None, "the compiled pass did not run"
    return out


@pytest.mark.parametrize("kind", ["normal", "subnormal", "mixed", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_compiled_magnitude_and_bound_are_the_numpy_formulas_bits(
    kind, dtype, parallel, rng, monkeypatch
):
    """Bounded.dot of exactly known float32 numbers: the terms' magnitude and the bound from
    the compiled pass (magnitude.product_bound) equal, bit for bit, those of product_magnitude
    and the NumPy formulas, in every scale, for every dtype's units, split between threads."""
    from convdiff import accel, magnitude

    if not accel.enabled():
        pytest.skip("no compiled kernels (numba not installed, or CONVDIFF_NUMBA=0)")
    if parallel:
        monkeypatch.setattr(magnitude, "_PARALLEL_ELEMENTS", 7)
        monkeypatch.setattr(accel, "_threads", lambda: 3)
    x, w = _operands(rng, 3 * 3 * 4, 6 * 5 * 2, kind)
    a = x.reshape(3, 3, 4, 6, 5, 2, 1)  # taps, channels, then the outputs' positions
    b = w.reshape(3, 3, 4, 1)[..., None, None, None, :] * np.ones((1, 1, 1, 1, 1, 1, 3))
    nx = Bounded(dtype)  # each dtype's unit roundoff and underflow in the bound
    want = _bounded_dot(a, b, nx, False, monkeypatch)
    got = _bounded_dot(a, b, nx, True, monkeypatch)
    for name in ("value", "err", "magnitude"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert getattr(got, name).shape == (6, 5, 2, 3)


def test_the_compiled_bound_leaves_a_float32_overflow_and_other_cases_to_numpy(monkeypatch):
    """product_bound declines where the NumPy formulas must decide: a float32 sum that
    overflows, operands that are not float32 numbers, a reduction with no terms."""
    from convdiff import accel
    from convdiff.magnitude import product_bound

    if not accel.enabled():
        pytest.skip("no compiled kernels (numba not installed, or CONVDIFF_NUMBA=0)")
    big = np.full((4, 3), 2.0**100), np.full((4, 1), 2.0**60)
    assert product_bound(*big, True, 0.1, 0.0, 0.0) is None
    small = np.ones((4, 3)), np.ones((4, 1))
    assert product_bound(*small, False, 0.1, 0.0, 0.0) is None
    assert product_bound(np.ones((0, 3)), np.ones((0, 1)), True, 0.1, 0.0, 0.0) is None
    scale, err = product_bound(*small, True, 0.5, 2.0**-30, 2.0**-40)
    factor = 1.0 + 2.0 * (4 + 2) * 2.0**-24
    np.testing.assert_array_equal(scale, np.full(3, 4.0))
    np.testing.assert_array_equal(
        err, np.full(3, 0.5 * (4.0 * factor + 4 * 2.0**-148) + 2.0**-30 + 2.0**-40)
    )
