"""The bound model of :class:`convdiff.numerics.Bounded`, checked against its own invariant.

A tracked value ``(v, e)`` promises that each side lies within ``e`` of ``v`` and that the two
sides lie within ``e`` of each other. For every elementwise step these tests draw pairs of float32
operands that keep that promise (the corners of the allowed region included, where the worst
cases are), compute the step on each side the way an implementation does (the float64 result
rounded once to float32), and check that the step's output keeps the promise again.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest

from convdiff.numerics import FUNCTIONS, Bounded, Tracked

F32 = np.float32
# Positions of the two sides in units of e around v: the corners and midpoints of the region
# |t1|, |t2| <= 1, |t1 - t2| <= 1, then random points inside it.
_CORNERS = [(a, b) for a in (-1, -0.5, 0, 0.5, 1) for b in (-1, -0.5, 0, 0.5, 1) if abs(a - b) <= 1]


def _sides(v: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> tuple:
    """Two float32 sides per element of ``v`` that keep the promise of ``(v, e)``."""
    n = v.size
    corners = np.array(_CORNERS)[rng.integers(len(_CORNERS), size=n)]
    t1 = np.where(rng.random(n) < 0.7, corners[:, 0], rng.uniform(-1, 1, n))
    t2 = np.where(rng.random(n) < 0.7, corners[:, 1], np.clip(t1 + rng.uniform(-1, 1, n), -1, 1))
    x1, x2 = (_inward(v + t * e, v, e) for t in (t1, t2))
    too_far = np.abs(x1.astype(float) - x2) > e
    return x1, np.where(too_far, x1, x2)


def _inward(x: np.ndarray, v: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``x`` rounded to float32, stepped back inside ``[v - e, v + e]`` when rounding left it."""
    r = x.astype(F32)
    r = np.where(r.astype(float) > v + e, np.nextafter(r, F32(-np.inf)), r)
    return np.where(r.astype(float) < v - e, np.nextafter(r, F32(np.inf)), r)


def _tracked(rng: np.random.Generator, n: int, relative_e: float) -> tuple:
    """Random float32 values (some zero), bounds from exact zero to as large as the values."""
    v = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(F32).astype(float)
    v[rng.random(n) < 0.05] = 0.0
    scale = np.where(v == 0, 1.0, np.abs(v))
    e = scale * relative_e * rng.choice([0.0, 1e-7, 1e-4, 0.1, 1.0], n)
    x1, x2 = _sides(v, e, rng)
    return Bounded.track(v, e), x1, x2


def assert_keeps_promise(out: Tracked, z1: np.ndarray, z2: np.ndarray) -> None:
    """Both sides within the bound of the float64 value and of each other (NaN: no claim)."""
    z1, z2 = z1.astype(float), z2.astype(float)
    checked = ~(np.isnan(z1) | np.isnan(z2) | np.isnan(out.value) | np.isinf(out.err))
    with np.errstate(invalid="ignore"):  # inf - inf where both sides overflowed
        gaps = [np.abs(z1 - z2), np.abs(z1 - out.value), np.abs(z2 - out.value)]
    for gap in gaps:
        same = z1 == z2  # equal infinities
        bad = checked & ~same & ~(gap <= out.err)
        assert not bad.any(), _first(bad, out, z1, z2)


def _first(bad, out, z1, z2) -> str:
    i = np.flatnonzero(bad)[0]
    return (
        f"{bad.sum()} elements; e.g. v={out.value[i]!r} e={out.err[i]!r} sides {z1[i]!r} {z2[i]!r}"
    )


def _rounded(fn: Callable[..., np.ndarray], *xs: np.ndarray) -> np.ndarray:
    """One implementation's step: the exact (float64) result rounded once to float32."""
    with np.errstate(all="ignore"):
        return fn(*(x.astype(float) for x in xs)).astype(F32)


BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
}


@pytest.mark.parametrize("relative_e", [1e-6, 0.3, 1.0])
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_steps_keep_the_promise(name, relative_e):
    rng = np.random.default_rng(zlib.crc32(f"{name} {relative_e}".encode()))
    nx = Bounded("float32")
    x, x1, x2 = _tracked(rng, 100_000, relative_e)
    y, y1, y2 = _tracked(rng, 100_000, relative_e)
    out = getattr(nx, name)(x, y)
    fn = BINARY[name]
    assert_keeps_promise(out, _rounded(fn, x1, y1), _rounded(fn, x2, y2))


# Domains where each function is defined and monotonic (the square: everywhere).
_DOMAINS = {"log": (1e-3, 50.0), "log1p": (-0.9, 50.0), "sqrt": (1e-3, 50.0), "rsqrt": (1e-3, 50.0)}


