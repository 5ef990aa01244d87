"""Kernels for Keras operations recorded in a functional graph (``keras.src.ops.numpy``).

Python arithmetic on symbolic tensors while a functional model is built (``inputs + x`` in
ConvNeXt's blocks, ``x + 3.0`` and ``* (1.0 / 6.0)`` in MobileNetV3's hard sigmoid) becomes a
node of a ``keras.ops`` operation, saved and loaded as such in .keras files. Each is one
elementwise TensorFlow op with NumPy broadcasting, one rounding, no reduction:

- ``Add`` (``tf.add``, or ``tf.nn.bias_add`` when the second operand is a vector along the
  channel axis: the same single rounding), ``Subtract``, ``Multiply``, ``Divide``/``TrueDivide``.

A Python number operand is converted to the tensor's dtype first (Keras treats it as a weak
type), exactly as :meth:`nx.const` does. The graph hands such constants to the kernel in
``spec.config["call_args"]``: the node's positional arguments in order, each tensor replaced by
``None``. Without it only an operation on two tensors can be evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register


def _operands(spec: LayerSpec, inputs: list, nx: Any) -> list:
    """The operation's two operands in call order: tensors from ``inputs``, numbers as
    constants in the compute dtype."""
    args = spec.config.get("call_args")
    if args is None:
        if len(inputs) == 2:
            return list(inputs)
        raise Unsupported(
            f"a constant operand (the graph passed {len(inputs)} tensor(s) and no call_args)"
        )
    tensors = iter(inputs)
    operands = []
    for arg in args:
        if arg is None:
            operands.append(next(tensors))
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            operands.append(nx.const(np.asarray(arg, dtype=np.float64)))
        else:
            raise Unsupported(f"operand {arg!r} of type {type(arg).__name__}")
    if len(operands) != 2:
        raise Unsupported(f"{len(operands)} operands (a binary operation takes 2)")
    return operands


def _binary(op: Callable[[Any], Callable[[Any, Any], Any]]) -> Callable[..., Any]:
    def kernel(spec: LayerSpec, inputs: list, nx: Any) -> Any:
        x, y = _operands(spec, inputs, nx)
        return op(nx)(x, y)

    return kernel


add = register("keras.src.ops.numpy.Add")(_binary(lambda nx: nx.add))
add.__doc__ = "``ops.add``: ``x1 + x2`` with broadcasting, one rounding."
subtract = register("keras.src.ops.numpy.Subtract")(_binary(lambda nx: nx.sub))
subtract.__doc__ = "``ops.subtract``: ``x1 - x2`` with broadcasting, one rounding."
multiply = register("keras.src.ops.numpy.Multiply")(_binary(lambda nx: nx.mul))
multiply.__doc__ = "``ops.multiply``: ``x1 * x2`` with broadcasting, one rounding."
divide = register("keras.src.ops.numpy.Divide", "keras.src.ops.numpy.TrueDivide")(
    _binary(lambda nx: nx.div)
)
divide.__doc__ = "``ops.divide``/``ops.true_divide``: ``x1 / x2`` (a true division), one rounding."
