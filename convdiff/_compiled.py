"""numba kernels of :mod:`convdiff.accel` (importing this module needs numba).

A reduction laid out by :mod:`convdiff.orders` as ``(K, G, S, L)`` operands has one operand
``x`` that varies along the outputs' ``L`` axis only (and perhaps ``G``) and one, ``w``, that
varies along ``S`` only (a convolution: positions and output channels; a plain sum: ``w`` is
all ones): ``acc[g, s, l]`` runs the chain ``acc = round(acc + x[k, g, l] * w[k, g, s])`` over
the terms ``k`` in order.

A register tile of :data:`ROWS` rows (``s``) times one vector of positions (``l``, 64 bytes:
16 float32 or 8 float64) keeps its accumulators in registers while the whole chain runs: per
term, one vector load of ``x``, one broadcast of ``w`` per row and one vector fused
multiply-add per row, where a loop over the outputs for each term loads and stores every
accumulator once per term (measured on ResNet50's convolutions, 2-core AVX2 machine: 3 to 5
times fewer seconds). Each accumulator still takes its own terms one after another in the
chain's order, with the same IEEE operation per step (``llvm.fma`` on a vector rounds each
lane once, exactly as the scalar ``llvm.fma``; unfused, a product and a sum each rounded, no
contraction without fast-math flags), so the bits are those of the NumPy engine. Storing an
accumulator to memory and reloading it is exact, so outputs can be shared out between threads.

The tile is written in LLVM IR (:func:`_tile`) because numba leaves LLVM's SLP vectoriser off:
a tile written as loops over a small array is kept in registers but issues one scalar FMA per
lane. Positions left over at the end of a row (fewer than a vector) take scalar steps.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from convdiff import accel


@intrinsic
def fma(typingctx: Any, x: Any, y: Any, z: Any) -> Any:
    """LLVM's fused multiply-add: ``x * y + z`` rounded once (IEEE 754 fusedMultiplyAdd),
    for float32 or float64 operands, in the widest one's type (a float32 operand widens
    exactly)."""
    if not all(isinstance(v, types.Float) for v in (x, y, z)):
        return None
    wide = max((x, y, z), key=lambda v: v.bitwidth)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        kind = context.get_value_type(wide)
        values = [v if v.type == kind else builder.fpext(v, kind) for v in args]
        fnty = ir.FunctionType(kind, [kind, kind, kind])
        name = f"llvm.fma.f{wide.bitwidth}"
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), values)

    return wide(wide, wide, wide), codegen


# Rows of a register tile. On AVX2 a 16-float32 vector takes two of the 16 vector registers:
# 6 rows are 12 accumulator registers, plus the term's vector and a broadcast.
ROWS = 6
# Bytes of the positions' vector (one AVX-512 register, two AVX2 registers).
VECTOR_BYTES = accel.VECTOR_BYTES


# Rows of a Kahan tile: each output holds a sum and a compensation (twice the registers).
KAHAN_ROWS = 2
# Rows of an exact tile: each output holds three float64 vectors (six AVX2 registers). Two
# rows do not fit the sixteen registers and the loop keeps values on the stack; its speed then
# depended on where the thread's stack stood at the call (measured on AMD EPYC: 3x slower at
# some depths, in a pool's threads; a store and a later load 4 KiB apart is the likely cause).
# One row keeps everything in registers and runs as fast as two did at best, at every depth.
EXACT_ROWS = 1


# What a tile's outputs hold: one accumulator, a Kahan sum and its compensation, or the
# exact order's double-double sum, its error sum and the terms' magnitude.
CHAIN, KAHAN, EXACT = 0, 1, 2
_STATES = {CHAIN: 1, KAHAN: 2, EXACT: 3}


def _tile(rows: int, fused: bool, mode: int = CHAIN) -> Any:
    """An intrinsic running ``count`` chain steps on a tile of ``rows`` x one vector of outputs.

    Called as ``tile(x, x_at, x_step, w, w_at, w_step, w_row, acc, acc_at, acc_row, count,
    comp_at)`` on flat arrays of one float dtype; offsets and steps count elements. Step ``i``
    reads the vector ``x[x_at + i*x_step :][:lanes]`` and, for row ``r``, the scalar
    ``w[w_at + i*w_step + r*w_row]``; row ``r``'s accumulators are the vector at
    ``acc[acc_at + r*acc_row]``, loaded before the first step and stored after the last.

    In ``KAHAN`` mode each output is a Kahan sum: its compensation is held ``comp_at`` elements
    after its sum, and a step is ``_Engine``'s (orders._kahan): ``y = a*b - comp`` (fused: one
    rounding), ``t = sum + y``, ``comp = (t - sum) - y``, ``sum = t``, each rounded. In
    ``EXACT`` mode float32 operands are widened to float64 (exact) and each output holds
    orders.exact_sum's double-double accumulation: its sum, error sum and magnitude, each
    ``comp_at`` elements after the previous.
    """

    @intrinsic
    def tile(
        typingctx, x, x_at, x_step, w, w_at, w_step, w_row, acc, acc_at, acc_row, count, comp_at
    ):
        arrays = (x, w, acc)
        if not all(isinstance(a, types.Array) and a.ndim == 1 for a in arrays):
            return None
        if not (isinstance(x.dtype, types.Float) and x.dtype == w.dtype):
            return None
        # float32 operands into float64 accumulators are widened as loaded (what EXACT mode
        # takes; numba types every mode's branch of a call, so each mode accepts them)
        wide = x.dtype.bitwidth == 32 and acc.dtype.bitwidth == 64
        if acc.dtype != x.dtype and not wide:
            return None
        index = types.intp
        sig = types.void(x, index, index, w, index, index, index, acc, index, index, index, index)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            xs, x_at, x_step, ws, w_at, w_step, w_row, accs, acc_at, acc_row, count, comp_at = args
            kind = context.get_value_type(acc.dtype)
            bits = acc.dtype.bitwidth
            lanes = VECTOR_BYTES * 8 // bits
            vector = ir.VectorType(kind, lanes)
            narrow = context.get_value_type(x.dtype)  # the operands' (exact mode: float32)
            operand_bytes = x.dtype.bitwidth // 8
            data = [
                context.make_array(t)(context, builder, value=v).data
                for t, v in ((x, xs), (w, ws), (acc, accs))
            ]
            x_data, w_data, acc_data = data
            vfma = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vector, [vector] * 3),
                f"llvm.fma.v{lanes}f{bits}",
            )
            vfabs = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector]), f"llvm.fabs.v{lanes}f{bits}"
            )
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            index_type = context.get_value_type(types.intp)

            def vector_at(base: Any, offset: Any, of: Any = vector) -> Any:
                return builder.bitcast(builder.gep(base, [offset]), of.as_pointer())

            def const(n: int) -> Any:
                return ir.Constant(index_type, n)

            targets: list[Any] = []
            for r in range(rows):
                at = builder.add(acc_at, builder.mul(const(r), acc_row))
                targets.append([])
                for _ in range(_STATES[mode]):
                    targets[-1].append(vector_at(acc_data, at))
                    at = builder.add(at, comp_at)
            # accumulators in allocas: mem2reg makes them registers for the whole loop
            slots = [[cgutils.alloca_once(builder, vector) for _ in row] for row in targets]
            for row_slots, row_targets in zip(slots, targets, strict=True):
                for slot, target in zip(row_slots, row_targets, strict=True):
                    builder.store(builder.load(target, align=bits // 8), slot)
            with cgutils.for_range(builder, count) as loop:
                i = loop.index
                term = builder.load(
                    vector_at(
                        x_data,
                        builder.add(x_at, builder.mul(i, x_step)),
                        ir.VectorType(narrow, lanes),
                    ),
                    align=operand_bytes,
                )
                if narrow != kind:
                    term = builder.fpext(term, vector)
                w_here = builder.add(w_at, builder.mul(i, w_step))
                for r, row_slots in enumerate(slots):
                    at = builder.add(w_here, builder.mul(const(r), w_row))
                    scalar = builder.load(builder.gep(w_data, [at]))
                    if narrow != kind:
                        scalar = builder.fpext(scalar, kind)
                    lane0 = builder.insert_element(
                        ir.Constant(vector, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0)
                    )
                    factor = builder.shuffle_vector(lane0, ir.Constant(vector, ir.Undefined), zeros)
                    state = [builder.load(slot) for slot in row_slots]
                    if mode == EXACT:
                        state = _exact_step(builder, vfabs, term, factor, state)
                    else:
                        step = _kahan_step if mode == KAHAN else _chain_step
                        state = step(builder, vfma, fused, term, factor, state)
                    for slot, value in zip(row_slots, state, strict=True):
                        builder.store(value, slot)
            for row_slots, row_targets in zip(slots, targets, strict=True):
                for slot, target in zip(row_slots, row_targets, strict=True):
                    builder.store(builder.load(slot), target, align=bits // 8)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _chain_step(builder: Any, vfma: Any, fused: bool, term: Any, factor: Any, state: list) -> list:
    """``acc + term * factor``, one rounding (fused) or two: no fast-math flags, so LLVM does
    not contract the product and the sum."""
    (total,) = state
    if fused:
        return [builder.call(vfma, [term, factor, total])]
    return [builder.fadd(total, builder.fmul(term, factor))]


def _kahan_step(builder: Any, vfma: Any, fused: bool, term: Any, factor: Any, state: list) -> list:
    """One step of Kahan's sum on ``[sum, comp]``, the roundings of orders._kahan."""
    total, comp = state
    if fused:  # fma(a, b, -comp): the negation is exact
        y = builder.call(vfma, [term, factor, builder.fneg(comp)])
    else:
        y = builder.fsub(builder.fmul(term, factor), comp)
    t = builder.fadd(total, y)  # the engine's total - (-y): the same IEEE operation
    return [t, builder.fsub(builder.fsub(t, total), y)]