@pytest.mark.parametrize("relative_e", [1e-6, 0.3, 1.0])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_library_functions_keep_the_promise(name, relative_e):
    """The image of the whole uncertainty interval: the sides may sit on either side of ``v``
    (tanh at 0 with e = 2: the sides -1 and 1 are 1.52 apart, tanh(2) is 0.96)."""
    rng = np.random.default_rng(zlib.crc32(f"{name} {relative_e}".encode()))
    nx = Bounded("float32")
    n = 20_000
    low, high = _DOMAINS.get(name, (-12.0, 12.0))
    # half the values near 0, where tanh, sigmoid and erf turn from convex to concave
    v = np.where(rng.random(n) < 0.5, rng.uniform(low, high, n), rng.uniform(-1, 1, n))
    v = np.clip(v, low, high).astype(F32).astype(float)
    e = relative_e * rng.choice([0.0, 1e-3, 1.0, 2.0], n) * np.maximum(np.abs(v), 1.0)
    e = np.minimum(e, (v - low) * 0.9)
    x1, x2 = _sides(v, np.maximum(e, 0.0), rng)
    out = nx.apply(name, Bounded.track(v, np.maximum(e, 0.0)))
    fn = FUNCTIONS[name]
    assert_keeps_promise(out, _rounded(fn, x1), _rounded(fn, x2))


def test_tanh_across_its_inflection_needs_the_whole_interval():
    out = Bounded("float32").apply("tanh", Bounded.track([0.0], [2.0]))
    assert out.err[0] >= np.tanh(1.0) - np.tanh(-1.0)


@pytest.mark.parametrize("relative_e", [1e-6, 0.3, 1.0])
def test_where_keeps_the_promise_when_the_sides_branch_apart(relative_e):
    """``x > 0 ? y : z``: near 0 one side may take ``y`` and the other ``z``, each anywhere
    within its own bound."""
    rng = np.random.default_rng(7)
    nx = Bounded("float32")
    (x, x1, x2), (y, y1, y2), (z, z1, z2) = (_tracked(rng, 100_000, relative_e) for _ in "xyz")
    out = nx.where(x, 0.0, z, y)
    assert_keeps_promise(out, np.where(x1 > 0, y1, z1), np.where(x2 > 0, y2, z2))


@pytest.mark.parametrize("relative_e", [1e-6, 0.3, 1.0])
def test_leaky_relu_keeps_the_promise(relative_e):
    """``x > 0 ? x : 0.2 x``, the branches of one uncertain value."""
    rng = np.random.default_rng(8)
    nx = Bounded("float32")
    x, x1, x2 = _tracked(rng, 100_000, relative_e)
    out = nx.where(x, 0.0, nx.mul(x, 0.2), x)

    def leaky(side: np.ndarray) -> np.ndarray:
        return np.where(side > 0, side, _rounded(lambda s: s * np.float64(F32(0.2)), side))

    assert_keeps_promise(out, leaky(x1), leaky(x2))


def test_an_uncertain_zero_times_infinity_is_unbounded():
    out = Bounded("float32").mul(Bounded.track([0.0], [1e-3]), Bounded.track([np.inf]))
    assert np.isinf(out.err[0])


@pytest.mark.parametrize("relative_e", [1e-6, 0.3])
def test_dot_keeps_the_promise(relative_e):
    """A sum of products of two uncertain operands, added in different orders on each side."""
    rng = np.random.default_rng(11)
    k, n = 16, 5_000
    nx = Bounded("float32")
    a, a1, a2 = _tracked(rng, k * n, relative_e)
    b, b1, b2 = _tracked(rng, k * n, relative_e)
    shaped = [np.reshape(t, (k, n)) for t in (a1, a2, b1, b2)]
    out = nx.dot(
        Tracked(a.value.reshape(k, n), a.err.reshape(k, n)),
        Tracked(b.value.reshape(k, n), b.err.reshape(k, n)),
    )
    forward = _sequential(shaped[0], shaped[2])
    backward = _sequential(shaped[1][::-1], shaped[3][::-1])
    assert_keeps_promise(out, forward, backward)


def _sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = np.zeros(a.shape[1], F32)
    for ai, bi in zip(a, b, strict=True):
        total = (total.astype(float) + (ai.astype(float) * bi).astype(F32)).astype(F32)
    return total


@pytest.mark.parametrize("pick", ["max", "min"])
@pytest.mark.parametrize("known", [True, False], ids=["exact inputs", "uncertain inputs"])
def test_a_window_extreme_takes_the_largest_bound_and_magnitude_of_its_window(pick, known):
    """max/min along axes (max pooling): the bound is the largest bound in the window and the
    terms' scale its largest |value|, bit for bit as the elementwise definition gives them,
    on windows with NaN, infinities and zeros of both signs."""
    rng = np.random.default_rng(21)
    shape = (3, 3, 40, 7)
    value = rng.standard_normal(shape)
    special = rng.integers(0, 8, shape)
    value[special == 0] = np.nan
    value[special == 1] = np.inf
    value[special == 2] = -np.inf
    value[special == 3] = 0.0
    value[special == 4] = -0.0
    value[:, :, :5] = -0.0  # windows of negative zeros only
    err = Bounded.track(value).err if known else np.abs(rng.standard_normal(shape))
    out = getattr(Bounded("float32"), pick)(Tracked(value, err), axis=(0, 1))
    expected = (
        getattr(np, pick)(value, axis=(0, 1)),
        np.max(err, axis=(0, 1)),
        np.max(np.abs(value), axis=(0, 1)),
    )
    for got, want in zip((out.value, out.err, out.magnitude), expected, strict=True):
        got = np.broadcast_to(got, want.shape)
        np.testing.assert_array_equal(np.ascontiguousarray(got).view("u8"), want.view("u8"))
