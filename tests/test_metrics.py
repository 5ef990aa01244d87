"""Tests for convdiff.metrics: ULP distance edge cases, compare() statistics, helpers."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convdiff import accel
from convdiff.floats import unit_roundoff
from convdiff.metrics import (
    Comparison,
    compare,
    is_identical,
    scaled_ulp,
    ulp_distance,
    ulp_histogram,
    ulp_of,
    within_bound,
    worst_elements,
)

# Any RuntimeWarning (overflow, divide by zero, invalid) from the metrics is a failure.
# Metrics must never warn; DeprecationWarnings come from third-party imports, not from us.
pytestmark = [
    pytest.mark.filterwarnings("error"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def engine(request, monkeypatch):
    """Every test here runs twice: compare and max_ulp_distance compiled (numba, where
    installed) and on their NumPy path (tests/test_metrics_compiled.py compares the two)."""
    if request.param == "compiled" and not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1" if request.param == "compiled" else "0")
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def _bits(x: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array as unsigned integers of the same width."""
    return x.view(UINT[x.dtype.itemsize])


def _step(x: np.ndarray, n: int = 1) -> np.ndarray:
    """Moves every element n representable values away from zero by stepping its bit pattern."""
    return (_bits(x) + np.asarray(n).astype(UINT[x.dtype.itemsize])).view(x.dtype)


def _ordinal(bits: int, width: int) -> int:
    """Independent reference: sign-magnitude bit pattern -> signed position on the number line."""
    magnitude = bits & ((1 << (width - 1)) - 1)
    return -magnitude if bits >> (width - 1) else magnitude


def _ulp_reference(a: np.ndarray, b: np.ndarray) -> list[int]:
    """ULP distances computed with Python ints from the arrays' bit patterns."""
    width = 8 * a.dtype.itemsize
    return [
        abs(_ordinal(int(x), width) - _ordinal(int(y), width))
        for x, y in zip(_bits(a).ravel(), _bits(b).ravel(), strict=True)
    ]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32_ulp_reference(x: float, y: float) -> int:
    return abs(_ordinal(_f32_bits(x), 32) - _ordinal(_f32_bits(y), 32))


def _sample(rng: np.random.Generator, dtype: type, n: int = 500) -> np.ndarray:
    """Finite values of ``dtype`` over many binades, both signs, with zeros and subnormals."""
    info = ml_dtypes.finfo(dtype)
    exponents = rng.uniform(np.log2(float(info.smallest_subnormal)), np.log2(float(info.max)), n)
    values = rng.choice([-1.0, 1.0], n) * np.exp2(exponents - 1)
    special = [0.0, -0.0, float(info.smallest_subnormal), float(info.max), -float(info.max)]
    return np.concatenate([values, special]).astype(dtype)


