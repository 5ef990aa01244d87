"""The terms' magnitude of a reduction, ``sum_k |a_k| |b_k|``, for the rounding bound.

The bounded pass (:meth:`convdiff.numerics.Bounded.dot`) needs, for every output of a
convolution or a Dense layer, the magnitude ``s = sum_k |a_k| |b_k|`` of its terms: the bound
is a multiple of it. Computed in float64 it is a second float64 matrix product as large as the
reference value's. When every operand is a float32 number (the layer's inputs and weights,
exactly as Keras holds them) it can be computed as a float32 matrix product instead, about
twice as fast and on operands half the size, and then inflated into a rigorous upper bound:

Every term ``t_k = |a_k| |b_k|`` is non-negative, and any evaluation of the sum by IEEE
operations rounding to nearest (BLAS's blocking, any order, fused or unfused) reaches each term
through at most ``K`` roundings (its product, or the fused multiply-add that consumes it, and
at most ``K - 1`` additions on its way to the root of a summation tree with ``K`` leaves;
adding a zero is exact). A rounding of a non-negative ``z`` gives at least ``(1 - u) z - eta``
with ``u = 2**-24`` and ``eta = 2**-150`` (half the smallest subnormal float32); ``eta`` only
arises where a product lands in the subnormal range (a sum of two floats in that range is
exact), at most once per term. Since every computed value is non-negative, by induction over
the tree the float32 result is

    s32 >= (1 - u)**K * s - K * eta,     so     s <= (s32 + K * eta) / (1 - u)**K.

With ``K u <= 1/2``, ``(1 - u)**K >= 1 - K u`` (Bernoulli) and ``1 / (1 - K u) <= 1 + 2 K u``,
so ``s <= (1 + 2 K u) (s32 + K eta)``. It is evaluated in float64 as
``fl(fl(f * s32) + c)`` with ``f = 1 + 2 (K + 2) u`` and ``c = K * 2**-148`` (both exact in
float64): each float64 rounding loses at most a factor ``1 - 2**-53``, which the extra
``4 u`` in ``f`` (far above ``3 * 2**-52``) and the factor 2 in ``c`` (``(1 + 2 K u) K eta <=
2 K eta``) more than cover. A float32 result that overflowed (or NaN or infinite operands)
leaves the whole product to float64, as before.

The float32 sum itself (not inflated) is what reports show as the terms' scale: it differs
from the exact magnitude by far less than the few significant digits shown.
"""

from __future__ import annotations

import numpy as np

from convdiff.orders import contract

# float32's unit roundoff (round to nearest) and half its smallest subnormal number
_U32 = 2.0**-24
_ETA32 = 2.0**-150
# Terms beyond which the float32 product is not used (K u <= 1/16, far inside K u <= 1/2)
MAX_TERMS = 1 << 20


def product_magnitude(
    av: np.ndarray, bv: np.ndarray, float32_exact: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_k |a_k| |b_k|`` over the leading axis of broadcasting operands.

    Args:
        av, bv: float64 operands, terms first (see :func:`convdiff.orders.contract`).
        float32_exact: every value of both operands is a float32 number.

    Returns:
        ``(scale, upper)``: the magnitude as computed (for reports) and a rigorous upper bound
        on its exact value (for the error bound). From float64 operands both are the float64
        product, as rounded.
    """
    terms = av.shape[0]
    sum32 = _float32_sum(av, bv) if float32_exact else None
    if sum32 is not None and np.isfinite(sum32).all():
        factor, tiny = _inflation(terms)
        scale = sum32.astype(np.float64)
        upper = scale * factor
        upper += tiny
        return scale, upper
    mag = contract(np.abs(av), np.abs(bv))
    return mag, mag


def product_bound(
    av: np.ndarray, bv: np.ndarray, float32_exact: bool, gamma: float, floor: float, eta: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """The terms' magnitude and ``gamma * upper + floor + eta`` (the bound of a reduction of
    exactly known operands, :meth:`convdiff.numerics.Bounded.dot`) in one compiled pass over
    the float32 sums, split between the cores: the same float64 operations, in the same order,
    as :func:`product_magnitude` and the NumPy formulas after it, without their six passes
    over float64 arrays of the output's size. None where the magnitude is not summed in
    float32 (operands that are not float32 numbers, too many terms), without numba, or where
    a float32 sum is not finite: the caller then takes those formulas."""
    from convdiff import accel, native

    terms = av.shape[0]
    sum32 = _float32_sum(av, bv) if float32_exact and accel.enabled() else None
    if sum32 is None:
        return None
    factor, tiny = _inflation(terms)
    constants = (factor, tiny, gamma, floor, eta)
    flat = np.ravel(sum32)  # C order; a copy only where the product's layout is not
    scale, err = np.empty(sum32.shape), np.empty(sum32.shape)
    calls = [
        (flat[lo:hi], scale.reshape(-1)[lo:hi], err.reshape(-1)[lo:hi], constants)
        for lo, hi in accel.split(flat.size, _PARALLEL_ELEMENTS)
    ]
    if sum(accel.in_parallel(native.reduction_bound, calls)):
        return None
    return scale, err


# Elements below which product_bound's pass is not split between the cores
_PARALLEL_ELEMENTS = 1 << 16


def _float32_sum(av: np.ndarray, bv: np.ndarray) -> np.ndarray | None:
    """``sum_k |a_k| |b_k|`` in float32 (the operands hold float32 numbers), or None where the
    terms are too many for the inflation (``K u`` kept far below 1/2)."""
    if not 0 < av.shape[0] <= MAX_TERMS:
        return None
    a32, b32 = _absolute_float32(av), _absolute_float32(bv)
    with np.errstate(over="ignore", invalid="ignore"):
        return contract(a32, b32)


def _inflation(terms: int) -> tuple[float, float]:
    """``f = 1 + 2 (K + 2) u`` and ``K 2**-148`` for ``K`` terms (see the module's text)."""
    return 1.0 + 2.0 * (terms + 2) * _U32, terms * 2.0**-148


def _absolute_float32(x: np.ndarray) -> np.ndarray:
    """``|x|`` as float32 (exact: ``x`` holds float32 numbers), in one new array: one pass
    that reads float64 and writes float32 (``astype`` and then ``abs`` in place made two)."""
    return np.abs(x, dtype=np.float32, casting="same_kind")
