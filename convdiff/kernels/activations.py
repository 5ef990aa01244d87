"""Activation functions (``activation=`` of Conv/Dense layers) and the activation layers.

Every activation is written as the TensorFlow ops Keras 3's TensorFlow backend runs for it
(``keras/src/backend/tensorflow/nn.py``, ``tf.nn.*`` and the C++ functors of
``tensorflow/core/kernels/{relu_op_functor,softplus_op,softsign_op,softmax_op_functor}.h``),
one nx step per rounded node of those expressions, so that the NumPy side rounds where
TensorFlow rounds:

- ``elu``/``selu`` compute ``exp(x) - 1`` (TensorFlow's functor), not ``expm1``: for tiny
  negative ``x`` the result is 0 or a few ULPs of 1, as in TensorFlow;
- ``softplus`` is TensorFlow's three-branch functor (``x`` above ``-threshold``, ``exp(x)`` below
  ``threshold``, ``log1p(exp(x))`` between, ``threshold = log(eps) + 2`` in the layer dtype with
  Eigen's epsilon, which for float16 is 2**-13);
- ``gelu`` is ``0.5 * x * erfc(-x * 0.70710678)`` (exact) or the tanh formula with
  ``pow(x, 3)`` (approximate), in Python's left-to-right order;
- ``softmax`` is ``exp(x - max) * (1 / sum)`` (a reciprocal, then a product), ``log_softmax``
  ``(x - max) - log(sum(exp(x - max)))``;
- ``sigmoid``, ``tanh``, ``exp``, ``expm1``, ``log1p``, ``erfc``, ``sqrt`` and ``pow`` are
  library primitives (:data:`~convdiff.numerics.FUNCTIONS`). Measured worst relative errors of
  TensorFlow's float32 kernels, in units of u = 2**-24: exp 2, log 3.7, log1p 4.6, expm1 5.0,
  tanh 5.1, pow 2, sigmoid 8.1, all within the FUNCTION_ULPS allowance (16 u per element for
  both sides); erfc 5.4 up to 8.5 but 66 beyond (an Eigen tail effect): there, in gelu, the
  bound's spread over the rounding of erfc's argument (about 4 t**2 u at t > 8.5) still
  exceeds it.

Not covered by the bound: TensorFlow's CPU kernels flush subnormal results (and inputs) to zero,
where numerics.py allows half a subnormal per rounding, so ``exp(-88)``, ``sigmoid(-90)``,
``softplus(-90)``, ``gelu(-13.5)`` or a softmax over a spread beyond ~87 come out as 0 in Keras
and are reported outside the bound.

Constants reach the layer dtype as TensorFlow converts them: a Python float operand directly
(``x * 0.3``), a C++ ``static_cast<T>(double)`` constant, a float op attribute (``LeakyRelu``'s
alpha) or ``ops.cast`` through float32 first (:func:`_scalar`).

Reductions (softmax sums, sparsemax's cumulative sums) run over the activation axis, in index
order for the sequential order; TensorFlow's order there is Eigen's and unspecified, which the
bound covers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from convdiff.kernels import LayerSpec, Unsupported, register

if TYPE_CHECKING:
    from convdiff.numerics import Arithmetic as Nx

Array = Any  # np.ndarray under Rounded, Tracked under Bounded
ActivationFn = Callable[..., Array]


def _scalar(nx: Nx, value: float, via_float32: bool = False) -> float:
    """``value`` as TensorFlow holds it in the layer dtype.

    A Python float operand of a tensor op is converted to the tensor's dtype directly;
    ``ops.cast``/``math_ops.cast`` of a Python float, float op attributes and C++
    ``static_cast<Eigen::half>(double)`` constants go through float32 first.
    """
    start = np.float32(value) if via_float32 else np.float64(value)
    return float(np.asarray(start).astype(nx.dtype))


# Piecewise-linear activations ---------------------------------------------------------------
def linear(x: Array, nx: Nx) -> Array:
    """Identity: no rounding step."""
    return x


def relu(
    x: Array,
    nx: Nx,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> Array:
    """Keras's ``ReLU.static_call``: leaky/thresholded/clipped variants, step for step."""
    if negative_slope != 0.0:
        if max_value is None and threshold == 0:
            return leaky_relu(x, nx, negative_slope)
        shifted = nx.neg(x)
        if threshold != 0:
            shifted = nx.add(shifted, _scalar(nx, threshold))  # -x + threshold, rounded
        negative_part = nx.maximum(shifted, 0.0)
    clip_max = max_value is not None
    if threshold != 0:
        y = nx.where(x, _scalar(nx, threshold, via_float32=True), 0.0, x)  # ops.cast: float32
    elif max_value == 6:
        y, clip_max = relu6(x, nx), False  # Keras uses the native Relu6 op
    else:
        y = nx.maximum(x, 0.0)
    if clip_max and max_value is not None:
        top = _scalar(nx, max_value, via_float32=True)
        y = nx.maximum(nx.minimum(y, top), 0.0)  # tf.clip_by_value: exact
    if negative_slope != 0.0:
        # x -= negative_slope * negative_part: a rounded product, then a rounded difference.
        y = nx.sub(y, nx.mul(_scalar(nx, negative_slope), negative_part))
    return y