# --- ulp_distance -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_equal_values_have_zero_distance(rng: np.random.Generator, dtype: type) -> None:
    x = _sample(rng, dtype)
    x = np.concatenate([x, np.array([np.inf, -np.inf], dtype=dtype)])
    dist = ulp_distance(x, x.copy())
    assert dist.dtype == np.uint64
    assert not dist.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_signed_zeros_are_equal(dtype: type) -> None:
    pos, neg = np.array([0.0], dtype=dtype), np.array([-0.0], dtype=dtype)
    assert _bits(pos)[0] != _bits(neg)[0]
    assert ulp_distance(pos, neg).tolist() == [0]
    assert ulp_distance(neg, pos).tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_distance_of_arbitrary_bit_patterns(rng: np.random.Generator, dtype: type) -> None:
    """Every pattern of the 16-bit formats (random ones for the wider), paired at random,
    against the Python-int reference: both signs, zeros, subnormals, max, inf; NaN pairs
    are reported as 0."""
    width = 8 * np.dtype(dtype).itemsize
    if width == 16:
        bits = np.arange(2**16, dtype=np.uint64)
    else:
        bits = rng.integers(0, 2**width - 1, size=20_000, dtype=np.uint64, endpoint=True)
    edges = [0, 1 << (width - 1), 1, (1 << (width - 1)) | 1, (1 << (width - 1)) - 1]
    bits = np.concatenate([bits, np.array([*edges, 2**width - 1], dtype=np.uint64)])
    a = bits.astype(UINT[width // 8]).view(dtype)
    b = rng.permutation(a)
    with np.errstate(invalid="ignore"):
        nan = np.isnan(a.astype(np.float64)) | np.isnan(b.astype(np.float64))
    expected = np.where(nan, 0, np.array(_ulp_reference(a, b), dtype=object)).astype(np.uint64)
    np.testing.assert_array_equal(ulp_distance(a, b), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adjacent_values_are_one_ulp_apart(rng: np.random.Generator, dtype: type) -> None:
    x = _sample(rng, dtype)
    if dtype is ml_dtypes.bfloat16:
        # Stepping the bit pattern moves one value away from zero (-0 -> -min subnormal,
        # max -> inf), which is one representable value in every case.
        neighbours = [_step(x)]
    else:
        # nextafter(max, inf) is inf, which numpy flags as an overflow.
        with np.errstate(over="ignore"):
            neighbours = [
                np.nextafter(x, np.array(np.inf, dtype=dtype)),
                np.nextafter(x, np.array(-np.inf, dtype=dtype)),
            ]
    for y in neighbours:
        assert (ulp_distance(x, y) == 1).all()
        assert (ulp_distance(y, x) == 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_steps_of_n_bit_patterns(rng: np.random.Generator, dtype: type) -> None:
    x = np.abs(_sample(rng, dtype))
    x = x[x < float(ml_dtypes.finfo(dtype).max) / 4]
    assert (ulp_distance(x, _step(x, 7)) == 7).all()
    assert (ulp_distance(-x, -_step(x, 7)) == 7).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inf_vs_max_finite_is_one(dtype: type) -> None:
    big = float(ml_dtypes.finfo(dtype).max)
    a = np.array([np.inf, -np.inf], dtype=dtype)
    b = np.array([big, -big], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [1, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_neg_inf_vs_inf_counts_both_half_lines(dtype: type) -> None:
    a = np.array([-np.inf], dtype=dtype)
    b = np.array([np.inf], dtype=dtype)
    expected = 2 * int(_bits(b)[0])  # inf's magnitude bits on each side of zero
    assert ulp_distance(a, b).tolist() == [expected] == _ulp_reference(a, b)


def test_float32_opposite_signs_near_limits_do_not_overflow() -> None:
    # numpy's nulp_diff gives ~2.07e7 here because it subtracts in 32 bits.
    expected = _f32_ulp_reference(-3e38, 3e38)
    assert expected == 4274217932
    a = np.array([-3e38], dtype=np.float32)
    b = np.array([3e38], dtype=np.float32)
    assert ulp_distance(a, b).tolist() == [expected]
    assert ulp_distance(b, a).tolist() == [expected]


def test_float64_opposite_limits_use_full_unsigned_range() -> None:
    big = np.finfo(np.float64).max
    a = np.array([-big, -np.inf], dtype=np.float64)
    b = np.array([big, np.inf], dtype=np.float64)
    expected = _ulp_reference(a, b)
    assert expected[1] > 2**63  # beyond int64: needs the unsigned path
    assert ulp_distance(a, b).tolist() == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_smallest_subnormals_across_zero(dtype: type) -> None:
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    a = np.array([-tiny, -tiny, tiny], dtype=dtype)
    b = np.array([tiny, 0.0, -0.0], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [2, 1, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_positions_have_zero_distance(dtype: type) -> None:
    a = np.array([np.nan, np.nan, 1.0, np.nan], dtype=dtype)
    b = np.array([np.nan, 1.0, np.nan, np.inf], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_bit_pattern_reference(rng: np.random.Generator, dtype: type) -> None:
    a = _sample(rng, dtype)
    b = rng.permutation(a)
    assert ulp_distance(a, b).tolist() == _ulp_reference(a, b)


def test_broadcasts_and_keeps_shape() -> None:
    a = np.ones((2, 3), dtype=np.float32)
    b = np.float32(2.0)
    assert ulp_distance(a, np.asarray(b)).shape == (2, 3)
    assert ulp_distance(np.float32(1.0), np.float32(2.0)) == 2**23


def test_rejects_mixed_or_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="equal dtypes"):
        ulp_distance(np.zeros(2, np.float32), np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="unsupported dtype"):
        ulp_distance(np.zeros(2, np.int32), np.zeros(2, np.int32))


_f32 = st.floats(width=32, allow_nan=False)


@given(_f32, _f32)
def test_property_float32_matches_struct_reference_and_is_symmetric(x: float, y: float) -> None:
    a = np.array([x], dtype=np.float32)
    b = np.array([y], dtype=np.float32)
    expected = _f32_ulp_reference(x, y)
    assert int(ulp_distance(a, b)[0]) == expected
    assert int(ulp_distance(b, a)[0]) == expected


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_property_float32_nextafter_is_one_ulp(x: float) -> None:
    a = np.array([x], dtype=np.float32)
    for direction in (np.inf, -np.inf):
        with np.errstate(over="ignore"):  # nextafter(max, inf) is inf, one ULP away
            b = np.nextafter(a, np.float32(direction))
        assert int(ulp_distance(a, b)[0]) == 1


# --- compare -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_identical_arrays(rng: np.random.Generator, dtype: type) -> None:
    x = _sample(rng, dtype).reshape(-1, 5)
    c = compare(x, x.copy())
    assert is_identical(c)
    assert c.size == x.size
    assert (c.max_ulp, c.mismatch_count, c.max_abs, c.max_rel) == (0, 0, 0.0, 0.0)
    assert c.worst is None


def test_compare_rejects_shape_or_dtype_mismatch() -> None:
    with pytest.raises(ValueError, match="equal shapes and dtypes"):
        compare(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="equal shapes and dtypes"):
        compare(np.zeros(3, np.float32), np.zeros(3, np.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_handling(dtype: type) -> None:
    ref = np.array([np.nan, 1.0, np.nan, 2.0, np.nan], dtype=dtype)
    cand = np.array([np.nan, 1.0, 1e4, np.nan, np.inf], dtype=dtype)
    c = compare(ref, cand)
    assert c.nan_mismatch == 3
    assert c.inf_mismatch == 0  # NaN vs inf is a NaN mismatch only
    assert c.max_ulp == 0  # one-sided NaN never turns into ULPs
    assert c.worst is None
    assert c.mismatch_count == 3
    assert not is_identical(c)
    both_nan = compare(ref[:2], cand[:2])
    assert is_identical(both_nan)
    assert both_nan.nan_mismatch == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inf_mismatch_is_counted_apart(dtype: type) -> None:
    big = float(ml_dtypes.finfo(dtype).max)
    ref = np.array([np.inf, -np.inf, np.inf, -np.inf, 1.0], dtype=dtype)
    cand = np.array([np.inf, np.inf, big, -np.inf, 1.0], dtype=dtype)
    c = compare(ref, cand)
    assert c.inf_mismatch == 2
    assert c.nan_mismatch == 0
    assert c.max_ulp == 0  # inf vs max is 1 ULP, but reported as an inf mismatch
    assert c.max_abs == 0.0
    assert c.mismatch_count == 2
    assert not is_identical(c)
    assert is_identical(compare(ref[[0, 3, 4]], cand[[0, 3, 4]]))


def test_max_rel_with_zero_reference() -> None:
    ref = np.array([0.0, 0.0, 2.0], dtype=np.float32)
    assert compare(ref, np.array([0.0, -0.0, 3.0], dtype=np.float32)).max_rel == 0.5
    assert compare(ref, np.array([1e-3, 0.0, 2.0], dtype=np.float32)).max_rel == np.inf


def test_bound_ratio() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float64)
    cand = np.array([1.0, 2.5, 3.0, 4.0], dtype=np.float64)
    assert compare(ref, cand).bound_ratio is None
    assert not within_bound(compare(ref, cand))
    # Scalar bound broadcasts; 0.5 / 1.0.
    c = compare(ref, cand, bound=np.float64(1.0))
    assert c.bound_ratio == 0.5
    assert within_bound(c)
    # 0/0 -> 0 where the values agree and the bound is zero.
    c = compare(ref, cand, bound=np.array([0.0, 0.25, 0.0, 0.0]))
    assert c.bound_ratio == 2.0
    assert not within_bound(c)
    # x/0 -> inf.
    c = compare(ref, cand, bound=np.zeros(4))
    assert c.bound_ratio == np.inf
    assert c.worst is not None and c.worst.bound == 0.0
    # Exactly on the bound is within it.
    assert within_bound(compare(ref, cand, bound=np.array([0.0, 0.5, 0.0, 0.0])))


def test_bound_does_not_excuse_nan_or_inf() -> None:
    ref = np.array([1.0, np.nan], dtype=np.float32)
    cand = np.array([1.0, 1.0], dtype=np.float32)
    c = compare(ref, cand, bound=np.float64(np.inf))
    # no bound covers a number against a NaN: the ratio says so instead of reading as rounding
    assert c.bound_ratio == np.inf and c.first_nonfinite == (1,) and c.nan_in_reference == 1
    assert not within_bound(c)


def test_bound_rejects_negative_and_a_nan_bound_bounds_nothing() -> None:
    """A negative bound is a programming error; a NaN bound (NaN inputs in the bounded pass)
    counts as 0: an exact match passes, any difference fails (tests/test_nonfinite.py)."""
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="non-negative"):
        compare(x, x, bound=np.array([1.0, -1.0, 1.0]))
    assert compare(x, x, bound=np.float64(np.nan)).bound_ratio == 0.0
    y = np.nextafter(x, np.float32(2))
    assert compare(x, y, bound=np.float64(np.nan)).bound_ratio == np.inf


def test_worst_index_values_and_ties() -> None:
    ref = np.ones((3, 4), dtype=np.float32)
    cand = ref.copy()
    cand[0, 3] = _step(ref[0, 3:4], 5)[0]
    cand[1, 2] = _step(ref[1, 2:3], 9)[0]
    cand[2, 0] = _step(ref[2, 0:1], 9)[0]  # tie with (1, 2): the first in C order wins
    bound = np.full((3, 4), 1e-6)
    c = compare(ref, cand, bound=bound)
    assert c.worst is not None
    assert c.worst.index == (1, 2)
    assert c.worst.ulp == 9 == c.max_ulp
    assert c.worst.reference == 1.0
    assert c.worst.candidate == float(cand[1, 2])
    assert c.worst.abs_err == 9 * 2.0**-23
    assert c.worst.bound == 1e-6
    assert c.max_abs == 9 * 2.0**-23
    assert c.mismatch_count == 3
    assert compare(ref, cand).worst.bound is None  # type: ignore[union-attr]


def test_worst_skips_nonfinite_positions() -> None:
    ref = np.array([np.inf, 1.0, np.nan], dtype=np.float32)
    cand = np.array([-np.inf, 1.5, 0.0], dtype=np.float32)
    c = compare(ref, cand)
    assert c.worst is not None
    assert c.worst.index == (1,)
    assert c.max_ulp == 2**22


def test_mismatch_fraction_and_percentiles() -> None:
    ref = np.ones(100, dtype=np.float32)
    ulps = np.arange(100)
    cand = _step(ref, ulps)
    c = compare(ref, cand)
    assert c.mismatch_count == 99
    assert c.mismatch_fraction == 0.99
    assert c.max_ulp == 99
    assert c.mean_ulp == pytest.approx(49.5)
    assert c.median_ulp == pytest.approx(np.percentile(ulps.astype(np.float64), 50))
    assert c.p99_ulp == pytest.approx(np.percentile(ulps.astype(np.float64), 99))
    assert c.p99_ulp == pytest.approx(98.01)


def test_mismatch_count_combines_kinds() -> None:
    ref = np.array([1.0, 1.0, np.nan, np.inf, 2.0, 3.0, 4.0, 5.0], dtype=np.float16)
    cand = np.array([1.0, 1.5, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float16)
    c = compare(ref, cand)
    assert (c.mismatch_count, c.nan_mismatch, c.inf_mismatch) == (3, 1, 1)
    assert c.mismatch_fraction == 3 / 8


def test_empty_arrays() -> None:
    x = np.zeros((0, 3), dtype=np.float32)
    c = compare(x, x, bound=np.float64(1.0))
    assert c.size == 0
    assert c.mismatch_fraction == 0.0
    assert (c.max_ulp, c.mean_ulp, c.median_ulp, c.p99_ulp) == (0, 0.0, 0.0, 0.0)
    assert c.worst is None
    assert is_identical(c)


def test_float64_extremes_do_not_warn() -> None:
    big = np.finfo(np.float64).max
    ref = np.array([-big, 0.0], dtype=np.float64)
    cand = np.array([big, 0.0], dtype=np.float64)
    c = compare(ref, cand, bound=np.array([np.inf, 0.0]))
    assert c.max_ulp == _ulp_reference(ref, cand)[0]
    assert c.max_abs == np.inf  # the float64 difference itself overflows
    assert c.max_rel == np.inf
    assert c.bound_ratio == np.inf  # inf / inf cannot be shown to be within the bound


def test_to_dict_is_json_ready() -> None:
    ref = np.array([[1.0, 0.0], [np.nan, 2.0]], dtype=ml_dtypes.bfloat16)
    cand = np.array([[1.0, 1.0], [np.nan, 2.0]], dtype=ml_dtypes.bfloat16)
    c = compare(ref, cand, bound=np.float64(0.5), scale=np.float64(4.0))
    d = c.to_dict()
    assert set(d) == set(Comparison.__dataclass_fields__)
    assert d["max_ulp_scaled"] == 32.0  # |1 - 0| over the bfloat16 spacing at 4, 2**-5
    assert compare(ref, cand).to_dict()["max_ulp_scaled"] is None
    assert d["worst"]["index"] == [0, 1]
    assert d["max_rel"] == float("inf")
    assert d["bound_ratio"] == 2.0
    assert d["first_nonfinite"] is None  # NaN on both sides is a match
    for key, value in d.items():
        if key not in ("worst", "first_nonfinite"):
            assert type(value) in (int, float), key
    assert all(type(v) is int for v in d["worst"]["index"])
    one_side = compare(ref, np.where(np.isnan(ref), 3.0, ref).astype(ref.dtype)).to_dict()
    assert one_side["first_nonfinite"] == [1, 0] and type(one_side["first_nonfinite"][0]) is int
    json.loads(json.dumps(d))


# --- helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float16, 2.0**-11),
        (ml_dtypes.bfloat16, 2.0**-8),
        (np.float32, 2.0**-24),
        (np.float64, 2.0**-53),
    ],
    ids=DTYPE_IDS,
)
def test_unit_roundoff(dtype: type, expected: float) -> None:
    assert unit_roundoff(dtype) == expected
    assert unit_roundoff(np.dtype(dtype)) == expected


def test_unit_roundoff_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        unit_roundoff(np.int8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ulp_of_matches_np_spacing(rng: np.random.Generator, dtype: type) -> None:
    x = np.concatenate([_sample(rng, dtype).astype(np.float64), [np.inf, -np.inf, np.nan]])
    cast = x.astype(dtype)
    # ml_dtypes registers np.spacing for bfloat16 too, so this is an independent reference.
    with np.errstate(all="ignore"):
        expected = np.spacing(np.abs(cast)).astype(np.float64)
    got = ulp_of(x, dtype)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_ulp_of_rounds_to_dtype_first() -> None:
    # 2 - 2**-30 rounds to 2.0 in float32, where the spacing is 2**-22, not 2**-23.
    assert ulp_of(np.array([2.0 - 2.0**-30]), np.float32).tolist() == [2.0**-22]
    assert ulp_of(np.array([0.0, -1.0]), ml_dtypes.bfloat16).tolist() == [2.0**-133, 2.0**-7]


# --- ulp_histogram -------------------------------------------------------------------------------


def _bucket(d: int) -> str:
    """Independent reference: the label of the power-of-two bucket holding distance d."""
    d = int(d)
    if d <= 1:
        return str(d)
    lo = 1 << (d.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def test_histogram_buckets_are_powers_of_two_with_empty_ones_listed() -> None:
    ref = np.ones(9, dtype=np.float32)
    cand = _step(ref, np.array([0, 1, 2, 3, 4, 7, 8, 100, 0]))
    assert ulp_histogram(ref, cand) == [
        ("0", 2),
        ("1", 1),
        ("2-3", 2),
        ("4-7", 2),
        ("8-15", 1),
        ("16-31", 0),
        ("32-63", 0),
        ("64-127", 1),
    ]


def test_histogram_of_equal_and_empty_arrays() -> None:
    x = np.array([0.0, -0.0, 1.0, np.inf, np.nan], dtype=np.float16)
    y = np.array([-0.0, 0.0, 1.0, np.inf, np.nan], dtype=np.float16)
    assert ulp_histogram(x, y) == [("0", 5)]
    empty = np.zeros((0, 2), dtype=np.float32)
    assert ulp_histogram(empty, empty) == [("0", 0)]


def test_histogram_counts_nonfinite_mismatches_apart() -> None:
    ref = np.array([np.nan, np.inf, np.nan, np.inf, 1.0, 1.0], dtype=np.float32)
    cand = np.array([1.0, -np.inf, np.nan, np.inf, np.nan, 1.0], dtype=np.float32)
    hist = ulp_histogram(ref, cand)
    assert hist == [("0", 3), ("nan/inf", 3)]
    assert sum(n for _, n in hist) == ref.size


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_histogram_matches_python_int_reference(rng: np.random.Generator, dtype: type) -> None:
    a = _sample(rng, dtype)
    b = rng.permutation(a)  # distances up to the full range, both signs, zeros, max
    counts: dict[str, int] = {}
    for d in _ulp_reference(a, b):
        counts[_bucket(d)] = counts.get(_bucket(d), 0) + 1
    hist = ulp_histogram(a, b)
    assert {label: n for label, n in hist if n} == counts
    assert hist[-1][1] > 0  # the last bucket is the one holding the maximum
    edges = [0, 1, *(1 << i for i in range(1, 64))]
    assert [label for label, _ in hist] == [_bucket(d) for d in edges][: len(hist)]


def test_histogram_bucket_edges_beyond_float64_precision() -> None:
    # Distances 2**k - 1 and 2**k for k > 53 are not exact in float64: bit lengths must be exact.
    big = np.finfo(np.float64).max
    a = np.array([-big, -big, 1.0], dtype=np.float64)
    b = np.array([big, 0.0, 1.0], dtype=np.float64)
    d = _ulp_reference(a, b)
    hist = dict(ulp_histogram(a, b))
    assert hist[_bucket(d[0])] == 1 and hist[_bucket(d[1])] == 1
    assert _bucket(d[0]) == "9223372036854775808-18446744073709551615"


def test_histogram_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="ulp_histogram needs equal shapes"):
        ulp_histogram(np.zeros(2, np.float32), np.zeros(3, np.float32))


# --- worst_elements ------------------------------------------------------------------------------


def test_worst_elements_order_ties_and_fields() -> None:
    ref = np.ones((3, 4), dtype=np.float32)
    cand = ref.copy()
    cand[0, 3] = _step(ref[0, 3:4], 5)[0]
    cand[1, 2] = _step(ref[1, 2:3], 9)[0]
    cand[2, 0] = _step(ref[2, 0:1], 9)[0]  # tie with (1, 2): C order first
    bound = np.full((3, 4), 2**-21)
    exact = np.full((3, 4), 1.0, dtype=np.float32)
    worst = worst_elements(ref, cand, 2, bound=bound, exact=exact)
    assert [w["index"] for w in worst] == [[1, 2], [2, 0]]
    assert worst[0] == {
        "index": [1, 2],
        "reference": 1.0,
        "candidate": float(cand[1, 2]),
        "ulp": 9,
        "abs_err": 9 * 2.0**-23,
        "bound": 2**-21,
        "bound_ratio": 9 / 4,
        "exact": 1.0,
    }
    # Same keys as the Worst record, plus exact and bound_ratio; same first element.
    first = compare(ref, cand, bound).worst
    assert first is not None
    assert {k: worst[0][k] for k in first.to_dict()} == first.to_dict()
    json.loads(json.dumps(worst))


def test_worst_elements_lists_only_differences() -> None:
    ref = np.arange(6, dtype=np.float64)
    cand = ref.copy()
    cand[4] = np.nextafter(cand[4], 10.0)
    assert [w["index"] for w in worst_elements(ref, cand, 10)] == [[4]]
    assert worst_elements(ref, ref, 3) == []
    assert worst_elements(ref, cand, 0) == []
    w = worst_elements(ref, cand, 1)[0]
    assert w["bound"] is None and w["bound_ratio"] is None and w["exact"] is None
    with pytest.raises(ValueError, match="k must be >= 0"):
        worst_elements(ref, cand, -1)


def test_worst_elements_nonfinite_mismatches_first() -> None:
    ref = np.array([1.0, np.nan, 2.0, np.inf, np.nan], dtype=np.float16)
    cand = np.array([1.5, 1.0, 2.0, -np.inf, np.nan], dtype=np.float16)
    worst = worst_elements(ref, cand, 5, bound=np.float64(0.0))
    assert [(w["index"], w["ulp"]) for w in worst] == [([1], None), ([3], None), ([0], 512)]
    assert worst[0]["abs_err"] == np.inf and worst[0]["bound_ratio"] == np.inf
    assert worst[2]["bound_ratio"] == np.inf  # x / 0


def test_worst_elements_top_k_matches_full_sort(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((50, 40)).astype(np.float32)
    cand = _step(ref, rng.integers(0, 6, ref.shape))  # many ties
    ulp = _ulp_reference(ref, cand)
    expected = sorted((i for i in range(ref.size) if ulp[i]), key=lambda i: (-ulp[i], i))[:37]
    got = worst_elements(ref, cand, 37)
    assert [np.ravel_multi_index(w["index"], ref.shape) for w in got] == expected
    assert [w["ulp"] for w in got] == [ulp[i] for i in expected]


# --- scaled_ulp ----------------------------------------------------------------------------------


def test_scaled_ulp_of_a_small_difference_of_large_terms() -> None:
    # docs/numerics.md: 0.0071908 vs 0.0071906 is hundreds of float32 ULPs at 0.0072, but less than
    # one ULP of terms of magnitude ~3.
    ref = np.array([0.0071908], dtype=np.float32)
    cand = np.array([0.0071906], dtype=np.float32)
    raw = compare(ref, cand).max_ulp
    scaled = scaled_ulp(ref, cand, np.array([3.0]), np.float32)
    assert raw > 200
    assert scaled[0] == pytest.approx(abs(float(ref[0]) - float(cand[0])) / 2.0**-22)
    assert scaled[0] < 1


def test_scaled_ulp_is_raw_ulp_within_a_binade_without_scale() -> None:
    ref = np.array([1.0, 1.5, -3.0], dtype=np.float32)
    cand = _step(ref, np.array([3, 0, 2]))
    np.testing.assert_array_equal(scaled_ulp(ref, cand, 0.0, np.float32), [3.0, 0.0, 2.0])
    # A scale smaller than the values does not inflate the result (values set the minimum).
    np.testing.assert_array_equal(scaled_ulp(ref, cand, 1e-30, np.float32), [3.0, 0.0, 2.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scaled_ulp_edge_cases(dtype: type) -> None:
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    big = float(ml_dtypes.finfo(dtype).max)
    ref = np.array([0.0, tiny, 1.0, np.nan, np.inf, 1.0, 1.0, -big], dtype=dtype)
    cand = np.array([-0.0, -tiny, 1.0, np.nan, 1.0, 2.0, 2.0, big], dtype=dtype)
    beyond = big * 4 if dtype is not np.float64 else big  # no float64 beyond float64's max
    scale = np.array([0.0, 0.0, np.nan, 1.0, 1.0, np.inf, beyond, 0.0])
    got = scaled_ulp(ref, cand, scale, dtype)
    assert got.dtype == np.float64 and got.shape == ref.shape
    assert got[0] == 0.0
    assert got[1] == 2.0  # two subnormal steps
    assert got[2] == 0.0  # NaN scale counts as 0 (no credit); equal values here
    assert np.isnan(got[3]) and np.isnan(got[4])  # a side not finite
    assert got[5] == 0.0  # finite difference over an infinite scale
    # Beyond the dtype's range the spacing keeps growing instead of becoming inf.
    nmant = ml_dtypes.finfo(dtype).nmant
    assert got[6] == 1.0 / 2.0 ** (np.frexp(beyond)[1] - 1 - nmant)
    if dtype is np.float64:
        assert got[7] == np.inf  # the float64 difference itself overflows, as in compare()
    else:
        assert got[7] == 2 * big / 2.0 ** (np.frexp(big)[1] - 1 - nmant)


def test_compare_scale_fills_max_ulp_scaled() -> None:
    ref = np.array([0.0071908, 1.0, np.nan], dtype=np.float32)
    cand = np.array([0.0071906, 1.0, 5.0], dtype=np.float32)
    c = compare(ref, cand, scale=np.array([3.0, 1.0, 1.0]))
    expected = scaled_ulp(ref, cand, np.array([3.0, 1.0, 1.0]), np.float32)[0]
    assert c.max_ulp_scaled == expected  # the NaN position is left out
    assert compare(ref, cand).max_ulp_scaled is None
    assert compare(ref[:0], cand[:0], scale=1.0).max_ulp_scaled == 0.0
    with pytest.raises(ValueError, match="scale must be non-negative"):
        compare(ref, cand, scale=-1.0)
    nan_scaled = compare(ref, cand, scale=np.nan)  # no credit for the terms: own ULPs
    assert nan_scaled.max_ulp_scaled is not None and not np.isnan(nan_scaled.max_ulp_scaled)


@pytest.mark.parametrize("seed", range(20))
def test_compare_matches_whole_array_statistics(seed) -> None:
    """compare() works on the differing positions only; its figures must equal the same
    statistics taken over the whole arrays (equal positions, equal infinities, NaN on one or
    both sides, and a bound and scale broadcast from a smaller shape)."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((6, 50)).astype(np.float32)
    cand = ref.copy()
    differ = rng.random(ref.shape) < rng.choice([0.01, 0.3, 0.9])
    steps = rng.integers(-40, 40, ref.shape).astype(np.int32)
    cand[differ] = (ref.view(np.int32) + steps).view(np.float32)[differ]
    for value, share in ((np.inf, 0.02), (np.nan, 0.02)):
        both = rng.random(ref.shape) < share
        ref[both], cand[both] = value, value
        one = rng.random(ref.shape) < share
        cand[one] = value
    bound = rng.uniform(0, 1e-5, (1, 50))
    scale = rng.uniform(0, 3, (6, 1))
    c = compare(ref, cand, bound=bound, scale=scale)

    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(r64) & np.isfinite(c64)
    ulp = np.where(finite, ulp_distance(ref, cand), 0).astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(c64 - r64), 0.0)
    assert c.max_ulp == int(ulp[finite].max())
    assert c.mean_ulp == pytest.approx(ulp[finite].mean(), rel=1e-12)
    assert [c.median_ulp, c.p99_ulp] == pytest.approx(np.percentile(ulp[finite], [50, 99]))
    assert c.max_abs == diff[finite].max()
    bound_full = np.broadcast_to(bound, ref.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound_full)
    nan_r, nan_c = np.isnan(r64), np.isnan(c64)
    mismatch = (nan_r != nan_c) | (~finite & ~nan_r & ~nan_c & (r64 != c64))
    # a NaN or inf mismatch is beyond any bound: the ratio is inf wherever there is one
    expected = np.inf if mismatch.any() else ratio[finite].max()
    assert c.bound_ratio == pytest.approx(expected)
    first_mismatch = np.unravel_index(int(np.argmax(mismatch)), ref.shape)
    assert c.first_nonfinite == (tuple(int(i) for i in first_mismatch) if mismatch.any() else None)
    assert c.nan_mismatch == int(np.count_nonzero(nan_r != nan_c))
    assert c.nan_in_reference == int(np.count_nonzero(nan_r & ~nan_c))
    first = np.unravel_index(int(np.argmax(ulp)), ref.shape)
    assert c.worst is not None and c.worst.index == tuple(int(i) for i in first)
    assert c.worst.bound == bound_full[first]
    whole = scaled_ulp(ref, cand, np.broadcast_to(scale, ref.shape), np.float32)
    assert c.max_ulp_scaled == pytest.approx(np.nanmax(np.where(finite, whole, 0)))
