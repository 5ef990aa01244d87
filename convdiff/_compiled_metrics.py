"""numba kernels of :mod:`convdiff.metrics` (importing this module needs numba).

:func:`convdiff.metrics.compare` of a layer's two outputs takes some sixty NumPy passes over the
positions that differ (masks, gathers, conversions, ratios, each a pass of its own), and most
positions of a layer whose summation order differs from TensorFlow's do differ. Here one pass
over the arrays computes, per position, exactly what the NumPy code computes (the same IEEE
operations on the same values: float64 differences and quotients, ``frexp``/``ldexp``), and
keeps the counts, the maxima and the first positions; the ULP distances of the differing finite
positions are written out in C order for the percentiles and the mean, which
:mod:`convdiff.metrics` then takes with NumPy as before. The tests compare every figure with
the NumPy path's, bit for bit, on arrays full of NaN, infinities, signed zeros and subnormals.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(inline="always")
def _ulp(r_bits, c_bits, magnitude_mask):
    """ULP distance of two floats from their sign-extended bit patterns: the difference of
    the magnitudes for equal signs, their sum for opposite signs (as metrics.ulp_distance).
    Both are computed and one selected: a branch on the order of the magnitudes is
    mispredicted half the time (magnitudes are below 2**63: their difference fits int64)."""
    mr = r_bits & magnitude_mask
    mc = c_bits & magnitude_mask
    apart = np.uint64(abs(mr - mc))
    across = np.uint64(mr) + np.uint64(mc)
    return apart if (r_bits < 0) == (c_bits < 0) else across


@numba.njit(inline="always")
def _safe_ratio(num, den):
    """metrics._safe_ratio of one pair: 0/0 -> 0, x/0 -> inf, NaN -> inf (the quotient is
    computed either way and the case selected, without a branch)."""
    ratio = num / den
    ratio = np.inf if ratio != ratio else ratio
    return 0.0 if num == 0 else ratio


@numba.njit(inline="always")
def _scaled(r, c, scale, diff, nmant, minexp, word, bits):
    """metrics._scaled_ulp64 of one finite differing pair: ``diff`` in ULPs of the largest of
    the scale and the two values (``scale`` has no NaN). ``word``/``bits`` are one float64 and
    its int64 view, to read and make bit patterns.

    ``frexp`` and ``ldexp`` from their definitions (the calls cost more than the rest of the
    pass): the magnitude is positive (the values differ), so its leading bit weighs
    ``2**(biased exponent - 1023)`` (below the normal range the clamp to ``minexp`` decides);
    ``diff * 2**n`` is the one rounding of the exact scaled value that ``ldexp`` gives when
    ``2**n`` is a float64 number, and for ``n > 1023`` (a magnitude below ``2**-1021``, so a
    result below ``2**54``) two exact scalings.
    """
    mag = max(scale, abs(r))
    mag = max(mag, abs(c))
    if math.isinf(mag):
        return np.inf if math.isinf(diff) else 0.0
    word[0] = mag
    leading = max(np.int64(bits[0] >> 52) - 1023, minexp)
    n = nmant - leading
    if n > 1023:
        half = n // 2
        return diff * _power_of_two(half, word, bits) * _power_of_two(n - half, word, bits)
    return diff * _power_of_two(n, word, bits)


@numba.njit(inline="always")
def _power_of_two(n, word, bits):
    """``2.0**n`` for ``-1022 <= n <= 1023``, from its bit pattern."""
    bits[0] = np.int64(n + 1023) << 52
    return word[0]


# Elements per block: a block where every position is equal is only counted
_BLOCK = 64


@numba.njit(nogil=True, error_model="numpy")
def differences(ref, cand, r_bits, c_bits, bound, scale, nmant, minexp, ulps, counts, word):
    """One pass over flat ``ref`` and ``cand`` (float32 or float64; ``r_bits``/``c_bits`` their
    bit patterns as signed integers of the same width). ``bound`` and ``scale`` are float64
    arrays of the same size, or of one element that holds for every position, or empty when
    absent; their NaN count as 0.

    Writes the ULP distances of the differing positions where both sides are finite into
    ``ulps`` (in C order), adds how many of them are 0, 1, ... to ``counts`` (int64; its last
    element counts those of its length - 1 and more, for the percentiles) and returns, as
    float64 in this order: positions that differ, differing positions NaN on both sides,
    equal infinite positions, finite differing positions (the count written), the largest
    ULP distance, its first position, the largest ``|cand - ref|``, relative error, bound
    ratio and scaled ULP distance over the finite differing positions, NaN mismatches, inf
    mismatches, NaN mismatches with NaN in ``ref``, the first NaN or inf mismatch (-1 if
    none), and whether ``bound`` holds a negative number, and ``scale``. ``word`` is one float64
    of scratch (the kernel allocates nothing: its machine code runs without numba's runtime).

    Blocks of :data:`_BLOCK` positions all equal are only counted (a vectorised comparison).
    """
    magnitude_mask = (1 << (8 * ref.itemsize - 1)) - 1
    has_bound, has_scale = bound.size > 0, scale.size > 0
    # where each reads position i: i * step (0: one element for every position)
    bound_step, scale_step = int(bound.size > 1), int(scale.size > 1)
    top = np.uint64(counts.size - 1)
    negative_bound = negative_scale = False
    n_diff = both_nan = equal_inf = n_finite = 0
    nan_mismatch = inf_mismatch = nan_in_ref = 0
    max_ulp = np.uint64(0)
    worst = first_nonfinite = -1
    max_abs = max_rel = max_ratio = max_scaled = 0.0
    bits = word.view(np.int64)
    for b in bound:
        negative_bound |= b < 0
    for s in scale:
        negative_scale |= s < 0
    for lo in range(0, ref.size, _BLOCK):
        hi = min(lo + _BLOCK, ref.size)
        if _equal(ref, cand, lo, hi):
            for i in range(lo, hi):
                equal_inf += math.isinf(ref[i])
            continue
        for i in range(lo, hi):
            r, c = np.float64(ref[i]), np.float64(cand[i])
            if r == c:
                equal_inf += math.isinf(r)
                continue
            n_diff += 1
            if not (math.isfinite(r) & math.isfinite(c)):
                r_nan, c_nan = r != r, c != c
                if r_nan and c_nan:
                    both_nan += 1
                    continue
                # NaN on one side only, or an infinity against anything else
                nan_mismatch += r_nan or c_nan
                inf_mismatch += not (r_nan or c_nan)
                nan_in_ref += r_nan
                if first_nonfinite < 0:
                    first_nonfinite = i
                continue
            ulp = _ulp(np.int64(r_bits[i]), np.int64(c_bits[i]), magnitude_mask)
            ulps[n_finite] = ulp
            n_finite += 1
            counts[min(ulp, top)] += 1
            if ulp > max_ulp:
                max_ulp, worst = ulp, i
            diff = abs(c - r)
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, _safe_ratio(diff, abs(r)))
            if has_bound:
                limit = bound[i * bound_step]
                max_ratio = max(max_ratio, _safe_ratio(diff, 0.0 if limit != limit else limit))
            if has_scale:
                terms = scale[i * scale_step]
                terms = 0.0 if terms != terms else terms
                scaled = _scaled(r, c, terms, diff, nmant, minexp, word, bits)
                max_scaled = max(max_scaled, scaled)
    return (
        n_diff,
        both_nan,
        equal_inf,
        n_finite,
        max_ulp,
        worst,
        max_abs,
        max_rel,
        max_ratio,
        max_scaled,
        nan_mismatch,
        inf_mismatch,
        nan_in_ref,
        first_nonfinite,
        negative_bound,
        negative_scale,
    )


@numba.njit(inline="always")
def _equal(ref, cand, lo, hi):
    """Whether every position of ``[lo, hi)`` is equal (+0 and -0 too; a NaN is not)."""
    same = True
    for i in range(lo, hi):
        same &= ref[i] == cand[i]
    return same


@numba.njit(nogil=True)
def max_ulp(ref, cand, r_bits, c_bits):
    """The largest ULP distance over the positions where both sides are finite (0 if none)."""
    magnitude_mask = (1 << (8 * ref.itemsize - 1)) - 1
    largest = np.uint64(0)
    for i in range(ref.size):
        r, c = ref[i], cand[i]
        if r == c or not (math.isfinite(r) and math.isfinite(c)):
            continue
        largest = max(largest, _ulp(np.int64(r_bits[i]), np.int64(c_bits[i]), magnitude_mask))
    return largest


@numba.njit(nogil=True)
def mismatches(ref, cand, r_bits, c_bits):
    """``(largest ULP distance over the positions where both sides are finite, positions that
    differ other than both NaN)``: compare's ``max_ulp`` and ``mismatch_count``."""
    magnitude_mask = (1 << (8 * ref.itemsize - 1)) - 1
    largest = np.uint64(0)
    count = 0
    for i in range(ref.size):
        r, c = ref[i], cand[i]
        if r == c or (r != r and c != c):
            continue
        count += 1
        if math.isfinite(r) and math.isfinite(c):
            largest = max(largest, _ulp(np.int64(r_bits[i]), np.int64(c_bits[i]), magnitude_mask))
    return largest, count


@numba.njit(nogil=True)
def rounded_max_ulp(reference, first, second, first_bits, second_bits, rounded):
    """The largest ULP distance of ``first`` and of ``second`` (flat arrays of one dtype,
    float32 or float64, with their bit patterns as signed integers; ``second`` may be empty)
    from the float64 ``reference`` rounded to that dtype (one rounding to nearest, as
    ``astype``), over the positions where both are finite: ``max_ulp`` of each against the
    rounded reference, without making it. ``rounded``: one element of scratch of that dtype."""
    mask = (1 << (8 * first.itemsize - 1)) - 1
    rounded_bits = rounded.view(first_bits.dtype)
    two = second.size > 0
    largest_first = largest_second = np.uint64(0)
    for i in range(first.size):
        rounded[0] = reference[i]  # the assignment rounds to the array's dtype
        e, e_bits = rounded[0], np.int64(rounded_bits[0])
        ulp = _distance(e, e_bits, first[i], np.int64(first_bits[i]), mask)
        largest_first = max(largest_first, ulp)
        if two:
            ulp = _distance(e, e_bits, second[i], np.int64(second_bits[i]), mask)
            largest_second = max(largest_second, ulp)
    return largest_first, largest_second


@numba.njit(inline="always")
def _distance(r, r_bits, c, c_bits, mask):
    """The ULP distance of a pair where both are finite; 0 where not (as max_ulp counts)."""
    ulp = _ulp(r_bits, c_bits, mask)
    return ulp if math.isfinite(r) and math.isfinite(c) else np.uint64(0)
