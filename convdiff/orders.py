"""Summation orders: how the NumPy side adds the terms of a reduction.

Every reduction in convdiff is ``sum_k a[k] * b[k]`` over the leading axis ``k`` of two arrays
that broadcast against each other on the remaining axes (``b`` may be absent: a plain sum).
An :class:`Order` names how those ``K`` terms are added; each function here is vectorised over
every output element and loops (in Python) only over the ``K`` terms, so its cost is
``K`` NumPy passes over the output.

Unless an order says otherwise, products and partial sums are rounded to the accumulator dtype
after every step, the way a scalar loop in that dtype would. With ``fma=True`` a product and the
addition that consumes it are rounded once, as a fused multiply-add instruction does.

The orders that TensorFlow's CPU kernels use (measured on x86-64 with AVX-512, see the README's
"What summation order does TensorFlow use?"): oneDNN's convolutions accumulate the taps in
(kernel row, kernel column, input channel) order, one FMA each (``sequential``), except that its
1x1 convolutions split the input channels into chunks whose size comes from an L2-cache
heuristic, each chunk summed from zero and added to the output (``blocked:K`` with that chunk
size). TensorFlow's Eigen path (oneDNN off) slices a matrix product's reduction into
near-equal slices of at most 320 terms, and runs depthwise convolutions and matrix-vector
products without FMA (``eigen`` models all three).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np

from convdiff import accel, trees
from convdiff.errors import OptionError
from convdiff.floats import (
    exact_products,
    finfo,
    fma64,
    mantissa_bits,
    quantum_log2,
    round_to,
    two_product,
)
from convdiff.trees import ReductionTree

ORDER_NAMES = (
    "auto",
    "sequential",
    "reverse",
    "pairwise",
    "kahan",
    "blocked",
    "eigen",
    "blas",
    "float64",
    "exact",
)
# The order a run takes when it names none (see default_order_name).
DEFAULT_ORDER = "auto"
# The labelled reduction axes a tap order can rearrange (kernels/conv.py): kernel depth, rows,
# columns and input channels of Conv1D/2D/3D, and the spatial taps of depthwise convolutions.
TAP_AXES = ("wc", "hwc", "dhwc", "hw", "dhw")
# Orders built from fused (or, with fma=False, unfused) multiply-add steps.
FMA_ORDERS = ("sequential", "reverse", "pairwise", "kahan", "blocked")
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
        fma: fuse each multiply with the add that consumes it (one rounding instead of two);
            ``eigen`` fixes that itself and ignores it.
        block: terms per block for ``blocked``.
        accumulate: accumulator dtype name, or None for the layer's compute dtype.
        tap_order: nesting of labelled reduction axes (e.g. ``"hwc"``), or None for the kernel's.
        trees: ``auto``: the revealed trees, by ``(terms, output shape)``.
        functions: ``auto``: library functions computed by a model of TensorFlow's own
            algorithm (:mod:`convdiff.eigenmath`) instead of their correctly rounded value.
    """

    name: str = "sequential"
    fma: bool = True
    block: int = 0
    accumulate: str | None = None
    tap_order: str | None = None
    trees: tuple[tuple[tuple[int, tuple[int, ...]], ReductionTree], ...] = ()
    functions: tuple[str, ...] = ()

    def tree_for(self, terms: int, shape: tuple[int, ...]) -> ReductionTree | None:
        """``auto``: the revealed tree of the reduction of ``terms`` terms into ``shape``."""
        return next((t for key, t in self.trees if key == (terms, tuple(shape))), None)

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``sequential+fma`` or ``blocked:16``."""
        base = f"blocked:{self.block}" if self.name == "blocked" else self.name
        if self.name in FMA_ORDERS:
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


def default_order_name(
    fma: bool | None = None, accumulate: str | None = None, tap_order: str | None = None
) -> str:
    """The order of a run that names none: ``auto``, the trees this machine's backend adds in,
    revealed layer by layer, so that a correct model reads ``identical`` wherever the backend
    is deterministic. A run that refines the order (``fma=False``, an accumulator, a tap
    order) asks "what if the terms were added like this", a question about an order of
    convdiff's own: it takes ``sequential``, refined."""
    refined = fma is False or accumulate is not None or tap_order is not None
    return "sequential" if refined else DEFAULT_ORDER


def parse_order(
    text: str, fma: bool = True, accumulate: str | None = None, tap_order: str | None = None
) -> Order:
    """Parse ``--order`` (and its companions) into an :class:`Order`.

    Raises:
        OptionError: for an unknown order, a bad block size or an unknown accumulator dtype.
    """
    name, _, arg = text.partition(":")
    if name not in ORDER_NAMES:
        choices = ", ".join("blocked:K" if n == "blocked" else n for n in ORDER_NAMES)
        raise OptionError(f"unknown order {text!r}; valid choices are {choices}")
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
    if tap_order is not None and not any(sorted(tap_order) == sorted(a) for a in TAP_AXES):
        raise OptionError(
            f"--tap-order {tap_order!r} is not an order of a convolution's reduction axes; "
            "give a permutation of hwc (Conv2D: kernel rows h, columns w, input channels c), "
            "wc (Conv1D), dhwc (Conv3D; d: kernel depth), hw or dhw (depthwise)"
        )
    return Order(name=name, fma=fma, block=block, accumulate=accumulate, tap_order=tap_order)


_SIGN_BIT = np.iinfo(np.int64).min


