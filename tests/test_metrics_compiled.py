"""metrics.compare and metrics.max_ulp_distance compiled (convdiff._compiled_metrics, numba)
against their NumPy path, every figure bit for bit, on arrays full of special values.

tests/test_metrics.py checks the figures themselves (on whichever path is enabled: the compiled
one where numba is installed); the NumPy path is also checked there with CONVDIFF_NUMBA=0 in
the fixture below.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convdiff import accel, metrics

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0]


def _special(dt: np.dtype) -> list[float]:
    info = np.finfo(dt)
    return [*SPECIAL, float(info.max), -float(info.max), float(info.smallest_subnormal)]


def _pair(rng, shape, dt: np.dtype, special_share: float):
    """A reference and a candidate that differ by a few ULPs at most positions, with special
    values sprinkled on either side (some at the same position on both)."""
    ref = rng.standard_normal(shape).astype(dt)
    steps = rng.integers(-3, 4, shape)
    cand = ref.copy()
    for _ in range(3):
        cand = np.where(steps > 0, np.nextafter(cand, np.inf), cand).astype(dt)
        cand = np.where(steps < 0, np.nextafter(cand, -np.inf), cand).astype(dt)
        steps = steps - np.sign(steps)
    specials = np.array(_special(dt), dt)
    for side in (ref, cand):
        hit = rng.random(shape) < special_share
        side[hit] = rng.choice(specials, int(hit.sum()))
    same = rng.random(shape) < special_share / 2
    cand[same] = ref[same]
    return ref, cand


def _bound_scale(rng, shape, kind: str):
    if kind == "none":
        return None, None
    bound = np.abs(rng.standard_normal(shape)) * 1e-6
    scale = np.abs(rng.standard_normal(shape)) * 10
    if kind == "special":
        for x in (bound, scale):
            x[rng.random(shape) < 0.05] = 0.0
            x[rng.random(shape) < 0.05] = np.nan
            x[rng.random(shape) < 0.02] = np.inf
    if kind == "broadcast":
        return bound[..., :1], scale[:1]
    if kind == "single":  # one value for every position, as a bound of zeros that takes no memory
        return np.broadcast_to(np.float64(rng.choice([0.0, 1e-6, np.inf, np.nan])), shape), 2.5
    return bound, scale


def _both(monkeypatch, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` compiled, then on the NumPy path."""
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    compiled = fn(*args, **kwargs)
    monkeypatch.setenv("CONVDIFF_NUMBA", "0")
    return compiled, fn(*args, **kwargs)


def _same(a, b) -> None:
    """Equal field by field; floats by their bits (so that NaN equals NaN and 0.0 is not -0.0)."""
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name))
        return
    if isinstance(a, float):
        assert isinstance(b, float) and np.float64(a).tobytes() == np.float64(b).tobytes(), (a, b)
        return
    assert type(a) is type(b) and a == b, (a, b)


@pytest.fixture(autouse=True)
def compiled_available():
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")