def leaky_relu(x: Array, nx: Nx, negative_slope: float = 0.2) -> Array:
    """TensorFlow's LeakyRelu functor: ``x > 0 ? x : x * alpha`` (alpha a float32 attribute)."""
    alpha = _scalar(nx, negative_slope, via_float32=True)
    return nx.where(x, 0.0, nx.mul(x, alpha), x)


def relu6(x: Array, nx: Nx) -> Array:
    """``min(max(x, 0), 6)``: exact."""
    return nx.minimum(nx.maximum(x, 0.0), 6.0)


def hard_tanh(x: Array, nx: Nx) -> Array:
    """``tf.clip_by_value(x, -1, 1)``: exact."""
    return nx.maximum(nx.minimum(x, 1.0), -1.0)


def hard_sigmoid(x: Array, nx: Nx) -> Array:
    """``relu6(x + 3) / 6``: a rounded sum, an exact clip, a rounded quotient."""
    return nx.div(relu6(nx.add(x, 3.0), nx), 6.0)


def hard_silu(x: Array, nx: Nx) -> Array:
    """``x * hard_sigmoid(x)``."""
    return nx.mul(x, hard_sigmoid(x, nx))


def hard_shrink(x: Array, nx: Nx, threshold: float = 0.5) -> Array:
    """``where(|x| > threshold, x, 0)``: exact."""
    return nx.where(nx.abs(x), _scalar(nx, threshold), 0.0, x)


def soft_shrink(x: Array, nx: Nx, threshold: float = 0.5) -> Array:
    """``x - t`` above ``t``, ``x + t`` below ``-t``, else 0 (each branch one rounding)."""
    t = _scalar(nx, threshold)
    inner = nx.where(x, -t, nx.add(x, t), 0.0, strict=False)  # x < -t -> x + t
    return nx.where(x, t, inner, nx.sub(x, t))


def sparse_sigmoid(x: Array, nx: Nx) -> Array:
    """0 for ``x <= -1``, 1 for ``x >= 1``, ``0.5 * (x + 1)`` between."""
    middle = nx.mul(0.5, nx.add(x, 1.0))
    upper = nx.where(x, 1.0, middle, 1.0, strict=False)
    return nx.where(x, -1.0, 0.0, upper)


def sparse_plus(x: Array, nx: Nx) -> Array:
    """0 for ``x <= -1``, ``x`` for ``x >= 1``, ``0.25 * pow(x + 1, 2)`` between."""
    middle = nx.mul(0.25, nx.apply("square", nx.add(x, 1.0)))  # tf.pow: a library call
    upper = nx.where(x, 1.0, middle, x, strict=False)
    return nx.where(x, -1.0, 0.0, upper)


def threshold(x: Array, nx: Nx, threshold: float, default_value: float) -> Array:
    """``where(x > threshold, x, default_value)``: exact."""
    return nx.where(x, _scalar(nx, threshold), _scalar(nx, default_value), x)


# Exponential family -------------------------------------------------------------------------
def exponential(x: Array, nx: Nx) -> Array:
    """``exp(x)``."""
    return nx.apply("exp", x)


def elu(x: Array, nx: Nx, alpha: float = 1.0) -> Array:
    """TensorFlow's Elu functor ``x < 0 ? exp(x) - 1 : x``; Keras scales by alpha if not 1."""
    res = nx.where(x, 0.0, nx.sub(nx.apply("exp", x), 1.0), x, strict=False)
    if alpha == 1:
        return res
    return nx.where(x, 0.0, nx.mul(_scalar(nx, alpha), res), res)


