"""The arithmetic kernels are written against.

A kernel is written once, as a pipeline of exact data movement (padding, patches, reshapes) and
arithmetic steps, each of which Keras rounds to the layer's dtype. It runs twice:

- with :class:`Rounded`, the NumPy side: every step computed and rounded to the layer's dtype,
  reductions added in the chosen :class:`~convdiff.orders.Order`;
- with :class:`Bounded`, on :class:`Tracked` values: each step evaluated in float64 together with a
  rigorous bound on how far two implementations that take the same rounding steps, in any
  summation order, can end up apart. One "side" is Keras, the other the NumPy side; their unit
  roundoffs can differ (e.g. a float16 accumulator on the NumPy side).

The invariant of a :class:`Tracked` ``(v, e)``: each side's value lies within ``e`` of ``v``, and
the two sides lie within ``e`` of each other. Neither side need sit at ``v``, so each step bounds
the worst pair of operands allowed by both. For a rounded operation ``z = op(x, y)`` the bound
grows by what the inputs' own uncertainty propagates (``|y| e_x + |x| e_y + e_x e_y`` for a
product) plus each side's rounding error ``u |z|`` (and an absolute ``eta`` for results in the
subnormal range). A reduction of ``n`` terms contributes
``gamma_n = n u / (1 - n u)`` times ``sum |terms|`` per side (Higham, ch. 3), valid for every
order and with or without FMA. Library functions (exp, tanh, erf, ...) are allowed
:data:`FUNCTION_ULPS` units in the last place per side beyond the propagated error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from convdiff.eigenmath import MODELS
from convdiff.floats import round_to, underflow_unit, unit_roundoff
from convdiff.fused import Operand, rounded_step
from convdiff.magnitude import product_bound, product_magnitude
from convdiff.orders import (
    ACCUMULATOR_DTYPES,
    Order,
    contract,
    gemm_terms,
    reduce_terms,
    terms_first,
)

# Accuracy assumed of a float32 library function (TF's Eigen/oneDNN kernels, numpy's float64
# evaluation rounded once) in units in the last place of its result, per implementation.
FUNCTION_ULPS = 4.0


@dataclass
class Tracked:
    """A float64 value, a per-element bound on how far two implementations can be apart, and
    the scale of the terms it was computed from (``sum |a_i b_i|`` for a reduction; None means
    ``|value|``), so that a difference can be read in units of the terms' magnitude."""

    value: np.ndarray
    err: np.ndarray
    scale: np.ndarray | None = None
    # every value is a float32 number (inputs and weights, and what moving them gives): the
    # terms' magnitude of a product can then be computed in float32 (convdiff.magnitude)
    float32_exact: bool = False

    @property
    def magnitude(self) -> np.ndarray:
        """The terms' scale: ``scale``, or ``|value|`` when no reduction produced it."""
        return np.abs(self.value) if self.scale is None else self.scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def ndim(self) -> int:
        return self.value.ndim


Array = Any  # np.ndarray for Rounded, Tracked for Bounded


