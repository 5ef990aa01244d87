"""Preprocessing kernels: Rescaling, Normalization (inference), CenterCrop.

None of them reduces anything; each is a short chain of elementwise steps, each rounded to the
layer's dtype as TensorFlow rounds it:

- Rescaling: ``cast(x) * scale + offset`` (scale and offset cast to the compute dtype first);
  a product, then a sum, two roundings (no FMA in eager TensorFlow).
- Normalization: ``(x - mean) / maximum(sqrt(variance), epsilon)``, or with ``invert=True``
  ``mean + x * maximum(sqrt(variance), epsilon)``; mean and variance cast to the compute dtype
  before any arithmetic.
- CenterCrop: a slice (exact) when the target fits in the image.

Keras reads two process-wide settings these kernels cannot see: ``keras.config.epsilon()``
(1e-7 is assumed) and, for a Rescaling with a per-channel ``scale``,
``keras.config.image_data_format()`` (channels_last is assumed: ``scale`` broadcasts against
the last axes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register

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
    return nx.add(nx.mul(inputs[0], scale), offset)


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