def selu(x: Array, nx: Nx) -> Array:
    """TensorFlow's Selu functor: ``x < 0 ? scale_alpha * (exp(x) - 1) : scale * x``."""
    scale = _scalar(nx, 1.0507009873554804934193349852946, via_float32=True)
    scale_alpha = _scalar(nx, 1.7580993408473768599402175208123, via_float32=True)
    negative = nx.mul(scale_alpha, nx.sub(nx.apply("exp", x), 1.0))
    return nx.where(x, 0.0, negative, nx.mul(scale, x), strict=False)


def celu(x: Array, nx: Nx, alpha: float = 1.0) -> Array:
    """``max(x, 0) + alpha * expm1(min(x, 0) / alpha)``."""
    a = _scalar(nx, alpha)
    negative = nx.mul(a, nx.apply("expm1", nx.div(nx.minimum(x, 0.0), a)))
    return nx.add(nx.maximum(x, 0.0), negative)


def _softplus_threshold(dtype: np.dtype) -> float:
    """TensorFlow's ``log(epsilon) + 2`` in the layer dtype, with Eigen's ``epsilon``: -13.94 for
    float32, but -7.0078 for float16, whose Eigen epsilon is 2**-13 (not 2**-10; measured:
    TensorFlow's float16 softplus switches branches at -7.0078 and 7.0078)."""
    eps = 2.0**-13 if dtype == np.float16 else float(ml_dtypes.finfo(dtype).eps)
    log_eps = np.asarray(np.log(eps)).astype(dtype)
    return float(np.asarray(log_eps.astype(np.float64) + 2.0).astype(dtype))


def softplus(x: Array, nx: Nx) -> Array:
    """TensorFlow's Softplus functor: ``x`` above ``-t``, ``exp(x)`` below ``t``, else
    ``log1p(exp(x))`` with ``t = log(eps) + 2``; ``exp(x)`` is rounded before ``log1p``."""
    t = _softplus_threshold(nx.dtype)
    e = nx.apply("exp", x)
    small = nx.where(x, t, e, nx.apply("log1p", e), strict=False)  # x < t -> exp(x)
    return nx.where(x, -t, small, x)  # x > -t -> x


def log_sigmoid(x: Array, nx: Nx) -> Array:
    """``-softplus(-x)``."""
    return nx.neg(softplus(nx.neg(x), nx))


def softsign(x: Array, nx: Nx) -> Array:
    """TensorFlow's Softsign functor ``x / (|x| + 1)``."""
    return nx.div(x, nx.add(nx.abs(x), 1.0))


def squareplus(x: Array, nx: Nx, b: float = 4) -> Array:
    """``(x + sqrt(square(x) + b)) / 2``."""
    root = nx.apply("sqrt", nx.add(nx.mul(x, x), _scalar(nx, b)))
    return nx.div(nx.add(x, root), 2.0)


# Sigmoid family -----------------------------------------------------------------------------
def sigmoid(x: Array, nx: Nx) -> Array:
    """Eigen's logistic function.

    For float32 Eigen has its own algorithm (at most 4.5 ULPs from the true value): one
    library primitive. Other dtypes take Eigen's generic ``e / (1 + e)`` with ``e = exp(x)``
    rounded to the dtype (1 where ``e`` overflows).
    """
    if nx.dtype == np.float32:
        return nx.apply("sigmoid", x)
    e = nx.apply("exp", x)
    ratio = nx.div(e, nx.add(1.0, e))
    return nx.where(e, float(ml_dtypes.finfo(nx.dtype).max), ratio, 1.0)


def silu(x: Array, nx: Nx) -> Array:
    """``x * sigmoid(x)`` (``tf.nn.silu``; its ``beta * x`` with beta 1 is exact)."""
    return nx.mul(x, sigmoid(x, nx))


def glu(x: Array, nx: Nx, axis: int = -1) -> Array:
    """``a * sigmoid(b)`` for the two halves ``a, b`` of ``x`` along ``axis``."""
    size = nx.value(x).shape[axis]
    if size % 2:
        raise Unsupported(f"glu over an axis of odd size {size}")
    first = nx.move(lambda v: np.split(v, 2, axis=axis)[0], x)
    second = nx.move(lambda v: np.split(v, 2, axis=axis)[1], x)
    return nx.mul(first, sigmoid(second, nx))