def _exact_step(builder: Any, vfabs: Any, term: Any, factor: Any, state: list) -> list:
    """One term of orders.exact_sum's double-double sum (TwoSum into ``s``, the error into
    ``e``) and of the terms' magnitude, as its NumPy loop computes them: ``t = a*b`` (exact:
    widened float32 numbers), ``s' = s + t``, ``z = s' - s``,
    ``e += (s - (s' - z)) + (t - z)``, ``mag += |t|``."""
    s, e, mag = state
    t = builder.fmul(term, factor)
    s_new = builder.fadd(s, t)
    z = builder.fsub(s_new, s)
    error = builder.fadd(builder.fsub(s, builder.fsub(s_new, z)), builder.fsub(t, z))
    return [s_new, builder.fadd(e, error), builder.fadd(mag, builder.call(vfabs, [t]))]


# One intrinsic per tile height (the last rows of a layer may be fewer than ROWS) and step.
_F1, _F2, _F3, _F4, _F5, _F6 = (_tile(rows, True) for rows in range(1, ROWS + 1))
_U1, _U2, _U3, _U4, _U5, _U6 = (_tile(rows, False) for rows in range(1, ROWS + 1))
_KF1, _KF2 = (_tile(rows, True, KAHAN) for rows in range(1, KAHAN_ROWS + 1))
_KU1, _KU2 = (_tile(rows, False, KAHAN) for rows in range(1, KAHAN_ROWS + 1))
_E1 = _tile(1, False, EXACT)
# Terms per pass over the outputs: the operands' part of a pass (a vector of positions and
# the rows' scalars, for this many terms) stays in the L1 and L2 caches while every tile of
# the pass reads it. Each pass stores the accumulators and the next reloads them (exact).
TERMS_PER_PASS = 256


