"""Exact floating-point primitives: float dtypes and their parameters, correct rounding to a
dtype, and error-free transformations (Dekker's TwoProduct, Knuth's TwoSum) with the fused
multiply-add in float64 built from them. Everything here is pure NumPy and exact by
construction; the summation orders (:mod:`convdiff.orders`), the bounded arithmetic
(:mod:`convdiff.numerics`) and the metrics (:mod:`convdiff.metrics`) build on it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

# Float dtypes with IEEE-754 style bit layout (sign bit, biased exponent, trailing significand,
# all-ones exponent for inf/NaN), each with the unsigned integer of its width.
FLOAT_DTYPES: dict[np.dtype, type] = {
    np.dtype(np.float16): np.uint16,
    np.dtype(ml_dtypes.bfloat16): np.uint16,
    np.dtype(np.float32): np.uint32,
    np.dtype(np.float64): np.uint64,
}


def is_float(dtype: DTypeLike) -> bool:
    """Whether convdiff compares ``dtype`` as floating point (bfloat16 included, whose NumPy
    ``kind`` is 'V', not 'f')."""
    return np.dtype(dtype) in FLOAT_DTYPES


def float_dtype(dtype: DTypeLike) -> np.dtype:
    """Returns ``dtype`` as a supported float dtype, or raises ValueError."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        names = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise ValueError(f"unsupported dtype {dt}; valid choices are: {names}")
    return dt


def unit_roundoff(dtype: DTypeLike) -> float:
    """Unit roundoff u of a float dtype under round-to-nearest.

    u is half the spacing at 1.0, i.e. 2**-(p) for a p-bit significand: 2**-24 for float32,
    2**-11 for float16, 2**-8 for bfloat16 and 2**-53 for float64.

    Raises:
        ValueError: If ``dtype`` is not a supported float dtype.
    """
    # nmant counts the stored significand bits; the implicit leading bit makes p = nmant + 1.
    return 2.0 ** -(ml_dtypes.finfo(float_dtype(dtype)).nmant + 1)


def underflow_unit(dtype: Any) -> float:
    """Largest absolute error of one rounded operation near zero.

    IEEE gradual underflow would need only half the smallest subnormal, but TensorFlow's CPU
    kernels run with flush-to-zero and denormals-are-zero (measured: ``tf.exp(-88.)`` is 0,
    ``1e-40 * 1.0`` is 0), so a result or operand below the smallest normal number can become
    0: the absolute error of one step is then up to the smallest normal number.
    """
    return float(finfo(dtype).smallest_normal)