def tanh(x: Array, nx: Nx) -> Array:
    """``tanh(x)`` (Eigen's rational approximation, clamped to +-1 beyond |x| ~ 7.9)."""
    return nx.apply("tanh", x)


def tanh_shrink(x: Array, nx: Nx) -> Array:
    """``x - tanh(x)``."""
    return nx.sub(x, nx.apply("tanh", x))


def mish(x: Array, nx: Nx) -> Array:
    """Keras's ``x * tanh(softplus(x))``."""
    return nx.mul(x, nx.apply("tanh", softplus(x, nx)))


def gelu(x: Array, nx: Nx, approximate: bool = False) -> Array:
    """``tf.nn.gelu``.

    Exact: ``(0.5 * x) * erfc(-x * float32(1/sqrt(2)))``. Approximate:
    ``(0.5 * x) * (1 + tanh(0.79788456 * (x + 0.044715 * pow(x, 3))))``, where the coefficient
    0.044715 is ``math_ops.cast`` (through float32) and 0.79788456 a Python float.
    """
    half_x = nx.mul(0.5, x)
    if not approximate:
        scaled = nx.mul(nx.neg(x), _scalar(nx, 0.7071067811865476, via_float32=True))
        return nx.mul(half_x, nx.apply("erfc", scaled))
    cubic = nx.mul(_scalar(nx, 0.044715, via_float32=True), nx.apply("cube", x))
    inner = nx.mul(_scalar(nx, 0.7978845608028654), nx.add(x, cubic))
    return nx.mul(half_x, nx.add(1.0, nx.apply("tanh", inner)))


# Normalising activations over an axis -------------------------------------------------------
def _axes(x: Array, nx: Nx, axis: Any) -> tuple[int, ...]:
    """The reduction axes; ``None`` means every axis (TensorFlow flattens the whole tensor)."""
    ndim = nx.value(x).ndim
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, list | tuple) else [axis]
    return tuple(int(a) % ndim for a in axes)


def softmax(x: Array, nx: Nx, axis: Any = -1) -> Array:
    """TensorFlow's softmax functor: ``e = exp(x - max)``, then ``e * (1 / sum(e))``."""
    axes = _axes(x, nx, axis)
    e = nx.apply("exp", nx.sub(x, nx.max(x, axis=axes, keepdims=True)))
    inverse = nx.div(1.0, nx.sum(e, axes, keepdims=True))
    return nx.mul(e, inverse)


def log_softmax(x: Array, nx: Nx, axis: Any = -1) -> Array:
    """TensorFlow's log-softmax functor: ``s = x - max``, then ``s - log(sum(exp(s)))``."""
    axes = _axes(x, nx, axis)
    shifted = nx.sub(x, nx.max(x, axis=axes, keepdims=True))
    total = nx.sum(nx.apply("exp", shifted), axes, keepdims=True)
    return nx.sub(shifted, nx.apply("log", total))


def _sorted_descending(x: Array, nx: Nx, axis: int) -> Array:
    """``tf.sort(x, 'DESCENDING')``. Sorting is 1-Lipschitz in the max norm, so each sorted
    value may be off by the largest input bound along the axis (taken by an exact maximum with
    the row minimum, which carries that largest bound)."""
    order = np.argsort(-nx.value(x), axis=axis, kind="stable")
    ordered = nx.move(lambda v: np.take_along_axis(v, order, axis=axis), x)
    return nx.maximum(ordered, nx.min(x, axis=axis, keepdims=True))


