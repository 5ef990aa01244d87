"""Dense: ``activation(x @ kernel + bias)``, each step rounded as Keras does.

Keras's ``Dense.call`` is ``ops.matmul``, then ``ops.add`` of the bias, then the activation: three
separately rounded operations. The reduction runs over the input features (axis label ``"c"``),
in index order for the sequential order, each a fused multiply-add from zero; the bias is added
after the product, never used as the accumulator's start.

Measured on x86-64 with AVX-512 and oneDNN: the sequential FMA order reproduces TF's float32
MatMul bit for bit when ``units > 1``; ``units == 1`` (a matrix-vector product) takes another,
unidentified order. For float16/bfloat16 compute dtypes TF accumulates in float32 and rounds
once: ``--accumulate float32`` reproduces it.
"""

from __future__ import annotations

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register
from convdiff.kernels.activations import activate


def _plain_kernel(spec: LayerSpec) -> np.ndarray:
    """The float kernel; LoRA and quantized layers compute another kernel than the stored one."""
    if spec.config.get("lora_rank"):
        raise Unsupported(f"lora_rank={spec.config['lora_rank']} (LoRA-adapted kernel)")
    kernel = spec.weight("kernel")
    if kernel is None or spec.weight("kernel_scale") is not None or kernel.dtype.kind != "f":
        dtype = None if kernel is None else kernel.dtype
        raise Unsupported(f"quantized kernel (dtype {dtype}, policy {spec.config.get('dtype')})")
    return kernel


@register("Dense")
def dense(spec: LayerSpec, inputs: list, nx):
    """Dense: per output, the sum over input features ``c`` of ``x[..., c] * kernel[c, :]``
    (one labelled reduction axis ``"c"``), then the bias, then the activation."""
    kernel = _plain_kernel(spec)  # (features, units)
    rank = np.ndim(nx.value(inputs[0]))
    # Features to the front, a unit axis at the back: (c, ..., 1) against (c, 1, ..., units).
    x = nx.move(lambda v: np.moveaxis(v, -1, 0)[..., None], inputs[0])
    w = nx.const(kernel.reshape((kernel.shape[0], *([1] * (rank - 1)), kernel.shape[1])))
    y = nx.dot(x, w, axes="c")
    bias = spec.weight("bias")
    if spec.config.get("use_bias", True) and bias is not None:
        y = nx.add(y, nx.const(bias))  # Keras adds the bias as its own rounded op
    return activate(spec.config.get("activation", "linear"), y, nx)