@numba.njit(inline="always")
def _tile_of(rows, fused, mode, x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count, comp_at):
    """The tile of ``rows`` rows (1 to ROWS, KAHAN_ROWS or EXACT_ROWS): numba needs the
    intrinsic picked by name."""
    args = (x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count, comp_at)
    if mode == EXACT:
        _E1(*args)
    elif mode == KAHAN:
        if fused:
            if rows == 2:
                _KF2(*args)
            else:
                _KF1(*args)
        elif rows == 2:
            _KU2(*args)
        else:
            _KU1(*args)
    elif fused:
        if rows == 6:
            _F6(*args)
        elif rows == 5:
            _F5(*args)
        elif rows == 4:
            _F4(*args)
        elif rows == 3:
            _F3(*args)
        elif rows == 2:
            _F2(*args)
        else:
            _F1(*args)
    elif rows == 6:
        _U6(*args)
    elif rows == 5:
        _U5(*args)
    elif rows == 4:
        _U4(*args)
    elif rows == 3:
        _U3(*args)
    elif rows == 2:
        _U2(*args)
    else:
        _U1(*args)


@numba.njit(nogil=True)
def tiled_chain(x, w, acc, geometry, count, fused, mode, g_lo, g_hi, l_lo, l_hi):
    """Chains of ``count`` steps on the outputs ``acc[g, s, l]`` for ``g_lo <= g < g_hi``,
    ``l_lo <= l < l_hi`` and every ``s``; arrays flat, laid out by ``geometry``:

    ``(x_at, x_g, x_k, w_at, w_g, w_row, w_k, rows, length)``: term ``i`` of output
    ``(g, s, l)`` multiplies ``x[x_at + g*x_g + i*x_k + l]`` by
    ``w[w_at + g*w_g + i*w_k + s*w_row]``; ``acc`` is ``(G, rows, length)`` in C order, and
    in KAHAN and EXACT mode the further states follow in further such blocks.
    """
    x_at, x_g, x_k, w_at, w_g, w_row, w_k, rows, length = geometry
    comp_at = acc.size // (3 if mode == EXACT else 2 if mode == KAHAN else 1)
    for first in range(0, count, TERMS_PER_PASS):
        terms = min(TERMS_PER_PASS, count - first)
        for g in range(g_lo, g_hi):
            xg = x_at + g * x_g + first * x_k
            wg = w_at + g * w_g + first * w_k
            operands = (x, xg, x_k, w, wg, w_k, w_row)
            outputs = (acc, g * rows * length, rows, length, comp_at)
            _tiles(operands, outputs, terms, fused, mode, l_lo, l_hi)


