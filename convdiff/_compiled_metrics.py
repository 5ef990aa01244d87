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

from convdiff._compiled import cache_compiled


@numba.njit(inline="always")
def _ulp(r_bits, c_bits, magnitude_mask):
    """ULP distance of two floats from their sign-extended bit patterns: the difference of
    the magnitudes for equal signs, their sum for opposite signs (as metrics.ulp_distance)."""
    mr = np.uint64(r_bits & magnitude_mask)
    mc = np.uint64(c_bits & magnitude_mask)
    if (r_bits < 0) == (c_bits < 0):
        return mr - mc if mr >= mc else mc - mr
    return mr + mc


@numba.njit(inline="always")
def _safe_ratio(num, den):
    """metrics._safe_ratio of one pair: 0/0 -> 0, x/0 -> inf, NaN -> inf."""
    if num == 0:
        return 0.0
    ratio = num / den
    return np.inf if ratio != ratio else ratio


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


@numba.njit(nogil=True, error_model="numpy")
def differences(ref, cand, r_bits, c_bits, bound, scale, nmant, minexp, ulps):
    """One pass over flat ``ref`` and ``cand`` (float32 or float64; ``r_bits``/``c_bits`` their
    bit patterns as signed integers of the same width). ``bound`` and ``scale`` are float64
    arrays of the same size, or empty when absent; their NaN count as 0.

    Writes the ULP distances of the differing positions where both sides are finite into
    ``ulps`` (in C order) and returns, as float64 in this order: positions that differ,
    differing positions NaN on both sides, equal infinite positions, finite differing
    positions (the count written), the largest ULP distance, its first position, the largest
    ``|cand - ref|``, relative error, bound ratio and scaled ULP distance over the finite
    differing positions, NaN mismatches, inf mismatches, NaN mismatches with NaN in ``ref``,
    the first NaN or inf mismatch (-1 if none), and whether ``bound`` holds a negative
    number, and ``scale``.
    """
    magnitude_mask = (1 << (8 * ref.itemsize - 1)) - 1
    has_bound, has_scale = bound.size > 0, scale.size > 0
    negative_bound = negative_scale = False
    for b in bound:
        negative_bound |= b < 0
    for s in scale:
        negative_scale |= s < 0
    n_diff = both_nan = equal_inf = n_finite = 0
    nan_mismatch = inf_mismatch = nan_in_ref = 0
    max_ulp = np.uint64(0)
    worst = first_nonfinite = -1
    max_abs = max_rel = max_ratio = max_scaled = 0.0
    word = np.empty(1, np.float64)
    bits = word.view(np.int64)
    for i in range(ref.size):
        r, c = np.float64(ref[i]), np.float64(cand[i])
        if r == c:
            equal_inf += math.isinf(r)
            continue
        n_diff += 1
        r_nan, c_nan = r != r, c != c
        if r_nan and c_nan:
            both_nan += 1
            continue
        if r_nan or c_nan or math.isinf(r) or math.isinf(c):
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
        if ulp > max_ulp:
            max_ulp, worst = ulp, i
        diff = abs(c - r)
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, _safe_ratio(diff, abs(r)))
        if has_bound:
            limit = bound[i]
            max_ratio = max(max_ratio, _safe_ratio(diff, 0.0 if limit != limit else limit))
        if has_scale:
            terms = scale[i]
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


cache_compiled(differences)
cache_compiled(max_ulp)
cache_compiled(mismatches)
