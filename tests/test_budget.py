"""Budgets: parsing CLI-style values, per-layer overrides, ULP quantiles, atol/rtol."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from convdiff.budget import Budget, LayerLimits, Rule, parse_budget, ulp_quantile
from convdiff.errors import OptionError


def _ulps_apart(reference: np.ndarray, steps: list[int]) -> np.ndarray:
    """``reference`` moved up by ``steps[i]`` representable values at position i."""
    # For positive floats the bit pattern, read as an unsigned integer, counts representable
    # values: adding n to it moves n ULPs up (any dtype, bfloat16 included).
    assert (reference >= 0).all()
    bits = reference.copy().view(np.dtype(f"u{reference.dtype.itemsize}"))
    bits += np.array(steps, dtype=bits.dtype)
    return bits.view(reference.dtype)


# --------------------------------------------------------------------------- parsing


def test_empty_budget_is_inactive_and_checks_nothing():
    budget = parse_budget([], [], [], None)
    assert budget == Budget() and not budget.active
    r = np.float32([1, 2])
    assert budget.check("any", "Conv2D", r, r * 3) == []


def test_global_and_overrides_keep_global_first():
    budget = parse_budget(["conv*=8", "4", "Dense=off"], ["1e-6"], ["block*=1e-3"], None)
    assert budget.max_ulp == (Rule(None, 4), Rule("conv*", 8), Rule("Dense", None))
    assert budget.atol == (Rule(None, 1e-6),) and budget.rtol == (Rule("block*", 1e-3),)
    assert budget.active and budget.global_max_ulp == 4
    assert budget.to_dict()["max_ulp"][1] == {"pattern": "conv*", "value": 8}


@pytest.mark.parametrize(
    ("name", "class_name", "expected"),
    [
        ("dense_1", "Dense", LayerLimits(None, 1e-6, None)),  # 'Dense=off' by class name
        ("conv2d_3", "Conv2D", LayerLimits(2, 1e-6, None)),  # last matching override wins
        ("conv2d_1", "Conv2D", LayerLimits(8, 1e-6, None)),
        ("block1_conv", "Conv2D", LayerLimits(16, 1e-6, 1e-3)),  # 'Conv*' by class, then block*
        ("relu", "ReLU", LayerLimits(4, 1e-6, None)),  # global value
        ("CONV_1", "Add", LayerLimits(4, 1e-6, None)),  # globs are case-sensitive
        ("outer/conv2d_3#2", "Conv2D", LayerLimits(2, 1e-6, None)),  # bare name of a call
        ("outer/block1_conv", "X", LayerLimits(16, 1e-6, 1e-3)),
    ],
)
def test_last_matching_override_wins(name, class_name, expected):
    budget = parse_budget(
        ["4", "conv*=8", "Conv*=8", "conv2d_3=2", "block*=16", "Dense=off"],
        ["1e-6"],
        ["block*=1e-3"],
        None,
    )
    assert budget.limits_for(name, class_name) == expected


def test_no_global_value_means_only_matching_layers_are_budgeted():
    budget = parse_budget(["conv2d_3=0"], [], [], None)
    r = np.float32([1.0, 2.0])
    c = _ulps_apart(r, [1, 0])
    assert budget.check("conv2d_2", "Conv2D", r, c) == []
    assert budget.check("conv2d_3", "Conv2D", r, c) == ["max ULP 1 > 0 (--max-ulp conv2d_3=0)"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((["4", "8"], [], []), ["--max-ulp was given 2 global values (4 and 8)", "PATTERN=N"]),
        ((["x"], [], []), ["--max-ulp expects N or PATTERN=N", "received 'x'"]),
        ((["conv=1.5"], [], []), ["whole number >= 0", "received 'conv=1.5'"]),
        ((["-1"], [], []), ["--max-ulp expects N"]),
        ((["=3"], [], []), ["--max-ulp '=3' has an empty layer pattern"]),
        (([], ["-1e-3"], []), ["--atol expects A or PATTERN=A", "finite number >= 0"]),
        (([], ["c=nan"], []), ["--atol expects A", "received 'c=nan'"]),
        (([], [], ["inf"]), ["--rtol expects R or PATTERN=R"]),
        (([], [], ["1e-5", "off"]), ["--rtol was given 2 global values (1e-05 and off)"]),
    ],
)
def test_bad_values_raise_option_error(args, fragments):
    with pytest.raises(OptionError) as info:
        parse_budget(*args, None)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("quantile", [0.0, -0.5, 1.5, float("nan")])
def test_quantile_outside_unit_interval_is_rejected(quantile):
    with pytest.raises(OptionError, match=r"--quantile must be in \(0, 1\]"):
        parse_budget(["4"], [], [], quantile)


def test_quantile_without_a_limit_is_rejected():
    with pytest.raises(OptionError, match=r"--quantile 0\.99 has nothing to apply to"):
        parse_budget([], [], [], 0.99)


def test_unmatched_overrides_are_reported():
    budget = parse_budget(["4", "conv2d_9=1", "Conv*=2"], ["dense=1e-6"], ["typo*=0"], None)
    layers = [("conv2d_1", "Conv2D"), ("dense", "Dense")]
    assert budget.unmatched_patterns(layers) == ["--max-ulp conv2d_9=1", "--rtol typo*=0"]


# --------------------------------------------------------------------------- ULP limits


def test_max_ulp_check_names_measured_value_and_rule():
    r = np.linspace(0, 3, 10, dtype=np.float32)
    c = _ulps_apart(r, [0, 5, 0, 2, 0, 0, 0, 0, 0, 0])
    assert parse_budget(["5"], [], [], None).check("c", "Conv2D", r, c) == []
    assert parse_budget(["4"], [], [], None).check("c", "Conv2D", r, c) == [
        "max ULP 5 > 4 (--max-ulp 4)"
    ]


def test_quantile_budget_tolerates_the_tail():
    r = np.ones(100, dtype=np.float32)
    c = _ulps_apart(r, [50] + [1] * 9 + [0] * 90)  # one element 50 ULP off, nine 1 ULP
    assert parse_budget(["1"], [], [], 0.99).check("c", "C", r, c) == []
    assert parse_budget(["0"], [], [], 0.9).check("c", "C", r, c) == []
    assert parse_budget(["0"], [], [], 0.91).check("c", "C", r, c) == [
        "0.91 ULP quantile 1 > 0 (--max-ulp 0)"
    ]
    assert parse_budget(["1"], [], [], 1.0).check("c", "C", r, c) == [
        "max ULP 50 > 1 (--max-ulp 1)"
    ]


@pytest.mark.parametrize("q", [0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99, 0.999, 1.0])
def test_ulp_quantile_is_numpys_inverted_cdf(rng, q):
    r = rng.standard_normal(1000).astype(np.float32)
    c = (r + rng.standard_normal(1000).astype(np.float32) * np.float32(1e-5)).astype(np.float32)
    from convdiff.metrics import ulp_distance

    ulp = ulp_distance(r, c).astype(np.float64)
    assert ulp_quantile(r, c, q) == int(np.quantile(ulp, q, method="inverted_cdf"))


def test_ulp_quantile_reads_q_as_a_decimal():
    # 0.1 as a float is slightly above 1/10: ceil(0.1 * 10) must still be element 1, not 2.
    r = np.zeros(10, dtype=np.float32)
    c = _ulps_apart(r, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert ulp_quantile(r, c, 0.1) == 1
    assert ulp_quantile(r, c, 0.7) == 7
    assert ulp_quantile(r, c, 1.0) == 10
    with pytest.raises(ValueError):
        ulp_quantile(r, c, 0.0)


def test_nonfinite_positions_are_not_budgeted():
    r = np.float32([1.0, np.nan, np.inf, 2.0, np.inf])
    c = np.float32([1.0, 5.0, -np.inf, 2.0, np.inf])
    budget = parse_budget(["0"], ["0"], [], None)
    assert budget.check("x", "X", r, c) == []  # NaN/inf mismatches are counted elsewhere
    assert ulp_quantile(r, c, 1.0) == 0
    assert ulp_quantile(np.float32([np.nan]), np.float32([np.nan]), 0.5) == 0


def test_integer_and_half_precision_outputs():
    ints = np.array([1, 2, 3], dtype=np.int32)
    assert parse_budget(["0"], [], [], None).check("i", "I", ints, ints) == []
    assert (
        parse_budget(["0"], ["0.5"], [], None)
        .check("i", "I", ints, ints + 1)[1]
        .startswith("3 of 3 elements outside atol 0.5")
    )
    for dtype in (np.float16, ml_dtypes.bfloat16):
        r = np.array([1.0, 2.0], dtype=dtype)
        c = _ulps_apart(r, [0, 3])
        assert parse_budget(["2"], [], [], None).check("h", "H", r, c) == [
            "max ULP 3 > 2 (--max-ulp 2)"
        ]


def test_mismatched_arrays_are_a_programming_error():
    with pytest.raises(ValueError, match="equal shapes and dtypes"):
        parse_budget(["0"], [], [], None).check("x", "X", np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------- atol / rtol


@pytest.mark.parametrize(
    ("atol", "rtol"),
    [(1e-6, None), (None, 1e-6), (1e-7, 1e-6), (0.0, 0.0), (None, 3e-7), (1e-5, 1e-5)],
)
def test_tolerance_agrees_with_numpy_isclose(rng, atol, rtol):
    r = rng.standard_normal(2000).astype(np.float32)
    c = (r * (1 + rng.standard_normal(2000) * 1e-6)).astype(np.float32)
    budget = parse_budget(
        [], [] if atol is None else [str(atol)], [] if rtol is None else [str(rtol)], None
    )
    close = np.isclose(
        c.astype(np.float64), r.astype(np.float64), rtol=rtol or 0.0, atol=atol or 0.0
    )
    violations = budget.check("x", "X", r, c)
    assert (violations == []) == bool(close.all())
    if violations:
        count = int((~close).sum())
        assert violations[0].startswith(f"{count:,} of 2,000 elements outside atol")


def test_tolerance_message_and_quantile_allowance():
    r = np.float32([1.0, 1.0, 1.0, 1.0])
    c = np.float32([1.0, 1.0, 1.5, 1.25])
    budget = parse_budget([], ["0.1"], ["conv=0.1"], None)
    assert budget.check("conv", "Conv2D", r, c) == [
        "2 of 4 elements outside atol 0.1 + rtol 0.1 x |ref| (worst |diff| 0.5 where 0.2 is "
        "allowed) (--atol 0.1, --rtol conv=0.1)"
    ]
    assert budget.check("other", "Dense", r, c)[0].startswith("2 of 4 elements outside atol 0.1")
    relaxed = parse_budget([], ["0.1"], [], 0.5)
    assert relaxed.check("x", "X", r, c) == []
    tight = parse_budget([], ["0.1"], [], 0.75)
    assert tight.check("x", "X", r, c) == [
        "2 of 4 elements outside atol 0.1 + rtol 0 x |ref| (worst |diff| 0.5 where 0.1 is "
        "allowed; quantile 0.75 allows 1) (--atol 0.1)"
    ]


def test_rtol_off_override_removes_the_check():
    r = np.float32([1.0])
    c = np.float32([2.0])
    budget = parse_budget([], [], ["0", "skipme=off"], None)
    assert budget.check("skipme", "X", r, c) == []
    assert len(budget.check("other", "X", r, c)) == 1
