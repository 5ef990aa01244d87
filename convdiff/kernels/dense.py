"""Dense: ``activation(x @ kernel + bias)``, each step rounded as Keras does.

The reduction runs over the input features (axis label ``"c"``), in index order for the
sequential order, each a fused multiply-add from zero; the bias is added after the product.
"""

from __future__ import annotations

import numpy as np

from convdiff.kernels import LayerSpec, register
from convdiff.kernels.activations import activate


@register("Dense")
def dense(spec: LayerSpec, inputs, nx):
    """Dense: sum over input features of x[..., c] * kernel[c, :], then bias, activation."""
    kernel = spec.weight("kernel")  # (features, units)
    x = nx.move(lambda v: np.moveaxis(v, -1, 0)[..., None], inputs[0])  # (c, ..., 1)
    w = nx.const(kernel.reshape((kernel.shape[0], *([1] * (inputs_rank(nx, inputs[0]) - 1)), -1)))
    y = nx.dot(x, w, axes="c")
    bias = spec.weight("bias")
    if spec.config.get("use_bias", True) and bias is not None:
        y = nx.add(y, nx.const(bias))
    return activate(spec.config.get("activation", "linear"), y, nx)


def inputs_rank(nx, x) -> int:
    return nx.value(x).ndim
