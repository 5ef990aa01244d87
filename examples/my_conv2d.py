"""Hand-written NumPy versions of the one-layer model's Conv2D (32 filters, 3x3, 'same', ReLU),
as a user writes them. Plug one in with

    convdiff examples/one_layer.h5 examples/one_layer_input.npy \\
        --impl conv2d=examples/my_conv2d.py:forward_loop

Each is called as ``forward(inp, filter_weights, filter_biases)`` with the layer's input
(N, H, W, C), its kernel (kh, kw, C, F) and its bias (F,), and returns the layer's output.
"""

from __future__ import annotations

import numpy as np


def forward_loop(inp, filter_weights, filter_biases):
    """A loop over output pixels; each dot product summed by NumPy in float64 (NumPy's default
    dtype once a float64 array is involved), bias and ReLU in float64 too."""
    n, h, w, _ = inp.shape
    kh, kw, _, filters = filter_weights.shape
    padded = np.pad(
        inp.astype(np.float64), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))
    )
    weights = filter_weights.astype(np.float64)
    out = np.zeros((n, h, w, filters))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                patch = padded[b, i : i + kh, j : j + kw, :]
                out[b, i, j, :] = np.tensordot(patch, weights, axes=3) + filter_biases
    return np.maximum(out, 0.0)


def forward_vectorized(inp, filter_weights, filter_biases):
    """im2col in float32: stack the 3x3 shifted views, one matrix product, bias, ReLU."""
    n, h, w, c = inp.shape
    kh, kw, _, filters = filter_weights.shape
    padded = np.pad(inp, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    taps = [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    cols = np.stack(taps, axis=3).reshape(n * h * w, kh * kw * c)
    out = cols @ filter_weights.reshape(kh * kw * c, filters) + filter_biases
    return np.maximum(out, 0.0).reshape(n, h, w, filters).astype(np.float32)


def forward_flipped(inp, filter_weights, filter_biases):
    """A classic mistake: a true convolution (kernel flipped), where Keras computes a
    correlation."""
    return forward_vectorized(inp, filter_weights[::-1, ::-1], filter_biases)


def forward_no_bias(inp, filter_weights, filter_biases):
    """Another: the bias forgotten."""
    return forward_vectorized(inp, filter_weights, np.zeros_like(filter_biases))


def forward_shifted(inp, filter_weights, filter_biases):
    """Another: 'same' padding put all on one side (pad 2 after, none before)."""
    n, h, w, c = inp.shape
    padded = np.pad(inp, ((0, 0), (0, 2), (0, 2), (0, 0)))
    taps = [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    cols = np.stack(taps, axis=3).reshape(n * h * w, 9 * c)
    out = cols @ filter_weights.reshape(9 * c, -1) + filter_biases
    return np.maximum(out, 0.0).reshape(n, h, w, -1).astype(np.float32)
