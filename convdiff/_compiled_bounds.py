"""numba kernels of the bounded pass (:mod:`convdiff.fused`, :mod:`convdiff.magnitude`;
importing this module needs numba).

One rounded elementwise step of the bounded pass (:class:`convdiff.numerics.Bounded`'s ``add``,
``sub`` and ``mul``) computes three float64 arrays: the value, the bound and the terms'
magnitude. In NumPy that is some ten passes over the output (the value, each error term, the
magnitude, then ``|z| + e``, ``* u``, ``+ e``, ``+ eta`` and a sum to look for infinities),
each reading and writing arrays of the output's size. Here one pass computes, per element,
the same IEEE operations on the same float64 values in the same order (no fused
multiply-add: numba leaves LLVM's contraction off without fast-math flags), so every number
is the NumPy path's, bit for bit; a NaN is a NaN, whose sign and payload IEEE leaves open
(``NaN + NaN`` keeps either operand's, and the compiler may swap a sum's operands), as no
figure reads them. The tests compare every element both ways.

The operands are flat float64 arrays read through per-operand element strides over at most
three axes (a broadcast operand has stride 0 along the axes it does not vary on), so that a
bias of shape ``(C,)`` or a per-position factor is read in place, never broadcast into a copy.
:func:`rounded_mul_add` is ``mul`` then ``add`` in one pass: the product's three numbers stay
in registers, where the two steps write them out and read them back.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# the steps (convdiff.fused.STEPS)
ADD, SUB, MUL = 0, 1, 2


@numba.njit(inline="always")
def _rounded(value, prop, u_sum, eta_sum):
    """numerics.Bounded._rounded of one element: ``((|z| + e) u + e) + eta``, then its two
    non-finite cases (an infinity from exact operands, a NaN from uncertain ones)."""
    err = (abs(value) + prop) * u_sum + prop + eta_sum
    if math.isinf(value) and prop == 0:
        return 0.0
    if err != err and prop != 0:
        return math.inf
    return err


@numba.njit(nogil=True)
def rounded_step(op, operands, strides, dims, outputs, part, units, flags, rows):
    """The step on the output elements of ``part``, written to ``outputs`` (value, err,
    magnitude: flat float64 arrays of the output's size, in C order over ``dims``).

    Args:
        op: ADD, SUB or MUL.
        operands: ``(a, e_a, m_a, b, e_b, m_b)``, flat read-only float64 arrays.
        strides: ``(6, 3)`` int64: each operand's element stride along each of the three axes.
        dims: the three axes' lengths.
        part: ``(row_lo, row_hi, col_lo, col_hi)``: rows are the first two axes together
            (C order), columns the third axis.
        units: ``(u_sum, eta_sum)`` of :class:`~convdiff.numerics.Bounded`.
        flags: ``(abs_a, abs_b, cross)``: the magnitude of ``a`` (of ``b``) is ``|a|``
            (its ``m`` array is not read); whether the ``e_a e_b`` term is included.
        rows: ``(6, col_hi - col_lo)`` float64 scratch, twice (an operand's row is gathered
            into the first where the operand does not step by one along the row, and read
            from the second, a view of the same memory of the operands' own array type).
    """
    row_lo, row_hi, col_lo, col_hi = part
    width = col_hi - col_lo
    for row in range(row_lo, row_hi):
        where = (row // dims[1], row % dims[1], col_lo)
        at = row * dims[2] + col_lo
        _row_step(
            op,
            _operand_row(operands, strides, where, rows, 0)
            + _operand_row(operands, strides, where, rows, 1),
            (outputs[0][at : at + width], outputs[1][at : at + width], outputs[2][at : at + width]),
            units,
            flags,
        )


@numba.njit(inline="always")
def _operand_row(operands, strides, where, rows, n):
    """Operand ``n``'s value, error and magnitude along one row (see :func:`_row`)."""
    scratch, gathered = rows
    return (
        _row(operands[3 * n], strides[3 * n], where, scratch[3 * n], gathered[3 * n]),
        _row(
            operands[3 * n + 1], strides[3 * n + 1], where, scratch[3 * n + 1], gathered[3 * n + 1]
        ),
        _row(
            operands[3 * n + 2], strides[3 * n + 2], where, scratch[3 * n + 2], gathered[3 * n + 2]
        ),
    )


@numba.njit(inline="always")
def _row(flat, strides, at, scratch, gathered):
    """The operand's elements along one row (``at``: its two row indices and first
    column): a view of ``flat`` where it steps by one, else ``gathered``, which views
    ``scratch``, filled with them."""
    i, j, col = at
    start = strides[0] * i + strides[1] * j + strides[2] * col
    if strides[2] == 1:
        return flat[start : start + scratch.size]
    for k in range(scratch.size):
        scratch[k] = flat[start + k * strides[2]]
    return gathered


@numba.njit(inline="always")
def _row_step(op, row, out, units, flags):
    """One row: value, error and magnitude of each element as Bounded.add/sub/mul compute
    them. Each operation has a loop of its own (LLVM vectorises each; one loop for both sums
    becomes ``a + (-b)``: the same numbers, but NaNs of the other sign).

    ``e_a``/``e_b`` are 0.0 where an error is known to be zero; ``cross``: neither is known
    to be zero everywhere, so the product's ``e_a e_b`` term is part of it (NumPy leaves it
    out otherwise, even where it would be NaN).
    """
    a, ea, ma, b, eb, mb = row
    value, err, magnitude = out
    u_sum, eta_sum = units
    abs_a, abs_b, cross = flags
    if op == MUL:
        for k in range(value.size):
            mx = abs(a[k]) if abs_a else ma[k]
            my = abs(b[k]) if abs_b else mb[k]
            value[k], err[k], magnitude[k] = _product(
                a[k], b[k], ea[k], eb[k], mx, my, cross, units
            )
    elif op == ADD:
        for k in range(value.size):
            mx = abs(a[k]) if abs_a else ma[k]
            my = abs(b[k]) if abs_b else mb[k]
            value[k] = a[k] + b[k]
            prop = ea[k] + eb[k]
            err[k] = _rounded(value[k], prop, u_sum, eta_sum)
            magnitude[k] = mx + my
    else:
        for k in range(value.size):
            mx = abs(a[k]) if abs_a else ma[k]
            my = abs(b[k]) if abs_b else mb[k]
            value[k] = a[k] - b[k]
            prop = ea[k] + eb[k]
            err[k] = _rounded(value[k], prop, u_sum, eta_sum)
            magnitude[k] = mx + my


@numba.njit(inline="always")
def _product(x, y, e_x, e_y, m_x, m_y, cross, units):
    """Bounded.mul of one element: value, bound and magnitude (``m_x``, ``m_y``: the
    operands' magnitudes; ``e_x``, ``e_y``: 0.0 where an error is known to be zero)."""
    # numerics._times: |value| * err, 0 where err is 0 (even against an infinity)
    prop = (0.0 if e_y == 0 else abs(x) * e_y) + (0.0 if e_x == 0 else abs(y) * e_x)
    if cross:
        prop = prop + e_x * e_y
    value = x * y
    return value, _rounded(value, prop, units[0], units[1]), m_x * m_y


@numba.njit(nogil=True)
def rounded_mul_add(operands, strides, dims, outputs, part, units, flags, rows):
    """:func:`rounded_step`'s MUL of ``a`` and ``b`` and then its ADD of ``c`` to the product,
    in one pass: the same numbers as the two steps, bit for bit.

    Args:
        operands: ``(a, e_a, m_a, b, e_b, m_b, c, e_c, m_c)``; ``strides`` ``(9, 3)``.
        flags: ``(abs_a, abs_b, abs_c, cross)``: whether each magnitude is ``|value|``, and
            whether the product's ``e_a e_b`` term is included.
        rows: ``(9, col_hi - col_lo)`` float64 scratch, writable and read-only (see
            :func:`rounded_step`).
    """
    row_lo, row_hi, col_lo, col_hi = part
    width = col_hi - col_lo
    for row in range(row_lo, row_hi):
        where = (row // dims[1], row % dims[1], col_lo)
        at = row * dims[2] + col_lo
        _row_mul_add(
            _operand_row(operands, strides, where, rows, 0)
            + _operand_row(operands, strides, where, rows, 1)
            + _operand_row(operands, strides, where, rows, 2),
            (outputs[0][at : at + width], outputs[1][at : at + width], outputs[2][at : at + width]),
            units,
            flags,
        )


@numba.njit(inline="always")
def _row_mul_add(row, out, units, flags):
    """One row of :func:`rounded_mul_add`: _row_step's MUL of ``a`` and ``b``, its three
    numbers kept, then its ADD of ``c`` (the sum's operands in that order)."""
    a, ea, ma, b, eb, mb, c, ec, mc = row
    value, err, magnitude = out
    u_sum, eta_sum = units
    abs_a, abs_b, abs_c, cross = flags
    for k in range(value.size):
        mx = abs(a[k]) if abs_a else ma[k]
        my = abs(b[k]) if abs_b else mb[k]
        product, product_err, product_magnitude = _product(
            a[k], b[k], ea[k], eb[k], mx, my, cross, units
        )
        mz = abs(c[k]) if abs_c else mc[k]
        value[k] = product + c[k]
        err[k] = _rounded(value[k], product_err + ec[k], u_sum, eta_sum)
        magnitude[k] = product_magnitude + mz


@numba.njit(nogil=True)
def reduction_bound(sum32, scale, err, factor, tiny, gamma, floor, eta_sum):
    """The terms' magnitude and the bound of a reduction whose magnitude was summed in float32
    (:func:`convdiff.magnitude.product_bound`), per element of ``sum32``: ``scale`` is the
    sum in float64, ``err`` is ``((gamma * (scale * factor + tiny)) + floor) + eta_sum``, each
    operation rounded once in float64, in that order (the NumPy formulas' passes:
    ``magnitude.product_magnitude``'s upper bound, then ``numerics.Bounded.dot``'s spread and
    underflows, then the final ``eta``). Returns how many sums are not finite (the caller then
    takes the NumPy formulas, whose float64 magnitude the float32 sum did not give)."""
    infinite = 0
    for i in range(sum32.size):
        s = np.float64(sum32[i])
        upper = s * factor
        upper = upper + tiny
        bound = gamma * upper
        bound = bound + floor
        scale[i] = s
        err[i] = bound + eta_sum
        infinite += not math.isfinite(s)
    return infinite
