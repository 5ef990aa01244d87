"""Pooling kernels: MaxPooling*D, AveragePooling*D, GlobalMaxPooling*D, GlobalAveragePooling*D.

Keras's TensorFlow backend moves channels_first data to channels_last, pools, and moves it back;
the kernels do the same (the moves are exact).

- Max pooling is exact: every output is one of its window's inputs, whatever the order.
- ``AveragePooling*D`` (TF's ``AvgPool`` CPU kernel, ``SpatialAvgPool``) adds each window's
  inputs one by one in the layer's dtype, starting from zero, in input order (row by row, column
  by column: the labelled tap axes ``"hw"``, ``"dhw"`` in 3-D, ``"w"`` in 1-D), then *divides*
  the sum by the number of inputs the window covers. With 'same' padding the padded positions
  are not counted (they are added here as exact zeros). Measured on this project's CPU: the
  sequential order reproduces TF's 2-D average pooling bit for bit in float32 and float16 (a
  float16 layer accumulates in float16); a multiplication by the reciprocal of the count does not.
  bfloat16 is the exception: TF's default oneDNN path sums and divides in float32.
- ``GlobalAveragePooling*D`` is ``ops.mean``: TF's ``reduce_mean`` computes in at least float32
  (Keras upcasts float16/bfloat16 inputs), sums the spatial axes and divides by the element
  count, then Keras casts back to the layer's dtype. Eigen's sum is not sequential (measured,
  float32, bit for bit): channels_last outputs that fill an 8-wide packet (by flat (N, C) index)
  add term ``k`` into accumulator ``k % 4`` (from 16 terms on), then ((a0 + a1) + a2) + a3 and
  the leftover terms; the other outputs add sequentially. channels_first (a contiguous inner
  reduction) uses 8-wide packets, four accumulators over 32-term blocks, then a tree over the
  lanes. The default sequential order therefore differs in the last bits; the bound holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register
from convdiff.kernels.geometry import on_channels_last, padding_widths, windows
from convdiff.kernels.normalization import accumulating_in, narrow, widen

_TAPS = {1: "w", 2: "hw", 3: "dhw"}


def _size_tuple(value: Any, rank: int, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, list | tuple) else [value] * rank
    sizes = tuple(int(v) for v in values)
    if len(sizes) != rank or min(sizes) < 1:
        raise Unsupported(f"{name}={value!r}")
    return sizes


def _pool_geometry(spec: LayerSpec, rank: int, spatial: tuple[int, ...]):
    """Window sizes, strides (None means the window size, as in Keras) and TF's padding."""
    cfg = spec.config
    pool = _size_tuple(cfg.get("pool_size", 2), rank, "pool_size")
    strides = cfg.get("strides")
    strides = pool if strides is None else _size_tuple(strides, rank, "strides")
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise Unsupported(f"padding={padding!r}")
    pads = padding_widths(spatial, pool, strides, (1,) * rank, padding)
    return pool, strides, pads


def _windows(v: np.ndarray, pool, strides, pads, pad_mode: str) -> np.ndarray:
    """Windows of channels_last ``v`` (N, *spatial, C) as (*pool, N, *out, C)."""
    rank = len(pool)
    if pad_mode == "edge":
        v = np.pad(v, [(0, 0), *pads, (0, 0)], mode="edge")
        pads = [(0, 0)] * rank
    p = windows(v, pool, strides, (1,) * rank, pads)  # (*pool, C, N, *out), zero padded
    return np.moveaxis(p, rank, -1)


def _max_pool(spec: LayerSpec, x, nx, rank: int):
    """Largest input of each window (exact).

    TF ignores padded positions; padding with copies of the edge input is the same, since every
    window that reaches into the padding also covers that edge input ('same' padding is always
    smaller than the window on each side).
    """
    pool, strides, pads = _pool_geometry(spec, rank, tuple(nx.value(x).shape[1:-1]))
    win = nx.move(lambda v: _windows(v, pool, strides, pads, "edge"), x)
    return nx.max(win, axis=tuple(range(rank)))


def _window_counts(spatial: tuple[int, ...], pool, strides, pads) -> np.ndarray:
    """How many real (not padded) inputs each window covers, shaped (1, *out, 1)."""
    ones = np.ones((1, *spatial, 1))
    return _windows(ones, pool, strides, pads, "zero").sum(axis=tuple(range(len(pool))))


def _avg_pool(spec: LayerSpec, x, nx, rank: int):
    """Sum of each window's inputs over the taps (``_TAPS[rank]``), then divided by the count."""
    spatial = tuple(nx.value(x).shape[1:-1])
    pool, strides, pads = _pool_geometry(spec, rank, spatial)
    # bfloat16 (measured): TF's default oneDNN pooling sums and divides in float32 and rounds
    # once; TF without oneDNN sums in bfloat16. Mirror the default, bound both.
    if nx.dtype.name == "bfloat16":
        wide = widen(nx, keras_accumulator=nx.dtype)
    else:  # Eigen's SpatialAvgPool adds in T, float16 included
        wide = accumulating_in(nx, nx.dtype)
    win = wide.move(lambda v: _windows(v, pool, strides, pads, "zero"), x)
    total = wide.dot(win, axes=_TAPS[rank])  # padded zeros add exactly
    # SpatialAvgPool counts in T and divides (``out /= count``), one rounding.
    mean = wide.div(total, wide.const(_window_counts(spatial, pool, strides, pads)))
    return narrow(nx, wide, mean)


