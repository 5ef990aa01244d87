"""Normalization kernels: BatchNormalization (inference), LayerNormalization, GroupNormalization,
UnitNormalization.

All four compute in at least float32 (Keras casts float16/bfloat16 inputs up with
``result_type(x.dtype, "float32")``) and cast the result back to the layer's dtype, so a float16
layer rounds to float16 once, at the end. The steps mirror Keras's TensorFlow backend one TF op
at a time, each rounded to float32:

- BatchNormalization (``tf.nn.batch_normalization`` on the moving statistics)::

      inv = rsqrt(variance + epsilon); inv *= gamma; y = x * inv + (beta - mean * inv)

- LayerNormalization / GroupNormalization (``tf.nn.moments``: ``reduce_mean``, then
  ``reduce_mean(squared_difference(x, mean))``; each ``reduce_mean`` a float32 sum divided by
  the element count)::

      inv = rsqrt(var + epsilon) * gamma; y = x * inv + (-mean * inv + beta)

  with ``rms_scaling``: ``y = (x * rsqrt(var + epsilon)) * gamma`` (Keras still subtracts the
  mean inside the variance).
- UnitNormalization (``ops.normalize``, order 2)::

      y = x * minimum(rsqrt(sum(square(x))), 1 / 1e-12)

Reduction order: the normalized axes, outermost first (a plain sum over them). TensorFlow's Eigen
reduction uses its own vectorised order (8-wide packets and several accumulators), so sums differ
in the last bits; the bound holds for any order.

TF's ``Rsqrt`` is not correctly rounded (measured on this project's CPU): elements in full 8-wide
packets get a hardware reciprocal-square-root estimate refined by one Newton step (up to 2 float32
ULPs off), the remaining ``n % 8`` elements ``1 / sqrt(x)`` rounded twice. The NumPy side rounds
``1/sqrt`` once; the library-function allowance of the bound covers the difference, which a
cancellation in ``x * inv + shift`` can magnify to hundreds of ULPs of a small output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register

# ----------------------------------------------------------------------------- compute dtype


def widen(nx: Any, dtype: Any = np.float32, keras_accumulator: Any = None) -> Any:
    """``nx`` carried out in ``dtype`` when that is wider (see ``Rounded.widened``)."""
    return nx.widened(dtype, keras_accumulator)


def narrow(nx: Any, wide: Any, y: Any) -> Any:
    """Cast ``y`` computed with ``wide`` back to ``nx``'s dtype: one rounding."""
    return y if wide.dtype == nx.dtype else nx.round(y)


def accumulating_in(nx: Any, dtype: Any) -> Any:
    """``nx`` with reductions accumulated in ``dtype`` unless the user chose an accumulator."""
    return nx.accumulating_in(dtype)


# ----------------------------------------------------------------------------- shared steps


def _axes(value: Any, ndim: int) -> list[int]:
    """Config axis (int or list, possibly negative) as sorted non-negative axes."""
    axes = [value] if isinstance(value, int) else list(value)
    if any(not -ndim <= a < ndim for a in axes):
        raise Unsupported(f"axis={value!r} for a rank-{ndim} input")
    return sorted(a % ndim for a in axes)


def _single_axis(value: Any, ndim: int) -> int:
    axes = _axes(value, ndim)
    if len(axes) != 1:
        raise Unsupported(f"axis={value!r} (this layer normalizes along one axis)")
    return axes[0]


def _param(nx, spec: LayerSpec, name: str, shape: Sequence[int]):
    """Weight ``name`` reshaped to broadcast against the input, or None when absent."""
    w = spec.weight(name)
    return None if w is None else nx.const(np.reshape(w, shape))


def _reduce_mean(nx, x, axes: list[int]):
    """TF's ``reduce_mean(keepdims=True)``: a sum over ``axes``, then ``/ float(count)``."""
    count = math.prod(nx.value(x).shape[a] for a in axes)
    return nx.div(nx.sum(x, axes, keepdims=True), nx.const(count))


def _moments(nx, x, axes: list[int]):
    """``tf.nn.moments``: mean, then the mean of ``squared_difference(x, mean)``."""
    mean = _reduce_mean(nx, x, axes)
    diff = nx.sub(x, mean)
    return mean, _reduce_mean(nx, nx.mul(diff, diff), axes)


def _rsqrt_plus(nx, variance, epsilon: float):
    """``rsqrt(variance + epsilon)``, epsilon converted to the compute dtype first."""
    return nx.apply("rsqrt", nx.add(variance, nx.const(epsilon)))


def _scale_shift(nx, x, mean, inv, gamma, beta):
    """``x * inv' + (-mean * inv' + beta)`` with ``inv' = inv * gamma`` (Keras's
    ``_layer_normalization`` and GroupNormalization, op by op)."""
    if gamma is not None:
        inv = nx.mul(inv, gamma)
    res = nx.mul(nx.neg(mean), inv)
    if beta is not None:
        res = nx.add(res, beta)
    return nx.mul_add(x, inv, res)


# ----------------------------------------------------------------------------- kernels


