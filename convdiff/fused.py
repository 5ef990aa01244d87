"""The bounded pass's rounded elementwise steps in one compiled pass, where numba is enabled.

:class:`convdiff.numerics.Bounded` evaluates ``add``, ``sub`` and ``mul`` as some ten NumPy
passes over float64 arrays of the output's size (memory-bound: the bounded pass of a batch of
8 ResNet50 images spent most of its time there). :func:`rounded_step` computes the same three
arrays (value, bound, terms' magnitude) in one pass of :mod:`convdiff._compiled_bounds`, split
between the cores by disjoint ranges of outputs, with the NumPy formulas' IEEE operations in
their order: the same numbers, bit for bit (a NaN's sign and payload excepted, which IEEE
leaves open and nothing reads). ``mul_add`` is ``mul`` then ``add`` (a normalization's scale
and shift, two roundings) in one pass that keeps the product's three numbers in registers: it
writes three arrays where the two steps write six and read three back. The step returns None
where it does not apply (numba missing or disabled, a small output, operands whose layout it
does not read, other dtypes), and the NumPy formulas run instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from convdiff import accel, native

# operations of convdiff._compiled_bounds (rounded_step's; mul_add has a kernel of its own)
STEPS = {"add": 0, "sub": 1, "mul": 2}
MUL_ADD = "mul_add"

# Outputs below this many elements take the NumPy formulas (a compiled call costs a few
# microseconds of argument checks: a NumPy pass over a few thousand elements costs as much).
_SMALL = 1 << 12
# Elements below which the pass is not split between cores
_PARALLEL_ELEMENTS = 1 << 17

_FLOAT64 = np.dtype(np.float64)


class Operand(NamedTuple):
    """One operand of a step: its value, its error and its magnitude (None: ``|value|``)."""

    value: np.ndarray
    err: np.ndarray
    magnitude: np.ndarray | None


def rounded_step(
    name: str, operands: Sequence[Operand], units: tuple[float, float], cross: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(value, err, magnitude)`` of Bounded's ``name`` step, each of the operands' broadcast
    shape, or None where the NumPy formulas must compute it.

    Args:
        name: ``add``, ``sub`` or ``mul`` of two operands, or ``mul_add`` of three (``x * y``
            rounded, then ``+ z`` rounded).
        units: Bounded's ``(u_sum, eta_sum)``.
        cross: include the product's ``e_x e_y`` term (neither error is known to be zero).
    """
    shape = np.broadcast_shapes(*(np.shape(op.value) for op in operands))
    size = math.prod(shape)
    if size < _SMALL or not accel.enabled():
        return None
    # a magnitude that is |value| is not read (the kernel takes |value|): the value stands in
    arrays = [
        array
        for op in operands
        for array in (op.value, op.err, op.value if op.magnitude is None else op.magnitude)
    ]
    layout = _layout(shape, arrays)
    if layout is None:
        return None
    dims, strides, flats = layout
    outputs = (np.empty(size), np.empty(size), np.empty(size))
    flags = (*(op.magnitude is None for op in operands), cross)
    op = None if name == MUL_ADD else STEPS[name]  # None: the mul_add kernel
    calls = [
        (op, flats, strides, dims, outputs, part, units, flags, _scratch(part, len(arrays)))
        for part in _parts(dims[0] * dims[1], dims[2])
    ]
    accel.in_parallel(native.rounded_step, calls)
    return outputs[0].reshape(shape), outputs[1].reshape(shape), outputs[2].reshape(shape)


def _scratch(part: tuple[int, int, int, int], arrays: int) -> np.ndarray:
    """A part's scratch rows for the kernel (one per array it reads)."""
    return np.empty((arrays, part[3] - part[2]))


def _parts(rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """The output cut into one part per core (rows, or the columns of a single row), each
    at least :data:`_PARALLEL_ELEMENTS` long: ``(row_lo, row_hi, col_lo, col_hi)``."""
    if rows > 1:
        return [(lo, hi, 0, cols) for lo, hi in accel.split(rows, -(-_PARALLEL_ELEMENTS // cols))]
    return [(0, rows, lo, hi) for lo, hi in accel.split(cols, _PARALLEL_ELEMENTS)]


def _layout(
    shape: tuple[int, ...], arrays: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]] | None:
    """How the kernel reads ``arrays`` broadcast to ``shape``: three axes' lengths, each
    array's element strides along them (``(len(arrays), 3)``) and each array as a flat
    read-only view of the memory it spans; None when an array is not aligned float64, does
    not broadcast to ``shape`` without enlarging it, has negative or unaligned strides, or
    needs more than three axes.

    Adjacent axes merge into one where every array steps along the outer one as along the
    inner one times its length (a contiguous array, and one broadcast along both, always do):
    an array of the output's shape and a ``(C,)`` bias need two axes, a squeeze-and-excite
    factor ``(N, 1, 1, C)`` three.
    """
    views = []
    for array in arrays:
        array = np.asarray(array)
        if array.dtype != _FLOAT64 or not array.flags.aligned:
            return None
        if np.broadcast_shapes(array.shape, shape) != shape:
            return None
        views.append(np.broadcast_to(array, shape))
    if any(s < 0 or s % _FLOAT64.itemsize for v in views for s in v.strides):
        return None
    axes = [
        [n, [s // _FLOAT64.itemsize for s in strides]]
        for n, *strides in zip(shape, *(v.strides for v in views), strict=True)
        if n != 1
    ]
    merged: list[list] = []
    for n, strides in reversed(axes):  # innermost first
        inner = merged[-1] if merged else None
        if inner is not None and all(
            s == t * inner[0] for s, t in zip(strides, inner[1], strict=True)
        ):
            inner[0] *= n
        else:
            merged.append([n, strides])
    if len(merged) > 3:
        return None
    merged += [[1, [0] * len(views)]] * (3 - len(merged))
    merged.reverse()  # outermost first
    dims = np.array([n for n, _ in merged], np.int64)
    strides = np.array([s for _, s in merged], np.int64).T.copy()
    flats = tuple(_flat(v, dims, row) for v, row in zip(views, strides, strict=True))
    return dims, strides, flats


def _flat(view: np.ndarray, dims: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """The memory ``view`` reads, from its first element to its last, as a flat read-only
    float64 array (every array the kernel reads has this one type)."""
    span = 1 + int(((dims - 1) * strides).sum())
    return np.lib.stride_tricks.as_strided(
        view, shape=(span,), strides=(_FLOAT64.itemsize,), writeable=False
    )