def _make_pool(rank: int, pool_fn: Callable, name: str, doc: str):
    def pool(spec: LayerSpec, inputs: list, nx) -> Any:
        return on_channels_last(spec, inputs[0], nx, lambda x: pool_fn(spec, x, nx, rank))

    pool.__name__ = name
    pool.__doc__ = doc
    return pool


max_pooling1d = register("MaxPooling1D")(
    _make_pool(1, _max_pool, "max_pooling1d", "MaxPooling1D: window maximum (exact).")
)
max_pooling2d = register("MaxPooling2D")(
    _make_pool(2, _max_pool, "max_pooling2d", "MaxPooling2D: window maximum (exact).")
)
max_pooling3d = register("MaxPooling3D")(
    _make_pool(3, _max_pool, "max_pooling3d", "MaxPooling3D: window maximum (exact).")
)
average_pooling1d = register("AveragePooling1D")(
    _make_pool(1, _avg_pool, "average_pooling1d", "AveragePooling1D: sum over (w), / count.")
)
average_pooling2d = register("AveragePooling2D")(
    _make_pool(2, _avg_pool, "average_pooling2d", "AveragePooling2D: sum over (hw), / count.")
)
average_pooling3d = register("AveragePooling3D")(
    _make_pool(3, _avg_pool, "average_pooling3d", "AveragePooling3D: sum over (dhw), / count.")
)


def _spatial_axes(spec: LayerSpec, rank: int) -> tuple[int, ...]:
    first = spec.config.get("data_format", "channels_last") == "channels_first"
    return tuple(range(2, rank + 2)) if first else tuple(range(1, rank + 1))


def _keep(y, nx, axes: tuple[int, ...], keepdims: bool):
    """Reinsert the reduced axes as length 1 when the layer keeps them."""
    if not keepdims:
        return y
    return nx.move(lambda v: np.expand_dims(v, axes), y)


def _global_max(spec: LayerSpec, x, nx, rank: int):
    """Largest input over the spatial axes (exact)."""
    axes = _spatial_axes(spec, rank)
    return nx.max(x, axis=axes, keepdims=bool(spec.config.get("keepdims", False)))


def _global_avg(spec: LayerSpec, x, nx, rank: int):
    """``ops.mean``: a sum over the spatial axes (``_TAPS[rank]``) in at least float32, divided
    by the number of positions, then cast to the layer's dtype."""
    axes = _spatial_axes(spec, rank)
    count = math.prod(nx.value(x).shape[a] for a in axes)
    wide = widen(nx)
    moved = wide.move(lambda v: np.moveaxis(v, axes, tuple(range(rank))), x)
    total = wide.dot(moved, axes=_TAPS[rank])
    # reduce_mean: sum / static_cast<T>(count), one division.
    mean = wide.div(total, wide.const(count))
    mean = narrow(nx, wide, mean)
    return _keep(mean, nx, axes, bool(spec.config.get("keepdims", False)))


def _make_global(rank: int, fn: Callable, name: str, doc: str):
    def global_pool(spec: LayerSpec, inputs: list, nx) -> Any:
        return fn(spec, inputs[0], nx, rank)

    global_pool.__name__ = name
    global_pool.__doc__ = doc
    return global_pool


_MAX_DOC = "GlobalMaxPooling{}D: maximum over the spatial axes (exact)."
_AVG_DOC = "GlobalAveragePooling{}D: float32 sum over ({}), / count, cast to the layer dtype."

global_max_pooling1d = register("GlobalMaxPooling1D")(
    _make_global(1, _global_max, "global_max_pooling1d", _MAX_DOC.format(1))
)
global_max_pooling2d = register("GlobalMaxPooling2D")(
    _make_global(2, _global_max, "global_max_pooling2d", _MAX_DOC.format(2))
)
global_max_pooling3d = register("GlobalMaxPooling3D")(
    _make_global(3, _global_max, "global_max_pooling3d", _MAX_DOC.format(3))
)
global_average_pooling1d = register("GlobalAveragePooling1D")(
    _make_global(1, _global_avg, "global_average_pooling1d", _AVG_DOC.format(1, "w"))
)
global_average_pooling2d = register("GlobalAveragePooling2D")(
    _make_global(2, _global_avg, "global_average_pooling2d", _AVG_DOC.format(2, "hw"))
)
global_average_pooling3d = register("GlobalAveragePooling3D")(
    _make_global(3, _global_avg, "global_average_pooling3d", _AVG_DOC.format(3, "dhw"))
)
