"""Where each output reads its inputs: strides, dilation, TensorFlow's padding, the windows of
taps, and the move to channels_last and back. Pure data movement, shared by the convolution and
pooling kernels and by the explanations of divergent layers; nothing here rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from convdiff.kernels import LayerSpec, Unsupported

# The labelled reduction axes of a convolution of each rank, outermost first: kernel depth,
# rows, columns, input channels.
TAPS = {1: "wc", 2: "hwc", 3: "dhwc"}


def reduction_axes(class_name: str) -> tuple[str, ...]:
    """The labelled axes of each reduction a convolution class adds over (what ``--tap-order``
    can rearrange), e.g. ``("hw", "hwc")`` for SeparableConv2D; empty for other classes."""
    for rank in (1, 2, 3):
        taps = TAPS[rank]
        if class_name in (f"Conv{rank}D", f"Conv{rank}DTranspose"):
            return (taps,)
        if class_name == f"DepthwiseConv{rank}D":
            return (taps[:-1],)
        if class_name == f"SeparableConv{rank}D":
            return (taps[:-1], taps)
    return ()


def tuple_of(value: Any, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (int(value),) * rank


def geometry(spec: LayerSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    cfg = spec.config
    strides = tuple_of(cfg.get("strides", 1), rank)
    dilation = tuple_of(cfg.get("dilation_rate", 1), rank)
    padding = str(cfg.get("padding", "valid")).lower()
    return strides, dilation, padding


def channels_first(spec: LayerSpec) -> bool:
    return spec.config.get("data_format", "channels_last") == "channels_first"


def to_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def to_first(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def same_padding(size: int, k_eff: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding: output ceil(size/stride), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


def padding_widths(
    spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dilation, padding: str
) -> list[tuple[int, int]]:
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilation, strict=True):
        k_eff = d * (k - 1) + 1
        if padding == "same":
            pads.append(same_padding(size, k_eff, s))
        elif padding == "causal":
            pads.append((k_eff - 1, 0))
        elif padding == "valid":
            pads.append((0, 0))
        else:
            raise Unsupported(f"padding={padding!r}")
    return pads


def windows(x: np.ndarray, kernel: tuple[int, ...], strides, dilation, pads) -> np.ndarray:
    """Windows of channels_last ``x`` (N, *spatial, C) as (*kernel, C, N, *out_spatial).

    Tap ``(i, j)`` of output ``(p, q)`` reads input ``(p*s + i*d, q*s + j*d)`` of the padded
    input: a correlation, as Keras computes (no kernel flip).
    """
    rank = len(kernel)
    # Without padding (a 1x1 or 'valid' window) np.pad would only copy: the windows are a
    # view of x itself, laid out as that copy would be (C order).
    padded = any(lo or hi for lo, hi in pads)
    x = np.pad(x, [(0, 0), *pads, (0, 0)]) if padded else np.ascontiguousarray(x)
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    if any(e > n for e, n in zip(extents, x.shape[1:-1], strict=True)):
        raise Unsupported("the kernel is larger than the padded input")
    win = sliding_window_view(x, extents, axis=tuple(range(1, rank + 1)))
    # win: (N, *positions, C, *extents); keep every stride-th position and dilation-th tap.
    index = (
        slice(None),
        *(slice(None, None, s) for s in strides),
        slice(None),
        *(slice(None, None, d) for d in dilation),
    )
    win = win[index]
    order = [rank + 2 + i for i in range(rank)] + [rank + 1, 0] + [1 + i for i in range(rank)]
    return win.transpose(order)


def on_channels_last(spec: LayerSpec, x, nx, body):
    """Run ``body`` on channels_last data, whatever the layer's data_format."""
    if not channels_first(spec):
        return body(x)
    y = body(nx.move(to_last, x))
    return nx.move(to_first, y)
