"""Convolution kernels against real Keras layers: a table of configurations like Keras's own
conv correctness tests (strides, 'same'/'valid'/'causal', dilation, even kernels, groups,
channels_first, bias, activation), every summation order, and checks that a wrong kernel fails.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from support import SEQUENTIAL_IS_EXACT, assert_matches_keras, check_layer

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import Unsupported, find_kernel
from convdiff.metrics import compare, within_bound
from convdiff.numerics import Rounded
from convdiff.orders import ORDER_NAMES, Order

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers

# (layer class, constructor kwargs, input shape without batch). Channels are small so the whole
# file runs in seconds, yet every case has several taps per output and odd spatial sizes.
# channels_first shapes avoid an output whose last axis has the length of the channel axis:
# there Keras adds the bias along the wrong axis (see test_keras_channels_first_bias_quirk).
CONV_CASES = [
    # Conv1D
    (L.Conv1D, dict(filters=4, kernel_size=3), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, strides=2, padding="same"), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, strides=2, padding="valid"), (12, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=4, padding="same"), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=4, strides=2, padding="same"), (10, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, padding="causal"), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, padding="causal", dilation_rate=2), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=2, padding="causal", strides=2), (11, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=3, groups=2), (11, 4)),
    (L.Conv1D, dict(filters=8, kernel_size=3, groups=4, padding="same"), (11, 8)),
    (L.Conv1D, dict(filters=4, kernel_size=3, data_format="channels_first"), (3, 11)),
    (L.Conv1D, dict(filters=4, kernel_size=3, use_bias=False, activation="relu"), (11, 3)),
    # Conv2D
    (L.Conv2D, dict(filters=4, kernel_size=3), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, padding="same", activation="relu"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, strides=2, padding="same"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, strides=2, padding="valid"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, strides=(1, 2), padding="same"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, dilation_rate=(2, 3), padding="same"), (9, 10, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, dilation_rate=2, padding="valid"), (9, 10, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=(4, 3), padding="same"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=(4, 3), padding="valid"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=2, padding="same"), (7, 6, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=(4, 3), strides=2, padding="same"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, groups=2, padding="same"), (7, 6, 4)),
    (L.Conv2D, dict(filters=8, kernel_size=3, groups=4), (7, 6, 8)),
    (L.Conv2D, dict(filters=4, kernel_size=3, data_format="channels_first"), (3, 9, 8)),
    (
        L.Conv2D,
        dict(filters=4, kernel_size=3, strides=2, padding="same", data_format="channels_first"),
        (3, 9, 10),
    ),
    (L.Conv2D, dict(filters=4, kernel_size=3, use_bias=False), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, use_bias=False, activation="relu"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, padding="same", dtype="mixed_float16"), (9, 8, 3)),
    (L.Conv2D, dict(filters=4, kernel_size=3, strides=2, dtype="float16"), (9, 8, 3)),
    # Conv3D
    (L.Conv3D, dict(filters=3, kernel_size=3), (5, 6, 5, 2)),
    (L.Conv3D, dict(filters=3, kernel_size=3, strides=2, padding="same"), (5, 6, 5, 2)),
    (L.Conv3D, dict(filters=3, kernel_size=(2, 3, 2), padding="same"), (5, 6, 5, 2)),
    (L.Conv3D, dict(filters=3, kernel_size=2, dilation_rate=2, padding="same"), (5, 6, 5, 2)),
    (L.Conv3D, dict(filters=4, kernel_size=2, groups=2), (4, 5, 4, 4)),
    (L.Conv3D, dict(filters=3, kernel_size=2, data_format="channels_first"), (2, 4, 5, 6)),
    (L.Conv3D, dict(filters=3, kernel_size=2, use_bias=False, activation="relu"), (4, 5, 4, 2)),
]

DEPTHWISE_CASES = [
    (L.DepthwiseConv1D, dict(kernel_size=3), (11, 3)),
    (L.DepthwiseConv1D, dict(kernel_size=3, depth_multiplier=2, padding="same"), (11, 3)),
    (L.DepthwiseConv1D, dict(kernel_size=3, strides=2, padding="same"), (11, 3)),
    (L.DepthwiseConv1D, dict(kernel_size=3, dilation_rate=2), (11, 3)),
    (L.DepthwiseConv1D, dict(kernel_size=3, strides=2, dilation_rate=2, padding="same"), (11, 3)),
    (L.DepthwiseConv1D, dict(kernel_size=3, data_format="channels_first"), (3, 11)),
    (L.DepthwiseConv1D, dict(kernel_size=4, use_bias=False, activation="relu"), (11, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3), (9, 8, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2, padding="same"), (9, 8, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, strides=2, padding="same"), (9, 8, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=(4, 3), strides=2, padding="valid"), (9, 8, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, dilation_rate=(2, 3), padding="same"), (9, 10, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, strides=2, dilation_rate=2, padding="same"), (9, 8, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, data_format="channels_first"), (3, 9, 8)),
    (
        L.DepthwiseConv2D,
        dict(kernel_size=3, depth_multiplier=2, strides=2, data_format="channels_first"),
        (3, 9, 8),
    ),
    (L.DepthwiseConv2D, dict(kernel_size=3, use_bias=False, activation="relu"), (9, 8, 3)),
]

SEPARABLE_CASES = [
    (L.SeparableConv1D, dict(filters=4, kernel_size=3), (11, 3)),
    (
        L.SeparableConv1D,
        dict(filters=4, kernel_size=3, depth_multiplier=2, padding="same"),
        (11, 3),
    ),
    (L.SeparableConv1D, dict(filters=4, kernel_size=3, strides=2, padding="same"), (11, 3)),
    (L.SeparableConv1D, dict(filters=4, kernel_size=3, dilation_rate=2), (11, 3)),
    (L.SeparableConv1D, dict(filters=4, kernel_size=3, data_format="channels_first"), (3, 11)),
    (L.SeparableConv2D, dict(filters=4, kernel_size=3), (9, 8, 3)),
    (
        L.SeparableConv2D,
        dict(filters=4, kernel_size=3, depth_multiplier=2, padding="same"),
        (9, 8, 3),
    ),
    (L.SeparableConv2D, dict(filters=4, kernel_size=3, strides=2, padding="same"), (9, 8, 3)),
    (L.SeparableConv2D, dict(filters=4, kernel_size=(4, 3), strides=2), (9, 8, 3)),
    (L.SeparableConv2D, dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"), (9, 8, 3)),
    (
        L.SeparableConv2D,
        dict(filters=4, kernel_size=3, strides=2, dilation_rate=2, padding="same"),
        (9, 8, 3),
    ),
    (L.SeparableConv2D, dict(filters=4, kernel_size=3, data_format="channels_first"), (3, 9, 8)),
    (
        L.SeparableConv2D,
        dict(filters=4, kernel_size=3, use_bias=False, activation="relu"),
        (9, 8, 3),
    ),
]

TRANSPOSE_CASES = [
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, strides=2), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, strides=2, padding="same"), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=4, strides=3, padding="same"), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=2, strides=3), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, strides=2, output_padding=1), (7, 3)),
    (
        L.Conv1DTranspose,
        dict(filters=4, kernel_size=3, strides=2, padding="same", output_padding=0),
        (7, 3),
    ),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, dilation_rate=2), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"), (7, 3)),
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, data_format="channels_first"), (3, 7)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3), (5, 6, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, strides=2), (5, 6, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, strides=2, padding="same"), (5, 6, 3)),
    (
        L.Conv2DTranspose,
        dict(filters=4, kernel_size=(4, 3), strides=(2, 3), padding="same"),
        (5, 6, 3),
    ),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=(4, 3), strides=(3, 2)), (5, 6, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=2, strides=3, padding="same"), (5, 6, 3)),
    (
        L.Conv2DTranspose,
        dict(filters=4, kernel_size=3, strides=2, output_padding=1),
        (5, 6, 3),
    ),
    (
        L.Conv2DTranspose,
        dict(filters=4, kernel_size=3, strides=3, padding="same", output_padding=(2, 1)),
        (5, 6, 3),
    ),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, dilation_rate=(2, 1)), (5, 6, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"), (5, 6, 3)),
    (
        L.Conv2DTranspose,
        dict(filters=4, kernel_size=3, strides=2, data_format="channels_first"),
        (3, 5, 6),
    ),
    (
        L.Conv2DTranspose,
        dict(filters=4, kernel_size=3, use_bias=False, activation="relu", padding="same"),
        (5, 6, 3),
    ),
    (L.Conv3DTranspose, dict(filters=3, kernel_size=2), (3, 4, 3, 2)),
    (L.Conv3DTranspose, dict(filters=3, kernel_size=3, strides=2, padding="same"), (3, 4, 3, 2)),
    (L.Conv3DTranspose, dict(filters=3, kernel_size=(2, 3, 2), strides=(1, 2, 3)), (3, 4, 3, 2)),
    (
        L.Conv3DTranspose,
        dict(filters=3, kernel_size=3, strides=2, output_padding=1),
        (3, 4, 3, 2),
    ),
    (L.Conv3DTranspose, dict(filters=3, kernel_size=2, dilation_rate=2), (3, 4, 3, 2)),
    (
        L.Conv3DTranspose,
        dict(filters=3, kernel_size=2, strides=2, data_format="channels_first"),
        (2, 3, 4, 3),
    ),
]


def _case_id(case) -> str:
    cls, kwargs, shape = case
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__name__}({args})@{'x'.join(map(str, shape))}"


def _build(cls, kwargs, shape, rng: np.random.Generator):
    """A built layer whose weights (bias included) are seeded random normals, and its input.

    Keras initialises biases to zero; random biases make a missing or misplaced bias visible.
    Skips the case when Keras itself cannot run the configuration on this machine.
    """
    layer = cls(**kwargs)
    x = rng.standard_normal((2, *shape)).astype(layer.compute_dtype)
    try:
        layer.build((2, *shape))
        layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.weights])
        layer(x)
    except Exception as exc:  # TensorFlow rejects some configs on CPU
        reason = " ".join(str(exc).split())
        pytest.skip(f"Keras cannot run this config here: {type(exc).__name__}: {reason}"[:400])
    return layer, x


ALL_CASES = CONV_CASES + DEPTHWISE_CASES + SEPARABLE_CASES + TRANSPOSE_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_matches_keras(case, rng):
    layer, x = _build(*case, rng)
    assert_matches_keras(layer, x)


def test_seed_model_bit_exact():
    """The seed one-layer model (docs/numerics.md): sequential FMA over (row, col, channel) is
    Keras's order."""
    rng = np.random.default_rng(0)
    layer = L.Conv2D(32, 3, padding="same", activation="relu")
    layer.build((1, 64, 64, 1))
    # Glorot-uniform-sized weights from the seeded generator (Keras's own init is unseeded).
    limit = np.sqrt(6 / (9 + 9 * 32))
    kernel = rng.uniform(-limit, limit, (3, 3, 1, 32)).astype("float32")
    layer.set_weights([kernel, np.zeros(32, "float32")])
    x = rng.standard_normal((1, 64, 64, 1)).astype("float32")
    check = assert_matches_keras(layer, x)
    # Nine terms a sum: one fused multiply-add chain from zero in tap order on every CPU path
    # measured (oneDNN on with AVX-512 and AVX2, Eigen with AVX2).
    assert check.comparison.max_ulp == 0, check.comparison


