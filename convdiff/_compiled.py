"""numba kernels of :mod:`convdiff.accel` (importing this module needs numba)."""

from __future__ import annotations

from typing import Any

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from convdiff.cachedir import cache_dir

# Accumulators (outputs) that stay in the L1 cache while a chain runs over them.
CACHE_ELEMENTS = 8192
MIN_CHUNK = 256


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


@numba.njit(inline="always")
def step_row(out, ar, br, fused):
    """One term added to a slice of a row's outputs; an operand of length 1 is a scalar there.
    Unfused, the product and the sum are each rounded (no contraction without fastmath).
    Loops from 0 over slices are what LLVM vectorizes."""
    n = out.shape[0]
    if ar.shape[0] == 1:
        x = ar[0]
        if fused:
            for i in range(n):
                out[i] = fma(x, br[i], out[i])
        else:
            for i in range(n):
                out[i] = out[i] + x * br[i]
    elif br.shape[0] == 1:
        y = br[0]
        if fused:
            for i in range(n):
                out[i] = fma(ar[i], y, out[i])
        else:
            for i in range(n):
                out[i] = out[i] + ar[i] * y
    elif fused:
        for i in range(n):
            out[i] = fma(ar[i], br[i], out[i])
    else:
        for i in range(n):
            out[i] = out[i] + ar[i] * br[i]


@numba.njit(nogil=True)
def chain(a, b, acc, start, stop, step, fused):
    """``acc[g, s, l] = round(acc + a[k] * b[k])`` for ``k`` in ``range(start, stop, step)``;
    ``a`` and ``b`` are ``(K, G, S, L)``, 1 on the axes they do not vary along."""
    groups, small, large = acc.shape
    # a tile of rows x chunk outputs whose accumulators stay in the L1 cache while every term
    # is added; rows of at least MIN_CHUNK outputs, so that the inner loops vectorize
    chunk = min(large, max(MIN_CHUNK, CACHE_ELEMENTS // max(small, 1)))
    rows = max(1, CACHE_ELEMENTS // max(chunk, 1))
    for g in range(groups):
        ga = g if a.shape[1] > 1 else 0
        gb = g if b.shape[1] > 1 else 0
        for lo in range(0, large, chunk):
            hi = min(lo + chunk, large)
            la = (lo, hi) if a.shape[3] > 1 else (0, 1)
            lb = (lo, hi) if b.shape[3] > 1 else (0, 1)
            for s0 in range(0, small, rows):
                s1 = min(s0 + rows, small)
                for k in range(start, stop, step):
                    ar = a[k, ga, 0, la[0] : la[1]]
                    br = b[k, gb, 0, lb[0] : lb[1]]
                    for s in range(s0, s1):
                        if a.shape[2] > 1:
                            ar = a[k, ga, s, la[0] : la[1]]
                        if b.shape[2] > 1:
                            br = b[k, gb, s, lb[0] : lb[1]]
                        step_row(acc[g, s, lo:hi], ar, br, fused)


def _cache_compiled(function: Any) -> None:
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


_cache_compiled(chain)