class _Engine:
    """Accumulators over one block of outputs: float64 arrays that hold values of ``dtype``,
    updated in place by rounded steps, with scratch buffers reused across steps.

    ``a`` and ``b`` are the block's operands, shaped ``(K, ...)`` and broadcasting to the
    block's output shape (``b`` None for a plain sum). Every step rounds once to ``dtype``:

    - ``fma(acc, k)``: ``acc + a[k]*b[k]`` with ``fused``; the product of two float32 (or
      narrower) numbers is exact in float64 (48 <= 53 bits), so the float64 sum is the fused
      result up to one more rounding: the cast to ``dtype`` double-rounds only where the
      float64 sum lies exactly on a ``dtype`` midpoint (or in ``dtype``'s subnormal range, with
      fewer bits). Those elements are found with two cheap passes and rounded to odd first
      (TwoSum gives the addition's error; an inexact sum with an even last bit moves one
      float64 step towards the exact value), which makes the final cast correct. A float64
      accumulator with float64 operands (whose products are not exact) takes :func:`fma64`.
    - unfused, ``acc + round(a[k]*b[k])``, and plain sums, ``acc + round(a[k])``: a sum of two
      ``dtype`` values computed in float64 (53 >= 2*24 + 2 bits) and cast once is correctly
      rounded, so no check is needed.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray | None, dtype: np.dtype, fma: bool):
        self.dtype = dtype
        self.fused = fma and b is not None
        self.shape = np.broadcast_shapes(a.shape[1:], () if b is None else b.shape[1:])
        self.size = a.shape[0]
        self._given = (a, b)
        # a plain sum is a[k] * 1, exact
        b_compiled = np.ones((a.shape[0], 1, 1, 1), a.dtype) if b is None else b
        # the operands for compiled chains (see chain()), None where they are not compiled
        self._compiled = accel.operands(a, b_compiled, dtype)
        self._ready = False
        self._sum: np.ndarray  # the scratch buffers, made on first use (_scratch)
        self._cast: np.ndarray
        self._has_scratch = False

    def _prepare(self) -> None:
        """The float64 operands and scratch buffers of the NumPy steps (made on first use:
        compiled chains need none of them)."""
        a, b = self._given
        dtype = self.dtype
        self._ready = True
        self.a = a.astype(np.float64)
        self.b = None if b is None else b.astype(np.float64)
        if b is None:  # the terms themselves, rounded to the accumulator once
            self.a = self._rounded_copy(self.a)
        self._prod = np.empty(self.shape)
        self._scratch()
        self._low = np.empty(self.shape, np.uint64)
        nmant = mantissa_bits(dtype)
        # Shifting the float64 bits left by 12 + nmant keeps the 52 - nmant bits that the cast
        # drops, at the top: a midpoint (1000...0) becomes the sign bit alone, int64's minimum.
        self._shift = np.uint64(12 + nmant)
        tiny_log2 = math.log2(float(finfo(dtype).smallest_normal)) if dtype != np.float64 else 0
        # Nonzero results below the smallest normal number are impossible when every product
        # is a multiple of a power of two >= that number (then so is every rounded sum).
        # (fused steps have a second operand)
        self._tiny = (
            self.fused
            and b is not None
            and dtype != np.float64
            and quantum_log2(a) + quantum_log2(b) < tiny_log2
        )
        self._smallest_normal = float(finfo(dtype).smallest_normal) if self._tiny else 0.0
        self._sum_bits = self._sum.view(np.uint64)
        self._low_signed = self._low.view(np.int64)
        self._fast = (
            self.fused and not self._tiny and dtype in (np.dtype(np.float32), np.dtype(np.float16))
        )
        # float64 operands' products are not exact in float64: a true fused step (fma64)
        self._fma64 = (
            self.fused
            and b is not None
            and dtype == np.float64
            and not exact_products(a.dtype, b.dtype)
        )

    def _scratch(self) -> None:
        """The buffers of a rounded sum (all that :meth:`add` needs: joining partial sums never
        reads the operands, so it does not convert them)."""
        if not self._has_scratch:
            self._sum = np.empty(self.shape)
            self._cast = np.empty(self.shape, self.dtype)
            self._has_scratch = True

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape)

    def fma(self, acc: np.ndarray, k: int, fused: bool | None = None) -> None:
        """``acc = round(acc + a[k]*b[k])`` (fused or not), or ``round(acc + a[k])``.

        ``fused=False`` makes this step unfused in an engine built fused (a revealed tree may
        mix fused and unfused chains); an unfused engine cannot fuse.
        """
        if not self._ready:
            self._prepare()
        a, b = self.a, self.b
        if b is None:  # a plain sum (never fused: see _fast and _fma64)
            np.add(acc, a[k], out=self._sum)
        elif fused is False and self.fused:  # one unfused step in a fused engine
            np.multiply(a[k], b[k], out=self._prod)
            self._round_into(self._prod, self._prod)
            np.add(acc, self._prod, out=self._sum)
        elif self._fast:  # the common case, six NumPy passes
            np.multiply(a[k], b[k], out=self._prod)
            np.add(acc, self._prod, out=self._sum)
            np.left_shift(self._sum_bits, self._shift, out=self._low)
            if self._low_signed.min() == _SIGN_BIT:
                self._round_to_odd(acc, self._prod, self._sum)
            np.copyto(self._cast, self._sum, casting="unsafe")
            np.copyto(acc, self._cast)
            return
        elif self._fma64:
            np.copyto(acc, fma64(acc, a[k], b[k]))
            return
        elif not self.fused:
            np.multiply(a[k], b[k], out=self._prod)
            self._round_into(self._prod, self._prod)
            np.add(acc, self._prod, out=self._sum)
        else:
            np.multiply(a[k], b[k], out=self._prod)
            np.add(acc, self._prod, out=self._sum)
            if self.dtype != np.float64 and self._double_rounding_possible():
                self._round_to_odd(acc, self._prod, self._sum)
        self._round_into(self._sum, acc)

    def chain(self, acc: np.ndarray, terms: range, fused: bool | None = None) -> None:
        """:meth:`fma` for each term in ``terms``, in order: compiled when
        :mod:`convdiff.accel` can (same bits), else one NumPy step per term. ``fused=False``
        as in :meth:`fma`."""
        if self._compiled is not None:
            accel.fma_chain(*self._compiled, acc, terms, self.fused and fused is not False)
            return
        for k in terms:
            self.fma(acc, k, fused)

    def fma_from(self, acc: np.ndarray, start: np.ndarray, k: int) -> None:
        """``acc = round(start + a[k]*b[k])`` for a fresh ``start`` array (used by Kahan)."""
        np.copyto(acc, start)
        self.fma(acc, k)

    def term(self, out: np.ndarray, k: int) -> None:
        """``out = round(a[k]*b[k])`` (or ``round(a[k])``)."""
        if not self._ready:
            self._prepare()
        if self.b is None:
            np.copyto(out, self.a[k])
        else:
            np.multiply(self.a[k], self.b[k], out=self._prod)
            self._round_into(self._prod, out)

    def add(self, acc: np.ndarray, other: np.ndarray) -> None:
        """``acc = round(acc + other)``."""
        self._scratch()
        np.add(acc, other, out=self._sum)
        self._round_into(self._sum, acc)

    def sub(self, out: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """``out = round(x - y)``."""
        if not self._ready:
            self._prepare()
        np.subtract(x, y, out=self._sum)
        self._round_into(self._sum, out)

    def _double_rounding_possible(self) -> bool:
        np.left_shift(self._sum_bits, self._shift, out=self._low)
        if self._low_signed.min() == _SIGN_BIT:
            return True
        if self._tiny:
            mags = np.abs(self._sum)
            return bool(np.any((mags < self._smallest_normal) & (mags != 0)))
        return False

    def _round_to_odd(self, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> None:
        """Where ``s = fl64(x + y)`` may double-round, replace it by ``x + y`` rounded to odd."""
        flagged = self._low.view(np.int64) == _SIGN_BIT
        if self._tiny:
            flagged |= (np.abs(s) < self._smallest_normal) & (s != 0)
        idx = np.flatnonzero(flagged)
        xs, ys, ss = x.reshape(-1)[idx], y.reshape(-1)[idx], s.reshape(-1)[idx]
        yy = ss - xs
        err = (xs - (ss - yy)) + (ys - yy)  # TwoSum: x + y == s + err exactly
        even = (ss.view(np.uint64) & np.uint64(1)) == 0
        fixed = np.where((err != 0) & even, np.nextafter(ss, np.copysign(np.inf, err)), ss)
        s.reshape(-1)[idx] = fixed

    def _round_into(self, src: np.ndarray, dst: np.ndarray) -> None:
        """``dst = round(src)`` to ``dtype``, kept in float64."""
        if self.dtype == np.float64:
            np.copyto(dst, src)
        elif self.dtype == ml_dtypes.bfloat16:
            np.copyto(dst, round_to(src, self.dtype).astype(np.float64))
        else:
            np.copyto(self._cast, src, casting="unsafe")
            np.copyto(dst, self._cast)

    def _rounded_copy(self, x: np.ndarray) -> np.ndarray:
        return round_to(x, self.dtype).astype(np.float64)


# --------------------------------------------------------------------------- layout and blocks

# Output elements per block: the engine's few float64 buffers of this size stay in the L2 cache.
_BLOCK_ELEMENTS = 1 << 16
_MIN_INNER = 512


@dataclass(frozen=True)
class _Layout:
    """The reduction rearranged as ``(K, G, S, L)`` operands and a ``(G, S, L)`` output.

    ``G`` gathers the output axes on which both operands vary (conv groups, depthwise
    channels), ``S`` and ``L`` those on which only one varies (output positions, output
    channels), the larger of the two innermost, so that each NumPy pass runs long inner loops
    with one operand a scalar.
    """

    a: np.ndarray
    b: np.ndarray | None
    dims: tuple[int, int, int]
    perm: tuple[int, ...]
    shape: tuple[int, ...]

    def restore(self, out: np.ndarray) -> np.ndarray:
        """The ``(G, S, L)`` result back in the output's shape."""
        permuted = out.reshape([self.shape[i] for i in self.perm])
        return permuted.transpose(np.argsort(self.perm)).reshape(self.shape)