# Configurations whose sequential order (one FMA chain over the tap axes) was measured to
# reproduce TF's CPU output bit for bit (x86-64 AVX-512, oneDNN on): every forward
# convolution in the table, and the strided 'valid' transposed convolutions.
EXACT_CASES = [
    *(case for case in CONV_CASES if "float16" not in str(case[1].get("dtype"))),
    *DEPTHWISE_CASES,
    *SEPARABLE_CASES,
    (L.Conv1DTranspose, dict(filters=4, kernel_size=3, strides=2), (7, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, strides=2), (5, 6, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=(4, 3), strides=(3, 2)), (5, 6, 3)),
    (L.Conv3DTranspose, dict(filters=3, kernel_size=(2, 3, 2), strides=(1, 2, 3)), (3, 4, 3, 2)),
]


@SEQUENTIAL_IS_EXACT
@pytest.mark.parametrize("case", EXACT_CASES, ids=_case_id)
def test_bit_exact_on_reference_cpu(case, rng):
    layer, x = _build(*case, rng)
    check = assert_matches_keras(layer, x)
    assert check.comparison.max_ulp == 0, check.comparison


def _orders() -> list[Order]:
    """Every order of ORDER_NAMES (blocked:4), with and without FMA where that applies."""
    fma_orders = ("sequential", "reverse", "pairwise", "kahan", "blocked")
    return [
        Order(name=name, fma=fma, block=4 if name == "blocked" else 0)
        for name in ORDER_NAMES
        for fma in ((True, False) if name in fma_orders else (True,))
    ]


