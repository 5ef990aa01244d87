"""Error metrics between a reference array and a candidate array.

The unit of comparison is the ULP (unit in the last place): the number of representable values
of the arrays' dtype that lie between two numbers. ULP distances are counted exactly on the bit
patterns (numpy's ``nulp_diff`` overflows for opposite signs near the float32 limits: -3e38 vs
3e38 gives 2.07e7 instead of 4,274,217,932), and NaN/inf disagreements are reported as counts
of their own instead of being folded into the ULPs.

All functions are vectorised, never overflow and never emit floating-point warnings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from convdiff.floats import FLOAT_DTYPES, float_dtype, is_float, round_to

__all__ = [
    "Comparison",
    "Worst",
    "compare",
    "identical",
    "is_identical",
    "scaled_ulp",
    "ulp_buckets",
    "ulp_distance",
    "ulp_histogram",
    "ulp_of",
    "within_bound",
    "worst_elements",
]

# bfloat16's ufuncs and casts (ml_dtypes) flag a signalling NaN as an invalid operation; the
# NaN stays NaN and is counted as one, so the functions that read arrays of any supported
# dtype run with that flag silenced.
_quiet_nans = np.errstate(invalid="ignore")


@_quiet_nans
def ulp_of(x: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    """Spacing of ``dtype`` at ``|x|``, as float64.

    Equals ``np.spacing(abs(x.astype(dtype)))`` converted to float64, including its edge cases: the
    spacing at 0 is the smallest subnormal, at the largest finite value it is inf (there is no
    larger finite neighbour), and at inf or NaN it is NaN. Works for bfloat16 through
    ``ml_dtypes.finfo`` and emits no warnings.

    Args:
        x: Values of any real dtype; they are first rounded to ``dtype``.
        dtype: One of float16, ml_dtypes.bfloat16, float32, float64.

    Returns:
        A float64 array of the same shape as ``x`` with non-negative spacings (or inf/NaN).

    Raises:
        ValueError: If ``dtype`` is not a supported float dtype.
    """
    dt = float_dtype(dtype)
    info = ml_dtypes.finfo(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        # Rounding to dtype first: a value just below a power of two may round up to it, and the
        # spacing doubles there. Every value of these dtypes is exact in float64.
        mag = np.abs(np.asarray(x).astype(dt).astype(np.float64))
    # frexp gives mag = m * 2**e with m in [0.5, 1), so the leading bit has weight 2**(e - 1).
    # Below the normal range the spacing stays at 2**(minexp - nmant), the subnormal step; frexp(0)
    # reports e = 0, so 0 is sent to that step explicitly.
    _, exp = np.frexp(mag)
    leading = np.where(mag > 0, np.maximum(exp.astype(np.int64) - 1, info.minexp), info.minexp)
    spacing = np.ldexp(1.0, leading - info.nmant)
    spacing = np.where(mag == float(info.max), np.inf, spacing)
    return np.where(np.isfinite(mag), spacing, np.nan)


def _sign_magnitude(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits a float array's bit patterns into (negative: bool, magnitude: uint64)."""
    bits = x.view(FLOAT_DTYPES[x.dtype]).astype(np.uint64)
    width = 8 * x.dtype.itemsize
    negative = (bits >> np.uint64(width - 1)) != 0
    # Clearing the sign bit leaves exponent|significand, which for IEEE floats is an integer that
    # increases by one per representable value: 0 -> smallest subnormal -> ... -> max -> inf.
    magnitude = bits & np.uint64((1 << (width - 1)) - 1)
    return negative, magnitude


@_quiet_nans
def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise ULP distance: how many representable values separate ``a`` and ``b``.

    Each bit pattern is mapped to a monotonic signed integer (sign-magnitude to two's complement:
    ord = -magnitude for negative numbers, +magnitude otherwise), and the result is
    ``|ord_a - ord_b|``. That difference is computed in uint64 without forming ``ord`` itself:
    for equal signs it is ``|mag_a - mag_b|`` (larger minus smaller), for opposite signs it is
    ``mag_a + mag_b``. Magnitudes are below 2**(w-1) for w-bit floats, so the sum is below 2**w and
    never overflows, even for float64. +0 and -0 both have magnitude 0, so their distance is 0;
    inf is one step above the largest finite value, so that distance is 1.

    Args:
        a: Float array of dtype float16, ml_dtypes.bfloat16, float32 or float64.
        b: Array of the same dtype, broadcastable against ``a``.

    Returns:
        uint64 array of the broadcast shape. Where either side is NaN the distance is 0 (NaN
        positions are reported separately by :func:`compare`).

    Raises:
        ValueError: If the dtypes differ or are not supported float dtypes.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance needs equal dtypes; received {a.dtype} and {b.dtype}")
    float_dtype(a.dtype)
    a, b = np.broadcast_arrays(a, b)
    nan = np.isnan(a) | np.isnan(b)
    if a.dtype.itemsize <= 4:
        # ordinals of <= 32-bit floats fit int64 with room for their difference
        dist = np.abs(_ordinal(a) - _ordinal(b)).astype(np.uint64)
    else:
        neg_a, mag_a = _sign_magnitude(a)
        neg_b, mag_b = _sign_magnitude(b)
        # np.where evaluates both branches; each is written so it cannot wrap around in uint64.
        same_sign = np.maximum(mag_a, mag_b) - np.minimum(mag_a, mag_b)
        dist = np.where(neg_a == neg_b, same_sign, mag_a + mag_b)
    return np.asarray(np.where(nan, np.uint64(0), dist) if nan.any() else dist)