def _arrange(a: np.ndarray, b: np.ndarray | None, shape: tuple[int, ...]) -> _Layout:
    """Copy the operands into the :class:`_Layout` of the output ``shape`` (in their dtype)."""
    d = len(shape)
    ops = [
        x.reshape((x.shape[0], *([1] * (d + 1 - x.ndim)), *x.shape[1:]))
        for x in (a, b)
        if x is not None
    ]
    varies = [[n != 1 for n in x.shape[1:]] for x in ops] + [[False] * d]
    va, vb = varies[0], varies[1]
    both = [i for i in range(d) if va[i] and vb[i]]
    only_a = [i for i in range(d) if va[i] and not vb[i]]
    only_b = [i for i in range(d) if vb[i] and not va[i]]
    ones = [i for i in range(d) if not (va[i] or vb[i])]

    def extent(axes):
        return math.prod(shape[i] for i in axes)

    small, large = (only_b, only_a) if extent(only_a) >= extent(only_b) else (only_a, only_b)
    perm = (*ones, *both, *small, *large)
    dims = (extent(both), extent(small), extent(large))

    def put(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x.transpose([0, *(1 + i for i in perm)]))
        inner = x.shape[1 + len(ones) + len(both) :]
        s = math.prod(inner[: len(small)])
        return x.reshape(x.shape[0], dims[0], s, math.prod(inner[len(small) :]))

    return _Layout(put(ops[0]), put(ops[1]) if b is not None else None, dims, perm, shape)