ORDER_CASES = [
    (L.Conv2D, dict(filters=4, kernel_size=3, strides=2, padding="same"), (9, 8, 5)),
    (L.SeparableConv1D, dict(filters=3, kernel_size=4, padding="same", activation="relu"), (9, 6)),
]


@pytest.mark.parametrize("order", _orders(), ids=lambda o: o.label)
@pytest.mark.parametrize("case", ORDER_CASES, ids=_case_id)
def test_every_order_within_bound(case, order, rng):
    layer, x = _build(*case, rng)
    assert_matches_keras(layer, x, order)


def _wrong_run(layer, x, **changes):
    """Keras's output and the kernel run on a deliberately altered spec."""
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    weights = dict(spec.weights)
    for name, fn in changes.items():
        weights[name] = fn(weights[name])
    kernel = find_kernel(type(layer), vars(keras.layers))
    run = run_kernel(kernel, dataclasses.replace(spec, weights=weights), [x])
    return compare(keras_out, run.output, run.bound)


WRONG_CASES = [
    (L.Conv2D, dict(filters=4, kernel_size=3, padding="same"), (9, 8, 3)),
    (L.Conv1D, dict(filters=4, kernel_size=4, padding="causal"), (11, 3)),
    (L.DepthwiseConv2D, dict(kernel_size=3, strides=2), (9, 8, 3)),
    (L.Conv2DTranspose, dict(filters=4, kernel_size=3, strides=2), (5, 6, 3)),
]


