"""Merging kernels: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, Dot.

Keras's merge layers are chains of binary operations in the order of the call's inputs
(``keras/src/layers/merging``): ``Add`` of ``[a, b, c]`` is ``(a + b) + c``, each ``ops.add``
rounded on its own; it is not an n-ary sum, so its order is fixed, not a summation order.
``Average`` adds the same way and then divides by the number of inputs (a true division: a
multiplication by ``1/3`` differs on about 30% of outputs, measured). Inputs of lower rank get
new axes at position 1 first, as ``Merge.call`` does, and then broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register

# keras.config.epsilon() at its default; Dot(normalize=True) clips 1/||x|| at 1/epsilon.
_EPSILON = 1e-7


def _aligned(inputs: list, nx: Any) -> list:
    """``Merge.call``: when ranks differ, add axes at position 1 until every rank is the
    largest (exact)."""
    ranks = [nx.value(x).ndim for x in inputs]
    top = max(ranks)

    def expand(extra: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda v: v.reshape((v.shape[0], *([1] * extra), *v.shape[1:]))

    pairs = zip(inputs, ranks, strict=True)
    return [x if r == top else nx.move(expand(top - r), x) for x, r in pairs]


def _chain(inputs: list, nx: Any, op: Callable[[Any, Any], Any]) -> Any:
    """``op(op(op(x0, x1), x2), ...)`` in input order, each step rounded by ``op``."""
    inputs = _aligned(inputs, nx)
    out = inputs[0]
    for x in inputs[1:]:
        out = op(out, x)
    return out


@register("Add")
def add(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Add: ``((x0 + x1) + x2) + ...`` in input order, one rounding per addition."""
    return _chain(inputs, nx, nx.add)


@register("Subtract")
def subtract(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Subtract: ``x0 - x1``, one rounding."""
    if len(inputs) != 2:
        raise Unsupported(f"Subtract of {len(inputs)} inputs (Keras takes exactly 2)")
    return _chain(inputs, nx, nx.sub)


@register("Multiply")
def multiply(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Multiply: ``((x0 * x1) * x2) * ...`` in input order, one rounding per product."""
    return _chain(inputs, nx, nx.mul)


@register("Average")
def average(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Average: ``(((x0 + x1) + x2) + ...) / n``: the chain of additions in input order, then
    one division by ``n`` (not a multiplication by ``1/n``)."""
    total = _chain(inputs, nx, nx.add)
    return nx.div(total, nx.const(len(inputs)))


@register("Maximum")
def maximum(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Maximum: elementwise maximum, pairwise in input order (exact)."""
    return _chain(inputs, nx, nx.maximum)


@register("Minimum")
def minimum(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Minimum: elementwise minimum, pairwise in input order (exact)."""
    return _chain(inputs, nx, nx.minimum)


@register("Concatenate")
def concatenate(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Concatenate: the inputs joined along ``axis`` (exact)."""
    axis = int(spec.config.get("axis", -1))
    return nx.move(lambda *vs: np.concatenate(vs, axis=axis), *inputs)


# --------------------------------------------------------------------------- Dot


def _dot_axes(axes: Any, ndims: tuple[int, int]) -> tuple[int, int]:
    """``Dot._merge_function``'s axes: an int for both inputs, or one per input; negative
    axes count from each input's own end."""
    pair = [axes, axes] if isinstance(axes, int) else [int(a) for a in axes]
    resolved = tuple(a % n if a < 0 else a for a, n in zip(pair, ndims, strict=True))
    if 0 in resolved:
        raise Unsupported(f"Dot over the batch axis (axes={axes!r})")
    return resolved  # type: ignore[return-value]


def _l2_normalize(x: Any, axis: int, nx: Any) -> Any:
    """``ops.nn.normalize(x, axis, order=2)``: ``x * min(rsqrt(sum(x*x)), 1/epsilon)``, each
    step rounded; the sum of squares is a reduction over ``axis`` (in the chosen order)."""
    squares = nx.mul(x, x)
    inv_norm = nx.apply("rsqrt", nx.sum(squares, axis=axis, keepdims=True))
    with np.errstate(over="ignore"):
        # 1/epsilon = 1e7 is inf in float16, as Keras's cast of the Python float makes it too.
        cap = nx.const(1.0 / _EPSILON)
    inv_norm = nx.minimum(inv_norm, cap)
    return nx.mul(x, inv_norm)


def _batch_dot(x: Any, y: Any, axes: tuple[int, int], nx: Any) -> Any:
    """Keras's ``batch_dot``: for each batch row, contract ``x`` axis ``axes[0]`` with ``y``
    axis ``axes[1]``; output axes are ``x``'s remaining axes then ``y``'s (batch excluded)."""
    x_rest = nx.value(x).ndim - 2
    y_rest = nx.value(y).ndim - 2

    def x_terms(v: np.ndarray) -> np.ndarray:  # (k, batch, *x_rest, 1...)
        v = np.moveaxis(v, axes[0], 0)
        return v.reshape((*v.shape, *([1] * y_rest)))

    def y_terms(v: np.ndarray) -> np.ndarray:  # (k, batch, 1..., *y_rest)
        v = np.moveaxis(v, axes[1], 0)
        return v.reshape((*v.shape[:2], *([1] * x_rest), *v.shape[2:]))

    out = nx.dot(nx.move(x_terms, x), nx.move(y_terms, y), axes="k")
    if x_rest == 0 and y_rest == 0:
        # Two vectors per row: Keras returns (batch, 1), not (batch,).
        out = nx.move(lambda v: v[:, None], out)
    return out


@register("Dot")
def dot(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """Dot: optional L2 normalisation of each input along its axis, then a batched dot product
    (one reduction over the contracted axis, label ``"k"``; TF's matmul order is unknown, so
    the bound covers every order)."""
    if len(inputs) != 2:
        raise Unsupported(f"Dot of {len(inputs)} inputs (Keras takes exactly 2)")
    x, y = inputs
    axes = _dot_axes(spec.config["axes"], (nx.value(x).ndim, nx.value(y).ndim))
    if spec.config.get("normalize", False):
        x = _l2_normalize(x, axes[0], nx)
        y = _l2_normalize(y, axes[1], nx)
    return _batch_dot(x, y, axes, nx)
