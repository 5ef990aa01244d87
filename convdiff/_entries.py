"""C entry points of convdiff's numba kernels (importing this module needs numba).

Each kernel of :mod:`convdiff._compiled`, :mod:`convdiff._compiled_bounds` and
:mod:`convdiff._compiled_metrics` is reached through a C function of one signature,
``void entry(int64_t *ints, double *floats)``, for each variant it is compiled for (the dtypes
of its arrays). ``ints`` holds the arguments in the order the entry reads them: an array as its
address and its length (a matrix: address, rows, columns; always C-contiguous), an integer or a
flag as itself; ``floats`` holds the float arguments. Results are written back into both at the
places :mod:`convdiff.native` reads them from. One signature lets one loader
(:mod:`convdiff.native`) keep the machine code of every entry between runs and call it without
numba.

The entries add no arithmetic: each rebuilds the kernel's arguments (arrays that view the
caller's memory, tuples) and calls the kernel, so its numbers are the kernel's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from convdiff._compiled import tiled_chain
from convdiff._compiled_bounds import reduction_bound, rounded_mul_add, rounded_step
from convdiff._compiled_metrics import differences, max_ulp, mismatches, rounded_max_ulp

SIGNATURE = types.void(types.CPointer(types.int64), types.CPointer(types.float64))


def _entry(function: Callable) -> Any:
    return numba.cfunc(SIGNATURE, nogil=True)(function)


@intrinsic
def _pointer(typingctx: Any, address: Any, kind: Any) -> Any:
    """The integer ``address`` as a pointer to ``kind`` (a NumPy scalar type: ``np.float32``)."""
    if not isinstance(address, types.Integer) or not isinstance(kind, types.NumberClass):
        return None
    target = types.CPointer(kind.instance_type)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(target))

    return target(address, kind), codegen


@numba.njit(inline="always")
def _array(ints, at, kind):
    """The array of ``kind`` whose address and length are ``ints[at]`` and ``ints[at + 1]``."""
    return numba.carray(_pointer(ints[at], kind), ints[at + 1])


@numba.njit(inline="always")
def _matrix(ints, at, kind):
    """The C-order matrix of ``kind`` at ``ints[at]`` of ``ints[at + 1]`` x ``ints[at + 2]``."""
    return numba.carray(_pointer(ints[at], kind), (ints[at + 1], ints[at + 2]))


def _tiled_chain(operand: Any, accumulator: Any) -> Any:
    """``ints``: x, w, acc (arrays), the geometry's nine numbers, count, fused, mode,
    g_lo, g_hi, l_lo, l_hi."""

    def entry(ints, floats):
        geometry = (
            ints[6], ints[7], ints[8], ints[9], ints[10], ints[11], ints[12], ints[13], ints[14]
        )  # fmt: skip
        tiled_chain(
            _array(ints, 0, operand),
            _array(ints, 2, operand),
            _array(ints, 4, accumulator),
            geometry,
            ints[15],
            ints[16] != 0,
            ints[17],
            ints[18],
            ints[19],
            ints[20],
            ints[21],
        )

    return _entry(entry)


def _rounded_step() -> Any:
    """``ints``: op, six operands (arrays), strides (matrix), dims (array), three outputs
    (arrays), the part's four numbers, three flags, the scratch rows (matrix); ``floats``:
    u_sum, eta_sum."""

    def entry(ints, floats):
        f8 = np.float64
        operands = (
            _array(ints, 1, f8),
            _array(ints, 3, f8),
            _array(ints, 5, f8),
            _array(ints, 7, f8),
            _array(ints, 9, f8),
            _array(ints, 11, f8),
        )
        outputs = (_array(ints, 18, f8), _array(ints, 20, f8), _array(ints, 22, f8))
        rows = _matrix(ints, 31, f8)
        rounded_step(
            ints[0],
            operands,
            _matrix(ints, 13, np.int64),
            _array(ints, 16, np.int64),
            outputs,
            (ints[24], ints[25], ints[26], ints[27]),
            (floats[0], floats[1]),
            (ints[28] != 0, ints[29] != 0, ints[30] != 0),
            (rows, rows),
        )

    return _entry(entry)


def _rounded_mul_add() -> Any:
    """``ints``: nine operands (arrays), strides (matrix), dims (array), three outputs
    (arrays), the part's four numbers, four flags, the scratch rows (matrix); ``floats``:
    u_sum, eta_sum."""

    def entry(ints, floats):
        f8 = np.float64
        operands = (
            _array(ints, 0, f8),
            _array(ints, 2, f8),
            _array(ints, 4, f8),
            _array(ints, 6, f8),
            _array(ints, 8, f8),
            _array(ints, 10, f8),
            _array(ints, 12, f8),
            _array(ints, 14, f8),
            _array(ints, 16, f8),
        )
        outputs = (_array(ints, 23, f8), _array(ints, 25, f8), _array(ints, 27, f8))
        rows = _matrix(ints, 37, f8)
        rounded_mul_add(
            operands,
            _matrix(ints, 18, np.int64),
            _array(ints, 21, np.int64),
            outputs,
            (ints[29], ints[30], ints[31], ints[32]),
            (floats[0], floats[1]),
            (ints[33] != 0, ints[34] != 0, ints[35] != 0, ints[36] != 0),
            (rows, rows),
        )

    return _entry(entry)


def _reduction_bound() -> Any:
    """``ints``: the float32 sums, scale, err (arrays); ``floats``: factor, tiny, gamma,
    floor, eta_sum; the count of sums that are not finite at ``ints[6]``."""

    def entry(ints, floats):
        f8 = np.float64
        ints[6] = reduction_bound(
            _array(ints, 0, np.float32),
            _array(ints, 2, f8),
            _array(ints, 4, f8),
            floats[0],
            floats[1],
            floats[2],
            floats[3],
            floats[4],
        )

    return _entry(entry)


def _differences(kind: Any) -> Any:
    """``ints``: ref, cand, their bits, bound, scale (arrays), nmant, minexp, ulps, counts,
    a one-element float64 scratch (arrays); results: the integers at 20 to 31 (as
    :func:`convdiff.native.differences` orders them), the floats at 0 to 3 of ``floats``."""
    bits = np.int32 if kind is np.float32 else np.int64

    def entry(ints, floats):
        f8 = np.float64
        r = differences(
            _array(ints, 0, kind),
            _array(ints, 2, kind),
            _array(ints, 4, bits),
            _array(ints, 6, bits),
            _array(ints, 8, f8),
            _array(ints, 10, f8),
            ints[12],
            ints[13],
            _array(ints, 14, np.uint64),
            _array(ints, 16, np.int64),
            _array(ints, 18, f8),
        )
        ints[20], ints[21], ints[22], ints[23] = r[0], r[1], r[2], r[3]
        ints[24], ints[25] = np.int64(r[4]), r[5]
        floats[0], floats[1], floats[2], floats[3] = r[6], r[7], r[8], r[9]
        ints[26], ints[27], ints[28], ints[29] = r[10], r[11], r[12], r[13]
        ints[30], ints[31] = r[14], r[15]

    return _entry(entry)


def _max_ulp(kind: Any) -> Any:
    """``ints``: ref, cand and their bits (arrays); the result at 8."""
    bits = np.int32 if kind is np.float32 else np.int64

    def entry(ints, floats):
        ref, cand = _array(ints, 0, kind), _array(ints, 2, kind)
        largest = max_ulp(ref, cand, _array(ints, 4, bits), _array(ints, 6, bits))
        ints[8] = np.int64(largest)

    return _entry(entry)


def _mismatches(kind: Any) -> Any:
    """``ints``: ref, cand and their bits (arrays); the results at 8 and 9."""
    bits = np.int32 if kind is np.float32 else np.int64

    def entry(ints, floats):
        ref, cand = _array(ints, 0, kind), _array(ints, 2, kind)
        largest, count = mismatches(ref, cand, _array(ints, 4, bits), _array(ints, 6, bits))
        ints[8], ints[9] = np.int64(largest), count

    return _entry(entry)


def _rounded_max_ulp(kind: Any) -> Any:
    """``ints``: the float64 reference, first, second, their bits, a one-element scratch of
    ``kind`` (arrays); the results at 12 and 13."""
    bits = np.int32 if kind is np.float32 else np.int64

    def entry(ints, floats):
        first, second = rounded_max_ulp(
            _array(ints, 0, np.float64),
            _array(ints, 2, kind),
            _array(ints, 4, kind),
            _array(ints, 6, bits),
            _array(ints, 8, bits),
            _array(ints, 10, kind),
        )
        ints[12], ints[13] = np.int64(first), np.int64(second)

    return _entry(entry)


_KINDS = {"float32": np.float32, "float64": np.float64}

# name -> the entry compiled for a variant (a tuple of dtype names)
ENTRIES: dict[str, Callable[..., Any]] = {
    "tiled_chain": lambda operand, accumulator: _tiled_chain(_KINDS[operand], _KINDS[accumulator]),
    "rounded_step": _rounded_step,
    "rounded_mul_add": _rounded_mul_add,
    "reduction_bound": _reduction_bound,
    "differences": lambda kind: _differences(_KINDS[kind]),
    "max_ulp": lambda kind: _max_ulp(_KINDS[kind]),
    "mismatches": lambda kind: _mismatches(_KINDS[kind]),
    "rounded_max_ulp": lambda kind: _rounded_max_ulp(_KINDS[kind]),
}
