"""Optional compiled chains of multiply-adds (numba), bit-identical to the NumPy engine.

A reduction in a fixed order is, for each output element, a chain of steps
``acc = round(acc + a[k] * b[k])`` over an ordered range of terms ``k``. The NumPy engine in
:mod:`convdiff.orders` runs one chain step per NumPy pass over a block of outputs and emulates
the fused step exactly in float64 (six passes a term). Where numba is installed this module runs
the same chains compiled (:mod:`convdiff._compiled`), with the hardware's own fused multiply-add
(LLVM's ``llvm.fma``, one rounding by definition, in the accumulator's dtype) or, unfused, a
product and a sum each rounded once: the IEEE operations the NumPy engine emulates, hence the
same bits. Outputs are visited in cache-sized chunks, each chunk's accumulators held while every
term of the chain is added, each term's operands read once per chunk.

Only float32 and float64 accumulators with operands of their own dtype are compiled (the
NumPy engine emulates a float64 fused step with Dekker's exact product and a round-to-odd sum,
see :func:`convdiff.floats.fma64`). For anything else, or without numba, or with
``CONVDIFF_NUMBA=0`` in the environment, :func:`operands` returns None and the NumPy engine
does the work. The tests run both paths on the same reductions and require identical bits.
"""

from __future__ import annotations

import importlib.metadata
import os
from functools import cache
from typing import Any

import numpy as np


def enabled() -> bool:
    """Whether compiled chains are used: numba importable and not disabled."""
    return os.environ.get("CONVDIFF_NUMBA", "1") != "0" and _kernels() is not None


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
    _kernels()(a, b, work, terms.start, terms.stop, terms.step, fused)
    acc[...] = work


@cache
def _kernels() -> Any:
    """The compiled chain function, or None without numba (compiled on first use, then
    cached on disk beside the module)."""
    try:
        from convdiff import _compiled
    except ImportError:
        return None
    return _compiled.chain