@pytest.mark.parametrize("dt_name", ["float32", "float64"])
@pytest.mark.parametrize("special_share", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("kind", ["none", "plain", "special", "broadcast", "single"])
@pytest.mark.parametrize("shape", [(7, 13, 5), (1,), ()])
def test_compare_gives_the_numpy_paths_figures(
    shape, kind, special_share, dt_name, rng, monkeypatch
):
    dt = np.dtype(dt_name)
    for _ in range(3):
        ref, cand = _pair(rng, shape, dt, special_share)
        bound, scale = _bound_scale(rng, shape, kind) if shape else (None, None)
        compiled, plain = _both(monkeypatch, metrics.compare, ref, cand, bound, scale=scale)
        _same(compiled, plain)
        compiled, plain = _both(monkeypatch, metrics.max_ulp_distance, ref, cand)
        assert compiled == plain
        _same_mismatches(monkeypatch, ref, cand)


def _same_mismatches(monkeypatch, ref: np.ndarray, cand: np.ndarray) -> None:
    """metrics.mismatches compiled and on the NumPy path: compare's max_ulp and
    mismatch_count."""
    compiled, plain = _both(monkeypatch, metrics.mismatches, ref, cand)
    assert compiled == plain
    c = metrics.compare(ref, cand)
    assert compiled == (c.max_ulp, c.mismatch_count)
    assert (compiled[1] == 0) == metrics.is_identical(c)


@pytest.mark.parametrize("dt_name", ["float32", "float64"])
def test_identical_and_all_nan_arrays(dt_name, monkeypatch):
    dt = np.dtype(dt_name)
    x = np.array([1.0, np.nan, np.inf, -0.0], dt)
    y = np.array([1.0, np.nan, np.inf, 0.0], dt)
    bound = np.ones(4)
    compiled, plain = _both(monkeypatch, metrics.compare, x, y, bound, scale=bound)
    _same(compiled, plain)
    assert metrics.is_identical(compiled)
    _same_mismatches(monkeypatch, x, y)
    assert metrics.mismatches(x, y) == (0, 0)


@pytest.mark.parametrize("which", ["bound", "scale"])
def test_negative_bound_or_scale_is_refused_on_both_paths(which, monkeypatch):
    x = np.ones(3, np.float32)
    y = np.array([1, 2, 3], np.float32)
    bad = np.array([1.0, -1.0, 1.0])
    args = {"bound": bad} if which == "bound" else {"bound": np.ones(3), "scale": bad}
    for engine in ("1", "0"):
        monkeypatch.setenv("CONVDIFF_NUMBA", engine)
        with pytest.raises(ValueError, match=f"{which} must be non-negative"):
            metrics.compare(x, y, **args)


def test_extreme_ulp_distances(monkeypatch):
    """Opposite signs at the limits of float32 and float64 (numpy's nulp_diff overflows)."""
    for dt in (np.float32, np.float64):
        big = np.finfo(dt).max
        ref = np.array([-big, big, -np.finfo(dt).smallest_subnormal], dt)
        cand = np.array([big, -big, np.finfo(dt).smallest_subnormal], dt)
        compiled, plain = _both(monkeypatch, metrics.compare, ref, cand)
        _same(compiled, plain)
        assert compiled.max_ulp == 2 * int(np.array(big, dt).view(f"u{ref.itemsize}"))


@pytest.mark.parametrize("dt_name", ["float32", "float64"])
def test_scaled_ulps_at_the_ends_of_the_range(dt_name, monkeypatch):
    """Magnitudes in the subnormal range (ULPs of 2**-1074 for float64: a scaling by more
    than 2**1023), near the largest number, and infinite scales."""
    dt = np.dtype(dt_name)
    info = np.finfo(dt)
    tiny, big = float(info.smallest_subnormal), float(info.max)
    ref = np.array([tiny, 3 * tiny, 0.0, big, -big, 1.0, 2.0], dt)
    cand = np.array([0.0, tiny, -tiny, np.nextafter(big, 0), big, 1.5, 2.5], dt)
    for scale in (np.zeros(7), np.array([0, 0, 0, 0, 0, np.inf, np.nan])):
        compiled, plain = _both(monkeypatch, metrics.compare, ref, cand, np.ones(7), scale=scale)
        _same(compiled, plain)


@pytest.mark.parametrize("special_share", [0.0, 0.05, 0.5])
def test_a_pass_split_between_cores_gives_the_same_figures(special_share, rng, monkeypatch):
    """compare's pass cut into three parts (merged counts, maxima, first positions, ULP
    distances in C order) against the NumPy path."""
    monkeypatch.setattr(metrics, "_PARALLEL_ELEMENTS", 5)
    monkeypatch.setattr(accel, "_threads", lambda: 3)
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        for _ in range(4):
            ref, cand = _pair(rng, (7, 13, 5), dt, special_share)
            bound, scale = _bound_scale(rng, (7, 13, 5), "special")
            compiled, plain = _both(monkeypatch, metrics.compare, ref, cand, bound, scale=scale)
            _same(compiled, plain)
            _same_mismatches(monkeypatch, ref, cand)


@pytest.mark.parametrize("counted", [1, 8, 4096])
@pytest.mark.parametrize("spread", ["small", "mixed", "large"])
def test_percentiles_from_counted_ulp_distances(counted, spread, rng, monkeypatch):
    """The median and 99th percentile read off the counts of small ULP distances where their
    ranks fall among them, and selected among the larger ones where not: compare's figures
    on both paths, and split between threads."""
    monkeypatch.setattr(metrics, "_COUNTED_ULPS", counted)
    top = {"small": 3, "mixed": 20_000, "large": 2**20}[spread]
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        ref = rng.standard_normal(20_000).astype(dt)
        away = rng.integers(0, top, ref.size) * (rng.random(ref.size) < 0.7)
        bits = ref.view(f"i{dt.itemsize}") + away.astype(f"i{dt.itemsize}")
        cand = bits.view(dt)
        compiled, plain = _both(monkeypatch, metrics.compare, ref, cand)
        _same(compiled, plain)
        monkeypatch.setattr(metrics, "_PARALLEL_ELEMENTS", 1000)
        monkeypatch.setattr(accel, "_threads", lambda: 3)
        threaded, _ = _both(monkeypatch, metrics.compare, ref, cand)
        _same(threaded, plain)


@pytest.mark.parametrize("top", [1, 5, 64])
def test_ranks_selected_from_counts_are_those_of_a_partition(top, rng):
    """metrics._select with counts of the values below ``top`` against np.partition alone,
    for ranks on both sides of the counted values."""
    for _ in range(20):
        values = rng.integers(1, 3 * top + 2, int(rng.integers(1, 300))).astype(np.uint64)
        counts = np.bincount(np.minimum(values, top).astype(np.int64), minlength=top + 1)
        ranks = sorted({int(r) for r in rng.integers(0, values.size, 4)})
        assert metrics._select(values, ranks, counts) == metrics._select(values, ranks, None)


@pytest.mark.parametrize("dt_name", ["float32", "float64"])
@pytest.mark.parametrize("threads", [1, 3])
def test_distances_from_the_rounded_reference(dt_name, threads, rng, monkeypatch):
    """max_ulp_from_reference (the three-way figures) compiled, rounding each float64 value as
    it reads it, against rounding the reference first and max_ulp_distance on NumPy: float64
    references across the whole range, NaN, infinities and signed zeros on every side."""
    dt = np.dtype(dt_name)
    monkeypatch.setattr(metrics, "_PARALLEL_ELEMENTS", 100)
    monkeypatch.setattr(accel, "_threads", lambda: threads)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300, -1e-310])
    for _ in range(3):
        reference = rng.standard_normal(5000) * np.exp(rng.standard_normal(5000) * 30)
        hit = rng.random(5000) < 0.05
        reference[hit] = rng.choice(specials, int(hit.sum()))
        with np.errstate(over="ignore"):
            exact = reference.astype(dt)
        sides = [exact.copy(), exact.copy()]
        for side in sides:
            for direction in (np.inf, -np.inf):
                step = rng.random(5000) < 0.3
                side[step] = np.nextafter(side[step], direction)
            hit = rng.random(5000) < 0.03
            side[hit] = rng.choice(np.array(_special(dt), dt), int(hit.sum()))
        for outputs in (sides[:1], sides):
            compiled, plain = _both(monkeypatch, metrics.max_ulp_from_reference, reference, outputs)
            assert compiled == plain
            assert plain == [metrics.max_ulp_distance(exact, out) for out in outputs]
