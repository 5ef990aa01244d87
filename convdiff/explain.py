"""Name the likely mistake behind a divergent layer.

When an implementation's output is outside the rounding bound of convdiff's kernel, the usual
suspects are a handful of semantic mistakes: a flipped kernel (convolution instead of
correlation), padding on the wrong side or of the wrong kind, a channels_first read of
channels_last data, a missing bias or activation, transposed kernel axes, another epsilon,
another stride or dilation. Each :class:`Hypothesis` is the layer as it would be under one such
mistake, expressed as a changed config, changed weights or changed (explicitly padded) inputs,
so that convdiff's own kernel computes it together with its rigorous bound. A hypothesis
explains the output when the output is within that bound of it: identical, or rounding away.

Hypotheses are evaluated with the order's accumulator dtype but summed as one BLAS product (the
fastest order); the bound holds for every summation order, so the verdict does not depend on it.
The activation hypotheses of layers whose pipeline ends in the activation (convolutions, Dense,
Activation) share one run of the layer without activation, and apply each alternative activation
to its output and bound: the same steps the kernel would take, without recomputing the sum.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from convdiff.evaluate import KernelRun, run_kernel
from convdiff.floats import is_float, round_to
from convdiff.kernels import Kernel, LayerSpec, Unsupported
from convdiff.kernels.activations import activate
from convdiff.kernels.geometry import channels_first, geometry, padding_widths
from convdiff.metrics import compare, is_identical, within_bound
from convdiff.numerics import Bounded, Rounded, Tracked
from convdiff.orders import Order, accumulator_dtype

__all__ = ["Hypothesis", "hypotheses", "likely_cause"]

_CONV = {
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
}
_TRANSPOSE = {"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}
_POOL = {f"{kind}Pooling{rank}D" for kind in ("Max", "Average") for rank in (1, 2, 3)}
_NORM = {"BatchNormalization", "LayerNormalization", "GroupNormalization"}
# Layers whose kernel ends with ``activate(config["activation"], y, nx)``.
_ACTIVATED = _CONV | _TRANSPOSE | {"Dense", "Activation"}

# Alternatives tried, most common first.
_ACTIVATIONS = (
    "linear",
    "relu",
    "sigmoid",
    "tanh",
    "softmax",
    "relu6",
    "gelu",
    "silu",
    "elu",
    "leaky_relu",
    "softplus",
    "selu",
    "hard_sigmoid",
)
# Elementwise ones commute with the kernels' final layout move (softmax runs over an axis).
_ELEMENTWISE = set(_ACTIVATIONS) - {"softmax"}
# Keras's default (1e-3), PyTorch's (1e-5), other common choices, none, BERT's (1e-12).
_EPSILONS = (1e-3, 1e-5, 1e-6, 1e-7, 0.0, 1e-12)
_AXIS_NAMES = {1: ("width",), 2: ("rows", "columns"), 3: ("depth", "rows", "columns")}


@dataclass(frozen=True)
class Hypothesis:
    """The layer as it would be under one mistake.

    Attributes:
        cause: the sentence reported when the hypothesis explains the output.
        spec: the layer's spec with the mistake (config or weights changed).
        inputs: the layer's inputs with the mistake (e.g. padded explicitly).
        activation: set when the mistake is only the final activation (this name instead of
            the layer's): the layer without activation can be computed once for all of them.
    """

    cause: str
    spec: LayerSpec
    inputs: list[np.ndarray]
    activation: str | None = None


def likely_cause(
    kernel: Kernel,
    spec: LayerSpec,
    inputs: Sequence[np.ndarray],
    observed: np.ndarray,
    order: Order | None = None,
) -> str | None:
    """The first usual mistake that explains the ``observed`` output, or None.

    Args:
        kernel: convdiff's kernel for the layer.
        spec: the layer's config and weights.
        inputs: the inputs the observed output was computed from.
        observed: the output to explain (any shape: a wrong padding mode or stride
            changes it; another float dtype is rounded to the layer's).
        order: the run's summation order (its accumulator dtype is kept).

    Returns:
        A sentence naming the mistake, e.g. "matches if the kernel is flipped: ...". None when
        the layer's own computation explains the output already, or no hypothesis does.
    """
    observed = np.asarray(observed)
    if not is_float(observed.dtype):
        return None
    order = replace(order or Order(), name="blas", block=0)
    inputs = list(inputs)
    remaining = _tolerant(spec, inputs)
    first = next(remaining, None)
    if first is None or _explains(observed, _evaluate(kernel, spec, inputs, order)):
        return None
    linear: list[KernelRun | None] = []  # the layer without activation, computed once
    for hypothesis in itertools.chain([first], remaining):
        if hypothesis.activation is None:
            run = _evaluate(kernel, hypothesis.spec, hypothesis.inputs, order)
        else:
            if not linear:
                linear.append(
                    _evaluate(kernel, _with(spec, {"activation": "linear"}), inputs, order)
                )
            run = _activated(linear[0], hypothesis.activation, spec.dtype, order)
        if _explains(observed, run):
            return hypothesis.cause
    return None


def hypotheses(spec: LayerSpec, inputs: Sequence[np.ndarray]) -> Iterator[Hypothesis]:
    """The mistakes that apply to this layer, most common first (lazily built)."""
    inputs = list(inputs)
    for family in _FAMILIES:
        yield from family(spec, inputs)


def _tolerant(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """:func:`hypotheses`, leaving out a family that cannot be built for this layer's config
    (an explanation is optional; it must never stop the comparison)."""
    for family in _FAMILIES:
        try:
            yield from family(spec, inputs)
        except (Unsupported, ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue


def _evaluate(kernel: Kernel, spec: LayerSpec, inputs: list[np.ndarray], order: Order):
    """The kernel's run on a (changed) layer, or None when that layer cannot be computed (a
    config the kernel does not implement, shapes that no longer fit)."""
    try:
        return run_kernel(kernel, spec, inputs, order)
    except (Unsupported, ValueError, IndexError):
        return None


def _activated(linear: KernelRun | None, name: str, dtype: str, order: Order) -> KernelRun | None:
    """The run of the layer with activation ``name``, from its run without activation: the
    kernel's last step, ``activate(name, y, nx)``, applied to that run's rounded output and to
    its float64 value with its bound."""
    if linear is None or linear.reference is None or linear.bound is None:
        return None
    try:
        output = activate(name, linear.output, Rounded(dtype, order))
        bounded = Bounded(dtype, (dtype, accumulator_dtype(order, dtype)))
        with np.errstate(all="ignore"):
            ref = activate(name, Tracked(linear.reference, linear.bound), bounded)
    except Unsupported:
        return None
    return replace(
        linear, output=np.asarray(output), reference=np.asarray(ref.value), bound=ref.err
    )


def _explains(observed: np.ndarray, run: KernelRun | None) -> bool:
    """``observed`` is identical to the run's output or within its bound everywhere, with a
    finite bound wherever they differ (an infinite bound explains nothing)."""
    if run is None or run.bound is None or run.output.shape != observed.shape:
        return False
    output = run.output
    if not is_float(output.dtype):
        return False
    if observed.dtype != output.dtype:
        observed = round_to(observed.astype(np.float64), output.dtype)
    bound = np.where(np.isnan(run.bound), np.inf, np.asarray(run.bound, dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        # Most hypotheses fail somewhere by far: reject them before compare's statistics.
        if np.any(np.abs(observed.astype(np.float64) - output.astype(np.float64)) > bound):
            return False
    c = compare(output, observed, bound)
    if is_identical(c):
        return True
    if not within_bound(c):
        return False
    with np.errstate(invalid="ignore"):
        differs = (output != observed) & ~(np.isnan(output) & np.isnan(observed))
    return bool(np.all(np.isfinite(bound) | ~differs))


# --------------------------------------------------------------------------- helpers


def _rank(spec: LayerSpec) -> int:
    """Number of spatial axes of a convolution or pooling layer (``Conv2DTranspose`` -> 2)."""
    return int(re.search(r"(\d)D", spec.class_name).group(1))  # type: ignore[union-attr]


def _spatial_axes(spec: LayerSpec) -> list[int]:
    rank = _rank(spec)
    start = 2 if channels_first(spec) else 1
    return list(range(start, start + rank))


def _spatial_kernel(spec: LayerSpec) -> tuple[str, np.ndarray] | None:
    """The name and value of the weight holding the spatial taps, if the layer has one."""
    for name in ("kernel", "depthwise_kernel"):
        weight = spec.weight(name)
        if weight is not None:
            return name, weight
    return None


def _with(spec: LayerSpec, config: dict | None = None, weights: dict | None = None) -> LayerSpec:
    return replace(
        spec,
        config={**spec.config, **(config or {})},
        weights={**spec.weights, **(weights or {})},
    )


def _tuple(values: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(v)) for v in values) + ")"


# --------------------------------------------------------------------------- families


def _flipped_kernel(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    if spec.class_name not in _CONV | _TRANSPOSE or (found := _spatial_kernel(spec)) is None:
        return
    name, kernel = found
    flipped = np.flip(kernel, axis=tuple(range(kernel.ndim - 2)))
    if np.array_equal(flipped, kernel):
        return
    if spec.class_name in _CONV:
        cause = (
            "matches if the kernel is flipped: this implementation computes a convolution, "
            "Keras a correlation"
        )
    else:
        cause = (
            "matches if the kernel is flipped spatially: this implementation pairs input and "
            "kernel taps in the opposite order from Keras's transposed convolution"
        )
    yield Hypothesis(cause, _with(spec, weights={name: flipped}), inputs)


def _padding_mode(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """Another padding mode: 'valid' for 'same' (a smaller output), 'same' for 'causal'..."""
    if spec.class_name not in _CONV | _TRANSPOSE | _POOL:
        return
    padding = str(spec.config.get("padding", "valid")).lower()
    modes = ["valid", "same"]
    if spec.class_name == "Conv1D":  # the only layer Keras lets pad causally
        modes.append("causal")
    for mode in modes:
        if mode != padding:
            cause = f"matches padding='{mode}': the layer uses padding='{padding}'"
            yield Hypothesis(cause, _with(spec, {"padding": mode}), inputs)


def _shifted_padding(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """'same' padding split differently: the odd pixel before, all after, all before, k//2 on
    both sides (PyTorch's ``padding=k//2``), one pixel off on one or every axis. Each is the
    input padded explicitly with zeros, then a 'valid' layer."""
    if spec.class_name not in _CONV or str(spec.config.get("padding")).lower() != "same":
        return
    if (found := _spatial_kernel(spec)) is None:
        return
    rank, axes = _rank(spec), _spatial_axes(spec)
    x = np.asarray(inputs[0])
    ksize = found[1].shape[:rank]
    strides, dilation, _ = geometry(spec, rank)
    tf_pads = padding_widths(tuple(x.shape[a] for a in axes), ksize, strides, dilation, "same")
    for pads in _pad_variants(tf_pads, ksize, dilation):
        widths = [(0, 0)] * x.ndim
        for axis, pad in zip(axes, pads, strict=True):
            widths[axis] = pad
        padded = np.pad(x, widths)
        yield Hypothesis(
            _shift_cause(pads, tf_pads),
            _with(spec, {"padding": "valid"}),
            [padded, *inputs[1:]],
        )


def _pad_variants(tf_pads, ksize, dilation) -> list[tuple[tuple[int, int], ...]]:
    """Other (before, after) paddings per axis than TensorFlow's, most common first."""
    tf_pads = [tuple(p) for p in tf_pads]
    half = [d * (k - 1) // 2 for k, d in zip(ksize, dilation, strict=True)]
    uniform = [
        [(h, h) for h in half],  # k//2 on both sides, PyTorch's padding=k//2
        [(hi, lo) for lo, hi in tf_pads],  # the odd pixel before
        [(0, lo + hi) for lo, hi in tf_pads],  # all after
        [(lo + hi, 0) for lo, hi in tf_pads],  # all before
        [(lo - 1, hi + 1) for lo, hi in tf_pads],
        [(lo + 1, hi - 1) for lo, hi in tf_pads],
    ]
    single = []
    for i, (lo, hi) in enumerate(tf_pads):
        for shifted in ((lo - 1, hi + 1), (lo + 1, hi - 1)):
            single.append([shifted if j == i else p for j, p in enumerate(tf_pads)])
    variants = []
    for pads in map(tuple, uniform + single):
        if pads != tuple(tf_pads) and pads not in variants and min(itertools.chain(*pads)) >= 0:
            variants.append(pads)
    return variants


def _shift_cause(pads, tf_pads) -> str:
    names = _AXIS_NAMES[len(pads)]
    mine = ", ".join(f"{n} {_tuple(p)}" for n, p in zip(names, pads, strict=True))
    theirs = ", ".join(_tuple(p) for p in tf_pads)
    odd = any(lo != hi for lo, hi in tf_pads)
    return (
        f"matches if the input is padded (before, after) {mine}: TensorFlow's 'same' padding "
        f"here is {theirs}" + (", the odd pixel after" if odd else "")
    )


def _pool_padding(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """'same' pooling with the padding as real zeros: counted in the average, or taking part in
    the max (TensorFlow leaves padded positions out of both)."""
    if spec.class_name not in _POOL or str(spec.config.get("padding")).lower() != "same":
        return
    rank, axes = _rank(spec), _spatial_axes(spec)
    x = np.asarray(inputs[0])
    pool = spec.config.get("pool_size", 2)
    pool = tuple(pool) if isinstance(pool, list | tuple) else (int(pool),) * rank
    strides = spec.config.get("strides") or pool
    strides = tuple(strides) if isinstance(strides, list | tuple) else (int(strides),) * rank
    tf_pads = padding_widths(tuple(x.shape[a] for a in axes), pool, strides, (1,) * rank, "same")
    if not any(itertools.chain(*tf_pads)):
        return
    widths = [(0, 0)] * x.ndim
    for axis, pad in zip(axes, tf_pads, strict=True):
        widths[axis] = pad
    if spec.class_name.startswith("Average"):
        cause = (
            "matches if the zero padding is counted in the average: TensorFlow divides each "
            "window's sum by the number of real inputs it covers"
        )
    else:
        cause = (
            "matches if the input is padded with zeros before the max: TensorFlow ignores padding"
        )
    yield Hypothesis(cause, _with(spec, {"padding": "valid"}), [np.pad(x, widths), *inputs[1:]])


def _missing_bias(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    bias = spec.weight("bias")
    if spec.config.get("use_bias", True) and bias is not None and np.any(bias != 0):
        cause = "matches if the bias is left out: Keras adds the layer's bias after the sum"
        yield Hypothesis(cause, _with(spec, {"use_bias": False}), inputs)
    if spec.class_name not in _NORM:
        return
    for flag, weight, what in (("center", "beta", "offset"), ("scale", "gamma", "scale")):
        value = spec.weight(weight)
        if spec.config.get(flag, True) and value is not None and np.any(value != (flag == "scale")):
            cause = f"matches if {weight} (the {what}) is left out: Keras applies it"
            yield Hypothesis(cause, _with(spec, {flag: False}), inputs)


def _activation(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    if "activation" not in spec.config or spec.class_name not in _ACTIVATED:
        return
    current = spec.config["activation"]
    current = current if isinstance(current, str) else None
    shared = spec.class_name == "Activation" or not channels_first(spec)
    for name in _ACTIVATIONS:
        if name == current:
            continue
        if name == "linear" and current is not None:
            cause = f"matches without the activation: the layer applies '{current}' last"
        else:
            theirs = f"'{current}'" if current else "the layer's"
            cause = f"matches with activation '{name}' instead of {theirs}"
        last = name if shared or name in _ELEMENTWISE else None
        yield Hypothesis(cause, _with(spec, {"activation": name}), inputs, last)


def _data_format(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """The data read in the other layout (e.g. channels_last data indexed as (N, C, H, W)); for
    a normalization, its parameters applied along axis 1 instead of the last (or back)."""
    ndim = np.ndim(inputs[0])
    if spec.class_name in ("BatchNormalization", "LayerNormalization") and ndim > 2:
        axis = spec.config.get("axis", -1)
        axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
        if isinstance(axis, int) and np.shape(inputs[0])[1] == np.shape(inputs[0])[-1]:
            other = 1 if axis % ndim == ndim - 1 else -1
            cause = f"matches with axis={other} instead of the layer's axis={axis}: "
            cause += "the channels are read from the other end (channels_first vs channels_last)"
            yield Hypothesis(cause, _with(spec, {"axis": other}), inputs)
    if spec.class_name not in _CONV | _TRANSPOSE | _POOL:
        return
    current = spec.config.get("data_format", "channels_last")
    other_format = "channels_first" if current == "channels_last" else "channels_last"
    cause = f"matches if the input is read as {other_format}: the layer's data is {current}"
    yield Hypothesis(cause, _with(spec, {"data_format": other_format}), inputs)


def _transposed_kernel(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """Kernel axes swapped: rows/columns of a 2-D kernel, input/output channels, Dense's
    (in, out) matrix."""
    if spec.class_name == "Dense":
        kernel = spec.weight("kernel")
        if kernel is not None and kernel.shape[0] == kernel.shape[1]:
            cause = (
                "matches if the Dense kernel is transposed: this implementation computes "
                "x @ kernel.T, Keras x @ kernel"
            )
            yield Hypothesis(cause, _with(spec, weights={"kernel": kernel.T}), inputs)
        return
    if spec.class_name not in _CONV | _TRANSPOSE or (found := _spatial_kernel(spec)) is None:
        return
    name, kernel = found
    if kernel.ndim == 4:
        swapped = np.swapaxes(kernel, 0, 1)
        cause = "matches if the kernel's spatial axes are transposed (kernel[i, j] read as [j, i])"
        yield Hypothesis(
            cause, _with(spec, {"kernel_size": swapped.shape[:2]}, {name: swapped}), inputs
        )
    plain = spec.class_name in {"Conv1D", "Conv2D", "Conv3D"} | _TRANSPOSE
    if plain and spec.config.get("groups", 1) == 1 and kernel.shape[-1] == kernel.shape[-2]:
        swapped = np.swapaxes(kernel, -1, -2)
        cause = "matches if the kernel's input and output channel axes are swapped"
        yield Hypothesis(cause, _with(spec, weights={name: swapped}), inputs)


def _epsilon(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    if spec.class_name not in _NORM:
        return
    current = float(spec.config.get("epsilon", 1e-3))
    for eps in _EPSILONS:
        if eps != current:
            cause = f"matches with epsilon={eps:g} instead of the layer's {current:g}"
            yield Hypothesis(cause, _with(spec, {"epsilon": eps}), inputs)


def _stride_dilation(spec: LayerSpec, inputs: list[np.ndarray]) -> Iterator[Hypothesis]:
    """Dilation 1 for 2 or 2 for 1 (same output shape with 'same' padding), stride 1 for s or 2
    for 1 (another output shape)."""
    if spec.class_name not in _CONV | _TRANSPOSE | _POOL:
        return
    rank = _rank(spec)
    keys = ["strides"] if spec.class_name in _POOL else ["dilation_rate", "strides"]
    for key in keys:
        value = spec.config.get(key) or spec.config.get("pool_size", 1)
        value = tuple(value) if isinstance(value, list | tuple) else (int(value),) * rank
        other = (1,) * rank if max(value) > 1 else (2,) * rank
        cause = f"matches with {key}={_tuple(other)} instead of {_tuple(value)}"
        yield Hypothesis(cause, _with(spec, {key: other}), inputs)


_FAMILIES: tuple[Callable[[LayerSpec, list[np.ndarray]], Iterator[Hypothesis]], ...] = (
    _flipped_kernel,
    _padding_mode,
    _shifted_padding,
    _pool_padding,
    _missing_bias,
    _activation,
    _data_format,
    _transposed_kernel,
    _epsilon,
    _stride_dilation,
)