def _cumsum(x: Array, nx: Nx, axis: int) -> Array:
    """``tf.cumsum`` along ``axis``: prefix ``i`` is the sum of terms ``0..i`` (later terms
    masked to exact zeros), so each prefix is one reduction of the chosen order."""
    n = nx.value(x).shape[axis]
    mask = np.tril(np.ones((n, n), dtype=bool))  # mask[i, j]: term j belongs to prefix i

    def terms(v: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(v, axis, -1)[..., None, :]  # (..., 1, j)
        return np.where(mask, moved, 0.0).astype(v.dtype)  # (..., i, j)

    sums = nx.sum(nx.move(terms, x), -1)  # (..., i)
    return nx.move(lambda v: np.moveaxis(v, -1, axis), sums)


def sparsemax(x: Array, nx: Nx, axis: int = -1) -> Array:
    """Keras's TensorFlow sparsemax, step for step (including its threshold
    ``tau = (sum of the supported cumulative sums - 1) / k``, which for a support of more than
    one element is not the textbook ``(cumsum[k-1] - 1) / k``)."""
    axis = _axes(x, nx, axis)[0]
    ordered = _sorted_descending(x, nx, axis)
    cumulative = _cumsum(ordered, nx, axis)
    shape = [1] * nx.value(x).ndim
    shape[axis] = -1
    ranks = nx.const(np.arange(1, nx.value(x).shape[axis] + 1).reshape(shape))
    margin = nx.sub(ordered, nx.div(nx.sub(cumulative, 1.0), ranks))
    supported = nx.where(margin, 0.0, 0.0, cumulative)  # support: margin > 0
    k = nx.sum(nx.where(margin, 0.0, 0.0, 1.0), axis, keepdims=True)
    tau = nx.div(nx.sub(nx.sum(supported, axis, keepdims=True), 1.0), k)
    return nx.maximum(nx.sub(x, tau), 0.0)


ACTIVATIONS: dict[str, ActivationFn] = {
    fn.__name__: fn
    for fn in (
        celu,
        elu,
        exponential,
        gelu,
        glu,
        hard_shrink,
        hard_sigmoid,
        hard_silu,
        hard_tanh,
        leaky_relu,
        linear,
        log_sigmoid,
        log_softmax,
        mish,
        relu,
        relu6,
        selu,
        sigmoid,
        silu,
        soft_shrink,
        softmax,
        softplus,
        softsign,
        sparse_plus,
        sparse_sigmoid,
        sparsemax,
        squareplus,
        tanh,
        tanh_shrink,
    )
}
ACTIVATIONS["swish"] = silu
ACTIVATIONS["hard_swish"] = hard_silu
# threshold(x, threshold, default_value) has no defaults: a layer config (a name only) cannot
# use it, and Keras itself fails calling it by name.
_NEEDS_ARGUMENTS = {"threshold"}


def _function_name(activation: Any) -> str | None:
    """The builtin activation's name from a layer config entry, or None for a layer object."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        return activation.rsplit(".", 1)[-1]
    if not isinstance(activation, dict):
        raise Unsupported(f"activation {activation!r}")
    config = activation.get("config")
    if isinstance(config, str):  # a serialized function
        module = str(activation.get("module", "keras.activations"))
        if not module.startswith(("keras.activations", "keras.src.activations")):
            raise Unsupported(f"custom activation function {config!r} (module {module!r})")
        return config
    if isinstance(config, dict) and activation.get("class_name") in _LAYER_ACTIVATIONS:
        return None
    raise Unsupported(f"activation {activation.get('class_name', activation)!r}")


def activate(activation: Any, x: Array, nx: Nx) -> Array:
    """Apply a Keras activation given as in a layer config.

    Args:
        activation: a builtin activation's name (``"relu"``), a serialized function
            (``{"class_name": "function", "config": "relu", ...}``) or a serialized activation
            layer object (``{"class_name": "ReLU", "config": {...}}``).
        x: the pre-activation (rounded to the layer dtype).
        nx: the arithmetic.

    Raises:
        Unsupported: a custom function or an unknown name.
    """
    name = _function_name(activation)
    with np.errstate(all="ignore"):  # overflow to inf is part of the arithmetic (exp(90))
        if name is None:
            return _LAYER_ACTIVATIONS[activation["class_name"]](activation["config"], x, nx)
        if name in _NEEDS_ARGUMENTS:
            raise Unsupported(f"activation {name!r} needs arguments a layer config cannot carry")
        if name not in ACTIVATIONS:
            raise Unsupported(f"activation {name!r}")
        return ACTIVATIONS[name](x, nx)


# Activation layers ----------------------------------------------------------------------------
def _relu_layer(config: dict, x: Array, nx: Nx) -> Array:
    return relu(
        x,
        nx,
        negative_slope=config.get("negative_slope", 0.0) or 0.0,
        max_value=config.get("max_value"),
        threshold=config.get("threshold", 0.0) or 0.0,
    )


def _leaky_relu_layer(config: dict, x: Array, nx: Nx) -> Array:
    return leaky_relu(x, nx, config.get("negative_slope", config.get("alpha", 0.3)))


def _elu_layer(config: dict, x: Array, nx: Nx) -> Array:
    if "alpha" not in config:
        # Keras's ELU has no get_config of its own: its alpha is only in the config Keras
        # records automatically, which it skips (get_config raises) when a constructor
        # argument is not a plain value (e.g. dtype=keras.DTypePolicy("mixed_float16")).
        raise Unsupported("ELU whose config has no 'alpha' (built with a non-plain argument)")
    return elu(x, nx, config["alpha"])


def _softmax_layer(config: dict, x: Array, nx: Nx, mask: Array | None = None) -> Array:
    """Keras's Softmax layer: masked positions get a large negative logit (-1e9; -3e4 in
    float16) and a 0 output; a list of several axes is ``exp(x - logsumexp(x))``."""
    if mask is not None:
        large_negative = -3e4 if nx.dtype == np.float16 else -1e9
        x = nx.where(mask, 0.5, large_negative, x)  # Keras: mask > 0.5 (or a bool mask)
    axis = config.get("axis", -1)
    if isinstance(axis, list | tuple) and len(axis) > 1:
        y = _exp_minus_logsumexp(x, nx, _axes(x, nx, axis))
    else:
        y = softmax(x, nx, axis[0] if isinstance(axis, list | tuple) else axis)
    return y if mask is None else nx.where(mask, 0.5, 0.0, y)


def _exp_minus_logsumexp(x: Array, nx: Nx, axes: tuple[int, ...]) -> Array:
    """``exp(x - reduce_logsumexp(x))``: ``log(sum(exp(x - max))) + max``, all rounded."""
    top = nx.max(x, axis=axes, keepdims=True)
    total = nx.sum(nx.apply("exp", nx.sub(x, top)), axes, keepdims=True)
    return nx.apply("exp", nx.sub(x, nx.add(nx.apply("log", total), top)))


def _activation_layer(config: dict, x: Array, nx: Nx) -> Array:
    return activate(config.get("activation"), x, nx)


_LAYER_ACTIVATIONS: dict[str, Callable[[dict, Any, Any], Any]] = {
    "Activation": _activation_layer,
    "ReLU": _relu_layer,
    "LeakyReLU": _leaky_relu_layer,
    "ELU": _elu_layer,
    "Softmax": _softmax_layer,
}


@register("Activation")
def activation_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """Activation: the configured activation function (see :func:`activate`)."""
    return _activation_layer(spec.config, inputs[0], nx)


@register("ReLU")
def relu_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """ReLU: ``max_value`` clip, ``negative_slope`` and ``threshold`` as Keras's
    ``ReLU.static_call`` applies them; elementwise, no reduction."""
    with np.errstate(all="ignore"):
        return _relu_layer(spec.config, inputs[0], nx)


@register("LeakyReLU")
def leaky_relu_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """LeakyReLU: ``x > 0 ? x : x * negative_slope``; elementwise, no reduction."""
    return _leaky_relu_layer(spec.config, inputs[0], nx)


@register("ELU")
def elu_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """ELU: ``exp(x) - 1`` below 0, times ``alpha`` when it is not 1; no reduction."""
    with np.errstate(all="ignore"):
        return _elu_layer(spec.config, inputs[0], nx)


@register("PReLU")
def prelu_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """PReLU: ``relu(x) + (-alpha) * relu(-x)`` (two rounded steps; ``alpha`` broadcast over
    the shared axes); no reduction."""
    alpha = spec.weight("alpha")
    if alpha is None:
        raise Unsupported("PReLU without its alpha weight")
    x = inputs[0]
    negative = nx.mul(nx.neg(nx.const(alpha)), nx.maximum(nx.neg(x), 0.0))
    return nx.add(nx.maximum(x, 0.0), negative)


@register("Softmax")
def softmax_layer(spec: LayerSpec, inputs: list, nx: Nx) -> Array:
    """Softmax over ``axis``: the max and the sum reduce over the axis (index order for the
    sequential order), then ``exp(x - max) * (1 / sum)``; an optional second input is the mask."""
    mask = inputs[1] if len(inputs) > 1 else None
    with np.errstate(all="ignore"):
        return _softmax_layer(spec.config, inputs[0], nx, mask)