def _has_scale(x: Any) -> bool:
    if isinstance(x, list | tuple):
        return any(_has_scale(v) for v in x)
    return isinstance(x, Tracked) and x.scale is not None


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float64 array of zeros of ``shape`` that occupies one element."""
    return np.broadcast_to(np.float64(0.0), shape)


def _is_zero(err: np.ndarray) -> bool:
    """True for an error array built by :func:`_zeros` or ``track(x)`` (one element repeated,
    and it is 0), without reading every element; False says nothing."""
    err = np.asarray(err)
    return err.size == 0 or (not any(err.strides) and float(err.reshape(-1)[0]) == 0.0)


def _exact(xs: Any) -> bool:
    """Every leaf of ``xs`` is a Tracked whose error is known to be zero."""
    if isinstance(xs, list | tuple):
        return all(_exact(x) for x in xs)
    return isinstance(xs, Tracked) and _is_zero(xs.err)


def _leaves(xs: Any) -> list[Any]:
    """The values in ``xs`` (nested lists and tuples flattened)."""
    if isinstance(xs, list | tuple):
        return [leaf for x in xs for leaf in _leaves(x)]
    return [xs]


def _unwrap(xs: Any, field: str) -> Any:
    if isinstance(xs, list | tuple):
        return type(xs)(_unwrap(x, field) for x in xs)
    return getattr(xs, field) if isinstance(xs, Tracked) else xs


# dtypes whose every value is a float32 number
_FLOAT32_NUMBERS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# dtypes whose + - * / NumPy evaluates in the dtype itself, correctly rounded (float16 goes
# through float32 in some loops and bfloat16 is a user type: both take the float64 route).
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _of_dtype(x: Any, dtype: np.dtype) -> bool:
    """An array or NumPy scalar of exactly ``dtype`` (a Python number is not: NumPy would
    round it to the array's dtype before the operation)."""
    return isinstance(x, np.ndarray | np.generic) and x.dtype == dtype


class Arithmetic(Protocol):
    """The contract a kernel is written against, which :class:`Rounded` and :class:`Bounded`
    both keep. Values are opaque to kernels (arrays for Rounded, :class:`Tracked` for
    Bounded): a kernel only moves them, combines them with these operations, and reads a
    plain array through :meth:`value` for data-dependent decisions.

    Each operation is one step Keras takes, rounded once to ``dtype`` unless it is exact (data
    movement, negation, comparisons, max/min); reductions add in the run's order (Rounded) or
    are bounded for every order (Bounded).
    """

    dtype: np.dtype

    def move(self, fn: Callable[..., np.ndarray], *xs: Any) -> Any:
        """Apply a function that only moves, copies or selects elements (exact)."""

    def const(self, x: Any) -> Any:
        """A weight or constant, in the layer's dtype (as Keras casts it)."""

    def value(self, x: Any) -> np.ndarray:
        """The plain array (for data-dependent decisions such as argmax)."""

    def widened(self, dtype: Any, keras_accumulator: Any = None) -> Arithmetic:
        """This arithmetic carried out in a wider ``dtype``."""

    def accumulating_in(self, dtype: Any) -> Arithmetic:
        """Reductions accumulated in ``dtype`` unless the user chose an accumulator."""

    def round(self, x: Any) -> Any:
        """``x`` from a wider arithmetic, rounded to this dtype: one rounding."""

    def dot(self, a: Any, b: Any = None, axes: str = "k") -> Any:
        """``sum`` over the leading ``len(axes)`` labelled axes of ``a * b`` (or of ``a``)."""

    def sum(self, x: Any, axis: int | Sequence[int], keepdims: bool = False) -> Any:
        """Sum of ``x`` over ``axis``, terms in index order."""

    def add(self, x: Any, y: Any) -> Any: ...
    def sub(self, x: Any, y: Any) -> Any: ...
    def mul(self, x: Any, y: Any) -> Any: ...
    def mul_add(self, x: Any, y: Any, z: Any) -> Any:
        """``x * y`` rounded, then ``+ z`` rounded: ``add(mul(x, y), z)``, two roundings (a
        normalization's scale and shift; not a fused multiply-add)."""

    def div(self, x: Any, y: Any) -> Any: ...
    def neg(self, x: Any) -> Any: ...
    def abs(self, x: Any) -> Any: ...
    def maximum(self, x: Any, y: Any) -> Any: ...
    def minimum(self, x: Any, y: Any) -> Any: ...
    def max(self, x: Any, axis: Any, keepdims: bool = False) -> Any: ...
    def min(self, x: Any, axis: Any, keepdims: bool = False) -> Any: ...

    def where(self, x: Any, threshold: float, below: Any, above: Any, strict: bool = True) -> Any:
        """``above`` where ``x > threshold`` (``>=`` if not strict), else ``below``."""

    def apply(self, name: str, x: Any) -> Any:
        """A library function (exp, tanh, erf, ...) of :data:`FUNCTIONS`."""


class Rounded:
    """The NumPy side: each step rounded to ``dtype``; reductions in ``order``."""

    def __init__(self, dtype: Any, order: Order | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.order = order or Order()

    # Exact data movement ------------------------------------------------------------------
    def move(self, fn: Callable[..., np.ndarray], *xs: Any) -> np.ndarray:
        """Apply a function that only moves, copies or selects elements (exact)."""
        return fn(*xs)

    def const(self, x: Any) -> np.ndarray:
        """A weight or constant, in the layer's dtype (as Keras casts it)."""
        return np.asarray(x).astype(self.dtype)

    def value(self, x: np.ndarray) -> np.ndarray:
        """The plain array (used for data-dependent decisions such as argmax)."""
        return x

    # Precision changes ----------------------------------------------------------------------
    def widened(self, dtype: Any, keras_accumulator: Any = None) -> Rounded:
        """This arithmetic carried out in a wider ``dtype`` (Keras computes normalizations and
        means of float16/bfloat16 tensors in float32). An accumulator that was the layer's own
        dtype widens with it; an explicit ``--accumulate`` stays. Not wider: ``self``."""
        target = np.dtype(dtype)
        if self.dtype.itemsize >= target.itemsize:
            return self
        order = self.order
        if order.accumulate and ACCUMULATOR_DTYPES[order.accumulate] == self.dtype:
            order = replace(order, accumulate=None)
        return Rounded(target, order)

    def accumulating_in(self, dtype: Any) -> Rounded:
        """Reductions accumulated in ``dtype`` unless the user chose an accumulator (for kernels
        whose TF implementation accumulates in the layer's own dtype)."""
        if self.order.accumulate:
            return self
        return Rounded(self.dtype, replace(self.order, accumulate=np.dtype(dtype).name))

    def round(self, x: np.ndarray) -> np.ndarray:
        """``x`` (from a wider arithmetic) rounded to this dtype: one rounding."""
        return self._round(np.asarray(x, dtype=np.float64))

    # Reductions ---------------------------------------------------------------------------
    def dot(self, a: np.ndarray, b: np.ndarray | None = None, axes: str = "k") -> np.ndarray:
        """``sum`` over the leading ``len(axes)`` axes of ``a * b`` (or of ``a``), in the order.

        ``axes`` labels the reduction axes, outermost first (e.g. ``"hwc"``: kernel rows,
        kernel columns, input channels); ``--tap-order`` may renest them.
        """
        a, b = self._nest(a, b, axes)
        return reduce_terms(a, b, self.order, self.dtype)

    def sum(self, x: np.ndarray, axis: int | Sequence[int], keepdims: bool = False) -> np.ndarray:
        """Sum of ``x`` over ``axis`` (terms in index order), in the order."""
        moved, shape = _to_front(x, axis, keepdims)
        return reduce_terms(moved, None, self.order, self.dtype).reshape(shape)

    def _nest(self, a, b, axes):
        n = len(axes)
        perm = _tap_permutation(axes, self.order.tap_order)
        if perm is not None:
            a = np.transpose(a, perm + list(range(n, a.ndim)))
            if b is not None:
                b = np.transpose(b, perm + list(range(n, b.ndim)))
        if b is not None and self.order.name == "blas":
            return gemm_terms(a, b, n)  # one matrix product: its operands as BLAS takes them
        a = a.reshape((math.prod(a.shape[:n]), *a.shape[n:]))
        if b is not None:
            b = b.reshape((math.prod(b.shape[:n]), *b.shape[n:]))
        return a, b

    # Elementwise, one rounding each --------------------------------------------------------
    def add(self, x, y):
        return self._arith(np.add, x, y)

    def sub(self, x, y):
        return self._arith(np.subtract, x, y)

    def mul(self, x, y):
        return self._arith(np.multiply, x, y)

    def mul_add(self, x, y, z):
        return self.add(self.mul(x, y), z)

    def div(self, x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._arith(np.divide, x, y)

    def _arith(self, op: np.ufunc, x, y) -> np.ndarray:
        """``op`` correctly rounded to this dtype. For + - * / on float32 (or narrower)
        operands, computing in float64 (53 >= 2*24+2 bits) and rounding once more gives the
        correctly rounded result; operands already in float32 or float64 (the layer's dtype)
        give the same bits by IEEE arithmetic in that dtype, without the float64 copy."""
        if self.dtype in _NATIVE and _of_dtype(x, self.dtype) and _of_dtype(y, self.dtype):
            return op(x, y)
        return self._round(op(x, y, dtype=np.float64))

    def _round(self, x64: np.ndarray) -> np.ndarray:
        return round_to(np.asarray(x64), self.dtype)

    # Exact elementwise ---------------------------------------------------------------------
    def neg(self, x):
        return np.negative(x)

    def abs(self, x):
        return np.abs(x)

    # (copy=False: the result is a new array, in the dtype already unless an operand was wider)
    def maximum(self, x, y):
        return np.maximum(x, y).astype(self.dtype, copy=False)

    def minimum(self, x, y):
        return np.minimum(x, y).astype(self.dtype, copy=False)

    def max(self, x, axis, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis, keepdims=False):
        return np.min(x, axis=axis, keepdims=keepdims)

    def where(self, x, threshold: float, below, above, strict: bool = True):
        """``above`` where ``x > threshold`` (``>=`` if not strict), else ``below``."""
        cond = (x > threshold) if strict else (x >= threshold)
        return np.where(cond, above, below).astype(self.dtype, copy=False)

    # Library functions, evaluated in float64 and rounded once ----------------------------
    def apply(self, name: str, x):
        if name in self.order.functions and self.dtype == np.float32:
            # ``auto``: TensorFlow's own algorithm, checked bit for bit on this machine
            return MODELS[name](np.asarray(x, np.float32))
        with np.errstate(all="ignore"):
            return self._round(FUNCTIONS[name](np.asarray(x, dtype=np.float64)))


class Bounded:
    """float64 evaluation plus a bound on ``|side_1 - side_2|`` for each element.

    Args:
        dtype: the layer's compute dtype (both sides round every step to it).
        accumulators: the accumulator dtype of each side's reductions.
    """

    def __init__(self, dtype: Any, accumulators: Sequence[Any] | None = None) -> None:
        self.dtype = np.dtype(dtype)
        accumulators = accumulators or (self.dtype, self.dtype)
        self.accumulators = tuple(np.dtype(d) for d in accumulators)
        self.u_sum = 2 * unit_roundoff(self.dtype)
        self.eta_sum = 2 * underflow_unit(self.dtype)
        self.acc_units = [unit_roundoff(d) for d in accumulators]
        self.acc_eta = sum(underflow_unit(d) for d in accumulators)
        # A side accumulating in another dtype rounds its sum to the layer's dtype once more.
        self.final_units = sum(
            unit_roundoff(self.dtype) for d in accumulators if np.dtype(d) != self.dtype
        )

    @staticmethod
    def track(x: Any, err: Any = 0.0) -> Tracked:
        """Wrap an input: its value and how far the other side's input may be from it."""
        narrow = np.asarray(x).dtype in _FLOAT32_NUMBERS
        value = np.asarray(x, dtype=np.float64)
        err = np.broadcast_to(np.asarray(err, dtype=np.float64), value.shape)
        return Tracked(value, err, float32_exact=narrow)

    def move(self, fn: Callable[..., np.ndarray], *xs: Any) -> Tracked:
        scaled = any(_has_scale(x) for x in xs)
        scale = fn(*_unwrap(xs, "magnitude")) if scaled else None
        value = fn(*_unwrap(xs, "value"))
        # moving float32 numbers (padding with zeros or -inf included) gives float32 numbers
        narrow = all(isinstance(x, Tracked) and x.float32_exact for x in _leaves(xs))
        if _exact(xs):
            # exactly known inputs (isolated mode, weights): the rearranged (padded, windowed)
            # values are exactly known too; no array of zeros is built for them
            return Tracked(value, _zeros(np.shape(value)), scale, narrow)
        return Tracked(value, fn(*_unwrap(xs, "err")), scale, narrow)

    def const(self, x: Any) -> Tracked:
        return self.track(np.asarray(x).astype(self.dtype))

    def value(self, x: Tracked) -> np.ndarray:
        return x.value

    def widened(self, dtype: Any, keras_accumulator: Any = None) -> Bounded:
        """See :meth:`Rounded.widened`; ``keras_accumulator`` names a narrower dtype Keras's
        own reductions may accumulate in (depending on the backend build): the bound then
        covers both."""
        target = np.dtype(dtype)
        if self.dtype.itemsize >= target.itemsize:
            return self
        numpy_side = self.accumulators[1]
        numpy_side = target if numpy_side == self.dtype else numpy_side
        keras_side = target if keras_accumulator is None else np.dtype(keras_accumulator)
        return type(self)(target, (keras_side, numpy_side))

    def accumulating_in(self, dtype: Any) -> Bounded:
        """See :meth:`Rounded.accumulating_in`: each side's coarser accumulator is bounded."""
        target = np.dtype(dtype)
        coarser = max((target, self.accumulators[1]), key=unit_roundoff)
        return type(self)(self.dtype, (target, coarser))

    def round(self, x) -> Tracked:
        """One rounding to this dtype (each side)."""
        x = self._lift(x)
        return self._rounded(x.value, x.err, x.scale)

    def _lift(self, x: Any) -> Tracked:
        return x if isinstance(x, Tracked) else self.track(x)

    def _rounded(self, value: np.ndarray, prop: np.ndarray, scale=None) -> Tracked:
        """A result rounded once per side: add ``u (|z| + e)`` for each side."""
        value = np.asarray(value)
        exact = _is_zero(prop)
        with np.errstate(all="ignore"):
            # prop + u_sum (|z| + prop) + eta_sum, built in one buffer
            err = np.abs(value) if exact else np.abs(value) + prop
            err *= self.u_sum
            if not exact:
                err += prop
            err += self.eta_sum
            # Every term is >= 0 (or NaN): a finite total means no element is inf or NaN, and
            # neither case below can arise. Otherwise (or if the total overflows) they are
            # checked element by element.
            if math.isfinite(np.sum(err)):
                return Tracked(value, err, scale)
            # An infinity computed from exactly known operands (a -inf mask) is the same on
            # both sides: rounding leaves it as it is, and u * inf would make every later use
            # of it unbounded.
            err = np.where(np.isinf(value) & (prop == 0), 0.0, err)
            # A NaN from uncertain operands (0 * inf where the zero is only known to within e)
            # may be anything on either side: unbounded, not undefined.
            err = np.where(np.isnan(err) & (prop != 0), np.inf, err)
        return Tracked(value, err, scale)

    # Reductions ---------------------------------------------------------------------------
    def dot(self, a, b=None, axes: str = "k") -> Tracked:
        a = self._lift(a)
        n = len(axes)
        k = math.prod(a.shape[:n])
        av = terms_first(a.value, n)
        ae = _terms_err(a, n)
        # Each side: gamma_k(u) * sum |terms| (any order, FMA or not), plus the float64
        # evaluation's own error, plus k underflows.
        gamma = sum(_gamma(k, u) for u in self.acc_units) + _gamma(k, 2.0**-53)
        with np.errstate(all="ignore"):
            if b is None:
                value = av.sum(axis=0)
                mag = upper = np.abs(av).sum(axis=0)
                prop = _zeros(()) if ae is None else ae.sum(axis=0)
            else:
                b = self._lift(b)
                bv = terms_first(b.value, n)
                be = _terms_err(b, n)
                value = contract(av, bv)
                # |a b - a' b'| <= |a| e_b + e_a (|b| + e_b) per term (see :meth:`mul`); exact
                # inputs (isolated mode, weights) skip the work.
                prop = _plus(
                    None if be is None else contract(np.abs(av), be),
                    None
                    if ae is None
                    else contract(ae, np.abs(bv) if be is None else np.abs(bv) + be),
                )
                narrow = a.float32_exact and b.float32_exact
                if _is_zero(prop) and self.final_units == 0:
                    # exactly known operands (isolated mode): the magnitude and the bound
                    # below in one compiled pass, where the magnitude is summed in float32
                    fused = product_bound(av, bv, narrow, gamma, k * self.acc_eta, self.eta_sum)
                    if fused is not None:
                        scale, err = fused
                        return Tracked(np.asarray(value), err, scale)
                # the terms' magnitude as reported, and a rigorous upper bound on it
                mag, upper = product_magnitude(av, bv, narrow)
            if not _is_zero(prop):
                mag, upper = mag + prop, upper + prop
            err = self._reduction_error(np.asarray(value), prop, gamma * upper, k)
        return Tracked(np.asarray(value), np.asarray(err), np.asarray(mag))

    def _reduction_error(self, value: np.ndarray, prop, spread: np.ndarray, k: int):
        """``prop + spread + k eta``, then the final rounding of a side that accumulates in
        another dtype: ``err + final_units (|value| + err) + eta_sum``, in place in ``spread``
        (a new array), the operations in that order."""
        err = spread
        if not _is_zero(prop):
            err += prop  # prop + spread: the same sum
        err += k * self.acc_eta
        if self.final_units == 0 and math.isfinite(np.sum(value)) and math.isfinite(np.sum(err)):
            # every |value| + err finite: final_units times it is +0, which adds nothing
            err += self.eta_sum
            return err
        tail = np.abs(value)
        tail += err
        tail *= self.final_units
        err += tail
        err += self.eta_sum
        return err

    def sum(self, x, axis, keepdims=False) -> Tracked:
        x = self._lift(x)
        moved = self.move(lambda v: _to_front(v, axis, keepdims)[0], x)
        _, shape = _to_front(x.value, axis, keepdims)
        out = self.dot(moved, None, "k")
        return Tracked(
            out.value.reshape(shape), out.err.reshape(shape), out.magnitude.reshape(shape)
        )

    # Elementwise, one rounding each --------------------------------------------------------
    def add(self, x, y):
        x, y = self._lift(x), self._lift(y)
        fused = self._fused("add", x, y)
        if fused is not None:
            return fused
        return self._rounded(x.value + y.value, _plus(x.err, y.err), x.magnitude + y.magnitude)

    def sub(self, x, y):
        x, y = self._lift(x), self._lift(y)
        fused = self._fused("sub", x, y)
        if fused is not None:
            return fused
        return self._rounded(x.value - y.value, _plus(x.err, y.err), x.magnitude + y.magnitude)

    def mul(self, x, y):
        x, y = self._lift(x), self._lift(y)
        fused = self._fused("mul", x, y)
        if fused is not None:
            return fused
        with np.errstate(all="ignore"):
            # The largest |x1 y1 - x2 y2| with both pairs within e of (x, y) and of each other:
            # x1 = x + e_x, y1 = y + e_y against x2 = x, y2 = y (for x, y >= 0).
            prop = _plus(
                _times(x.value, y.err),
                _times(y.value, x.err),
                None if _is_zero(x.err) or _is_zero(y.err) else x.err * y.err,
            )
            return self._rounded(x.value * y.value, prop, x.magnitude * y.magnitude)

    def mul_add(self, x, y, z):
        x, y, z = self._lift(x), self._lift(y), self._lift(z)
        fused = self._fused("mul_add", x, y, z)
        if fused is not None:
            return fused
        return self.add(self.mul(x, y), z)

    def _fused(self, name: str, x: Tracked, y: Tracked, *rest: Tracked) -> Tracked | None:
        """The step compiled in one pass (:mod:`convdiff.fused`: the same bits as the NumPy
        formulas of add, sub and mul, and of mul then add), or None where those formulas must
        run. ``cross``: the product's ``e_x e_y`` term, where neither error is known to be
        zero."""
        cross = not (_is_zero(x.err) or _is_zero(y.err))
        operands = [Operand(t.value, t.err, t.scale) for t in (x, y, *rest)]
        step = rounded_step(name, operands, (self.u_sum, self.eta_sum), cross)
        return None if step is None else Tracked(*step)

    def div(self, x, y):
        x, y = self._lift(x), self._lift(y)
        with np.errstate(all="ignore"):
            value = x.value / y.value
            margin = np.abs(y.value) - y.err  # smallest |denominator| either side can have
            # The largest |x1/y1 - x2/y2|: x1 = x + e_x over y1 = margin against x/y.
            prop = np.where(
                margin > 0,
                (np.abs(x.value) * y.err + np.abs(y.value) * x.err) / (np.abs(y.value) * margin),
                np.where((x.err == 0) & (y.err == 0), 0.0, np.inf),
            )
            return self._rounded(value, prop, x.magnitude / np.abs(y.value))

    # Exact elementwise (1-Lipschitz) -------------------------------------------------------
    def neg(self, x):
        x = self._lift(x)
        return Tracked(-x.value, x.err, x.scale)

    def abs(self, x):
        x = self._lift(x)
        return Tracked(np.abs(x.value), x.err, x.scale)

    def maximum(self, x, y):
        x, y = self._lift(x), self._lift(y)
        scale = None
        if _has_scale([x, y]):
            scale = np.where(x.value >= y.value, x.magnitude, y.magnitude)
        return Tracked(np.maximum(x.value, y.value), _larger_err(x, y), scale)

    def minimum(self, x, y):
        x, y = self._lift(x), self._lift(y)
        scale = None
        if _has_scale([x, y]):
            scale = np.where(x.value <= y.value, x.magnitude, y.magnitude)
        return Tracked(np.minimum(x.value, y.value), _larger_err(x, y), scale)

    def max(self, x, axis, keepdims=False):
        return self._extreme(np.max, x, axis, keepdims)

    def min(self, x, axis, keepdims=False):
        return self._extreme(np.min, x, axis, keepdims)

    def _extreme(self, pick: Callable[..., np.ndarray], x, axis, keepdims: bool) -> Tracked:
        """The largest (smallest) element along ``axis``: exact, so its bound is the largest
        bound of the elements it may be (either side may pick another element within its
        bound), and its terms' scale the largest one there."""
        x = self._lift(x)
        value = pick(x.value, axis=axis, keepdims=keepdims)
        err = (
            _zeros(np.shape(value))
            if _is_zero(x.err)
            else np.max(x.err, axis=axis, keepdims=keepdims)
        )
        if x.scale is not None:
            return Tracked(value, err, np.max(x.scale, axis=axis, keepdims=keepdims))
        # The largest |v| is max(max v, -min v) (each exact), from the one reduction that
        # ``value`` did not already make: no array of |v| as large as the windows. abs makes
        # a zero +0, as the largest |v| of zeros is.
        other = np.min if pick is np.max else np.max
        rest = other(x.value, axis=axis, keepdims=keepdims)
        top, bottom = (value, rest) if pick is np.max else (rest, value)
        return Tracked(value, err, np.abs(np.maximum(top, -bottom)))

    def where(self, x, threshold: float, below, above, strict: bool = True):
        """Piecewise selection. Where ``x`` is within its bound of the threshold the two sides
        may take different branches, so the bound covers both."""
        x, below, above = self._lift(x), self._lift(below), self._lift(above)
        cond = (x.value > threshold) if strict else (x.value >= threshold)
        value = np.where(cond, above.value, below.value)
        err = np.where(cond, above.err, below.err)
        with np.errstate(all="ignore"):
            ambiguous = np.abs(x.value - threshold) <= x.err
            # One side may take ``above`` and the other ``below``, each within its own bound.
            both = np.abs(above.value - below.value) + above.err + below.err
            err = np.where(ambiguous, np.maximum(err, both), err)
        scale = np.where(cond, above.magnitude, below.magnitude)
        return Tracked(np.asarray(value), np.asarray(err), np.asarray(scale))

    # Library functions ---------------------------------------------------------------------
    def apply(self, name: str, x):
        """A library function: its float64 value, the width of its image of the input's
        uncertainty interval, and FUNCTION_ULPS of the result per side.

        Both sides' inputs lie anywhere in ``[x - e, x + e]``, so the whole image of that interval
        bounds ``|f(x1) - f(x2)|``. The larger of its two halves does not: for tanh at ``x = 0``,
        ``e = 2``, the inputs -1 and 1 give 1.52 against ``tanh(2) = 0.96``. Every function is
        monotonic there except the square, whose image is ``[0 or min(f(ends)), max(f(ends))]``.
        """
        x = self._lift(x)
        fn = FUNCTIONS[name]
        with np.errstate(all="ignore"):
            value = fn(x.value)
            upper, lower = fn(x.value + x.err), fn(x.value - x.err)
            if name == "square":
                bottom = np.where(np.abs(x.value) <= x.err, 0.0, np.minimum(upper, lower))
                spread = np.maximum(upper, lower) - bottom
            else:
                spread = np.abs(upper - lower)
            spread = np.where(x.err == 0, 0.0, spread)
            spread = np.where(np.isnan(spread) & ~np.isnan(value), np.inf, spread)
            ulps = FUNCTION_ULPS * (self.u_sum * 2 * (np.abs(value) + spread) + 2 * self.eta_sum)
            return Tracked(value, spread + ulps)


class ValueOnly(Bounded):
    """:class:`Bounded`'s float64 values, bit for bit, without the bound or the terms'
    magnitude: for a layer whose two sides agree to the bit, where neither is read (every
    figure of an identical output is 0) and only the float64 reference is wanted.

    The steps that would grow a bound (the reductions: a second matrix product; the rounded
    elementwise steps and library functions: two more arrays written each) compute the value
    alone, with Bounded's formulas; the exact steps (data movement, negation, ``where``) are
    Bounded's own on errors that are all zero.
    """

    def _rounded(self, value: np.ndarray, prop: np.ndarray, scale=None) -> Tracked:
        return _value_only(np.asarray(value))

    def dot(self, a, b=None, axes: str = "k") -> Tracked:
        av = terms_first(self._lift(a).value, len(axes))
        with np.errstate(all="ignore"):
            if b is None:
                return _value_only(av.sum(axis=0))
            return _value_only(contract(av, terms_first(self._lift(b).value, len(axes))))

    def add(self, x, y):
        return _value_only(self._lift(x).value + self._lift(y).value)

    def sub(self, x, y):
        return _value_only(self._lift(x).value - self._lift(y).value)

    def mul(self, x, y):
        with np.errstate(all="ignore"):
            return _value_only(self._lift(x).value * self._lift(y).value)

    def mul_add(self, x, y, z):
        return self.add(self.mul(x, y), z)

    def apply(self, name: str, x):
        with np.errstate(all="ignore"):
            return _value_only(FUNCTIONS[name](self._lift(x).value))

    def _extreme(self, pick: Callable[..., np.ndarray], x, axis, keepdims: bool) -> Tracked:
        return _value_only(pick(self._lift(x).value, axis=axis, keepdims=keepdims))

    def maximum(self, x, y):
        return _value_only(np.maximum(self._lift(x).value, self._lift(y).value))

    def minimum(self, x, y):
        return _value_only(np.minimum(self._lift(x).value, self._lift(y).value))


def _value_only(value: np.ndarray) -> Tracked:
    """A value with zeros (one element each) as its bound and its terms' magnitude."""
    zeros = _zeros(np.shape(value))
    return Tracked(np.asarray(value), zeros, zeros)


def _larger_err(x: Tracked, y: Tracked) -> np.ndarray:
    """``max(e_x, e_y)`` per element; zeros that take no memory where both are known to be
    zero (a ReLU of exactly known inputs)."""
    if _is_zero(x.err) and _is_zero(y.err):
        return _zeros(np.broadcast_shapes(np.shape(x.err), np.shape(y.err)))
    return np.maximum(x.err, y.err)


def _times(value: np.ndarray, err: np.ndarray) -> np.ndarray | None:
    """``|value| * err``, 0 where ``err`` is 0: an exactly known operand carries no
    uncertainty, even times an infinite one (None: ``err`` is known to be zero everywhere)."""
    if _is_zero(err):
        return None
    return np.where(err == 0, 0.0, np.abs(value) * err)


def _terms_err(x: Tracked, n: int) -> np.ndarray | None:
    """``x``'s errors as terms (its first ``n`` axes merged, see
    :func:`~convdiff.orders.terms_first`), or None where they are all zero: a broadcast zero
    is never reshaped (a copy) or read."""
    if _is_zero(x.err):
        return None
    err = terms_first(x.err, n)
    return err if err.any() else None


def _plus(*errors: np.ndarray | None) -> np.ndarray:
    """The sum of error terms, leaving out those known to be zero (None or :func:`_zeros`);
    a one-element zero when all are."""
    terms = [e for e in errors if e is not None and not _is_zero(e)]
    if not terms:
        return _zeros(())
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _gamma(n: int, u: float) -> float:
    nu = n * u
    return nu / (1 - nu) if nu < 1 else math.inf


def _to_front(x: np.ndarray, axis, keepdims: bool):
    """Move the reduction axes of ``x`` to the front (in their order); return the result shape."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    axes = [a % x.ndim for a in axes]
    rest = [i for i in range(x.ndim) if i not in axes]
    moved = np.transpose(x, axes + rest)
    shape = (
        [1 if i in axes else x.shape[i] for i in range(x.ndim)]
        if keepdims
        else [x.shape[i] for i in rest]
    )
    return moved.reshape((-1, *moved.shape[len(axes) :])), tuple(shape)


def _tap_permutation(axes: str, tap_order: str | None) -> list[int] | None:
    if not tap_order or sorted(tap_order) != sorted(axes) or tap_order == axes:
        return None
    return [axes.index(c) for c in tap_order]


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x) if np.size(x) else np.asarray(x, float)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # 1/(1+exp(-x)) without overflow warnings for large |x|
    return np.where(
        x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))
    )


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


# Monotonic (on their domains) float64 library functions: the NumPy side rounds them once.
FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "expm1": np.expm1,
    "log": np.log,
    "log1p": np.log1p,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "erf": _erf,
    "erfc": np.vectorize(math.erfc, otypes=[np.float64]),  # decreasing
    # tf.pow(x, 3) and tf.pow(x, 2) are Eigen's generic pow, not a product: up to 1 ULP off the
    # correctly rounded power (measured). The square is even and convex: the spread of its
    # values at the two ends of an interval still bounds it on the whole interval.
    "cube": lambda x: x * x * x,
    "square": np.square,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
}

__all__ = [
    "ACCUMULATOR_DTYPES",
    "FUNCTIONS",
    "FUNCTION_ULPS",
    "Bounded",
    "Rounded",
    "Tracked",
    "underflow_unit",
    "unit_roundoff",
]
