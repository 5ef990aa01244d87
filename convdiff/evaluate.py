"""Run one kernel on one layer's inputs: the NumPy output, a float64 reference and the bound."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from convdiff.floats import is_float
from convdiff.kernels import Kernel, LayerSpec
from convdiff.numerics import Bounded, Rounded, ValueOnly
from convdiff.orders import Order, accumulator_dtype
from convdiff.timing import phase


@dataclass(frozen=True)
class KernelRun:
    """A kernel's two evaluations on the same inputs.

    Attributes:
        output: the NumPy side, rounded to the layer's dtype step by step in the chosen order.
        reference: the same pipeline evaluated in float64.
        scale: per element, the magnitude of the terms it was computed from (``sum |a_i b_i|``
            for a reduction), for errors in units of the terms' scale.
        bound: per element, the largest ``|keras - numpy|`` that rounding alone can explain
            (both sides rounding every step Keras rounds, in any order), plus what the
            difference between the two sides' inputs can propagate.
        agreed: the output equals ``keras_output`` (see :func:`run_kernel`) bit for bit: the
            comparison is all zeros, and ``bound`` and ``scale`` are zeros.
    """

    output: np.ndarray
    reference: np.ndarray | None
    bound: np.ndarray | None
    scale: np.ndarray | None = None
    agreed: bool = False


Implementation = Callable[[list[np.ndarray]], np.ndarray]


def run_kernel(
    kernel: Kernel | None,
    spec: LayerSpec,
    inputs: Sequence[np.ndarray],
    order: Order | None = None,
    *,
    reference_inputs: Sequence[np.ndarray] | None = None,
    implementation: Implementation | None = None,
    bound: bool = True,
    keras_output: np.ndarray | None = None,
) -> KernelRun:
    """Evaluate ``kernel`` with rounded arithmetic and with bounded float64 arithmetic.

    Args:
        kernel: the registered kernel.
        spec: the layer's config and weights.
        inputs: the NumPy side's inputs (Keras's own in isolated mode).
        order: the NumPy side's summation order.
        reference_inputs: Keras's inputs when they differ from ``inputs`` (propagated mode);
            the bounded pass starts from them, with ``|inputs - reference_inputs|`` as the
            inputs' uncertainty.
        implementation: computes the NumPy side instead of the kernel (a user's implementation);
            the kernel, if any, still gives the float64 reference and the bound.
        bound: run the bounded pass (False: only the NumPy side's output is wanted).
        keras_output: Keras's output, where no bound is read if the NumPy side's output equals
            it bit for bit (isolated mode: every figure of an identical output is 0, and the
            output's terms' magnitude goes nowhere else). Then the bounded pass computes the
            float64 reference alone (:class:`~convdiff.numerics.ValueOnly`) and the bound and
            the magnitude are zeros.
    """
    order = order or Order()
    # Keras casts floating inputs to the layer's compute dtype before ``call`` (mixed precision).
    inputs = [_autocast(x, spec.dtype) for x in inputs]
    refs = (
        inputs if reference_inputs is None else [_autocast(x, spec.dtype) for x in reference_inputs]
    )
    with phase("kernel"):
        if implementation is not None:
            numpy_out = implementation(list(inputs))
        elif kernel is not None:
            # NaN and inf are data here: IEEE arithmetic on them is the result, not an accident.
            with np.errstate(all="ignore"):
                numpy_out = kernel(spec, inputs, Rounded(spec.dtype, order))
        else:
            raise ValueError("run_kernel needs a kernel or an implementation")
    if kernel is None or not bound:
        return KernelRun(np.asarray(numpy_out), None, None)
    agreed = _bit_equal(numpy_out, keras_output)
    arithmetic = ValueOnly if agreed else Bounded
    # Keras's side may accumulate in the layer dtype or in float32 (half precision); the layer
    # dtype's gamma_n covers both.
    bounded = arithmetic(spec.dtype, (spec.dtype, accumulator_dtype(order, spec.dtype)))
    with phase("bound"), np.errstate(all="ignore"):
        tracked = [
            bounded.track(r, _input_difference(x, r)) for x, r in zip(inputs, refs, strict=True)
        ]
        ref = kernel(spec, tracked, bounded)
    return KernelRun(
        np.asarray(numpy_out),
        np.asarray(ref.value),
        np.asarray(ref.err),
        np.asarray(ref.magnitude),
        agreed,
    )


def _bit_equal(x: np.ndarray, y: np.ndarray | None) -> bool:
    """Whether ``y`` is given and ``x`` holds the same bits in the same shape and dtype."""
    x = np.asarray(x)
    if y is None or x.shape != y.shape or x.dtype != y.dtype or x.dtype.kind != "f":
        return False
    # the bits compared as unsigned integers of the same width: a view of any strides, no copy
    bits = f"u{x.dtype.itemsize}"
    x_bits, y_bits = x.view(bits), y.view(bits)
    # a layer that differs mostly differs early: its first rows say so without a whole pass
    head = (slice(0, 1),) * (x.ndim - 1) if x.ndim > 1 else (slice(0, _HEAD_ELEMENTS),)
    if x.ndim and not np.array_equal(x_bits[head], y_bits[head]):
        return False
    return bool(np.array_equal(x_bits, y_bits))


# Elements of a 1-D output compared first by _bit_equal (a row of the others)
_HEAD_ELEMENTS = 4096


def _input_difference(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``|x - r|``, 0 where equal (the same infinity included), NaN where a NaN is involved."""
    if x is r:  # isolated mode: the same array on both sides
        return np.zeros(())
    x64, r64 = np.asarray(x, np.float64), np.asarray(r, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(x64 == r64, 0.0, np.abs(x64 - r64))


def _autocast(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(dtype) if is_float(x.dtype) and x.dtype != np.dtype(dtype) else x