@numba.njit(inline="always")
def _tiles(operands, outputs, count, fused, mode, l_lo, l_hi):
    """One group's outputs ``l_lo <= l < l_hi`` (every row), ``count`` steps: tiles of a
    vector of positions, then scalar steps for the positions left over."""
    x, xg, x_k, w, wg, w_k, w_row = operands
    acc, ag, rows, length, comp_at = outputs
    lanes = VECTOR_BYTES // acc.itemsize
    height = ROWS if mode == CHAIN else KAHAN_ROWS if mode == KAHAN else EXACT_ROWS
    at = l_lo
    while at + lanes <= l_hi:
        for s in range(0, rows, height):
            tall = min(height, rows - s)
            xa, wa, aa = xg + at, wg + s * w_row, ag + s * length + at
            _tile_of(
                tall, fused, mode, x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count, comp_at
            )
        at += lanes
    for position in range(at, l_hi):
        for s in range(rows):
            out = ag + s * length + position
            xi, wi = xg + position, wg + s * w_row
            if mode == KAHAN:
                _kahan_scalar(x, xi, x_k, w, wi, w_k, acc, out, comp_at, count, fused)
                continue
            if mode == EXACT:
                _exact_scalar(x, xi, x_k, w, wi, w_k, acc, out, comp_at, count)
                continue
            total = acc[out]
            for _ in range(count):
                total = fma(x[xi], w[wi], total) if fused else total + x[xi] * w[wi]
                xi += x_k
                wi += w_k
            acc[out] = total


@numba.njit(inline="always")
def _kahan_scalar(x, xi, x_k, w, wi, w_k, acc, out, comp_at, count, fused):
    """One output's Kahan steps (as _kahan_step, on scalars)."""
    total, comp = acc[out], acc[out + comp_at]
    for _ in range(count):
        y = fma(x[xi], w[wi], -comp) if fused else x[xi] * w[wi] - comp
        t = total + y
        comp = (t - total) - y
        total = t
        xi += x_k
        wi += w_k
    acc[out], acc[out + comp_at] = total, comp


@numba.njit(inline="always")
def _exact_scalar(x, xi, x_k, w, wi, w_k, acc, out, comp_at, count):
    """One output's double-double steps (as _exact_step, on scalars)."""
    s, e, mag = acc[out], acc[out + comp_at], acc[out + 2 * comp_at]
    for _ in range(count):
        t = np.float64(x[xi]) * np.float64(w[wi])
        s_new = s + t
        z = s_new - s
        e += (s - (s_new - z)) + (t - z)
        s = s_new
        mag += abs(t)
        xi += x_k
        wi += w_k
    acc[out], acc[out + comp_at], acc[out + 2 * comp_at] = s, e, mag
