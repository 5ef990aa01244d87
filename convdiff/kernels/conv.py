"""Convolution kernels: Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D, Conv*DTranspose.

Every kernel is the pipeline Keras's ``BaseConv.call`` takes, each step rounded on its own:

    to channels_last -> pad -> patches -> reduce (the chosen order) -> + bias -> activation

The reduction runs over the labelled tap axes ``"hwc"`` (kernel rows, kernel columns, input
channels; ``"dhwc"`` in 3-D, ``"wc"`` in 1-D), outermost first: the default sequential order
therefore adds taps row by row, column by column, channel by channel, each a fused multiply-add
from zero, which is the order that reproduces TensorFlow's CPU convolution on the one-layer
example bit for bit (measured with oneDNN on AVX-512 for every forward configuration in
tests/test_kernels_conv.py: strides, dilation, groups, channels_first, depthwise, separable). The
accumulator never starts at the bias: Keras adds the bias as its own rounded operation.

Keras 3.15's TensorFlow backend turns ``outputs + reshape(bias, (1, F, 1, ...))`` into
``tf.nn.bias_add(..., "NHWC")`` whenever the output's last axis also has length F, so a
channels_first layer whose output width equals its channel count gets the bias along the width.
These kernels add it along the channel axis, so such a layer is reported as a real divergence.
"""

from __future__ import annotations

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register
from convdiff.kernels.activations import activate
from convdiff.kernels.geometry import (
    TAPS,
    geometry,
    on_channels_last,
    padding_widths,
    tuple_of,
    windows,
)


def _kernel(spec: LayerSpec, *names: str) -> np.ndarray:
    """The first stored float kernel among ``names``. LoRA-adapted and quantized layers convolve
    with another kernel than the stored one: they are not implemented."""
    if spec.config.get("lora_rank"):
        raise Unsupported(f"lora_rank={spec.config['lora_rank']} (LoRA-adapted kernel)")
    kernel = next((w for w in map(spec.weight, names) if w is not None), None)
    scaled = any(name.endswith("_scale") for name in spec.weights)
    if kernel is None or scaled or kernel.dtype.kind != "f":
        dtype = None if kernel is None else kernel.dtype
        raise Unsupported(f"quantized kernel (dtype {dtype}, policy {spec.config.get('dtype')})")
    return kernel


def _conv(spec: LayerSpec, x, nx, rank: int, kernel, groups: int = 1, flip_taps: bool = False):
    """Grouped correlation of channels_last ``x`` with ``kernel`` (*k, C/groups, F); no bias.

    With ``flip_taps`` it is a convolution instead: tap ``i`` of the kernel meets input
    ``p*s + (k-1-i)*d``, and the taps are still added in the kernel's own index order.
    """
    strides, dilation, padding = geometry(spec, rank)
    ksize = tuple(kernel.shape[:rank])
    spatial = tuple(nx.value(x).shape[1:-1])
    pads = padding_widths(spatial, ksize, strides, dilation, padding)
    cin_g, filters = kernel.shape[rank], kernel.shape[rank + 1]
    cout_g = filters // groups

    def grouped_patches(v: np.ndarray) -> np.ndarray:
        p = windows(v, ksize, strides, dilation, pads)  # (*k, C, N, *out)
        if flip_taps:
            p = np.flip(p, axis=tuple(range(rank)))
        p = p.reshape((*ksize, groups, cin_g, *p.shape[rank + 1 :]))
        p = np.moveaxis(p, rank, -1)  # (*k, cin_g, N, *out, G)
        return p[..., None]  # (*k, cin_g, N, *out, G, 1)

    patches = nx.move(grouped_patches, x)
    w = nx.const(kernel.reshape((*ksize, cin_g, *([1] * (rank + 1)), groups, cout_g)))
    y = nx.dot(patches, w, axes=TAPS[rank])  # (N, *out, G, cout_g)
    return nx.move(lambda v: v.reshape((*v.shape[:-2], filters)), y)


