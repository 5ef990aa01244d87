"""Summation orders: how the NumPy side adds the terms of a reduction.

Every reduction in convdiff is ``sum_k a[k] * b[k]`` over the leading axis ``k`` of two arrays
that broadcast against each other on the remaining axes (``b`` may be absent: a plain sum).
An :class:`Order` names how those ``K`` terms are added; each function here is vectorised over
every output element and loops (in Python) only over the ``K`` terms, so its cost is
``K`` NumPy passes over the output.

Unless an order says otherwise, products and partial sums are rounded to the accumulator dtype
after every step, the way a scalar loop in that dtype would. With ``fma=True`` a product and the
addition that consumes it are rounded once, as a fused multiply-add instruction does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np

from convdiff.errors import OptionError

ORDER_NAMES = ("sequential", "reverse", "pairwise", "kahan", "blocked", "blas", "float64", "exact")
ACCUMULATOR_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


@dataclass(frozen=True)
class Order:
    """A summation order for every reduction of a run.

    Attributes:
        name: one of :data:`ORDER_NAMES`.
        fma: fuse each multiply with the add that consumes it (one rounding instead of two).
        block: terms per block for ``blocked``.
        accumulate: accumulator dtype name, or None for the layer's compute dtype.
        tap_order: nesting of labelled reduction axes (e.g. ``"hwc"``), or None for the kernel's.
    """

    name: str = "sequential"
    fma: bool = True
    block: int = 0
    accumulate: str | None = None
    tap_order: str | None = None

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``sequential+fma`` or ``blocked:16``."""
        base = f"blocked:{self.block}" if self.name == "blocked" else self.name
        if self.name in ("sequential", "reverse", "pairwise", "kahan", "blocked"):
            base += "+fma" if self.fma else "-fma"
        if self.accumulate:
            base += f" acc={self.accumulate}"
        if self.tap_order:
            base += f" taps={self.tap_order}"
        return base

    def to_dict(self) -> dict:
        return {
            "order": self.name if self.name != "blocked" else f"blocked:{self.block}",
            "fma": self.fma,
            "accumulate": self.accumulate,
            "tap_order": self.tap_order,
        }


def parse_order(
    text: str, fma: bool = True, accumulate: str | None = None, tap_order: str | None = None
) -> Order:
    """Parse ``--order`` (and its companions) into an :class:`Order`.

    Raises:
        OptionError: for an unknown order, a bad block size or an unknown accumulator dtype.
    """
    name, _, arg = text.partition(":")
    if name not in ORDER_NAMES:
        raise OptionError(
            f"unknown order {text!r}; valid choices are {', '.join(ORDER_NAMES)} (blocked:K)"
        )
    block = 0
    if name == "blocked":
        if not arg.isdigit() or int(arg) < 1:
            raise OptionError(f"order {text!r} needs a positive block size, e.g. blocked:16")
        block = int(arg)
    elif arg:
        raise OptionError(f"order {name!r} takes no argument; received {text!r}")
    if accumulate is not None and accumulate not in ACCUMULATOR_DTYPES:
        raise OptionError(
            f"unknown accumulator dtype {accumulate!r}; "
            f"valid choices are {', '.join(ACCUMULATOR_DTYPES)}"
        )
    if tap_order is not None and (not tap_order.isalpha() or len(set(tap_order)) != len(tap_order)):
        raise OptionError(
            f"--tap-order must be distinct axis letters like 'hwc'; got {tap_order!r}"
        )
    return Order(name=name, fma=fma, block=block, accumulate=accumulate, tap_order=tap_order)


# --------------------------------------------------------------------------- rounding steps