@pytest.mark.parametrize("case", WRONG_CASES, ids=_case_id)
def test_flipped_kernel_is_caught(case, rng):
    """A kernel flipped in space (convolution instead of correlation) is a semantic difference."""
    layer, x = _build(*case, rng)
    spatial_axes = tuple(range(len(case[2]) - 1))
    comparison = _wrong_run(layer, x, kernel=lambda w: np.flip(w, axis=spatial_axes))
    assert not within_bound(comparison), comparison


def test_dropped_bias_is_caught(rng):
    layer, x = _build(L.Conv2D, dict(filters=4, kernel_size=3), (9, 8, 3), rng)
    assert not within_bound(_wrong_run(layer, x, bias=np.zeros_like))


def test_swapped_channels_is_caught(rng):
    """Reading the kernel's input channels in reverse (a layout mistake) is caught."""
    layer, x = _build(L.Conv2D, dict(filters=4, kernel_size=3), (9, 8, 3), rng)
    assert not within_bound(_wrong_run(layer, x, kernel=lambda w: w[:, :, ::-1, :]))


def test_check_reports_figures(rng):
    """check_layer exposes the figures: identical outputs have 0 ULPs and bound ratio 0."""
    layer, x = _build(L.Conv2D, dict(filters=4, kernel_size=3), (9, 8, 3), rng)
    check = check_layer(layer, x)
    assert check.keras_output.shape == (2, 7, 6, 4)
    assert np.all(check.run.bound > 0)


def test_keras_channels_first_bias_quirk(rng):
    """Keras 3's TensorFlow ``ops.add`` turns ``outputs + reshape(bias, (1, F, 1, 1))`` into
    ``tf.nn.bias_add(..., "NHWC")`` whenever the output's last axis also has length F, so a
    channels_first layer whose output width equals its filter count adds the bias along the
    width axis. convdiff's kernel implements the documented semantics and must flag this layer
    as a real divergence (not rounding); once Keras is fixed it must match again."""
    kwargs = dict(filters=4, kernel_size=3, strides=2, padding="same", data_format="channels_first")
    layer, x = _build(L.Conv2D, kwargs, (3, 9, 8), rng)  # output (2, 4, 5, 4): width == filters
    check = check_layer(layer, x)
    conv = keras.ops.convert_to_numpy(
        keras.ops.conv(x, layer.kernel, 2, "same", data_format="channels_first")
    )
    bias = keras.ops.convert_to_numpy(layer.bias)
    if np.array_equal(check.keras_output, conv + bias):  # the bias went along the last axis
        assert not within_bound(check.comparison), check.comparison
    else:
        assert within_bound(check.comparison), check.comparison


def test_lora_is_unsupported(rng):
    """A LoRA-enabled convolution uses kernel + A @ B, not the stored kernel."""
    layer, x = _build(L.Conv2D, dict(filters=4, kernel_size=3), (9, 8, 3), rng)
    layer.enable_lora(2)
    kernel = find_kernel(type(layer), vars(keras.layers))
    with pytest.raises(Unsupported, match="lora"):
        kernel(layer_spec(layer), [x], Rounded("float32"))
