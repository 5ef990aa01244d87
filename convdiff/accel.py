"""Optional compiled chains of multiply-adds (numba), bit-identical to the NumPy engine.

A reduction in a fixed order is, for each output element, a chain of steps
``acc = round(acc + a[k] * b[k])`` over an ordered range of terms ``k``. The NumPy engine in
:mod:`convdiff.orders` runs one chain step per NumPy pass over a block of outputs and emulates
the fused step exactly in float64 (six passes a term). Where numba is installed this module runs
the same chains compiled (:mod:`convdiff._compiled`), with the hardware's own fused multiply-add
(LLVM's ``llvm.fma``, one rounding by definition, in the accumulator's dtype) or, unfused, a
product and a sum each rounded once: the IEEE operations the NumPy engine emulates, hence the
same bits. The outputs are computed in register tiles (a few rows times one vector of
positions, each accumulator held in a register for its whole chain) and shared out between the
cores the process may use; each output's chain runs on one thread, in order.

Only float32 and float64 accumulators with operands of their own dtype are compiled (the
NumPy engine emulates a float64 fused step with Dekker's exact product and a round-to-odd sum,
see :func:`convdiff.floats.fma64`). For anything else, or without numba, or with
``CONVDIFF_NUMBA=0`` in the environment, :func:`operands` returns None and the NumPy engine
does the work. The tests run both paths on the same reductions and require identical bits.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np

from convdiff import native


def enabled() -> bool:
    """Whether compiled chains are used: numba installed and not disabled (by
    ``CONVDIFF_NUMBA=0``, or numba's ``NUMBA_DISABLE_JIT=1``, under which nothing compiles)."""
    disabled = os.environ.get("CONVDIFF_NUMBA", "1") == "0"
    no_jit = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
    return not (disabled or no_jit) and native.available()


def version() -> str | None:
    """numba's installed version unless disabled, for the environment record (read from the
    package metadata: importing numba takes a while and a run in the BLAS order never needs it).
    """
    if os.environ.get("CONVDIFF_NUMBA", "1") == "0":
        return None
    try:
        return importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return None


def operands(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """The operands of a reduction made ready for :func:`fma_chain` (C-contiguous), or None
    when its chains are not compiled: another dtype, a wider operand, numba missing.

    Args:
        a, b: operands shaped ``(K, G, S, L)``, each 1 on the axes it does not vary along.
        dtype: the accumulator dtype every step rounds to.
    """
    if not compiles(a.dtype, b.dtype, dtype) or a.ndim != 4 or b.ndim != 4:
        return None
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def compiles(a_dtype: Any, b_dtype: Any, dtype: Any) -> bool:
    """Whether chains on operands of these dtypes into a ``dtype`` accumulator are compiled."""
    return np.dtype(dtype) == np.dtype(a_dtype) == np.dtype(b_dtype) in _COMPILED and enabled()


# accumulators whose IEEE steps the hardware (and llvm.fma) gives directly
_COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


def fma_chain(a: np.ndarray, b: np.ndarray, acc: np.ndarray, terms: range, fused: bool) -> None:
    """Run ``acc = round(acc + a[k] * b[k])`` for ``k`` in ``terms`` on every output, in place.

    Args:
        a, b: operands from :func:`operands`.
        acc: ``(G, S, L)`` float64 accumulators holding values of the operands' dtype.
        terms: the chain's terms in order (a range with any step).
        fused: one rounding per step (FMA) instead of two.
    """
    if not len(terms):
        return
    work = acc.astype(a.dtype)
    chain_in_place(a, b, work, terms, fused)
    acc[...] = work


def chain_in_place(
    a: np.ndarray, b: np.ndarray, work: np.ndarray, terms: range, fused: bool
) -> None:
    """:func:`fma_chain` on accumulators held in the operands' own dtype (C-contiguous
    ``work``), in place: the same steps without the float64 copies."""
    if len(terms):
        _run_tiles(*_read(a, b, work.shape, terms), work.reshape(-1), len(terms), fused, _CHAIN)


def kahan_in_place(
    a: np.ndarray, b: np.ndarray, state: np.ndarray, terms: range, fused: bool
) -> None:
    """Kahan's compensated sum of the terms in order (orders._kahan's steps), on ``state``:
    ``(2, G, S, L)`` in the operands' dtype, C-contiguous, the sums then the compensations."""
    if len(terms):
        geometry = _read(a, b, state.shape[1:], terms)
        _run_tiles(*geometry, state.reshape(-1), len(terms), fused, _KAHAN)


def exact_in_place(a: np.ndarray, b: np.ndarray, state: np.ndarray) -> None:
    """orders.exact_sum's double-double accumulation of ``a[k] * b[k]`` (float32 operands,
    exact products in float64), in order, on ``state``: ``(3, G, S, L)`` float64,
    C-contiguous: the sums, the error sums, the terms' magnitudes."""
    terms = range(a.shape[0])
    if len(terms):
        geometry = _read(a, b, state.shape[1:], terms)
        _run_tiles(*geometry, state.reshape(-1), len(terms), False, _EXACT)


def exact_compiles(a_dtype: Any, b_dtype: Any) -> bool:
    """Whether :func:`exact_in_place` takes operands of these dtypes."""
    f32 = np.dtype(np.float32)
    return np.dtype(a_dtype) == np.dtype(b_dtype) == f32 and enabled()


# Bytes of the positions' vector of a register tile of convdiff._compiled (one AVX-512
# register, two AVX2 registers): a split of the positions between threads falls on them.
VECTOR_BYTES = 64

# modes of _compiled.tiled_chain (its CHAIN, KAHAN, EXACT) and their states per output
_CHAIN, _KAHAN, _EXACT = 0, 1, 2
_STATES = {_CHAIN: 1, _KAHAN: 2, _EXACT: 3}


def _read(
    a: np.ndarray, b: np.ndarray, shape: tuple[int, ...], terms: range
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """:func:`_tiling`, for any operands: those of no layout of orders._arrange are copied
    into one where each output is a group of its own."""
    geometry = _tiling(a, b, shape, terms)
    if geometry is None:
        size = math.prod(shape)
        full = (a.shape[0], size, 1, 1)
        a, b = (np.broadcast_to(x, (x.shape[0], *shape)).reshape(full) for x in (a, b))
        geometry = _tiling(a, b, full[1:], terms)
    if geometry is None:  # one output per group always tiles
        raise RuntimeError(f"no tiling of operands {a.shape} x {b.shape}")
    return geometry


# Multiply-adds below which a chain runs on one thread (splitting costs ~0.1 ms).
_PARALLEL_STEPS = 1 << 22


def _tiling(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...], terms: range) -> tuple | None:
    """How :func:`convdiff._compiled.tiled_chain` reads the operands: ``(x, w, geometry)``
    with ``x`` the operand that varies along the outputs' last axis only, ``w`` the one that
    does not (a product is commutative, bit for bit); None when neither does (never for the
    layouts of :func:`convdiff.orders._arrange`)."""
    _, rows, length = shape
    for x, w in ((a, b), (b, a)):
        if x.shape[2] == 1 and w.shape[3] == 1 and x.shape[3] == length:
            break
    else:
        return None
    x_term, w_term = x.shape[1] * x.shape[3], w.shape[1] * w.shape[2]
    geometry = (
        terms.start * x_term,
        x.shape[3] if x.shape[1] > 1 else 0,
        terms.step * x_term,
        terms.start * w_term,
        w.shape[2] if w.shape[1] > 1 else 0,
        1 if w.shape[2] > 1 else 0,
        terms.step * w_term,
        rows,
        length,
    )
    return x.reshape(-1), w.reshape(-1), geometry


def _run_tiles(
    x: np.ndarray,
    w: np.ndarray,
    geometry: tuple,
    flat: np.ndarray,
    count: int,
    fused: bool,
    mode: int,
) -> None:
    """Run the tiled chains on the accumulators ``flat`` (laid out as ``geometry`` says; in
    KAHAN and EXACT mode followed by their further states), the outputs split between
    threads: disjoint outputs, so the split cannot change a bit."""
    rows, length = geometry[-2:]
    outputs = flat.size // _STATES[mode]
    groups = outputs // max(rows * length, 1)
    threads = _threads()
    if threads == 1 or count * outputs < _PARALLEL_STEPS:
        native.tiled_chain(x, w, flat, geometry, count, fused, mode, 0, groups, 0, length)
        return
    lanes = VECTOR_BYTES // flat.itemsize
    if length >= 2 * threads * lanes:  # split the positions at vector boundaries
        step = math.ceil(length / threads / lanes) * lanes
        parts = [(0, groups, lo, min(lo + step, length)) for lo in range(0, length, step)]
    else:
        step = math.ceil(groups / threads)
        parts = [(lo, min(lo + step, groups), 0, length) for lo in range(0, groups, step)]
    jobs = [
        _pool().submit(native.tiled_chain, x, w, flat, geometry, count, fused, mode, *part)
        for part in parts
    ]
    for job in jobs:
        job.result()


def split(size: int, minimum: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut into one part per core, each at least ``minimum`` long (one part when
    there is one core or too little work)."""
    parts = min(_threads(), size // max(minimum, 1))
    if parts <= 1:
        return [(0, size)]
    step = math.ceil(size / parts)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


def in_parallel(function: Any, calls: list[tuple]) -> list:
    """``function(*args)`` for each ``args`` in ``calls``, on the cores (``function`` must
    release the GIL: a kernel of :mod:`convdiff.native`, called through ``ctypes``), results
    in the order of ``calls``."""
    if len(calls) == 1:
        return [function(*calls[0])]
    jobs = [_pool().submit(function, *args) for args in calls]
    return [job.result() for job in jobs]


@cache
def _threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="convdiff-chains")