def _ordinal(x: np.ndarray) -> np.ndarray:
    """The monotonic signed integer of each <= 32-bit float, as int64: its bit pattern as a
    signed integer for non-negative values, minus its magnitude for negative ones (-0 -> 0)."""
    width = 8 * x.dtype.itemsize
    bits = x.view(f"i{x.dtype.itemsize}")
    # In the float's own integer width, without a branch: sign = -1 for negative values, 0
    # otherwise; bits ^ (sign & max) flips the magnitude of a negative value, giving
    # -1 - magnitude, and subtracting sign adds the 1 back. -magnitude >= -(2**(w-1) - 1):
    # nothing overflows.
    sign = bits >> (width - 1)
    ordinal = bits ^ (sign & np.array(2 ** (width - 1) - 1, dtype=bits.dtype))
    ordinal -= sign
    return ordinal.astype(np.int64)


@dataclass(frozen=True)
class Worst:
    """The finite position with the largest ULP distance.

    Attributes:
        index: Position in the compared arrays (C order index tuple).
        reference: Reference value there, as float.
        candidate: Candidate value there, as float.
        ulp: ULP distance there.
        abs_err: ``|candidate - reference|`` there, computed in float64.
        bound: The error bound there, or None if no bound was given.
    """

    index: tuple[int, ...]
    reference: float
    candidate: float
    ulp: int
    abs_err: float
    bound: float | None

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (index as a list)."""
        return {
            "index": list(self.index),
            "reference": self.reference,
            "candidate": self.candidate,
            "ulp": self.ulp,
            "abs_err": self.abs_err,
            "bound": self.bound,
        }


@dataclass(frozen=True)
class Comparison:
    """Summary of the differences between a reference and a candidate array.

    ULP statistics, ``max_abs``, ``max_rel`` and ``bound_ratio`` are taken over the positions where
    both sides are finite (0 when there are none); disagreements involving NaN or inf are counted in
    ``nan_mismatch`` and ``inf_mismatch`` instead.

    Attributes:
        size: Number of elements compared.
        max_ulp: Largest ULP distance.
        mean_ulp: Mean ULP distance.
        median_ulp: Median ULP distance (linear interpolation).
        p99_ulp: 99th percentile of the ULP distance (linear interpolation).
        max_abs: Largest ``|candidate - reference|``, computed in float64.
        max_rel: Largest ``|candidate - reference| / |reference|``; where the reference is 0 the
            ratio is 0 if the candidate is 0 too, else inf.
        mismatch_count: Finite positions with a nonzero ULP distance plus NaN and inf mismatches.
        mismatch_fraction: ``mismatch_count / size`` (0.0 for an empty array).
        nan_mismatch: Positions where exactly one side is NaN.
        inf_mismatch: Positions where neither side is NaN, at least one is +-inf, and they differ.
        bound_ratio: Largest ``|candidate - reference| / bound`` (0/0 counts as 0, x/0 as inf), or
            None if no bound was given; inf where there is a NaN or inf mismatch (no bound
            covers a value against a NaN or another infinity).
        worst: The finite position with the largest ULP distance (first in C order on ties), or
            None if all finite positions are equal.
        max_ulp_scaled: Largest :func:`scaled_ulp` over the finite positions, or None if no
            ``scale`` was given.
        nan_in_reference: Of ``nan_mismatch``, the positions where the reference is the NaN.
        first_nonfinite: The first (C order) NaN or inf mismatch position, or None.
    """

    size: int
    max_ulp: int
    mean_ulp: float
    median_ulp: float
    p99_ulp: float
    max_abs: float
    max_rel: float
    mismatch_count: int
    mismatch_fraction: float
    nan_mismatch: int
    inf_mismatch: int
    bound_ratio: float | None
    worst: Worst | None
    max_ulp_scaled: float | None = None
    nan_in_reference: int = 0
    first_nonfinite: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict of plain Python ints and floats (inf may appear as float)."""
        return {
            "size": self.size,
            "max_ulp": self.max_ulp,
            "mean_ulp": self.mean_ulp,
            "median_ulp": self.median_ulp,
            "p99_ulp": self.p99_ulp,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mismatch_count": self.mismatch_count,
            "mismatch_fraction": self.mismatch_fraction,
            "nan_mismatch": self.nan_mismatch,
            "inf_mismatch": self.inf_mismatch,
            "bound_ratio": self.bound_ratio,
            "worst": None if self.worst is None else self.worst.to_dict(),
            "max_ulp_scaled": self.max_ulp_scaled,
            "nan_in_reference": self.nan_in_reference,
            "first_nonfinite": None if self.first_nonfinite is None else list(self.first_nonfinite),
        }


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` for ``num, den >= 0`` with 0/0 -> 0 and x/0 -> inf, without warnings."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = num / den  # a huge difference over a subnormal bound overflows to inf
    # The only NaNs left come from 0/0 (an exact match) or inf/inf (a float64 overflow of the
    # difference against an infinite bound, which cannot be shown to hold).
    return np.where(num == 0, 0.0, np.where(np.isnan(ratio), np.inf, ratio))


def _max_or_zero(values: np.ndarray) -> float:
    """Largest value as float, 0.0 for an empty array."""
    return float(values.max()) if values.size else 0.0


def _check_non_negative(values: Any, name: str) -> None:
    """ValueError if ``values`` (None, or an array) holds a negative number; NaN is not one
    (``np.min`` is NaN where any value is NaN)."""
    if values is not None and np.size(values) and np.min(values) < 0:
        raise ValueError(f"{name} must be non-negative")


def _prepare_bound(bound: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Broadcasts ``bound`` (checked with :func:`_check_non_negative`) to ``shape`` as float64.

    A NaN (NaN inputs reached the bounded evaluation, e.g. 0 * inf) bounds nothing: it counts
    as 0, so that any difference there fails and only an exact match passes. NaN must never
    turn into a pass.
    """
    if bound is None:
        return None
    bound64 = np.broadcast_to(np.asarray(bound, dtype=np.float64), shape)
    return np.where(np.isnan(bound64), 0.0, bound64)


def _pair(reference: Any, candidate: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as ndarrays of one supported float dtype and one shape, or ValueError."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape or reference.dtype != candidate.dtype:
        raise ValueError(
            f"{what} needs equal shapes and dtypes; received reference "
            f"{reference.shape} {reference.dtype} and candidate {candidate.shape} {candidate.dtype}"
        )
    float_dtype(reference.dtype)
    return reference, candidate


def _finite_and_nonfinite_mismatch(
    ref64: np.ndarray, cand64: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks: both sides finite; exactly one side NaN; an inf disagreement without NaN."""
    nan_ref, nan_cand = np.isnan(ref64), np.isnan(cand64)
    finite = np.isfinite(ref64) & np.isfinite(cand64)
    nan_mismatch = nan_ref != nan_cand
    # Non-finite positions without NaN hold at least one inf; equal infinities are a match.
    inf_mismatch = ~finite & ~nan_ref & ~nan_cand & (ref64 != cand64)
    return finite, nan_mismatch, inf_mismatch


@_quiet_nans
def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    bound: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> Comparison:
    """Compares a candidate array with a reference array of the same shape and dtype.

    Args:
        reference: Float array (float16, ml_dtypes.bfloat16, float32 or float64).
        candidate: Array of the same shape and dtype as ``reference``.
        bound: Optional per-element bound on ``|candidate - reference|``, float64 and
            broadcastable to the arrays' shape.
        scale: Optional per-element magnitude of the terms each value was computed from (e.g.
            ``sum |a_i b_i|`` for a dot product), broadcastable to the arrays' shape; fills
            ``max_ulp_scaled`` (see :func:`scaled_ulp`).

    Returns:
        The :class:`Comparison` of the two arrays.

    Raises:
        ValueError: If shapes or dtypes differ, the dtype is unsupported, or ``bound`` does not
            broadcast or holds negative or NaN values. These are programming errors.
    """
    reference, candidate = _pair(reference, candidate, "compare")
    compiled = _compare_compiled(reference, candidate, bound, scale)
    if compiled is not None:
        return compiled
    _check_non_negative(bound, "bound")
    _check_non_negative(scale, "scale")
    # Every figure is 0 where the two sides are equal: the work is done on the positions that
    # differ (NaN positions included), in C order; equal positions only count as zeros.
    where, ref, cand = _differing(reference, candidate)
    if (np.isnan(ref) & np.isnan(cand)).all():
        # Most layers of a good run: every position equal (+0 == -0) or NaN on both sides.
        return identical(int(reference.size), bound is not None, scale is not None)
    # Every value of the supported dtypes is exact in float64.
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    bound64 = _prepare_bound(_gather(bound, reference.shape, where), ref64.shape)
    scale64 = _prepare_bound(_gather(scale, reference.shape, where), ref64.shape)
    finite, nan_mask, inf_mask = _finite_and_nonfinite_mismatch(ref64, cand64)
    nan_mismatch = int(np.count_nonzero(nan_mask))
    inf_mismatch = int(np.count_nonzero(inf_mask))
    # equal positions holding an infinity are not finite: they count in no statistic
    equal_infinities = int(np.count_nonzero(np.isinf(reference))) - int(
        np.count_nonzero(np.isinf(ref64))
    )
    equal_finite = int(reference.size) - where.size - equal_infinities

    nonfinite = nan_mask | inf_mask
    first_nonfinite = (
        tuple(int(j) for j in np.unravel_index(int(where[np.argmax(nonfinite)]), reference.shape))
        if nonfinite.any()
        else None
    )
    ulp = np.where(finite, ulp_distance(ref, cand), np.uint64(0))
    ulp_finite = ulp[finite]
    abs_err = _abs_err(ref64, cand64)
    abs_finite = abs_err[finite]
    size = int(reference.size)
    mismatch_count = int(np.count_nonzero(ulp_finite)) + nan_mismatch + inf_mismatch
    max_ulp = int(ulp_finite.max()) if ulp_finite.size else 0
    median, p99 = _percentiles_with_zeros(ulp_finite, equal_finite, (50, 99))
    count = equal_finite + ulp_finite.size
    return Comparison(
        size=size,
        max_ulp=max_ulp,
        mean_ulp=float(ulp_finite.sum(dtype=np.float64)) / count if count else 0.0,
        median_ulp=median,
        p99_ulp=p99,
        max_abs=_max_or_zero(abs_finite),
        max_rel=_max_or_zero(_safe_ratio(abs_finite, np.abs(ref64[finite]))),
        mismatch_count=mismatch_count,
        mismatch_fraction=mismatch_count / size if size else 0.0,
        nan_mismatch=nan_mismatch,
        inf_mismatch=inf_mismatch,
        bound_ratio=_bound_ratio(
            bound64, first_nonfinite, lambda b: _max_or_zero(_safe_ratio(abs_finite, b[finite]))
        ),
        worst=_worst(ulp, ref64, cand64, abs_err, bound64, where, reference.shape)
        if max_ulp > 0
        else None,
        max_ulp_scaled=None
        if scale64 is None
        else _max_or_zero(_scaled_ulp64(ref64, cand64, scale64, reference.dtype, abs_err)[finite]),
        nan_in_reference=int(np.count_nonzero(nan_mask & np.isnan(ref64))),
        first_nonfinite=first_nonfinite,
    )


def _bound_ratio(
    bound: np.ndarray | None,
    first_nonfinite: Any,
    finite_ratio: Callable[[np.ndarray], float],
) -> float | None:
    """The largest |difference| / bound: None without a bound; infinite where a NaN or infinity
    stands against a number (no rounding explains it); else ``finite_ratio(bound)``, over the
    positions where both sides are finite, from the bound."""
    if bound is None:
        return None
    return math.inf if first_nonfinite is not None else finite_ratio(bound)


def _kernels() -> Any:
    """The compiled kernels (:mod:`convdiff._compiled_metrics`, called through
    :mod:`convdiff.native`), or None without numba or with ``CONVDIFF_NUMBA=0``:
    :func:`compare` and :func:`max_ulp_distance` then take NumPy."""
    from convdiff import accel, native

    return native if accel.enabled() else None


def _flat_float64(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``values`` broadcast to ``shape``, flat and contiguous in float64; empty for None; one
    element for one value repeated (a bound of zeros that takes no memory is not written
    out: the kernel reads that element for every position)."""
    if values is None:
        return np.empty(0)
    spread = np.broadcast_to(np.asarray(values, np.float64), shape)
    if spread.size > 1 and not any(spread.strides):
        return np.array([spread.flat[0]])
    return np.ascontiguousarray(spread).reshape(-1)


def _value_at(values: np.ndarray, i: int) -> float:
    """Element ``i`` of a :func:`_flat_float64` array (its one element if it has one)."""
    return float(values[i if values.size > 1 else 0])


def _bits(x: np.ndarray) -> np.ndarray:
    """A flat float32 or float64 array's bit patterns as signed integers of its width."""
    return x.view(f"i{x.dtype.itemsize}")


def _compare_compiled(
    reference: np.ndarray, candidate: np.ndarray, bound: Any, scale: Any
) -> Comparison | None:
    """:func:`compare` in one compiled pass (float32 and float64 arrays), the same figures bit
    for bit; None where it does not apply."""
    kernels = _kernels()
    if kernels is None or reference.dtype not in _COMPILED:
        return None
    shape, size = reference.shape, int(reference.size)
    ref, cand = np.ravel(reference), np.ravel(candidate)
    bound64, scale64 = _flat_float64(bound, shape), _flat_float64(scale, shape)
    ulps = np.empty(size, np.uint64)
    info = ml_dtypes.finfo(reference.dtype)
    counts = np.zeros(_COUNTED_ULPS + 1, np.int64)
    figures = _differences(
        kernels, ref, cand, bound64, scale64, (info.nmant, info.minexp), (ulps, counts)
    )
    n_diff, both_nan, equal_inf, n_finite, max_ulp, worst_at = figures[:6]
    max_abs, max_rel, max_ratio, max_scaled = figures[6:10]
    nan_mismatch, inf_mismatch, nan_in_ref, first_at, negative_bound, negative_scale = figures[10:]
    if negative_bound or negative_scale:
        raise ValueError(f"{'bound' if negative_bound else 'scale'} must be non-negative")
    if n_diff == both_nan:
        return identical(size, bound is not None, scale is not None)
    equal_finite = size - n_diff - equal_inf
    ulp_finite = ulps[:n_finite]
    median, p99 = _percentiles_with_zeros(ulp_finite, equal_finite, (50, 99), counts)
    count = equal_finite + n_finite
    mismatch_count = n_finite + nan_mismatch + inf_mismatch
    first_nonfinite = None if first_at < 0 else _index(first_at, shape)
    worst = None
    if max_ulp > 0:
        r, c = float(ref[worst_at]), float(cand[worst_at])
        # a NaN bound counts as 0, as on the NumPy path (an infinite one stays infinite)
        limit = None if bound is None else _value_at(bound64, worst_at)
        limit = 0.0 if limit is not None and math.isnan(limit) else limit
        worst = Worst(_index(worst_at, shape), r, c, int(max_ulp), abs(c - r), limit)
    return Comparison(
        size=size,
        max_ulp=int(max_ulp),
        mean_ulp=float(ulp_finite.sum(dtype=np.float64)) / count if count else 0.0,
        median_ulp=median,
        p99_ulp=p99,
        max_abs=max_abs,
        max_rel=max_rel,
        mismatch_count=mismatch_count,
        mismatch_fraction=mismatch_count / size if size else 0.0,
        nan_mismatch=nan_mismatch,
        inf_mismatch=inf_mismatch,
        bound_ratio=_bound_ratio(bound, first_nonfinite, lambda _: max_ratio),
        worst=worst,
        max_ulp_scaled=None if scale is None else max_scaled,
        nan_in_reference=nan_in_ref,
        first_nonfinite=first_nonfinite,
    )


# ULP distances below which compare counts how many there are of each (for the percentiles)
_COUNTED_ULPS = 4096
# Elements below which compare's pass is not split between cores
_PARALLEL_ELEMENTS = 1 << 18


def _differences(kernels, ref, cand, bound64, scale64, precision, outputs) -> tuple:
    """The kernel's figures of the whole arrays (see _compiled_metrics.differences), its pass
    split between the cores: parts in C order, their figures merged (sums, maxima, the first
    position of the largest ULP distance and of a NaN or inf mismatch), each part's ULP
    distances moved up behind the previous part's, so that they stay in C order, and their
    counts of ULP distances added up. ``outputs``: the ULP distances and their counts."""
    from convdiff import accel

    ulps, counts = outputs
    parts = accel.split(ref.size, _PARALLEL_ELEMENTS)
    tallies = [counts] + [np.zeros_like(counts) for _ in parts[1:]]
    refs, cands = _bits(ref), _bits(cand)

    def piece(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return x[lo:hi] if x.size > 1 else x

    calls = [
        (
            ref[lo:hi],
            cand[lo:hi],
            refs[lo:hi],
            cands[lo:hi],
            piece(bound64, lo, hi),
            piece(scale64, lo, hi),
            *precision,
            ulps[lo:hi],
            tally,
        )
        for (lo, hi), tally in zip(parts, tallies, strict=True)
    ]
    figures = accel.in_parallel(kernels.differences, calls)
    if len(figures) == 1:
        return figures[0]
    for tally in tallies[1:]:
        counts += tally
    written = 0
    for (lo, _), part in zip(parts, figures, strict=True):
        ulps[written : written + part[3]] = ulps[lo : lo + part[3]]
        written += part[3]
    max_ulp = max(part[4] for part in figures)
    worst_at = next(
        (part[5] + lo for (lo, _), part in zip(parts, figures, strict=True) if part[4] == max_ulp),
        -1,
    )
    nonfinite = [
        part[13] + lo for (lo, _), part in zip(parts, figures, strict=True) if part[13] >= 0
    ]
    total = [sum(part[i] for part in figures) for i in range(4)]
    largest = [max(part[i] for part in figures) for i in (6, 7, 8, 9)]
    counts = [sum(part[i] for part in figures) for i in (10, 11, 12)]
    flags = [any(part[i] for part in figures) for i in (14, 15)]
    first = nonfinite[0] if nonfinite else -1
    return (*total, max_ulp, worst_at, *largest, *counts, first, *flags)


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(j) for j in np.unravel_index(int(flat), shape))


# dtypes compare and max_ulp_distance run compiled
_COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    bound: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> Comparison:
    """:func:`compare` for layer outputs of any dtype: float outputs with their ``bound`` and
    ``scale``; integer and boolean outputs (argmax, masks) as float64 values (exact below
    2**53), where a difference is one of value, not of rounding: no bound applies."""
    if is_float(reference.dtype):
        return compare(reference, candidate, bound, scale=scale)
    return compare(reference.astype(np.float64), candidate.astype(np.float64))


def _differing(
    reference: np.ndarray, candidate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat (C order) positions where the two arrays differ (NaN included), and both
    arrays' values there."""
    flat_ref, flat_cand = reference.reshape(-1), candidate.reshape(-1)
    with np.errstate(invalid="ignore"):
        where = np.flatnonzero(flat_ref != flat_cand)
    return where, flat_ref[where], flat_cand[where]


def _gather(values: Any, shape: tuple[int, ...], where: np.ndarray) -> Any:
    """``values`` (broadcastable to ``shape``) at the flat positions ``where``, or None."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    if values.shape == shape:
        return values.reshape(-1)[where]
    return np.broadcast_to(values, shape)[np.unravel_index(where, shape)]


def _percentiles_with_zeros(
    values: np.ndarray, zeros: int, qs: tuple[float, ...], counts: np.ndarray | None = None
) -> list[float]:
    """``np.percentile`` (linear interpolation) of ``values`` together with ``zeros`` more
    zeros, without building that array. ``values`` are non-negative integers; only the ranks
    asked for are selected, not the whole array sorted: read off ``counts`` (how many values
    are 0, 1, ..., the last element counting those of its index and more) where they fall
    below its last index, else selected with ``np.partition``."""
    n = zeros + values.size
    if n == 0:
        return [0.0 for _ in qs]
    ranks = {}
    for q in qs:
        low = math.floor(q / 100 * (n - 1))
        ranks[low] = ranks[min(low + 1, n - 1)] = 0.0
    wanted = sorted(r - zeros for r in ranks if r >= zeros)
    if wanted:
        ranks.update({r + zeros: v for r, v in _select(values, wanted, counts).items()})
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        low = math.floor(position)
        high = min(low + 1, n - 1)
        out.append(ranks[low] + (ranks[high] - ranks[low]) * (position - low))
    return out


def _select(values: np.ndarray, ranks: list[int], counts: np.ndarray | None) -> dict[int, float]:
    """The values at ``ranks`` (ascending) of ``values`` sorted: from the ``counts`` of the
    small values where the rank falls among them (the same integers), the others by
    ``np.partition`` of the values beyond."""
    if counts is None:
        selected = np.partition(values, ranks)
        return {r: float(selected[r]) for r in ranks}
    top = counts.size - 1
    below = np.cumsum(counts[:top])  # below[v]: how many values are at most v
    small = int(below[-1]) if top else 0
    found = {r: float(np.searchsorted(below, r, side="right")) for r in ranks if r < small}
    beyond = [r - small for r in ranks if r >= small]
    if beyond:
        large = np.partition(values[values >= top], beyond)
        found.update({r + small: float(large[r]) for r in beyond})
    return found


def identical(size: int, bounded: bool, scaled: bool) -> Comparison:
    """The comparison of two arrays equal at every position (what :func:`compare` returns
    for them, with or without a bound and a terms' scale)."""
    return Comparison(
        size=size,
        max_ulp=0,
        mean_ulp=0.0,
        median_ulp=0.0,
        p99_ulp=0.0,
        max_abs=0.0,
        max_rel=0.0,
        mismatch_count=0,
        mismatch_fraction=0.0,
        nan_mismatch=0,
        inf_mismatch=0,
        bound_ratio=0.0 if bounded else None,
        worst=None,
        max_ulp_scaled=0.0 if scaled else None,
    )


@_quiet_nans
def max_ulp_distance(reference: np.ndarray, candidate: np.ndarray) -> int:
    """The largest ULP distance over positions where both sides are finite (0 if none)."""
    reference, candidate = _pair(reference, candidate, "max_ulp_distance")
    kernels = _kernels()
    if kernels is not None and reference.dtype in _COMPILED:
        ref, cand = np.ravel(reference), np.ravel(candidate)
        return int(kernels.max_ulp(ref, cand, _bits(ref), _bits(cand)))
    _, ref, cand = _differing(reference, candidate)  # only differing positions have a distance
    finite = np.isfinite(ref) & np.isfinite(cand)
    if not finite.all():
        ref, cand = ref[finite], cand[finite]
    return int(ulp_distance(ref, cand).max()) if ref.size else 0


def max_ulp_from_reference(reference: np.ndarray, outputs: Sequence[np.ndarray]) -> list[int]:
    """:func:`max_ulp_distance` of each of one or two ``outputs`` (of one float dtype and
    shape) from the float64 ``reference`` correctly rounded to their dtype (the three-way
    figures); compiled for float32 and float64, one pass over the three arrays that rounds
    each reference value as it reads it, split between the cores."""
    dtype = outputs[0].dtype
    kernels = _kernels()
    if kernels is None or dtype not in _COMPILED or len(outputs) > 2:
        exact = round_to(reference, dtype)
        return [max_ulp_distance(exact, out) for out in outputs]
    from convdiff import accel

    ref = np.ravel(np.asarray(reference, np.float64))
    first = np.ravel(outputs[0])
    second = np.ravel(outputs[1]) if len(outputs) > 1 else np.empty(0, dtype)
    if first.shape != ref.shape or second.size not in (0, ref.size) or second.dtype != dtype:
        raise ValueError("the outputs must have the reference's size and one dtype")

    def piece(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return x[lo:hi] if x.size > 1 else x

    calls = [
        (
            ref[lo:hi],
            first[lo:hi],
            piece(second, lo, hi),
            _bits(first)[lo:hi],
            piece(_bits(second), lo, hi),
        )
        for lo, hi in accel.split(ref.size, _PARALLEL_ELEMENTS)
    ]
    parts = accel.in_parallel(kernels.rounded_max_ulp, calls)
    return [int(max(p[k] for p in parts)) for k in range(len(outputs))]


def mismatches(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
    """``(max_ulp, mismatch_count)`` of :func:`compare_outputs`, without its other figures
    (what ``--order all`` ranks its orders by): one compiled pass for float32 and float64
    arrays, split between the cores."""
    kernels = _kernels()
    if kernels is None or reference.dtype not in _COMPILED or reference.shape != candidate.shape:
        c = compare_outputs(reference, candidate)
        return c.max_ulp, c.mismatch_count
    reference, candidate = _pair(reference, candidate, "mismatches")
    from convdiff import accel

    ref, cand = np.ravel(reference), np.ravel(candidate)
    refs, cands = _bits(ref), _bits(cand)
    calls = [
        (ref[lo:hi], cand[lo:hi], refs[lo:hi], cands[lo:hi])
        for lo, hi in accel.split(ref.size, _PARALLEL_ELEMENTS)
    ]
    parts = accel.in_parallel(kernels.mismatches, calls)
    return int(max(p[0] for p in parts)), sum(int(p[1]) for p in parts)


def _abs_err(ref64: np.ndarray, cand64: np.ndarray) -> np.ndarray:
    """``|cand64 - ref64|`` without warnings (NaN or inf where a side is not finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        # One rounding in float64 (relative error 2**-53), far below the ULP of <= 32-bit inputs.
        # It overflows to inf only for float64 inputs of opposite sign near the limits; inf - inf
        # gives NaN at non-finite positions, which callers mask out.
        return np.abs(cand64 - ref64)


def _worst(
    ulp: np.ndarray,
    ref64: np.ndarray,
    cand64: np.ndarray,
    abs_err: np.ndarray,
    bound64: np.ndarray | None,
    where: np.ndarray,
    shape: tuple[int, ...],
) -> Worst:
    """Builds the Worst record at the first (C order) maximum of ``ulp`` (zero where not
    finite), over the differing positions ``where`` (flat, ascending) of an array of ``shape``."""
    # argmax returns the first occurrence of the maximum, and ``where`` is in C order.
    i = int(np.argmax(ulp))
    index = tuple(int(j) for j in np.unravel_index(int(where[i]), shape))
    return Worst(
        index=index,
        reference=float(ref64[i]),
        candidate=float(cand64[i]),
        ulp=int(ulp[i]),
        abs_err=float(abs_err[i]),
        bound=None if bound64 is None else float(bound64[i]),
    )


def is_identical(c: Comparison) -> bool:
    """True if every position matches bit for bit up to +0/-0 and NaN payloads.

    Positions where both sides are NaN, or both are the same infinity, count as equal.

    Args:
        c: A comparison from :func:`compare`.

    Returns:
        Whether ``max_ulp`` is 0 and there are no NaN or inf mismatches.
    """
    return c.max_ulp == 0 and c.nan_mismatch == 0 and c.inf_mismatch == 0


def describe_nonfinite(c: Comparison, candidate: str, reference: str = "Keras") -> str | None:
    """The NaN and inf mismatches in words, e.g. ``"1 NaN from NumPy where Keras has a
    number, first at [0, 5, 7, 3]"``; None when there are none.

    Args:
        c: A comparison from :func:`compare`.
        candidate: What the candidate side is called (``NumPy``, a user's function...).
        reference: What the reference side is called.
    """
    if c.first_nonfinite is None:
        return None
    nan_candidate = c.nan_mismatch - c.nan_in_reference
    parts = [
        f"{nan_candidate:,} NaN from {candidate} where {reference} has a number"
        if nan_candidate
        else "",
        f"{c.nan_in_reference:,} NaN from {reference} where {candidate} has a number"
        if c.nan_in_reference
        else "",
        f"{c.inf_mismatch:,} infinities that differ between the two" if c.inf_mismatch else "",
    ]
    return f"{'; '.join(p for p in parts if p)}, first at {list(c.first_nonfinite)}"


def within_bound(c: Comparison) -> bool:
    """True if a bound was given and every finite difference stays within it.

    Args:
        c: A comparison from :func:`compare`.

    Returns:
        Whether there are no NaN or inf mismatches and ``bound_ratio`` is at most 1.
    """
    return (
        c.nan_mismatch == 0
        and c.inf_mismatch == 0
        and c.bound_ratio is not None
        and c.bound_ratio <= 1.0
    )


@_quiet_nans
def scaled_ulp(
    reference: np.ndarray, candidate: np.ndarray, scale: np.ndarray, dtype: DTypeLike
) -> np.ndarray:
    """Each difference in units in the last place of the magnitude of its terms.

    A dot product's rounding error is proportional to ``sum |a_i b_i|``, not to the result: an
    output that is a small difference of large terms (0.0071908 vs 0.0071906 in a 3x3
    convolution) is ~500 float32 ULPs apart at 0.0072, yet under one ULP of its terms. This
    divides ``|candidate - reference|`` by the spacing of ``dtype``'s precision at
    ``max(scale, |reference|, |candidate|)``: the values themselves are included because every
    rounding step, including ones after the reduction (bias, activation), errs relative to the
    value it rounds. For a layer without a reduction, pass ``scale=0`` and the result is about
    the raw ULP distance (within a factor of two across a power of two).

    The spacing is ``2**(e - p + 1)`` for the magnitude's binade ``2**e`` and ``dtype``'s
    ``p``-bit significand, never below the smallest subnormal and not capped at ``dtype``'s
    largest value (the terms' magnitude may exceed the range of the result's dtype).

    Args:
        reference: Float array.
        candidate: Array of the same shape and dtype.
        scale: Non-negative float64 magnitudes, broadcastable to the arrays' shape.
        dtype: The precision the ULP is taken in (usually the arrays' dtype).

    Returns:
        A float64 array of the arrays' shape: 0 where equal, NaN where a side is not finite; a
        NaN scale counts as 0 (no credit for the terms' size).

    Raises:
        ValueError: On mismatched arrays or an unsupported dtype.
    """
    reference, candidate = _pair(reference, candidate, "scaled_ulp")
    scale64 = np.broadcast_to(np.asarray(scale, dtype=np.float64), reference.shape)
    return _scaled_ulp64(reference.astype(np.float64), candidate.astype(np.float64), scale64, dtype)


def _scaled_ulp64(
    ref64: np.ndarray,
    cand64: np.ndarray,
    scale64: np.ndarray,
    dtype: DTypeLike,
    diff: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`scaled_ulp` of arrays already in float64 (``diff``: ``|cand64 - ref64|`` when
    the caller has it)."""
    info = ml_dtypes.finfo(float_dtype(dtype))
    finite = np.isfinite(ref64) & np.isfinite(cand64)
    with np.errstate(all="ignore"):
        # fmax skips a NaN: a NaN magnitude (NaN inputs) gives no credit for large terms, the
        # value's own ULP is used
        mag = np.fmax(scale64, np.abs(ref64))
        np.fmax(mag, np.abs(cand64), out=mag)
        diff = _abs_err(ref64, cand64) if diff is None else diff
        # frexp: mag = m * 2**e with m in [0.5, 1), so the leading bit weighs 2**(e - 1), and
        # the spacing 2**(e - 1 - nmant) is never below the subnormal step. Dividing by a
        # power of two is ldexp (the same rounding); mag = 0 gives e = 0, but then diff = 0.
        _, exp = np.frexp(mag)
        ratio = np.ldexp(diff, info.nmant - np.maximum(exp - 1, info.minexp))
    # An infinite magnitude (an infinite scale) has an infinite spacing: a finite difference
    # is 0 of it, a float64 difference overflowing to inf stays inf.
    infinite_mag = np.isinf(mag)
    if infinite_mag.any():
        ratio = np.where(infinite_mag, np.where(np.isinf(diff), np.inf, 0.0), ratio)
    return ratio if finite.all() else np.where(finite, ratio, np.nan)


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Number of significant bits of each uint64 (0 for 0), exactly: smear the highest set bit
    into every lower bit, then count the ones."""
    x = x.astype(np.uint64)
    for shift in (1, 2, 4, 8, 16, 32):
        x = x | (x >> np.uint64(shift))
    return np.bitwise_count(x).astype(np.int64)


def _bucket_label(bucket: int) -> str:
    if bucket <= 1:
        return str(bucket)
    return f"{2 ** (bucket - 1)}-{2**bucket - 1}"


@_quiet_nans
def ulp_histogram(reference: np.ndarray, candidate: np.ndarray) -> list[tuple[str, int]]:
    """The distribution of ULP distances in power-of-two buckets.

    Buckets are ``"0"``, ``"1"``, ``"2-3"``, ``"4-7"``, ``"8-15"``, ... up to the one holding the
    largest distance, every bucket in between listed (with count 0 if empty), and a last
    ``"nan/inf"`` bucket for NaN and inf mismatches when there are any. Positions where both
    sides are NaN, or the same infinity, count in ``"0"``, so the counts add up to the size.

    Args:
        reference: Float array.
        candidate: Array of the same shape and dtype.

    Returns:
        ``[(label, count), ...]`` in increasing order of distance.

    Raises:
        ValueError: On mismatched arrays or an unsupported dtype.
    """
    reference, candidate = _pair(reference, candidate, "ulp_histogram")
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    finite, nan_mask, inf_mask = _finite_and_nonfinite_mismatch(ref64, cand64)
    ulp = ulp_distance(reference, candidate)[finite]
    nonfinite = int(np.count_nonzero(nan_mask | inf_mask))
    return ulp_buckets(ulp, int(reference.size - ulp.size - nonfinite), nonfinite)


def ulp_buckets(ulp: np.ndarray, zeros: int = 0, nonfinite: int = 0) -> list[tuple[str, int]]:
    """ULP distances counted in :func:`ulp_histogram`'s power-of-two buckets.

    Args:
        ulp: ULP distances (uint64) of finite pairs.
        zeros: more distances of 0 (equal positions not in ``ulp``).
        nonfinite: NaN and inf mismatches (a last ``"nan/inf"`` bucket when nonzero).
    """
    # Bucket b >= 1 holds [2**(b-1), 2**b - 1]: exactly the distances with bit length b.
    counts = np.bincount(_bit_length(ulp), minlength=1).tolist()
    counts[0] += zeros
    histogram = [(_bucket_label(b), int(n)) for b, n in enumerate(counts)]
    if nonfinite:
        histogram.append(("nan/inf", nonfinite))
    return histogram


@_quiet_nans
def worst_elements(
    reference: np.ndarray,
    candidate: np.ndarray,
    k: int,
    bound: np.ndarray | None = None,
    exact: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` positions where the two arrays differ most, worst first.

    NaN and inf mismatches rank first (their ``ulp`` is None), then finite positions by
    decreasing ULP distance; ties keep C order. Equal positions are never listed, so fewer than
    ``k`` records come back when fewer positions differ.

    Args:
        reference: Float array (e.g. Keras's output).
        candidate: Array of the same shape and dtype (e.g. the NumPy side's).
        k: How many positions at most; ``k >= 0``.
        bound: Optional per-element bound on ``|candidate - reference|`` (as for :func:`compare`).
        exact: Optional correctly rounded values, broadcastable to the arrays' shape.

    Returns:
        JSON-ready dicts with the keys of :meth:`Worst.to_dict` (``index``, ``reference``,
        ``candidate``, ``ulp``, ``abs_err``, ``bound``) plus ``exact`` (None if not given) and
        ``bound_ratio`` (``abs_err / bound``, None without a bound).

    Raises:
        ValueError: On mismatched arrays, a negative ``k`` or an invalid bound.
    """
    reference, candidate = _pair(reference, candidate, "worst_elements")
    ref_shape = reference.shape
    if k < 0:
        raise ValueError(f"k must be >= 0; received k={k}")
    _check_non_negative(bound, "bound")
    bound64 = _prepare_bound(bound, reference.shape)
    exact64 = None if exact is None else np.broadcast_to(np.asarray(exact, np.float64), ref_shape)
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    finite, nan_mask, inf_mask = _finite_and_nonfinite_mismatch(ref64, cand64)
    nonfinite = nan_mask | inf_mask
    ulp = np.where(finite, ulp_distance(reference, candidate), np.uint64(0))
    abs_err = np.where(nonfinite, np.inf, _abs_err(ref64, cand64))
    records = []
    for i in _top_k(ulp.ravel(), nonfinite.ravel(), k).tolist():
        index = tuple(int(j) for j in np.unravel_index(i, reference.shape))
        limit = None if bound64 is None else float(bound64[index])
        err = float(abs_err[index])
        records.append(
            {
                "index": list(index),
                "reference": float(ref64[index]),
                "candidate": float(cand64[index]),
                "ulp": None if nonfinite[index] else int(ulp[index]),
                "abs_err": err,
                "bound": limit,
                "bound_ratio": None
                if limit is None
                else float(_safe_ratio(np.float64(err), np.float64(limit))),
                "exact": None if exact64 is None else float(exact64[index]),
            }
        )
    return records


def _top_k(ulp: np.ndarray, nonfinite: np.ndarray, k: int) -> np.ndarray:
    """Flat positions of the ``k`` worst differing elements, worst first, ties in C order."""
    # Sort key, ascending = worse: ~ulp reverses the order of the distances (which stay below
    # 2**64 - 1, so ~ulp >= 1), and 0 puts the non-finite mismatches first.
    key = np.where(nonfinite, np.uint64(0), ~ulp)
    flat = np.flatnonzero(nonfinite | (ulp > 0))
    if k == 0:
        return flat[:0]
    if k < flat.size:
        # Keep everything up to the k-th smallest key (ties included), then sort only those.
        kth = np.partition(key[flat], k - 1)[k - 1]
        flat = flat[key[flat] <= kth]
    return flat[np.argsort(key[flat], kind="stable")][:k]