def _bias_activation(spec: LayerSpec, y, nx):
    """Keras adds the bias as its own rounded op, then applies the activation."""
    bias = spec.weight("bias")
    if spec.config.get("use_bias", True) and bias is not None:
        y = nx.add(y, nx.const(bias))
    return activate(spec.config.get("activation", "linear"), y, nx)


def _make_conv(rank: int):
    def conv(spec: LayerSpec, inputs, nx):
        kernel = _kernel(spec, "kernel")
        groups = int(spec.config.get("groups", 1))

        def body(x):
            return _bias_activation(spec, _conv(spec, x, nx, rank, kernel, groups), nx)

        return on_channels_last(spec, inputs[0], nx, body)

    conv.__name__ = f"conv{rank}d"
    conv.__doc__ = f"Conv{rank}D: reduction over ({TAPS[rank]}) per output, then bias, activation."
    return conv


conv1d = register("Conv1D")(_make_conv(1))
conv2d = register("Conv2D")(_make_conv(2))
conv3d = register("Conv3D")(_make_conv(3))


def _depthwise(spec: LayerSpec, x, nx, rank: int, kernel):
    """Each input channel correlated with its own ``depth_multiplier`` filters; output channel
    ``c * depth_multiplier + m``. Reduction over the spatial taps only (``"hw"``)."""
    strides, dilation, padding = geometry(spec, rank)
    ksize = tuple(kernel.shape[:rank])
    spatial = tuple(nx.value(x).shape[1:-1])
    pads = padding_widths(spatial, ksize, strides, dilation, padding)
    channels, multiplier = kernel.shape[rank], kernel.shape[rank + 1]

    def taps_first(v: np.ndarray) -> np.ndarray:
        p = windows(v, ksize, strides, dilation, pads)  # (*k, C, N, *out)
        return np.moveaxis(p, rank, -1)[..., None]  # (*k, N, *out, C, 1)

    patches = nx.move(taps_first, x)
    w = nx.const(kernel.reshape((*ksize, *([1] * (rank + 1)), channels, multiplier)))
    y = nx.dot(patches, w, axes=TAPS[rank][:-1])
    return nx.move(lambda v: v.reshape((*v.shape[:-2], channels * multiplier)), y)


def _make_depthwise(rank: int):
    def depthwise(spec: LayerSpec, inputs, nx):
        """Each channel correlated with its own filters (taps in kernel index order, one fused
        multiply-add each from zero), then bias and activation."""
        kernel = _kernel(spec, "kernel", "depthwise_kernel")

        def body(x):
            return _bias_activation(spec, _depthwise(spec, x, nx, rank, kernel), nx)

        return on_channels_last(spec, inputs[0], nx, body)

    depthwise.__name__ = f"depthwise_conv{rank}d"
    return depthwise


depthwise_conv1d = register("DepthwiseConv1D")(_make_depthwise(1))
depthwise_conv2d = register("DepthwiseConv2D")(_make_depthwise(2))


def _make_separable(rank: int):
    def separable(spec: LayerSpec, inputs, nx):
        """Depthwise correlation (rounded, as TF's separable_conv2d rounds it), then a 1x1
        pointwise convolution over the channels in index order, bias, activation."""
        depth_k = _kernel(spec, "depthwise_kernel")
        point_k = _kernel(spec, "pointwise_kernel")
        point_spec = LayerSpec(spec.name, spec.class_name, {"strides": 1, "padding": "valid"})

        def body(x):
            y = _depthwise(spec, x, nx, rank, depth_k)
            y = _conv(point_spec, y, nx, rank, point_k)
            return _bias_activation(spec, y, nx)

        return on_channels_last(spec, inputs[0], nx, body)

    separable.__name__ = f"separable_conv{rank}d"
    return separable


separable_conv1d = register("SeparableConv1D")(_make_separable(1))
separable_conv2d = register("SeparableConv2D")(_make_separable(2))