def _blocks(dims: tuple[int, int, int], target: int | None = None):
    """Slices ``(g0, g1, l0, l1)`` of the output, each about ``target`` elements
    (:data:`_BLOCK_ELEMENTS` by default)."""
    target = target or _BLOCK_ELEMENTS
    groups, small, large = dims
    if small * large >= target:
        step = min(large, max(_MIN_INNER, target // max(small, 1)))
        step = -(-large // -(-large // step))  # equal blocks, no small remainder
        for g in range(groups):
            for l0 in range(0, large, step):
                yield g, g + 1, l0, min(l0 + step, large)
    else:
        step = max(1, target // max(small * large, 1))
        step = -(-groups // -(-groups // step))
        for g0 in range(0, groups, step):
            yield g0, min(g0 + step, groups), 0, large


def _slice(x: np.ndarray, g0: int, g1: int, l0: int, l1: int) -> np.ndarray:
    """An operand's part of an output block (all of an axis it broadcasts along)."""
    gs = slice(g0, g1) if x.shape[1] != 1 else slice(None)
    ls = slice(l0, l1) if x.shape[3] != 1 else slice(None)
    return x[:, gs, :, ls]


# an order's steps on an engine (_Engine or _CompiledEngine: zeros, chain, add, size, ...)
Program = Callable[[Any], np.ndarray]


def _map_blocks(a, b, shape, dtype: np.dtype, fn, target: int | None = None) -> np.ndarray:
    """``fn(a_block, b_block)`` for each output block (operands shaped ``(K, G, S, L)``, with
    1 where they broadcast); the results assembled in ``dtype`` and the output's shape."""
    layout = _arrange(a, b, shape)
    out = np.empty(layout.dims, dtype)
    for g0, g1, l0, l1 in _blocks(layout.dims, target):
        a_blk = _slice(layout.a, g0, g1, l0, l1)
        b_blk = None if layout.b is None else _slice(layout.b, g0, g1, l0, l1)
        view = out[g0:g1, :, l0:l1]
        view[...] = np.broadcast_to(fn(a_blk, b_blk), view.shape)
    return layout.restore(out)


def _run_blocked(a, b, shape, dtype: np.dtype, fma: bool, program: Program) -> np.ndarray:
    """Run an order's ``program`` on each output block; the result in ``dtype``. Compiled
    chains take the whole output as one block (they tile it for the cache themselves)."""
    whole = accel.compiles(a.dtype, a.dtype if b is None else b.dtype, dtype)
    if whole and program is _kahan:
        return _kahan_compiled(a, b, shape, dtype, fma)
    if whole:
        return _chains_compiled(a, b, shape, dtype, fma, program)
    return _map_blocks(
        a,
        b,
        shape,
        dtype,
        lambda ab, bb: round_to(program(_Engine(ab, bb, dtype, fma)), dtype),
        None,
    )


class _CompiledEngine:
    """The steps of an order made of chains and sums of partial sums (sequential, reverse,
    pairwise, blocked, a revealed tree: everything but Kahan's) on the whole output, with
    compiled chains and the accumulators held in ``dtype`` itself (float32 or float64).

    An :class:`_Engine` holds them in float64 and copies them to ``dtype`` and back around
    each compiled chain; a sum of two partial sums it computes in float64 and rounds once to
    ``dtype``. Here that sum is one IEEE addition in ``dtype``: the same value (a sum of two
    float32 numbers computed in float64, 53 >= 2*24 + 2 bits, and rounded once is correctly
    rounded), without the copies, in half the memory.
    """

    def __init__(self, layout: _Layout, dtype: np.dtype, fma: bool):
        self.dtype, self.dims, self.size = dtype, layout.dims, layout.a.shape[0]
        self.fused = fma and layout.b is not None
        # a plain sum is a[k] * 1, exact (as in _Engine)
        ones = np.ones((self.size, 1, 1, 1), layout.a.dtype)
        self._operands = _compiled_operands(layout.a, ones if layout.b is None else layout.b, dtype)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.dims, self.dtype)

    def chain(self, acc: np.ndarray, terms: range, fused: bool | None = None) -> None:
        """As :meth:`_Engine.chain` (``fused=False``: an unfused chain in a fused engine)."""
        accel.chain_in_place(*self._operands, acc, terms, self.fused and fused is not False)

    def add(self, acc: np.ndarray, other: np.ndarray) -> None:
        """``acc = round(acc + other)``."""
        np.add(acc, other, out=acc)


def _chains_compiled(a, b, shape, dtype: np.dtype, fma: bool, program: Program) -> np.ndarray:
    """``program`` (chains and sums of partial sums) on the whole output with a
    :class:`_CompiledEngine`."""
    layout = _arrange(a, b, shape)
    return layout.restore(program(_CompiledEngine(layout, dtype, fma)))


def _kahan_compiled(a, b, shape, dtype: np.dtype, fma: bool) -> np.ndarray:
    """:func:`_kahan` on the whole output with compiled steps (the same roundings), the sums
    and compensations held in ``dtype``."""
    layout = _arrange(a, b, shape)
    b_terms = np.ones((a.shape[0], 1, 1, 1), a.dtype) if layout.b is None else layout.b
    state = np.zeros((2, *layout.dims), dtype)
    operands = _compiled_operands(layout.a, b_terms, dtype)
    accel.kahan_in_place(*operands, state, range(a.shape[0]), fma and b is not None)
    return layout.restore(state[0])


def _compiled_operands(a, b, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """accel.operands of _arrange's blocks (4-D) where accel.compiles said yes: never None."""
    operands = accel.operands(a, b, dtype)
    if operands is None:
        raise RuntimeError(f"compiled chains refused {a.dtype}/{b.dtype} operands")
    return operands


# --------------------------------------------------------------------------- orders as programs


def _sequential(eng: _Engine, terms: range | None = None, acc: np.ndarray | None = None):
    """One accumulator from zero, a step per term in order."""
    acc = eng.zeros() if acc is None else acc
    eng.chain(acc, range(eng.size) if terms is None else terms)
    return acc


def _reverse(eng: _Engine) -> np.ndarray:
    return _sequential(eng, range(eng.size - 1, -1, -1))


def _pairwise(eng: _Engine, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """NumPy's pairwise summation (``pairwise_sum`` in its loops): leaves of up to 128 terms are
    summed with 8 interleaved accumulators, combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
    the tail added in order; longer ranges split at a multiple of 8 near the middle."""
    hi = eng.size if hi is None else hi
    n = hi - lo
    if n < 8:
        return _sequential(eng, range(lo, hi))
    if n <= 128:
        r = [eng.zeros() for _ in range(8)]
        full = n - n % 8
        for j in range(8):  # accumulator j takes every 8th term
            eng.chain(r[j], range(lo + j, lo + full, 8))
        for x, y in ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (4, 6), (0, 4)):
            eng.add(r[x], r[y])
        return _sequential(eng, range(lo + full, hi), acc=r[0])
    half = n // 2
    half -= half % 8
    left = _pairwise(eng, lo, lo + half)
    eng.add(left, _pairwise(eng, lo + half, hi))
    return left


def _kahan(eng: _Engine) -> np.ndarray:
    """Kahan's compensated summation; with FMA the compensation is folded into the product:
    ``y = fma(a, b, -comp)``."""
    total, comp, y, t = eng.zeros(), eng.zeros(), eng.zeros(), eng.zeros()
    for k in range(eng.size):
        if eng.fused:
            eng.fma_from(y, -comp, k)
        else:
            eng.term(y, k)
            eng.sub(y, y, comp)
        eng.sub(t, total, -y)  # t = round(total + y)
        eng.sub(comp, t, total)
        eng.sub(comp, comp, y)
        total, t = t, total
    return total


def _blocked(eng: _Engine, block: int) -> np.ndarray:
    """Partial sums over consecutive blocks of ``block`` terms, then the partials in order."""
    total = eng.zeros()
    for start in range(0, eng.size, block):
        eng.add(total, _sequential(eng, range(start, min(start + block, eng.size))))
    return total


# --------------------------------------------------------------------------- revealed trees


def _reduce_tree(a, b, shape, dtype: np.dtype, tree: ReductionTree) -> np.ndarray:
    """A revealed :class:`~convdiff.trees.ReductionTree`: its main tree on every output, then
    each position exception's tree on its positions, each column class's trees on its
    columns."""
    out = np.asarray(_tree_run(a, b, shape, dtype, tree, tree.main))
    if tree.exceptions:
        grid = _Grid(a, b, shape)
        out = np.array(out)
        for runs, node in tree.exceptions:
            sub_a, sub_b, sub_shape, put = grid.rows(np.array(trees.from_runs(runs), np.intp))
            put(out, _tree_run(sub_a, sub_b, sub_shape, dtype, tree, node))
    if tree.columns:
        grid = _Grid(a, b, shape)
        out = np.array(out)
        for runs, sub in tree.columns:
            sub_a, sub_b, sub_shape, put = grid.columns(np.array(trees.from_runs(runs), np.intp))
            put(out, _reduce_tree(sub_a, sub_b, sub_shape, dtype, sub))
    return out


def _tree_run(a, b, shape, dtype: np.dtype, tree: ReductionTree, node: trees.Node):
    fused = trees.any_fused(tree) and b is not None
    program = lambda eng: trees.evaluate(node, eng)  # noqa: E731
    return _run_blocked(a, b, shape, dtype, fused, program)


def reduce_positions(
    a: np.ndarray,
    b: np.ndarray | None,
    order: Order,
    dtype: np.dtype,
    rows: np.ndarray,
    term_axes: int = 1,
) -> np.ndarray:
    """:func:`reduce_terms` at some output positions only (numbered in C order over the output
    axes along which ``b`` is constant), each in its own tree under ``auto``: shaped
    ``(len(rows), ...the other output axes)``. Only the operands of those positions are
    copied: ``a`` may hold its terms on its first ``term_axes`` axes (a convolution's
    windows, a strided view of the input that merging would copy whole), merged only for the
    positions taken."""
    shape = np.broadcast_shapes(a.shape[term_axes:], () if b is None else b.shape[1:])
    rows = np.asarray(rows, np.intp)
    sub_a, sub_b, sub_shape, _ = _Grid(a, b, shape, term_axes).rows(rows)
    terms = math.prod(a.shape[:term_axes])
    tree = order.tree_for(terms, shape) if order.name == "auto" else None
    if tree is None:
        return reduce_terms(sub_a, sub_b, order, dtype).reshape(sub_shape)
    # the selected positions are a reduction of their own: its exceptions renumbered
    renumbered = _renumbered(tree, {int(r): i for i, r in enumerate(rows)})
    acc_dtype = accumulator_dtype(order, dtype)
    return round_to(np.asarray(_reduce_tree(sub_a, sub_b, sub_shape, acc_dtype, renumbered)), dtype)


def _renumbered(tree: ReductionTree, local: dict[int, int]) -> ReductionTree:
    """``tree`` for the positions in ``local`` only, numbered as ``local`` says (its column
    classes' own position exceptions too)."""
    exceptions = []
    for runs, node in tree.exceptions:
        mine = sorted(local[r] for r in trees.from_runs(runs) if r in local)
        if mine:
            exceptions.append((trees.to_runs(mine), node))
    columns = tuple((cols, _renumbered(sub, local)) for cols, sub in tree.columns)
    return ReductionTree(tree.main, tuple(exceptions), columns)


class _Grid:
    """A reduction's operands seen as positions (the output axes along which ``b`` is
    constant) by columns (the others), to take out some positions or some columns as a
    reduction of their own and put its result back."""

    def __init__(
        self, a: np.ndarray, b: np.ndarray | None, shape: tuple[int, ...], term_axes: int = 1
    ) -> None:
        d = len(shape)
        self.shape = tuple(shape)
        # ``a``'s terms on its first term_axes axes, merged only by rows() (after picking)
        self.term_axes = term_axes
        t = term_axes
        self.a = a.reshape((*a.shape[:t], *([1] * (d + t - a.ndim)), *a.shape[t:]))
        self.b = (
            None if b is None else b.reshape((b.shape[0], *([1] * (d + 1 - b.ndim)), *b.shape[1:]))
        )
        varies = [False] * d if self.b is None else [n != 1 for n in self.b.shape[1:]]
        self.row_axes = [i for i in range(d) if not varies[i]]
        self.col_axes = [i for i in range(d) if varies[i]]

    def _moved(self, x: np.ndarray, t: int = 1) -> np.ndarray:
        """``x`` (its terms on its first ``t`` axes) with its row axes, then its column axes."""
        rows, cols = (t + i for i in self.row_axes), (t + i for i in self.col_axes)
        return x.transpose([*range(t), *rows, *cols])

    def rows(self, picked: np.ndarray):
        """Positions ``picked`` (flat): operands shaped ``(K, n, ...columns)`` and a function
        that writes their result into an output of the full shape."""
        row_shape = [self.shape[i] for i in self.row_axes]
        index = np.unravel_index(picked, row_shape)
        t = self.term_axes
        a = self._moved(self.a, t)
        picked_rows: tuple[Any, ...] = (*[slice(None)] * t, *index)  # in a subscript: 3.11+
        a = a[picked_rows]
        a = a.reshape((math.prod(a.shape[:t]), *a.shape[t:]))  # the picked rows' terms merged
        b = (
            None
            if self.b is None
            else self._moved(self.b)[(slice(None),) + (0,) * len(index)][:, None]
        )
        sub_shape = (len(picked), *(self.shape[i] for i in self.col_axes))

        def put(out: np.ndarray, sub: np.ndarray) -> None:
            out.transpose(self.row_axes + self.col_axes)[index] = np.asarray(sub).reshape(sub_shape)

        return a, b, sub_shape, put

    def columns(self, picked: np.ndarray):
        """Columns ``picked`` (flat): operands shaped ``(K, ...positions, n)`` and a function
        that writes their result into an output of the full shape."""
        if self.b is None:  # columns are where the second operand varies
            raise ValueError("a plain sum has no columns")
        if self.term_axes != 1:
            raise ValueError("columns are taken of operands whose terms are merged")
        col_shape = [self.shape[i] for i in self.col_axes]
        index = np.unravel_index(picked, col_shape)
        a = self._moved(self.a)
        rows = len(self.row_axes)
        a_varies = [a.shape[1 + rows + q] > 1 for q in range(len(index))]
        if any(a_varies):
            a = a[
                (slice(None),) * (1 + rows)
                + tuple(ix if v else 0 * ix for ix, v in zip(index, a_varies, strict=True))
            ]
        else:
            a = a[(slice(None),) * (1 + rows) + (0,) * len(index)][..., None]
        b = self._moved(self.b)[(slice(None),) * (1 + rows) + tuple(index)]
        sub_shape = (*(self.shape[i] for i in self.row_axes), len(picked))

        def put(out: np.ndarray, sub: np.ndarray) -> None:
            view = out.transpose(self.row_axes + self.col_axes)
            view[(slice(None),) * rows + tuple(index)] = np.asarray(sub).reshape(sub_shape)

        return a, b, sub_shape, put


# --------------------------------------------------------------------------- TensorFlow's Eigen

# Eigen's largest inner-dimension block for a multi-threaded float contraction
# (evaluateProductBlockingSizesHeuristic caps kc at 320; TensorFlow passes num_threads=2).
_EIGEN_MAX_KC = 320
# TensorFlow rounds its slices up to 8 terms and its column blocks up to 24 (its oneDNN
# contraction kernel, eigen_contraction_kernel.h: kUnrollN); Eigen's nr is 4.
_EIGEN_SLICE_ROUND = 8
_EIGEN_UNROLL_N = 24
_EIGEN_NR = 4
# Eigen's matrix-vector kernel adds blocks of 16 terms (measured: batch-1 Dense layers).
_EIGEN_GEMV = 16


def eigen_slice(terms: int) -> int:
    """Terms per slice of TensorFlow's Eigen contraction: the reduction is cut into
    ``ceil(K / 320)`` near-equal slices, each rounded up to a multiple of 8 (the last one
    shorter). ``eigen_contraction_kernel.h``: ``divup(k / divup(k, kc), 8) * 8``."""
    slices = -(-terms // _EIGEN_MAX_KC)
    size = -(-(terms // slices) // _EIGEN_SLICE_ROUND) * _EIGEN_SLICE_ROUND
    return max(1, min(terms, size))


def _eigen_lone_row(rows: int) -> bool:
    """Whether the last of ``rows`` output positions is a column block of its own, which
    TensorFlow's contraction kernel hands to oneDNN as a matrix-vector product.

    Columns (output positions) are blocked per thread: half of them (TensorFlow asks for two
    threads) rounded up to Eigen's nr = 4, then up to 24. Eigen's cache cap on the block is
    not modelled: it only matters for large position counts. A single position (a whole
    matrix-vector product) goes another way, not modelled either.
    """
    if rows <= 1:
        return False
    half = -(-rows // 2)
    per_thread = -(-half // _EIGEN_NR) * _EIGEN_NR
    block = min(rows, -(-per_thread // _EIGEN_UNROLL_N) * _EIGEN_UNROLL_N)
    return rows % block == 1


def _eigen(a, b, shape, dtype: np.dtype) -> np.ndarray:
    """TensorFlow's CPU kernels with oneDNN off, by the shape of the reduction.

    - A matrix product (the operands vary on disjoint output axes: positions for ``a``,
      channels for ``b``; Conv2D, Dense) is Eigen's contraction with TensorFlow's oneDNN sgemm
      kernel: each slice of :func:`eigen_slice` terms is summed from zero with one FMA per
      term and added to the output. A last position that is a column block of its own is a
      matrix-vector product whose kernel carries the running sum through every slice
      (``sequential``). A single position (a matrix times a vector) is Eigen's own GEMV, built
      without FMA: blocks of 16 terms, each product and sum rounded (``blocked:16``, no FMA).
    - Where both operands vary along an output axis (depthwise convolutions) TensorFlow's
      depthwise kernel adds the taps in order, multiply and add rounded apart (``sequential``,
      no FMA).
    - Plain sums are not modelled: index order, as ``sequential``.

    The order fixes where FMA is used, so ``--no-fma`` does not apply.
    """
    if b is None:
        return _run_blocked(a, b, shape, dtype, False, _sequential)
    rows, cols, shared = _operand_extents(a, b, shape)
    if shared > 1:
        return _run_blocked(a, b, shape, dtype, False, _sequential)
    if rows == 1 and cols > 1:
        return _run_blocked(a, b, shape, dtype, False, lambda eng: _blocked(eng, _EIGEN_GEMV))
    kc = eigen_slice(a.shape[0])
    out = np.asarray(_run_blocked(a, b, shape, dtype, True, lambda eng: _blocked(eng, kc)))
    if _eigen_lone_row(rows):
        a_sel, out_sel = _last_row(a, b, shape)
        row = _run_blocked(a[a_sel], b, out[out_sel].shape, dtype, True, _sequential)
        out = np.array(out)
        out[out_sel] = row
    return out


def _operand_extents(a, b, shape) -> tuple[int, int, int]:
    """Output elements along the axes where only ``a`` varies (rows), only ``b`` varies
    (columns), and both vary."""
    d = len(shape)
    sa = (1,) * (d + 1 - a.ndim) + a.shape[1:]
    sb = (1,) * (d + 1 - b.ndim) + b.shape[1:]
    rows = math.prod(n for n, x, y in zip(shape, sa, sb, strict=True) if x != 1 and y == 1)
    cols = math.prod(n for n, x, y in zip(shape, sa, sb, strict=True) if x == 1 and y != 1)
    shared = math.prod(n for n, x, y in zip(shape, sa, sb, strict=True) if x != 1 and y != 1)
    return rows, cols, shared


def _last_row(a, b, shape):
    """Index tuples into ``a`` and the output selecting the last row (position)."""
    d = len(shape)
    sa = (1,) * (d + 1 - a.ndim) + a.shape[1:]
    sb = (1,) * (d + 1 - b.ndim) + b.shape[1:]
    out_sel = tuple(
        slice(n - 1, n) if sa[i] != 1 and sb[i] == 1 else slice(None) for i, n in enumerate(shape)
    )
    return (slice(None), *out_sel[d + 1 - a.ndim :]), out_sel


def _blas(a, b, dtype, shape):
    """One matrix product; the order is whatever the BLAS library picks."""
    # (astype without a copy where the operands are in the accumulator's dtype already)
    if b is None:
        return np.sum(a.astype(dtype, copy=False), axis=0, dtype=dtype)
    product = contract(a.astype(dtype, copy=False), b.astype(dtype, copy=False))
    return product.astype(dtype, copy=False).reshape(shape)


def terms_first(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` with its first ``n`` axes merged into one axis of terms: ``(k, *x.shape[n:])``.

    A view where the axes merge without a copy. Otherwise (patches: a strided view of the
    input) the copy is laid out with each output's terms side by side in memory and a view
    of it is returned terms first. That copy reads the input's channels in runs, where a
    terms-major copy reads one element per output position (3-4x slower for a 3x3
    convolution), and it is the layout a matrix product packs fastest (see :func:`contract`).
    """
    k, rest = math.prod(x.shape[:n]), x.shape[n:]
    if _merges(x.shape[:n], x.strides[:n]):
        return x.reshape((k, *rest))
    last = tuple(range(x.ndim - n, x.ndim))
    outputs_first = np.ascontiguousarray(np.moveaxis(x, tuple(range(n)), last))
    return np.moveaxis(outputs_first.reshape((*rest, k)), -1, 0)


def _merges(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether axes of these lengths and strides merge into one without a copy."""
    kept = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    return all(s == n * t for (_, s), (n, t) in itertools.pairwise(kept))


def _gemm_axes(
    rest_a: tuple[int, ...], rest_b: tuple[int, ...]
) -> tuple[list[int], list[int]] | None:
    """The output axes ``a`` and ``b`` vary on, where they are disjoint (one GEMM), else None."""
    if len(rest_a) != len(rest_b):
        return None
    ia = [i for i, n in enumerate(rest_a) if n != 1]
    ib = [i for i, n in enumerate(rest_b) if n != 1]
    return None if set(ia) & set(ib) else (ia, ib)


def contract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_k a[k] * b[k]`` for arrays that broadcast on their other axes, in their dtype: one
    GEMM (BLAS) when ``a`` and ``b`` vary on disjoint output axes (convolutions, Dense), else
    einsum."""
    rest_a, rest_b = a.shape[1:], b.shape[1:]
    axes = _gemm_axes(rest_a, rest_b)
    if axes is None:
        return np.einsum("k...,k...->...", a, b, optimize=True)
    # a varies on some output axes, b on the others: one GEMM (K contracted).
    ia, ib = axes
    gemm = a.reshape(a.shape[0], -1).T @ b.reshape(b.shape[0], -1)
    gemm = gemm.reshape([rest_a[i] for i in ia] + [rest_b[i] for i in ib])
    shape = np.broadcast_shapes(rest_a, rest_b)
    return gemm.transpose(np.argsort(ia + ib)).reshape(shape)


# OpenBLAS multiplies small products with kernels of their own, each summing in its own order:
# a "direct" kernel for untransposed row-major operands on AVX-512 (below some 7 million
# multiply-adds), small-matrix kernels chosen by the operands' transposition (below some
# million). Larger products always go through its blocked kernel, which first copies both
# operands into packed panels of the same content whatever layout they came in, so the sum of
# each output runs in the same order. From this size on a product may take either layout.
ANY_LAYOUT_MACS = 1 << 26


def gemm_terms(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` with their first ``n`` axes merged into one axis of terms, for
    :func:`contract`.

    The terms of a patches view (a strided window of the input) are copied. A product that
    :func:`contract` makes one GEMM of at least :data:`ANY_LAYOUT_MACS` takes them in the
    layout that is fastest to copy and to multiply (:func:`terms_first`: each output's terms
    side by side; BLAS packs the same panels from it, and the sums are the same bits).
    Anything else keeps the terms-major copy of a plain reshape, the layout its kernel was
    chosen for until now.
    """
    ka, kb = math.prod(a.shape[:n]), math.prod(b.shape[:n])
    rest_a, rest_b = a.shape[n:], b.shape[n:]
    macs = ka * math.prod(np.broadcast_shapes(rest_a, rest_b))
    if _gemm_axes(rest_a, rest_b) is not None and macs >= ANY_LAYOUT_MACS:
        return terms_first(a, n), terms_first(b, n)
    return a.reshape((ka, *rest_a)), b.reshape((kb, *rest_b))


def _float64(a, b, dtype, shape):
    """Accumulate in float64 in index order (products of float32 are exact there), round
    once."""
    wide = np.dtype(np.float64)
    if accel.enabled() and exact_products(a.dtype, a.dtype if b is None else b.dtype):
        # Exact products: a float64 chain of the operands widened (exactly) adds each product
        # with one rounding, fused or not, as the NumPy engine's steps do: compiled, same bits.
        widened = (a.astype(wide), None if b is None else b.astype(wide))
        return round_to(_chains_compiled(*widened, shape, wide, True, _sequential), dtype)

    def block(ab, bb):
        return round_to(_sequential(_Engine(ab, bb, np.dtype(np.float64), True)), dtype)

    return _map_blocks(a, b, shape, np.dtype(dtype), block)


# exact_sum holds every term of a block in float64 several times: keep blocks to ~4M terms.
EXACT_BLOCK_TERMS = 1 << 22


def exact_sum(a: np.ndarray, b: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """The correctly rounded value of ``sum_k a[k]*b[k]`` in ``dtype``.

    Products of float32 (or narrower) operands are exact in float64; a float64 product is split
    into its rounded value and its exact error (Dekker's TwoProduct), both summed as terms. The
    sum is accumulated as a double-double (TwoSum of each term into a float64 sum, the errors
    summed apart: Ogita, Rump and Oishi's Sum2), whose error is at most ``u64*|s| +
    gamma_{K}(u64)^2 * sum|terms|``. Where that interval rounds to one ``dtype`` value the
    answer is certain; the rare remaining elements (and those whose products TwoProduct cannot
    split exactly) are summed exactly with rationals.
    """
    shape = np.broadcast_shapes(a.shape, () if b is None else b.shape)
    n = a.shape[0]
    compiled = _double_double_compiled(a, b, shape)
    if compiled is not None:
        s, e, mag, risky = *compiled, np.zeros(shape[1:], bool)

        def finite_terms() -> np.ndarray:  # float32 products: finite where both factors are
            return np.isfinite(a).all(axis=0) & (True if b is None else np.isfinite(b).all(axis=0))
    else:
        s, e, mag, risky, terms = _double_double(a, b, shape)

        def finite_terms() -> np.ndarray:
            return np.isfinite(terms).all(axis=0)

    with np.errstate(all="ignore"):
        # an infinite or NaN term makes the errors NaN: IEEE's sum of the terms is the answer
        # there (one infinity, or NaN for both signs)
        res = np.where(np.isfinite(s), s + e, s)
        u64 = 2.0**-53
        gamma = n * u64 / (1 - n * u64)
        slack = 2 * (u64 * np.abs(res) + gamma * gamma * mag) + 2.0**-1074
        lo = round_to(res - slack, dtype)
        hi = round_to(res + slack, dtype)
        out = round_to(res, dtype)
    unsure = ((lo != hi) & np.isfinite(res)) | risky
    if not np.isfinite(res).all():
        # finite terms whose float64 running sum overflowed are summed exactly too
        unsure |= ~np.isfinite(res) & finite_terms()
    out = np.atleast_1d(out)
    if unsure.any():
        a64 = np.broadcast_to(a.astype(np.float64), shape)
        b64 = None if b is None else np.broadcast_to(b.astype(np.float64), shape)
    for i in np.flatnonzero(unsure):
        at: tuple[Any, ...] = (slice(None), *np.unravel_index(i, res.shape))  # one column
        column = [Fraction(float(v)) for v in a64[at]]
        if b64 is not None:
            column = [x * Fraction(float(y)) for x, y in zip(column, b64[at], strict=True)]
        out.flat[i] = _round_rational(sum(column, Fraction(0)), dtype)
    return out.reshape(res.shape)


def _double_double(a: np.ndarray, b: np.ndarray | None, shape: tuple[int, ...]) -> tuple:
    """exact_sum's accumulation: ``(s, e, mag, risky, terms)``: the float64 sum of the terms,
    the sum of its errors (TwoSum), the terms' magnitude, the outputs whose products could
    not be split exactly, and the terms themselves."""
    a64 = np.broadcast_to(a.astype(np.float64), shape)
    b64 = None if b is None else np.broadcast_to(b.astype(np.float64), shape)
    risky = np.zeros(shape[1:], bool)
    with np.errstate(all="ignore"):
        if b is None or b64 is None:
            terms = a64
        elif exact_products(a.dtype, b.dtype):
            terms = a64 * b64
        else:
            terms, risky = _split_products(a64, b64)
    s = np.zeros(terms.shape[1:])
    e = np.zeros(terms.shape[1:])
    mag = np.zeros(terms.shape[1:])
    with np.errstate(all="ignore"):
        for k in range(terms.shape[0]):
            t = terms[k]
            s_new = s + t
            z = s_new - s
            e += (s - (s_new - z)) + (t - z)
            s = s_new
            mag += np.abs(t)
    return s, e, mag, risky, terms


def _double_double_compiled(
    a: np.ndarray, b: np.ndarray | None, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_double_double`'s ``(s, e, mag)`` compiled (the same operations in the same
    order per output), for float32 operands laid out as ``(K, G, S, L)`` (orders._arrange's
    blocks); None for any other."""
    ones = np.ones((a.shape[0], 1, 1, 1), a.dtype)
    b_terms = ones if b is None else b
    if a.ndim != 4 or b_terms.ndim != 4 or not accel.exact_compiles(a.dtype, b_terms.dtype):
        return None
    state = np.zeros((3, *shape[1:]))
    operands = np.ascontiguousarray(a), np.ascontiguousarray(b_terms)
    with np.errstate(all="ignore"):
        accel.exact_in_place(*operands, state)
    return state[0], state[1], state[2]


def _split_products(a64: np.ndarray, b64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 products ``a*b`` as ``2K`` terms (rounded products, then their exact errors),
    and the outputs where some product could not be split exactly (see :func:`fma64`)."""
    p, err, split = two_product(a64, b64)
    nonzero = (a64 != 0) & (b64 != 0)
    operands = np.isfinite(a64) & np.isfinite(b64)
    # not split: tiny or huge, or a product of finite operands beyond float64's range
    risky = operands & nonzero & ~split
    # an infinite product has no finite error; a zero product has none
    err = np.where(np.isfinite(p) & nonzero, err, 0.0)
    # a column with an infinite or NaN operand is IEEE arithmetic's, not the rationals'
    return np.concatenate([p, err]), risky.any(axis=0) & operands.all(axis=0)


def _exact_block(dtype):
    return lambda ab, bb: exact_sum(ab, bb, np.dtype(dtype))


def _round_rational(value: Fraction, dtype: np.dtype) -> np.ndarray:
    """Round an exact rational to ``dtype``, ties to even."""
    try:
        approx = round_to(np.array(float(value)), dtype)
    except OverflowError:  # beyond float64's range, so beyond every dtype's
        return np.array(math.inf if value > 0 else -math.inf, dtype=dtype)
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
    programs: dict[str, Program] = {
        "sequential": _sequential,
        "reverse": _reverse,
        "pairwise": _pairwise,
        "kahan": _kahan,
        "blocked": lambda eng: _blocked(eng, order.block),
    }
    tree = order.tree_for(a.shape[0], shape) if order.name == "auto" else None
    if tree is not None:
        out = _reduce_tree(a, b, shape, acc_dtype, tree)
    elif order.name == "auto":  # a reduction nobody revealed: in order, as sequential
        out = _run_blocked(a, b, shape, acc_dtype, fma, _sequential)
    elif order.name in programs:
        out = _run_blocked(a, b, shape, acc_dtype, fma, programs[order.name])
    elif order.name == "eigen":
        out = _eigen(a, b, shape, acc_dtype)
    elif order.name == "blas":
        out = _blas(a, b, acc_dtype, shape)
    elif order.name == "float64":  # its accumulator is float64 by definition: one rounding
        out = _float64(a, b, np.dtype(dtype), shape)
    else:  # correctly rounded to the output dtype, whatever the accumulator
        target = max(1, EXACT_BLOCK_TERMS // a.shape[0])
        out = _map_blocks(a, b, shape, np.dtype(dtype), _exact_block(dtype), target)
    out = np.asarray(out).reshape(shape)
    # a result in the dtype already is the new array it is (no copy: one pass less per layer)
    return out if out.dtype == dtype else round_to(out, dtype)
