"""Preprocessing kernels: Rescaling, Normalization (inference), CenterCrop, Resizing.

None of them reduces anything; each is a short chain of elementwise steps, each rounded to the
layer's dtype as TensorFlow rounds it:

- Rescaling: ``cast(x) * scale + offset`` (scale and offset cast to the compute dtype first);
  a product, then a sum, two roundings (no FMA in eager TensorFlow).
- Normalization: ``(x - mean) / maximum(sqrt(variance), epsilon)``, or with ``invert=True``
  ``mean + x * maximum(sqrt(variance), epsilon)``; mean and variance cast to the compute dtype
  before any arithmetic.
- CenterCrop: a slice (exact) when the target fits in the image.
- Resizing: ``tf.image.resize`` with half-pixel centres. 'nearest' gathers pixels (exact);
  'bilinear' is TF's CPU ``ResizeBilinear``: weights in float32, then three rounded lerps per
  output, computed in float32 whatever the input (float16/bfloat16 results are rounded once
  more, as Keras's saturating cast does). ``crop_to_aspect_ratio`` slices and
  ``pad_to_aspect_ratio`` pads with ``fill_value`` first (exact), sizes computed as TF does.

Keras reads two process-wide settings these kernels cannot see: ``keras.config.epsilon()``
(1e-7 is assumed) and, for a Rescaling with a per-channel ``scale``,
``keras.config.image_data_format()`` (channels_last is assumed: ``scale`` broadcasts against
the last axes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register
from convdiff.kernels.reshaping import _bilinear_weights, _lerp

# keras.config.epsilon() at its default: the floor of Normalization's standard deviation.
_EPSILON = 1e-7


def _config_array(value: Any) -> np.ndarray:
    """A config value that may be a number, a list, or a serialized NumPy array."""
    if isinstance(value, dict):
        inner = value.get("config", {})
        if value.get("class_name") != "__numpy__" or "value" not in inner:
            raise Unsupported(f"config value {value!r}")
        value = inner["value"]
    return np.asarray(value, dtype=np.float64)


@register("Rescaling")
def rescaling(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Rescaling: ``x * scale`` rounded, then ``+ offset`` rounded.

    An integer input is cast to the compute dtype first by Keras; the product here is formed
    from the input's exact value, which is the same whenever that cast is exact (|x| <= 2**24
    for float32: every uint8/uint16/int16 image).
    """
    scale = nx.const(_config_array(spec.config.get("scale", 1.0)))
    offset = nx.const(_config_array(spec.config.get("offset", 0.0)))
    return nx.mul_add(inputs[0], scale, offset)


# --------------------------------------------------------------------------- Normalization


def _keep_axes(spec: LayerSpec, ndim: int) -> tuple[int, ...]:
    axis = spec.config.get("axis", -1)
    if axis is None:
        axis = ()
    elif isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(int(a) % ndim for a in axis))