def round_to(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Round to ``dtype`` correctly (once), also for bfloat16.

    ml_dtypes casts float64 to bfloat16 through float32, which double-rounds (measured:
    ``1 + 2**-8 + 2**-40`` becomes 1.0 instead of 1.0078125). Rounding to float32 by
    round-to-odd first (24 >= 8 + 2 bits) makes the second cast correct.
    """
    dtype = np.dtype(dtype)
    x = np.asarray(x)
    if dtype != ml_dtypes.bfloat16 or x.dtype != np.float64:
        return x.astype(dtype)
    x32 = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        inexact = (x32.astype(np.float64) != x) & np.isfinite(x32)
    even = (x32.view(np.uint32) & np.uint32(1)) == 0
    toward = np.where(x > x32, np.float32(np.inf), np.float32(-np.inf))
    x32 = np.where(inexact & even, np.nextafter(x32, toward), x32)
    return x32.astype(dtype)


def finfo(dtype: Any) -> Any:
    """``np.finfo``, or ``ml_dtypes.finfo`` for bfloat16."""
    dtype = np.dtype(dtype)
    return ml_dtypes.finfo(dtype) if dtype == ml_dtypes.bfloat16 else np.finfo(dtype)


def mantissa_bits(dtype: np.dtype) -> int:
    """Stored mantissa bits of a float dtype; 52 (the most a float64 copy holds) otherwise."""
    try:
        return int(finfo(dtype).nmant)
    except ValueError:
        return 52


def quantum_log2(x: np.ndarray) -> float:
    """log2 of a power of two that divides every nonzero element of ``x`` (+inf if all zero).

    A float with ``m`` stored mantissa bits is a multiple of ``2**(floor(log2|v|) - m)``, and
    that power shrinks with ``|v|``: the smallest magnitude decides.
    """
    mags = np.abs(x.astype(np.float64))
    smallest = np.min(mags, where=(mags != 0) & np.isfinite(mags), initial=np.inf)
    if not np.isfinite(smallest):
        return math.inf
    return float(np.frexp(smallest)[1] - 1 - mantissa_bits(x.dtype))


# fma64's fast path: Veltkamp's split of an operand overflows above 2**997, and Dekker's product
# error is exact only while the product's lowest bit stays above float64's subnormal step
# (|a b| >= 2**-968 keeps e_a + e_b - 104 >= -1074); results below the smallest normal number
# are recomputed too (the round-to-odd argument assumes no underflow).
_SPLIT_MAX = 2.0**995
_PRODUCT_MIN = 2.0**-968
_RESULT_MIN = 2.0**-1021
_VELTKAMP = 2.0**27 + 1


def fma64(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``c + a*b`` in float64 with one rounding (a fused multiply-add), elementwise, in NumPy.

    The product is split exactly (Dekker's TwoProduct: ``p + e == a*b``), the sum too
    (TwoSum: ``th + tl == c + p``), and ``RN(th + RO(tl + e))`` is the correctly rounded
    ``c + a*b`` (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", IEEE TC 2008); round-to-odd is a rounded sum whose
    inexact even result moves one step towards the exact value. Elements outside the fast
    path's assumptions (tiny or huge operands and products, a subnormal result) are computed
    from exact rationals; infinities and NaNs follow IEEE (a zero product adds a signed zero).
    """
    c, a, b = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (c, a, b)))
    with np.errstate(all="ignore"):
        p, e, split = two_product(a, b)
        th, tl = two_sum(c, p)
        v, v_err = two_sum(tl, e)
        odd = (v.view(np.uint64) & np.uint64(1)) == 1
        v = np.where((v_err != 0) & ~odd, np.nextafter(v, np.copysign(np.inf, v_err)), v)
        out = th + v
        finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(c)
        zero_product = (a == 0) | (b == 0)
        # IEEE arithmetic is the fused result wherever a product is exactly zero or an operand
        # is not finite, except that a finite product added to an infinite c leaves c.
        plain = np.where(np.isfinite(a) & np.isfinite(b) & ~np.isfinite(c), c, c + p)
        out = np.where(~finite | zero_product, plain, out)
        slow = finite & ~zero_product & (~split | ~(np.abs(out) >= _RESULT_MIN))
    if slow.any():
        out = np.array(out).reshape(-1)
        flat_c, flat_a, flat_b = (x.reshape(-1) for x in (c, a, b))
        for i in np.flatnonzero(slow):
            out[i] = exact_fma(float(flat_c[i]), float(flat_a[i]), float(flat_b[i]))
        out = out.reshape(c.shape)
    return out


def two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``p = fl(a*b)``, its error ``e`` (Dekker: ``a*b == p + e`` exactly), and where that
    holds: not where the product is below 2**-968 (zero products included) or an operand
    above 2**995, or for infinities and NaN."""
    p = a * b
    a_hi, a_lo = _veltkamp(a)
    b_hi, b_lo = _veltkamp(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    split = (np.abs(p) >= _PRODUCT_MIN) & (np.abs(a) <= _SPLIT_MAX) & (np.abs(b) <= _SPLIT_MAX)
    return p, e, split & np.isfinite(p)


def exact_products(a_dtype: Any, b_dtype: Any) -> bool:
    """Whether float64 holds every product of these dtypes exactly (26 significant bits or
    fewer each: float32 and narrower)."""
    return mantissa_bits(np.dtype(a_dtype)) + mantissa_bits(np.dtype(b_dtype)) + 2 <= 53


def _veltkamp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x == hi + lo`` exactly, each with at most 26 significant bits."""
    t = _VELTKAMP * x
    hi = t - (t - x)
    return hi, x - hi


def two_sum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s = fl(x + y)`` and its error: ``x + y == s + err`` exactly (Knuth)."""
    s = x + y
    z = s - x
    return s, (x - (s - z)) + (y - z)


def exact_fma(c: float, a: float, b: float) -> float:
    """``c + a*b`` rounded once from exact rationals (int / int division rounds correctly in
    Python, subnormals included)."""
    exact = Fraction(c) + Fraction(a) * Fraction(b)
    try:
        return float(exact)
    except OverflowError:  # beyond the largest float64 after rounding
        return math.inf if exact > 0 else -math.inf