def _round_fma(acc: np.ndarray, a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``round(acc + a*b)`` to ``dtype`` with a single rounding, as a hardware FMA does.

    The product of two float32 (or narrower) numbers is exact in float64 (48 <= 53 bits), so for
    a float64 accumulator one float64 addition is the fused result. For narrower accumulators
    the float64 sum is rounded a second time by the cast to ``dtype``, which can go wrong only
    when the float64 sum lies exactly on a ``dtype`` midpoint (or in ``dtype``'s subnormal
    range, where fewer bits are kept). There we recover the addition's error (TwoSum) and round
    the float64 sum to odd: an inexact sum with an even last bit moves one float64 step towards
    the exact value. Rounding to odd in a format at least two bits wider than ``dtype`` makes
    the final cast correctly rounded.
    """
    prod = np.multiply(a, b, dtype=np.float64)
    total = acc.astype(np.float64) + prod
    if dtype == np.float64:
        return total
    suspect = _at_midpoint(total, dtype)
    if suspect.any():
        acc64, prod, total = (
            np.array(v, dtype=np.float64)
            for v in np.broadcast_arrays(acc.astype(np.float64), prod, total)
        )
        idx = np.nonzero(suspect)
        s, x, y = total[idx], acc64[idx], prod[idx]
        yy = s - x
        err = (x - (s - yy)) + (y - yy)  # TwoSum: x + y == s + err exactly
        even = (s.view(np.uint64) & np.uint64(1)) == 0
        total[idx] = np.where((err != 0) & even, np.nextafter(s, np.copysign(np.inf, err)), s)
    return round_to(total, dtype)


def _at_midpoint(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Elements of float64 ``x`` that a cast to ``dtype`` might double-round.

    A float64 with 52 stored bits lies on a midpoint of a format with ``m`` stored bits when its
    low ``52 - m`` bits are ``1000...0``. Values below the format's smallest normal number keep
    fewer bits; they are all flagged (they are rare, and round-to-odd is right for them too).
    """
    finfo = _finfo(dtype)
    shift = 52 - int(finfo.nmant)
    bits = np.ascontiguousarray(x).view(np.uint64)
    low = bits & np.uint64((1 << shift) - 1)
    mid = low == np.uint64(1 << (shift - 1))
    return mid | (np.abs(x) < float(finfo.smallest_normal))


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


def _finfo(dtype: np.dtype):
    return ml_dtypes.finfo(dtype) if dtype == ml_dtypes.bfloat16 else np.finfo(dtype)


def _step(acc: np.ndarray, a: np.ndarray, b: np.ndarray | None, fma: bool, dtype: np.dtype):
    """One accumulation step ``acc + a*b`` in ``dtype``: fused, or the exact product rounded
    to ``dtype`` and then the sum rounded to ``dtype``."""
    if b is None:
        return (acc + a.astype(dtype)).astype(dtype)
    if fma:
        return _round_fma(acc, a, b, dtype)
    return (acc + _term(a, b, dtype)).astype(dtype)


def _term(a: np.ndarray, b: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """One term ``a*b`` rounded to ``dtype``."""
    if b is None:
        return round_to(a.astype(np.float64), dtype)
    return round_to(np.multiply(a, b, dtype=np.float64), dtype)


# --------------------------------------------------------------------------- orders


def _sequential(a, b, fma, dtype, shape, indices=None):
    acc = np.zeros(shape, dtype)
    for k in range(a.shape[0]) if indices is None else indices:
        acc = _step(acc, a[k], None if b is None else b[k], fma, dtype)
    return acc


def _reverse(a, b, fma, dtype, shape):
    return _sequential(a, b, fma, dtype, shape, indices=range(a.shape[0] - 1, -1, -1))


def _pairwise(a, b, fma, dtype, shape, lo=0, hi=None):
    """NumPy's pairwise summation (``pairwise_sum`` in its loops): leaves of up to 128 terms are
    summed with 8 interleaved accumulators, combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
    the tail added in order; longer ranges split at a multiple of 8 near the middle."""
    hi = a.shape[0] if hi is None else hi
    n = hi - lo
    bk = (lambda k: None) if b is None else (lambda k: b[k])
    if n < 8:
        return _sequential(a, b, fma, dtype, shape, indices=range(lo, hi))
    if n <= 128:
        r = [_step(np.zeros(shape, dtype), a[lo + j], bk(lo + j), fma, dtype) for j in range(8)]
        i = 8
        while i < n - (n % 8):
            for j in range(8):
                r[j] = _step(r[j], a[lo + i + j], bk(lo + i + j), fma, dtype)
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        res = res.astype(dtype)
        for k in range(lo + i, hi):
            res = _step(res, a[k], bk(k), fma, dtype)
        return res
    n2 = n // 2
    n2 -= n2 % 8
    left = _pairwise(a, b, fma, dtype, shape, lo, lo + n2)
    right = _pairwise(a, b, fma, dtype, shape, lo + n2, hi)
    return (left + right).astype(dtype)


def _kahan(a, b, fma, dtype, shape):
    """Kahan's compensated summation; with FMA the compensation is folded into the product."""
    total = np.zeros(shape, dtype)
    comp = np.zeros(shape, dtype)
    for k in range(a.shape[0]):
        if fma and b is not None:
            y = _round_fma(-comp, a[k], b[k], dtype)
        else:
            y = (_term(a[k], None if b is None else b[k], dtype) - comp).astype(dtype)
        t = (total + y).astype(dtype)
        comp = ((t - total).astype(dtype) - y).astype(dtype)
        total = t
    return total


def _blocked(a, b, fma, dtype, shape, block):
    """Partial sums over consecutive blocks of ``block`` terms, then the partials in order."""
    total = np.zeros(shape, dtype)
    for start in range(0, a.shape[0], block):
        part = _sequential(
            a, b, fma, dtype, shape, indices=range(start, min(start + block, a.shape[0]))
        )
        total = (total + part).astype(dtype)
    return total


def _blas(a, b, dtype, shape):
    """One matrix product; the order is whatever the BLAS library picks."""
    if b is None:
        return np.sum(a.astype(dtype), axis=0, dtype=dtype)
    a2, b2 = a.astype(dtype), b.astype(dtype)
    a_rest, b_rest = a2.shape[1:], b2.shape[1:]
    if len(a_rest) == len(b_rest):
        ia = [i for i, n in enumerate(a_rest) if n != 1]
        ib = [i for i, n in enumerate(b_rest) if n != 1]
        if not set(ia) & set(ib):
            # a varies on some output axes, b on the others: one GEMM (K contracted).
            gemm = a2.reshape(a2.shape[0], -1).T @ b2.reshape(b2.shape[0], -1)
            gemm = gemm.reshape([a_rest[i] for i in ia] + [b_rest[i] for i in ib])
            return gemm.transpose(np.argsort(ia + ib)).reshape(shape)
    return np.einsum("k...,k...->...", a2, b2, optimize=True).astype(dtype)


def _float64(a, b, dtype, shape):
    """Accumulate in float64 (products of float32 are exact there), round once."""
    a64 = a.astype(np.float64)
    terms = a64 if b is None else a64 * b.astype(np.float64)
    return round_to(np.add.reduce(terms, axis=0).reshape(shape), dtype)


def exact_sum(a: np.ndarray, b: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """The correctly rounded value of ``sum_k a[k]*b[k]`` in ``dtype``.

    Products are exact in float64. The sum is accumulated as a double-double (TwoSum of each
    term into a float64 sum, the errors summed apart: Ogita, Rump and Oishi's Sum2), whose error
    is at most ``u64*|s| + gamma_{K}(u64)^2 * sum|terms|``. Where that interval rounds to one
    ``dtype`` value the answer is certain; the rare remaining elements are summed exactly with
    rationals.
    """
    a64 = a.astype(np.float64)
    terms = a64 if b is None else a64 * b.astype(np.float64)
    terms = np.broadcast_to(terms, np.broadcast_shapes(a.shape, () if b is None else b.shape))
    n = terms.shape[0]
    s = np.zeros(terms.shape[1:])
    e = np.zeros(terms.shape[1:])
    mag = np.zeros(terms.shape[1:])
    with np.errstate(all="ignore"):
        for k in range(n):
            t = terms[k]
            s_new = s + t
            z = s_new - s
            e += (s - (s_new - z)) + (t - z)
            s = s_new
            mag += np.abs(t)
        res = s + e
        u64 = 2.0**-53
        gamma = n * u64 / (1 - n * u64)
        slack = 2 * (u64 * np.abs(res) + gamma * gamma * mag) + 2.0**-1074
        lo = round_to(res - slack, dtype)
        hi = round_to(res + slack, dtype)
        out = round_to(res, dtype)
    out = np.atleast_1d(out)
    unsure = np.atleast_1d((lo != hi) & np.isfinite(res))
    flat_terms = terms.reshape(n, -1)
    for i in np.flatnonzero(unsure):
        out.flat[i] = _round_rational(sum(Fraction(float(v)) for v in flat_terms[:, i]), dtype)
    return out.reshape(res.shape)


def _round_rational(value: Fraction, dtype: np.dtype) -> np.ndarray:
    """Round an exact rational to ``dtype``, ties to even."""
    approx = round_to(np.array(float(value)), dtype)
    best_key, best = None, approx
    for cand in (_adjacent(approx, dtype, -1), approx, _adjacent(approx, dtype, 1)):
        if not math.isfinite(float(cand)):
            continue
        odd = int(np.array(cand, dtype=dtype).view(_UINT[dtype.itemsize])) & 1
        key = (abs(Fraction(float(cand)) - value), odd)
        if best_key is None or key < best_key:
            best_key, best = key, cand
    return best


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _adjacent(x: np.ndarray, dtype: np.dtype, step: int) -> np.ndarray:
    """The neighbour of ``x`` in ``dtype`` (``step`` = +1 up, -1 down), via its bit pattern, so
    that it works for bfloat16 too (np.nextafter would promote it to float32)."""
    width = dtype.itemsize * 8
    bits = int(np.array(x, dtype=dtype).view(_UINT[dtype.itemsize]))
    sign = 1 << (width - 1)
    ordinal = -(bits & (sign - 1)) if bits & sign else bits  # monotonic in the value
    ordinal += step
    bits = (sign | -ordinal) if ordinal < 0 else ordinal
    return np.array(bits, dtype=_UINT[dtype.itemsize]).view(dtype)


def accumulator_dtype(order: Order, dtype: Any) -> np.dtype:
    """The order's accumulator, or by default the layer's dtype — float32 for float16 and
    bfloat16 layers, which TensorFlow's matmul and convolution kernels accumulate in float32
    and round once (measured: bit-exact for float16, mixed_float16 and mixed_bfloat16 Dense)."""
    if order.accumulate:
        return ACCUMULATOR_DTYPES[order.accumulate]
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


Reducer = Callable[[np.ndarray, np.ndarray | None, np.dtype, tuple[int, ...]], np.ndarray]


def reduce_terms(a: np.ndarray, b: np.ndarray | None, order: Order, dtype: np.dtype) -> np.ndarray:
    """``sum_k a[k] * b[k]`` over axis 0 in ``order``, accumulated in ``dtype`` (or the order's
    accumulator dtype, the result then rounded to ``dtype``)."""
    acc_dtype = accumulator_dtype(order, dtype)
    shape = np.broadcast_shapes(a.shape[1:], () if b is None else b.shape[1:])
    fma = order.fma and b is not None
    if a.shape[0] == 0:
        return np.zeros(shape, dtype)
    if order.name == "sequential":
        out = _sequential(a, b, fma, acc_dtype, shape)
    elif order.name == "reverse":
        out = _reverse(a, b, fma, acc_dtype, shape)
    elif order.name == "pairwise":
        out = _pairwise(a, b, fma, acc_dtype, shape)
    elif order.name == "kahan":
        out = _kahan(a, b, fma, acc_dtype, shape)
    elif order.name == "blocked":
        out = _blocked(a, b, fma, acc_dtype, shape, order.block)
    elif order.name == "blas":
        out = _blas(a, b, acc_dtype, shape)
    elif order.name == "float64":  # its accumulator is float64 by definition: one rounding
        out = _float64(a, b, np.dtype(dtype), shape)
    else:  # correctly rounded to the output dtype, whatever the accumulator
        out = exact_sum(a, b, np.dtype(dtype))
    return round_to(np.asarray(out).reshape(shape), dtype)