def _transpose_geometry(spec: LayerSpec, rank: int, spatial, ksize):
    """Dilated-input padding and crop for a transposed convolution (TensorFlow's
    ``conv_transpose``: the gradient of a correlation whose input is the output here)."""
    strides, dilation, padding = geometry(spec, rank)
    out_pad = spec.config.get("output_padding")
    out_pad = tuple_of(out_pad, rank) if out_pad is not None else None
    lengths, pads = [], []
    for i, (n, k, s, d) in enumerate(zip(spatial, ksize, strides, dilation, strict=True)):
        k_eff = d * (k - 1) + 1
        if out_pad is None:  # Keras's deconv_output_length
            length = n * s + max(k_eff - s, 0) if padding == "valid" else n * s
        else:
            p = 0 if padding == "valid" else k_eff // 2
            length = (n - 1) * s + k_eff - 2 * p + out_pad[i]
        before = 0 if padding == "valid" else max((n - 1) * s + k_eff - length, 0) // 2
        full = (n - 1) * s + k_eff
        # Full correlation of the stride-dilated input, cropped to [before, before + length).
        lo = k_eff - 1 - before
        hi = before + length - full + (k_eff - 1)
        lengths.append(length)
        pads.append((lo, hi))
    return strides, dilation, pads, lengths


def _dilate(x: np.ndarray, strides, pads) -> np.ndarray:
    """Insert ``s-1`` zeros between input pixels and pad (negative pads crop)."""
    shape = [x.shape[0]]
    shape += [(n - 1) * s + 1 for n, s in zip(x.shape[1:-1], strides, strict=True)]
    out = np.zeros((*shape, x.shape[-1]), x.dtype)
    spread = (slice(None), *(slice(None, None, s) for s in strides), slice(None))
    out[spread] = x
    crop = (
        slice(None),
        *(slice(max(-lo, 0), n - max(-hi, 0)) for (lo, hi), n in zip(pads, shape[1:], strict=True)),
        slice(None),
    )
    out = out[crop]
    pos = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    return np.pad(out, [(0, 0), *pos, (0, 0)])


def _make_transpose(rank: int):
    def conv_transpose(spec: LayerSpec, inputs, nx):
        """Convolution (not correlation) of the stride-dilated input with the kernel, its
        channel axes swapped; then bias and activation.

        Reduction order: kernel taps in the stored kernel's index order (rows, columns), input
        channels innermost, each a fused multiply-add from zero. That is TensorFlow's CPU
        order (Conv2DBackpropInput, oneDNN on) for strided 'valid' layers without
        output_padding, measured bit for bit; for stride 1, 'same' or output_padding TF picks
        other algorithms (some add per-tap channel sums), so expect rounding differences there.
        """
        kernel = _kernel(spec, "kernel").swapaxes(-1, -2)  # stored (*k, filters, C)
        ksize = tuple(kernel.shape[:rank])
        dilation = spec.config.get("dilation_rate", 1)
        geometry = {"strides": 1, "padding": "valid", "dilation_rate": dilation}
        inner = LayerSpec(spec.name, spec.class_name, geometry)

        def body(x):
            spatial = tuple(nx.value(x).shape[1:-1])
            strides, _, pads, _ = _transpose_geometry(spec, rank, spatial, ksize)
            x = nx.move(lambda v: _dilate(v, strides, pads), x)
            y = _conv(inner, x, nx, rank, kernel, flip_taps=True)
            return _bias_activation(spec, y, nx)

        return on_channels_last(spec, inputs[0], nx, body)

    conv_transpose.__name__ = f"conv{rank}d_transpose"
    return conv_transpose


conv1d_transpose = register("Conv1DTranspose")(_make_transpose(1))
conv2d_transpose = register("Conv2DTranspose")(_make_transpose(2))
conv3d_transpose = register("Conv3DTranspose")(_make_transpose(3))
