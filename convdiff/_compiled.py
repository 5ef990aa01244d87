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
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from convdiff.cachedir import cache_dir


@intrinsic
def fma(typingctx: Any, x: Any, y: Any, z: Any) -> Any:
    """LLVM's fused multiply-add: ``x * y + z`` rounded once (IEEE 754 fusedMultiplyAdd),
    for float32 or float64 operands of one type."""
    if not (isinstance(x, types.Float) and x == y == z):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        kind = args[0].type
        fnty = ir.FunctionType(kind, [kind, kind, kind])
        name = "llvm.fma.f32" if x.bitwidth == 32 else "llvm.fma.f64"
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)

    return x(x, y, z), codegen


# Rows of a register tile. On AVX2 a 16-float32 vector takes two of the 16 vector registers:
# 6 rows are 12 accumulator registers, plus the term's vector and a broadcast.
ROWS = 6
# Bytes of the positions' vector (one AVX-512 register, two AVX2 registers).
VECTOR_BYTES = 64


def _tile(rows: int, fused: bool) -> Any:
    """An intrinsic running ``count`` chain steps on a tile of ``rows`` x one vector of outputs.

    Called as ``tile(x, x_at, x_step, w, w_at, w_step, w_row, acc, acc_at, acc_row, count)``
    on flat arrays of one float dtype; offsets and steps count elements. Step ``i`` reads the
    vector ``x[x_at + i*x_step :][:lanes]`` and, for row ``r``, the scalar
    ``w[w_at + i*w_step + r*w_row]``; row ``r``'s accumulators are the vector at
    ``acc[acc_at + r*acc_row]``, loaded before the first step and stored after the last.
    """

    @intrinsic
    def tile(typingctx, x, x_at, x_step, w, w_at, w_step, w_row, acc, acc_at, acc_row, count):  # type: ignore[no-untyped-def]
        arrays = (x, w, acc)
        if not all(isinstance(a, types.Array) and a.ndim == 1 for a in arrays):
            return None
        if not (isinstance(x.dtype, types.Float) and x.dtype == w.dtype == acc.dtype):
            return None
        index = types.intp
        sig = types.void(x, index, index, w, index, index, index, acc, index, index, index)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            xs, x_at, x_step, ws, w_at, w_step, w_row, accs, acc_at, acc_row, count = args
            kind = context.get_value_type(x.dtype)
            bits = x.dtype.bitwidth
            lanes = VECTOR_BYTES * 8 // bits
            vector = ir.VectorType(kind, lanes)
            data = [context.make_array(x)(context, builder, value=a).data for a in (xs, ws, accs)]
            x_data, w_data, acc_data = data
            vfma = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vector, [vector] * 3),
                f"llvm.fma.v{lanes}f{bits}",
            )
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)

            index_type = context.get_value_type(types.intp)

            def vector_at(base: Any, offset: Any) -> Any:
                return builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())

            def const(n: int) -> Any:
                return ir.Constant(index_type, n)

            targets = [
                vector_at(acc_data, builder.add(acc_at, builder.mul(const(r), acc_row)))
                for r in range(rows)
            ]
            # accumulators in allocas: mem2reg makes them registers for the whole loop
            slots = [cgutils.alloca_once(builder, vector) for _ in range(rows)]
            for slot, target in zip(slots, targets, strict=True):
                builder.store(builder.load(target, align=bits // 8), slot)
            with cgutils.for_range(builder, count) as loop:
                i = loop.index
                term = builder.load(
                    vector_at(x_data, builder.add(x_at, builder.mul(i, x_step))),
                    align=bits // 8,
                )
                w_here = builder.add(w_at, builder.mul(i, w_step))
                for r, slot in enumerate(slots):
                    at = builder.add(w_here, builder.mul(const(r), w_row))
                    scalar = builder.load(builder.gep(w_data, [at]))
                    lane0 = builder.insert_element(
                        ir.Constant(vector, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0)
                    )
                    factor = builder.shuffle_vector(lane0, ir.Constant(vector, ir.Undefined), zeros)
                    total = builder.load(slot)
                    if fused:
                        total = builder.call(vfma, [term, factor, total])
                    else:  # two IEEE roundings: no fast-math flags, so no contraction
                        total = builder.fadd(total, builder.fmul(term, factor))
                    builder.store(total, slot)
            for slot, target in zip(slots, targets, strict=True):
                builder.store(builder.load(slot), target, align=bits // 8)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# One intrinsic per tile height (the last rows of a layer may be fewer than ROWS) and step.
_FUSED = tuple(_tile(rows, True) for rows in range(1, ROWS + 1))
_UNFUSED = tuple(_tile(rows, False) for rows in range(1, ROWS + 1))
_F1, _F2, _F3, _F4, _F5, _F6 = _FUSED
_U1, _U2, _U3, _U4, _U5, _U6 = _UNFUSED
# Terms per pass over the outputs: the operands' part of a pass (a vector of positions and
# the rows' scalars, for this many terms) stays in the L1 and L2 caches while every tile of
# the pass reads it. Each pass stores the accumulators and the next reloads them (exact).
TERMS_PER_PASS = 256


@numba.njit(inline="always")
def _tile_of(rows, fused, x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count):  # type: ignore[no-untyped-def]
    """The tile of ``rows`` (1 to ROWS) rows: numba needs the intrinsic picked by name."""
    args = (x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count)
    if fused:
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
def tiled_chain(x, w, acc, geometry, count, fused, g_lo, g_hi, l_lo, l_hi):  # type: ignore[no-untyped-def]
    """Chains of ``count`` steps on the outputs ``acc[g, s, l]`` for ``g_lo <= g < g_hi``,
    ``l_lo <= l < l_hi`` and every ``s``; arrays flat, laid out by ``geometry``:

    ``(x_at, x_g, x_k, w_at, w_g, w_row, w_k, rows, length)``: term ``i`` of output
    ``(g, s, l)`` multiplies ``x[x_at + g*x_g + i*x_k + l]`` by
    ``w[w_at + g*w_g + i*w_k + s*w_row]``; ``acc`` is ``(G, rows, length)`` in C order.
    """
    x_at, x_g, x_k, w_at, w_g, w_row, w_k, rows, length = geometry
    for first in range(0, count, TERMS_PER_PASS):
        terms = min(TERMS_PER_PASS, count - first)
        for g in range(g_lo, g_hi):
            xg = x_at + g * x_g + first * x_k
            wg = w_at + g * w_g + first * w_k
            _tiles(
                x,
                xg,
                x_k,
                w,
                wg,
                w_k,
                w_row,
                acc,
                g * rows * length,
                rows,
                length,
                terms,
                fused,
                l_lo,
                l_hi,
            )


@numba.njit(inline="always")
def _tiles(x, xg, x_k, w, wg, w_k, w_row, acc, ag, rows, length, count, fused, l_lo, l_hi):  # type: ignore[no-untyped-def]
    """One group's outputs ``l_lo <= l < l_hi`` (every row), ``count`` steps: tiles of a
    vector of positions, then scalar steps for the positions left over."""
    lanes = VECTOR_BYTES // x.itemsize
    at = l_lo
    while at + lanes <= l_hi:
        for s in range(0, rows, ROWS):
            height = min(ROWS, rows - s)
            xa, wa, aa = xg + at, wg + s * w_row, ag + s * length + at
            _tile_of(height, fused, x, xa, x_k, w, wa, w_k, w_row, acc, aa, length, count)
        at += lanes
    for position in range(at, l_hi):
        for s in range(rows):
            total = acc[ag + s * length + position]
            xi = xg + position
            wi = wg + s * w_row
            for _ in range(count):
                total = fma(x[xi], w[wi], total) if fused else total + x[xi] * w[wi]
                xi += x_k
                wi += w_k
            acc[ag + s * length + position] = total


def cache_compiled(function: Any) -> None:
    """Keep ``function``'s machine code in convdiff's user cache directory (numba's default is
    the ``__pycache__`` beside this file, inside the installed package, where a later
    reinstall leaves it behind). ``NUMBA_CACHE_DIR``, when set, is the user's choice and wins.
    Without a writable directory nothing is cached: numba compiles on each run's first call.
    """
    if numba.config.CACHE_DIR:
        function.enable_caching()
        return
    target = cache_dir("numba")
    if target is None:
        return
    numba.config.CACHE_DIR = str(target)  # read once, when the cache is located
    try:
        function.enable_caching()
    finally:
        numba.config.CACHE_DIR = ""


cache_compiled(tiled_chain)
