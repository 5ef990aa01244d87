"""Reshaping kernels: padding, cropping, upsampling, flatten, reshape, permute, repeat, and the
layers that are the identity at inference (dropout, noise, regularisation).

Nearly every kernel here is pure data movement (``nx.move``): Keras only pads, slices, repeats,
transposes or reshapes, so the output is the input's values, bit for bit, and the bound is the
input's own uncertainty. They reduce nothing, so they have no reduction order.

The one exception is ``UpSampling2D(interpolation="bilinear")``, which mirrors TensorFlow's CPU
``ResizeBilinear`` kernel (half-pixel centres): interpolation weights computed in float32, then
per output ``top = tl + (tr - tl) * wx``, ``bottom = bl + (br - bl) * wx`` and
``top + (bottom - top) * wy``, every subtraction, product and sum rounded on its own (no FMA;
measured bit-exact against TF 2.21 on this CPU for factors 2, 3, 5 and 7 and 1, 3, 4 channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register

Pairs = tuple[tuple[int, int], ...]


def _channels_first(spec: LayerSpec) -> bool:
    return spec.config.get("data_format", "channels_last") == "channels_first"


def _pairs(value: Any, rank: int) -> Pairs:
    """A padding/cropping config as ``rank`` (before, after) pairs.

    Accepts what Keras accepts: an int (all sides), a pair (1-D only), or ``rank`` entries that
    are each an int (symmetric) or a pair.
    """
    if isinstance(value, int):
        return ((value, value),) * rank
    items = list(value)
    if rank == 1 and len(items) == 2 and all(isinstance(v, int) for v in items):
        return ((int(items[0]), int(items[1])),)
    if len(items) != rank:
        raise Unsupported(f"padding/cropping {value!r} for a {rank}-D layer")
    return tuple((v, v) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in items)


def _spatial_axes(rank: int, channels_first: bool) -> list[int]:
    start = 2 if channels_first else 1
    return list(range(start, start + rank))


# --------------------------------------------------------------------------- padding, cropping


def _make_padding(rank: int) -> Callable[..., Any]:
    def zero_padding(spec: LayerSpec, inputs: list, nx: Any) -> Any:
        pads = _pairs(spec.config.get("padding", 1), rank)
        x = inputs[0]
        widths = [(0, 0)] * nx.value(x).ndim
        for axis, pad in zip(_spatial_axes(rank, _channels_first(spec)), pads, strict=True):
            widths[axis] = pad
        # Zeros are exact; the other side's zeros are the same zeros (no uncertainty).
        return nx.move(lambda v: np.pad(v, widths), x)

    zero_padding.__name__ = f"zero_padding{rank}d"
    zero_padding.__doc__ = f"ZeroPadding{rank}D: ``ops.pad`` with zeros (exact; no reduction)."
    return zero_padding


def _make_cropping(rank: int) -> Callable[..., Any]:
    def cropping(spec: LayerSpec, inputs: list, nx: Any) -> Any:
        crops = _pairs(spec.config.get("cropping", 1), rank)
        x = inputs[0]
        index: list[slice] = [slice(None)] * nx.value(x).ndim
        # Cropping1D has no data_format: its config lacks the key, so channels_last.
        for axis, (lo, hi) in zip(_spatial_axes(rank, _channels_first(spec)), crops, strict=True):
            index[axis] = slice(lo, nx.value(x).shape[axis] - hi)
        return nx.move(lambda v: v[tuple(index)], x)

    cropping.__name__ = f"cropping{rank}d"
    cropping.__doc__ = f"Cropping{rank}D: a slice of the spatial axes (exact; no reduction)."
    return cropping


zero_padding1d = register("ZeroPadding1D")(_make_padding(1))
zero_padding2d = register("ZeroPadding2D")(_make_padding(2))
zero_padding3d = register("ZeroPadding3D")(_make_padding(3))
cropping1d = register("Cropping1D")(_make_cropping(1))
cropping2d = register("Cropping2D")(_make_cropping(2))
cropping3d = register("Cropping3D")(_make_cropping(3))


# --------------------------------------------------------------------------- upsampling


def _repeat(x: Any, nx: Any, sizes: Sequence[int], axes: Sequence[int]) -> Any:
    """``ops.repeat`` along each axis in turn (nearest-neighbour upsampling, exact)."""

    def fn(v: np.ndarray) -> np.ndarray:
        for size, axis in zip(sizes, axes, strict=True):
            v = np.repeat(v, size, axis=axis)
        return v

    return nx.move(fn, x)


def _sizes(value: Any, rank: int) -> tuple[int, ...]:
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


@register("UpSampling1D")
def up_sampling1d(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """UpSampling1D: each step repeated ``size`` times (exact; no reduction)."""
    return _repeat(inputs[0], nx, [int(spec.config.get("size", 2))], [1])


@register("UpSampling3D")
def up_sampling3d(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """UpSampling3D: depth, height, width repeated in turn (exact; no reduction)."""
    axes = _spatial_axes(3, _channels_first(spec))
    return _repeat(inputs[0], nx, _sizes(spec.config.get("size", 2), 3), axes)


@register("UpSampling2D")
def up_sampling2d(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """UpSampling2D: 'nearest' repeats rows and columns (exact); 'bilinear' interpolates as
    TensorFlow's ResizeBilinear (half-pixel centres), three rounded lerps per output, no
    reduction."""
    sizes = _sizes(spec.config.get("size", 2), 2)
    interpolation = str(spec.config.get("interpolation", "nearest")).lower()
    axes = _spatial_axes(2, _channels_first(spec))
    if interpolation == "nearest":
        return _repeat(inputs[0], nx, sizes, axes)
    if interpolation != "bilinear":
        raise Unsupported(f"UpSampling2D interpolation={interpolation!r}")
    if np.dtype(spec.dtype) != np.float32:
        # TF's ResizeBilinear computes and returns float32 whatever the input dtype.
        raise Unsupported(f"UpSampling2D interpolation='bilinear' with dtype {spec.dtype}")
    x = inputs[0]
    if _channels_first(spec):
        x = nx.move(lambda v: np.moveaxis(v, 1, -1), x)
    y = _resize_bilinear(x, nx, sizes)
    return nx.move(lambda v: np.moveaxis(v, -1, 1), y) if _channels_first(spec) else y


def _bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF's ``compute_interpolation_weights`` with ``HalfPixelScaler``, all in float32:
    ``scale = in / out``; source ``(i + 0.5) * scale - 0.5`` (product rounded, then the
    subtraction); lower/upper neighbours clamped to the image; weight ``src - floor(src)``."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    index = np.arange(out_size, dtype=f32)
    src = ((index + f32(0.5)) * scale).astype(f32) - f32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - floor).astype(f32)


def _resize_bilinear(x: Any, nx: Any, sizes: Sequence[int]) -> Any:
    """Bilinear upsampling of channels_last ``x`` (N, H, W, C) by integer ``sizes``."""
    _, height, width, _ = nx.value(x).shape
    y_lo, y_hi, y_w = _bilinear_weights(height, height * sizes[0])
    x_lo, x_hi, x_w = _bilinear_weights(width, width * sizes[1])

    def corner(rows: np.ndarray, cols: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda v: v[:, rows][:, :, cols]

    top_left, top_right = nx.move(corner(y_lo, x_lo), x), nx.move(corner(y_lo, x_hi), x)
    bottom_left, bottom_right = nx.move(corner(y_hi, x_lo), x), nx.move(corner(y_hi, x_hi), x)
    # The weights are computed identically by both sides: exact constants.
    wx = nx.const(x_w[None, None, :, None])
    wy = nx.const(y_w[None, :, None, None])
    top = _lerp(top_left, top_right, wx, nx)
    bottom = _lerp(bottom_left, bottom_right, wx, nx)
    return _lerp(top, bottom, wy, nx)


def _lerp(a: Any, b: Any, weight: Any, nx: Any) -> Any:
    """``a + (b - a) * weight``: three rounded float32 operations (TF's compute_lerp)."""
    return nx.add(a, nx.mul(nx.sub(b, a), weight))


# --------------------------------------------------------------------------- shape changes


@register("Flatten")
def flatten(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Flatten: channels_first moves the channel axis last first, then reshapes to
    (batch, -1) in C order (exact; no reduction)."""
    channels_first = _channels_first(spec)

    def fn(v: np.ndarray) -> np.ndarray:
        if channels_first and v.ndim > 1:
            v = np.transpose(v, (0, *range(2, v.ndim), 1))
        return v.reshape((v.shape[0], math.prod(v.shape[1:])))

    return nx.move(fn, inputs[0])


@register("Reshape")
def reshape(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Reshape: C-order reshape to (batch, *target_shape), ``-1`` inferred (exact)."""
    target = tuple(int(d) for d in spec.config["target_shape"])
    return nx.move(lambda v: v.reshape((v.shape[0], *target)), inputs[0])


@register("Permute")
def permute(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Permute: transpose the non-batch axes by ``dims`` (1-based; exact)."""
    dims = tuple(int(d) for d in spec.config["dims"])
    return nx.move(lambda v: np.transpose(v, (0, *dims)), inputs[0])


@register("RepeatVector")
def repeat_vector(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """RepeatVector: (batch, features) -> (batch, n, features) (exact)."""
    n = int(spec.config["n"])
    return nx.move(lambda v: np.repeat(v[:, None, :], n, axis=1), inputs[0])


# --------------------------------------------------------------------------- identity at inference


@register(
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
)
def identity(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Layers whose ``call`` returns the input unchanged at inference (``training=False``)."""
    return inputs[0]