def _statistics(spec: LayerSpec, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance shaped to broadcast against the input, as ``Normalization.build``
    places them: the kept axes hold the statistics (trailing statistics axes on the last kept
    axes), every other axis has size 1."""
    keep = _keep_axes(spec, ndim)
    mean, variance = spec.config.get("mean"), spec.config.get("variance")
    if mean is None:
        mean, variance = spec.weight("mean"), spec.weight("variance")
        if mean is None or variance is None:
            raise Unsupported("Normalization without mean/variance (neither config nor adapted)")
    mean, variance = np.asarray(mean), np.asarray(variance)
    shape = [1] * ndim
    for i in range(1, mean.ndim + 1):
        shape[keep[-i]] = mean.shape[-i]
    return mean.reshape(shape), variance.reshape(shape)


@register("Normalization")
def normalization(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Normalization at inference: ``(x - mean) / max(sqrt(var), eps)`` (or the inverse
    ``mean + x * max(sqrt(var), eps)``); subtraction, square root, division each rounded."""
    x = inputs[0]
    mean, variance = _statistics(spec, nx.value(x).ndim)
    # Keras casts the statistics to the compute dtype before the arithmetic.
    mean = nx.const(mean)
    # sqrt of the float32 variance: correctly rounded in TF (vector sqrt) and here.
    std = nx.apply("sqrt", nx.const(variance))
    std = nx.maximum(std, nx.const(_EPSILON))
    if spec.config.get("invert", False):
        return nx.add(mean, nx.mul(x, std))
    return nx.div(nx.sub(x, mean), std)


# --------------------------------------------------------------------------- CenterCrop


def _to_compute_dtype(x: Any, nx: Any) -> Any:
    """Keras casts integer images to the compute dtype; exact for |x| <= 2**24 in float32."""
    if np.issubdtype(nx.value(x).dtype, np.floating):
        return x
    return nx.move(lambda v: v.astype(nx.dtype), x)


@register("CenterCrop")
def center_crop(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """CenterCrop: the central ``height x width`` window, offset ``(size - target) // 2``
    (exact). A target larger than the image makes Keras resize instead (unsupported)."""
    x = _to_compute_dtype(inputs[0], nx)
    ndim = nx.value(x).ndim
    channels_first = spec.config.get("data_format", "channels_last") == "channels_first"
    h_axis = ndim - (2 if channels_first else 3)
    shape = nx.value(x).shape
    height, width = int(spec.config["height"]), int(spec.config["width"])
    h_diff, w_diff = shape[h_axis] - height, shape[h_axis + 1] - width
    if h_diff < 0 or w_diff < 0:
        raise Unsupported(
            f"CenterCrop to {height}x{width} of a {shape[h_axis]}x{shape[h_axis + 1]} image "
            "(Keras resizes with smart_resize there)"
        )
    index = [slice(None)] * ndim
    index[h_axis] = slice(h_diff // 2, h_diff // 2 + height)
    index[h_axis + 1] = slice(w_diff // 2, w_diff // 2 + width)
    return nx.move(lambda v: v[tuple(index)], x)


# --------------------------------------------------------------------------- Resizing


def _f32_int(numerator: int, denominator: int) -> int:
    """``int32(float32(numerator) / denominator)``: TF's aspect-ratio arithmetic, truncated."""
    return int(np.float32(numerator) / np.float32(denominator))


def _crop_to_aspect(x: Any, nx: Any, target: tuple[int, int]) -> Any:
    """The central crop with the target's aspect ratio (Keras's TF ``resize``, exact slice)."""
    _, height, width, _ = nx.value(x).shape
    crop_h = max(min(height, _f32_int(width * target[0], target[1])), 1)
    crop_w = max(min(width, _f32_int(height * target[1], target[0])), 1)
    top, left = _f32_int(height - crop_h, 2), _f32_int(width - crop_w, 2)
    return nx.move(lambda v: v[:, top : top + crop_h, left : left + crop_w, :], x)


def _pad_to_aspect(x: Any, nx: Any, target: tuple[int, int], fill_value: float) -> Any:
    """Bands of ``fill_value`` on both sides of the short axis (Keras's TF ``resize``: the same
    band height before and after, so an odd difference loses a row)."""
    batch, height, width, channels = nx.value(x).shape
    pad_h = max(height, _f32_int(width * target[0], target[1]))
    pad_w = max(width, _f32_int(height * target[1], target[0]))
    top, left = _f32_int(pad_h - height, 2), _f32_int(pad_w - width, 2)
    for axis, band in ((1, top), (2, left)):
        if band > 0:
            shape = [batch, height, width, channels]
            shape[axis] = band
            # ones(dtype) * fill_value: fill_value rounded to the image's dtype
            fill = nx.const(np.full(shape, fill_value))
            x = nx.move(
                lambda v, f, axis=axis: np.concatenate(
                    [f.astype(v.dtype), v, f.astype(v.dtype)], axis
                ),
                x,
                fill,
            )
            height, width = nx.value(x).shape[1:3]
    return x


def _resize_nearest(x: Any, nx: Any, size: tuple[int, int]) -> Any:
    """TF's ``ResizeNearestNeighbor`` (half-pixel centres): source index
    ``min(floor((i + 0.5) * (in / out)), in - 1)``, all in float32 (exact gather)."""
    _, height, width, _ = nx.value(x).shape

    def source(in_size: int, out_size: int) -> np.ndarray:
        scale = np.float32(in_size) / np.float32(out_size)
        index = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale)
        return np.clip(index.astype(np.int64), 0, in_size - 1)

    rows, cols = source(height, size[0]), source(width, size[1])
    return nx.move(lambda v: v[:, rows][:, :, cols], x)


def _resize_bilinear(x: Any, nx: Any, size: tuple[int, int]) -> Any:
    """TF's ``ResizeBilinear`` (half-pixel centres) of channels_last ``x`` to ``size``."""
    _, height, width, _ = nx.value(x).shape
    y_lo, y_hi, y_w = _bilinear_weights(height, size[0])
    x_lo, x_hi, x_w = _bilinear_weights(width, size[1])

    def corner(rows: np.ndarray, cols: np.ndarray) -> Any:
        return nx.move(lambda v: v[:, rows][:, :, cols], x)

    # The weights are computed identically by both sides: exact constants.
    wx, wy = nx.const(x_w[None, None, :, None]), nx.const(y_w[None, :, None, None])
    top = _lerp(corner(y_lo, x_lo), corner(y_lo, x_hi), wx, nx)
    bottom = _lerp(corner(y_hi, x_lo), corner(y_hi, x_hi), wx, nx)
    return _lerp(top, bottom, wy, nx)


def _check_resizing(spec: LayerSpec, x: Any, nx: Any) -> str:
    """The interpolation, after refusing what the kernel does not implement."""
    cfg = spec.config
    interpolation = str(cfg.get("interpolation", "bilinear")).lower()
    if interpolation not in ("bilinear", "nearest"):
        raise Unsupported(f"Resizing interpolation={interpolation!r}")
    if interpolation == "bilinear" and cfg.get("antialias", False):
        raise Unsupported("Resizing antialias=True (TF's ScaleAndTranslate)")
    if interpolation == "bilinear" and nx.value(x).dtype.kind in "iub":
        raise Unsupported(f"bilinear Resizing of {nx.value(x).dtype} images (Keras rounds)")
    if interpolation == "bilinear" and np.dtype(spec.dtype) == np.float64:
        raise Unsupported("bilinear Resizing in float64 (TF computes in float32)")
    if nx.value(x).ndim not in (3, 4):
        raise Unsupported(f"Resizing of a rank-{nx.value(x).ndim} input")
    return interpolation


@register("Resizing")
def resizing(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Resizing to ``(height, width)``: optional aspect-ratio crop or pad (exact), then
    'nearest' (exact gather) or 'bilinear' (no reduction; three float32 lerps per output)."""
    cfg = spec.config
    x = inputs[0]
    interpolation = _check_resizing(spec, x, nx)
    unbatched = nx.value(x).ndim == 3
    channels_first = cfg.get("data_format", "channels_last") == "channels_first"
    if unbatched:
        x = nx.move(lambda v: v[None], x)
    if channels_first:
        x = nx.move(lambda v: np.moveaxis(v, 1, -1), x)
    size = (int(cfg["height"]), int(cfg["width"]))
    if cfg.get("crop_to_aspect_ratio", False):
        x = _crop_to_aspect(x, nx, size)
    elif cfg.get("pad_to_aspect_ratio", False):
        x = _pad_to_aspect(x, nx, size, float(cfg.get("fill_value", 0.0)))
    if interpolation == "nearest":
        y = _resize_nearest(x, nx, size)
    else:
        # TF interpolates in float32 whatever the input; Keras casts the result back.
        wide = nx.widened(np.float32)
        y = _resize_bilinear(x, wide, size)
        y = y if wide.dtype == nx.dtype else nx.round(y)
    if channels_first:
        y = nx.move(lambda v: np.moveaxis(v, -1, 1), y)
    return nx.move(lambda v: v[0], y) if unbatched else y