@register("BatchNormalization")
def batch_normalization(spec: LayerSpec, inputs: list, nx) -> Any:
    """BatchNormalization at inference: elementwise on the moving statistics (no reduction)."""
    x = inputs[0]
    ndim = nx.value(x).ndim
    axis = _single_axis(spec.config.get("axis", -1), ndim)
    shape = [1] * ndim
    shape[axis] = nx.value(x).shape[axis]
    wide = widen(nx)
    mean = _param(wide, spec, "moving_mean", shape)
    inv = _rsqrt_plus(wide, _param(wide, spec, "moving_variance", shape), spec.config["epsilon"])
    gamma = _param(wide, spec, "gamma", shape) if spec.config.get("scale", True) else None
    beta = _param(wide, spec, "beta", shape) if spec.config.get("center", True) else None
    if gamma is not None:
        inv = wide.mul(inv, gamma)
    # tf.nn.batch_normalization: offset - mean * inv (or -mean * inv without offset).
    shift = wide.mul(mean, inv)
    shift = wide.neg(shift) if beta is None else wide.sub(beta, shift)
    return narrow(nx, wide, wide.mul_add(x, inv, shift))


@register("LayerNormalization")
def layer_normalization(spec: LayerSpec, inputs: list, nx) -> Any:
    """LayerNormalization: moments over the normalized axes (outermost first), then scale/shift."""
    x = inputs[0]
    cfg = spec.config
    shape = nx.value(x).shape
    axes = _axes(cfg.get("axis", -1), len(shape))
    param_shape = [shape[a] if a in axes else 1 for a in range(len(shape))]
    wide = widen(nx)
    gamma = _param(wide, spec, "gamma", param_shape)
    beta = _param(wide, spec, "beta", param_shape)
    mean, variance = _moments(wide, x, axes)
    inv = _rsqrt_plus(wide, variance, cfg.get("epsilon", 1e-3))
    if cfg.get("rms_scaling", False):
        # Keras: outputs = x * inv, then outputs * gamma (two roundings, not x * (inv * gamma)).
        y = wide.mul(x, inv)
        y = y if gamma is None else wide.mul(y, gamma)
    else:
        y = _scale_shift(wide, x, mean, inv, gamma, beta)
    return narrow(nx, wide, y)


@register("GroupNormalization")
def group_normalization(spec: LayerSpec, inputs: list, nx) -> Any:
    """GroupNormalization: channels split into groups; moments over each group's channels and
    all non-batch axes (outermost first), then scale/shift as LayerNormalization."""
    x = inputs[0]
    cfg = spec.config
    shape = tuple(nx.value(x).shape)
    axis = _single_axis(cfg.get("axis", -1), len(shape))
    if axis == 0:
        raise Unsupported("axis=0 (the batch axis)")
    channels = shape[axis]
    groups = channels if int(cfg.get("groups", 32)) == -1 else int(cfg.get("groups", 32))
    if channels % groups:
        raise Unsupported(f"groups={groups} for {channels} channels")
    grouped = (*shape[:axis], groups, channels // groups, *shape[axis + 1 :])
    param_shape = [1] * len(grouped)
    param_shape[axis : axis + 2] = [groups, channels // groups]
    reduce_axes = [a for a in range(1, len(grouped)) if a != axis]
    wide = widen(nx)
    xg = wide.move(lambda v: v.reshape(grouped), x)
    mean, variance = _moments(wide, xg, reduce_axes)
    inv = _rsqrt_plus(wide, variance, cfg.get("epsilon", 1e-3))
    gamma = _param(wide, spec, "gamma", param_shape) if cfg.get("scale", True) else None
    beta = _param(wide, spec, "beta", param_shape) if cfg.get("center", True) else None
    y = _scale_shift(wide, xg, mean, inv, gamma, beta)
    return narrow(nx, wide, wide.move(lambda v: v.reshape(shape), y))


@register("UnitNormalization")
def unit_normalization(spec: LayerSpec, inputs: list, nx) -> Any:
    """UnitNormalization: ``x * min(rsqrt(sum over axis of x*x), 1e12)``; the sum of squares
    over the axes (outermost first), in the layer's dtype (Keras does not upcast here)."""
    x = inputs[0]
    axes = _axes(spec.config.get("axis", -1), nx.value(x).ndim)
    square_sum = nx.sum(nx.mul(x, x), axes, keepdims=True)
    # ops.normalize: minimum(rsqrt(square_sum), 1.0 / epsilon) with epsilon = 1e-12 (inf in
    # float16, as in Keras). Taking the cap outright where square_sum <= 1e-25 (there rsqrt is
    # above 3e12, so minimum picks the cap anyway) gives the same values and keeps the bound
    # finite for all-zero vectors, whose rsqrt(0) = inf would otherwise reach 0 * inf.
    with np.errstate(over="ignore"):
        cap = nx.const(1.0 / 1e-12)
    inv_norm = nx.where(square_sum, 1e-25, cap, nx.apply("rsqrt", square_sum))
    return nx.mul(x, nx.minimum(inv_norm, cap))
