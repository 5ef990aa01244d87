"""convdiff.spatial: where the differences sit, reduced by the maximum so nothing is lost."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convdiff.metrics import compare, ulp_distance, ulp_histogram
from convdiff.spatial import (
    MAP_CELLS,
    PROFILE_BINS,
    UNIT_BOUND,
    UNIT_ULP,
    layout,
    round_up,
    summarize,
)

pytestmark = [
    pytest.mark.filterwarnings("error"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.mark.parametrize(
    ("shape", "channels_first", "rows", "columns", "channel", "reduced"),
    [
        ((), False, None, None, None, ()),
        ((7,), False, None, 0, 0, ()),
        ((2, 7), False, 0, 1, 1, ()),
        ((2, 9, 4), False, 1, 2, 2, ("batch",)),
        ((2, 4, 9), True, 2, 1, 1, ("batch",)),
        ((2, 6, 5, 4), False, 1, 2, 3, ("batch", "channels")),
        ((2, 4, 6, 5), True, 2, 3, 1, ("batch", "channels")),
        ((2, 3, 6, 5, 4), False, 2, 3, 4, ("batch", "depth", "channels")),
        ((2, 4, 3, 6, 5), True, 3, 4, 1, ("batch", "channels", "depth")),
    ],
)
def test_layout_natural_reduction(shape, channels_first, rows, columns, channel, reduced):
    picture = layout(shape, channels_first)
    assert (picture.rows, picture.columns, picture.channel) == (rows, columns, channel)
    assert picture.reduced == reduced


def _pair(rng, shape, dtype=np.float32):
    ref = rng.standard_normal(shape).astype(dtype)
    return ref, ref.copy()


def test_one_hot_element_survives_every_reduction(rng):
    """The maximum over batch, channels and 4x4 blocks keeps a single bad element visible
    in its cell and its channel; every other cell stays at the rounding level."""
    ref, cand = _pair(rng, (3, 100, 70, 40))
    cand[1, 57, 3, 29] += 1.0
    bound = np.full(ref.shape, 1e-3)
    s = summarize(ref, cand, bound)
    assert s.unit == UNIT_BOUND
    assert s.source_shape == (100, 70) and s.block == (4, 3)
    assert s.map.shape == (25, 24) and max(s.map.shape) <= MAP_CELLS
    hot = np.argwhere(s.map > 1)
    assert hot.tolist() == [[57 // 4, 3 // 3]]
    assert s.map[57 // 4, 1] == pytest.approx(
        abs(float(cand[1, 57, 3, 29]) - ref[1, 57, 3, 29]) / 1e-3, rel=1e-6
    )
    assert s.channels == 40 and s.channel_block == 1
    assert np.flatnonzero(s.profile > 1).tolist() == [29]
    assert s.differing == 1 and s.over_bound == 1
    assert s.worst[0]["index"] == [1, 57, 3, 29]
    assert "downsampled from 100x70" in s.describe()


def test_map_and_profile_agree_with_a_direct_computation(rng):
    ref, _ = _pair(rng, (2, 9, 11, 300))
    cand = (ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-6).astype(np.float32)
    bound = rng.uniform(1e-7, 1e-5, ref.shape)
    s = summarize(ref, cand, bound)
    ratio = np.abs(cand.astype(np.float64) - ref) / bound
    np.testing.assert_allclose(s.map, ratio.max(axis=(0, 3)), rtol=1e-6)
    per_channel = ratio.max(axis=(0, 1, 2))
    assert s.channel_block == math.ceil(300 / PROFILE_BINS) == 3
    expected = np.pad(per_channel, (0, 0)).reshape(100, 3).max(axis=1)
    np.testing.assert_allclose(s.profile, expected, rtol=1e-6)
    # The same largest ratio as the comparison's, and never below it (rounded upwards).
    assert s.peak >= compare(ref, cand, bound).bound_ratio
    assert s.peak == pytest.approx(compare(ref, cand, bound).bound_ratio, rel=1e-6)
    assert s.over_bound == int(np.count_nonzero(ratio > 1))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_histogram_equals_the_full_arrays_histogram(rng, dtype):
    ref = rng.standard_normal((4, 5, 6)).astype(dtype)
    cand = (ref.astype(np.float64) * (1 + rng.standard_normal(ref.shape) * 1e-2)).astype(dtype)
    cand[0, 0, :3] = ref[0, 0, :3]
    cand[1, 1, 1], ref[2, 2, 2], cand[2, 2, 2] = np.nan, np.nan, np.nan
    cand[3, 3, 3] = np.inf
    s = summarize(ref, cand)
    assert s.unit == UNIT_ULP
    assert s.histogram == ulp_histogram(ref, cand)
    assert sum(count for _, count in s.histogram) == ref.size


def test_nan_and_inf_mismatches_are_infinitely_far_and_equal_nans_are_not(rng):
    ref, cand = _pair(rng, (1, 4, 4, 2))
    ref[0, 0, 0, 0] = cand[0, 0, 0, 0] = np.nan  # NaN on both sides: a match
    ref[0, 1, 1, 1] = cand[0, 1, 1, 1] = np.inf  # the same infinity: a match
    cand[0, 2, 3, 0] = np.nan
    cand[0, 3, 0, 1] = -np.inf
    s = summarize(ref, cand, np.zeros(()))
    assert np.isinf(s.map[2, 3]) and np.isinf(s.map[3, 0])
    assert s.map[0, 0] == 0 and s.map[1, 1] == 0
    assert s.over_bound == 2 and s.differing == 2
    assert {tuple(w["index"]) for w in s.worst[:2]} == {(0, 2, 3, 0), (0, 3, 0, 1)}
    assert all(w["ulp"] is None for w in s.worst[:2])
    assert s.histogram[-1] == ("nan/inf", 2)
    assert round_up(float("inf")) == float("inf")
    assert s.to_dict()["map"][2][3] == float("inf")


def test_bitwise_equal_is_all_zero_and_non_float_is_none(rng):
    ref, cand = _pair(rng, (2, 5, 5, 3))
    ref[0, 0, 0, 0], cand[0, 0, 0, 0] = 0.0, -0.0  # equal values
    s = summarize(ref, cand, np.ones(ref.shape))
    assert not s.map.any() and not s.profile.any() and s.worst == [] and s.over_bound == 0
    assert s.histogram == [("0", ref.size)]
    assert summarize(np.arange(6), np.arange(6)) is None


def test_worst_elements_ranked_by_ratio_not_by_ulp(rng):
    """A large ULP distance at a tiny value can be well within its bound: the worst
    elements are the ones furthest beyond their bound."""
    ref = np.array([[1e-6, 1.0, 2.0]], np.float32)
    cand = np.array([[2e-6, 1.5, 2.0]], np.float32)
    bound = np.array([[1e-5, 1e-3, 1e-3]])
    s = summarize(ref, cand, bound)
    assert ulp_distance(ref, cand)[0, 0] > ulp_distance(ref, cand)[0, 1]
    assert [w["index"] for w in s.worst] == [[0, 1], [0, 0]]
    assert s.worst[0]["bound_ratio"] == pytest.approx(500.0)
    assert s.worst[0]["reference"] == 1.0 and s.worst[0]["candidate"] == 1.5


def test_channels_first_puts_the_channel_axis_first(rng):
    ref, cand = _pair(rng, (1, 5, 6, 7))  # (N, C, H, W)
    cand[0, 4, 2, 6] += 1
    s = summarize(ref, cand, np.full(ref.shape, 1e-3), channels_first=True)
    assert s.source_shape == (6, 7) and s.channels == 5
    assert np.argwhere(s.map > 1).tolist() == [[2, 6]]
    assert np.flatnonzero(s.profile > 1).tolist() == [4]


def test_json_summary_is_compact(rng):
    ref, cand = _pair(rng, (8, 112, 112, 64))
    cand[:, :, 0, :] += 1
    d = summarize(ref, cand, np.full(ref.shape, 1e-3)).to_dict()
    assert len(d["map"]) == 28 and {len(row) for row in d["map"]} == {28}
    assert d["block"] == [4, 4] and d["source_shape"] == [112, 112]
    assert d["reduced_by_max"] == ["batch", "channels"]
    assert (d["rows"], d["columns"]) == ("height", "width")
    assert [row[0] > 1 for row in d["map"]] == [True] * 28
    assert all(v <= 1 for row in d["map"] for v in row[1:])
    assert len(d["channel_profile"]) == 64


@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False))
def test_round_up_never_below_and_three_digits(value):
    rounded = round_up(value)
    assert rounded >= value
    assert len(f"{rounded:.3e}".split("e")[0].rstrip("0").replace(".", "")) <= 3
    assert rounded <= value * 1.0101  # at most one step of the third digit


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, 1.0), (1.0000001, 1.01), (0.9996, 1.0), (0.123456, 0.124), (0.5, 0.5), (1e-9, 1e-9)],
)
def test_round_up_keeps_above_one_above_one(value, expected):
    assert round_up(value) == expected
    assert (round_up(value) > 1) == (value > 1)
