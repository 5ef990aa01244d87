"""Normalization kernels against real Keras layers, with random (non-default) statistics and
parameters so that formula errors show: BatchNormalization (axis incl. channels_first and
negative axes, center/scale off, float16 and mixed precision), LayerNormalization (int and list
axes, rms_scaling), GroupNormalization, UnitNormalization; and checks that a wrong epsilon fails.
"""

from __future__ import annotations

import dataclasses

import keras
import ml_dtypes
import numpy as np
import pytest
from support import assert_matches_keras

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import LayerSpec, Unsupported, find_kernel
from convdiff.kernels.normalization import accumulating_in, widen
from convdiff.metrics import compare, within_bound
from convdiff.numerics import Bounded, Rounded
from convdiff.orders import Order

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers
SHAPE = (5, 6, 8)  # without batch: rank-4 inputs, 8 channels last, 5 "channels" first
DTYPES = ["float32", "float16", "mixed_float16", "bfloat16"]


def _x_dtype(dtype: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype, np.float16)


def _build(layer, x: np.ndarray, rng: np.random.Generator):
    """Build ``layer`` and give every weight random values (variances positive, some small, so
    that epsilon matters; the defaults 0 and 1 would hide formula errors)."""
    layer.build(x.shape)
    weights = []
    for variable in layer.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            value = rng.uniform(0.002, 3.0, shape)
        elif "mean" in variable.path or "beta" in variable.path:
            value = rng.normal(0.5, 1.0, shape)
        else:
            value = rng.normal(1.0, 0.5, shape)
        weights.append(value.astype(variable.dtype))
    layer.set_weights(weights)
    return layer


def _input(rng, dtype: str, shape=SHAPE) -> np.ndarray:
    return (rng.normal(0.3, 2.0, (3, *shape))).astype(_x_dtype(dtype))


BN_CASES = [
    dict(),
    dict(axis=1),
    dict(axis=-2),
    dict(axis=2),
    dict(center=False),
    dict(scale=False),
    dict(center=False, scale=False),
    dict(epsilon=0.1),
    dict(epsilon=1e-5, momentum=0.9),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", BN_CASES)
def test_batch_normalization_matches_keras(rng, dtype, kwargs) -> None:
    x = _input(rng, dtype)
    assert_matches_keras(_build(L.BatchNormalization(dtype=dtype, **kwargs), x, rng), x)


@pytest.mark.parametrize("shape", [(7,), (9, 4), (2, 3, 4, 5)])
def test_batch_normalization_other_ranks(rng, shape) -> None:
    x = _input(rng, "float32", shape)
    assert_matches_keras(_build(L.BatchNormalization(), x, rng), x)


def test_batch_normalization_with_renorm_uses_moving_statistics(rng) -> None:
    x = _input(rng, "float32")
    assert_matches_keras(_build(L.BatchNormalization(renorm=True), x, rng), x)


LN_CASES = [
    dict(),
    dict(axis=1),
    dict(axis=-2),
    dict(axis=[1, 2]),
    dict(axis=[-1, -3]),
    dict(axis=[1, 2, 3]),
    dict(center=False),
    dict(scale=False),
    dict(center=False, scale=False),
    dict(epsilon=0.1),
    dict(rms_scaling=True),
    dict(rms_scaling=True, axis=[2, 3]),
]


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", LN_CASES)
def test_layer_normalization_matches_keras(rng, dtype, kwargs) -> None:
    x = _input(rng, dtype)
    assert_matches_keras(_build(L.LayerNormalization(dtype=dtype, **kwargs), x, rng), x)


def test_layer_normalization_transformer_shape(rng) -> None:
    """(batch, tokens, features) with 64 features: several 8-wide packets in TF's reduction."""
    x = _input(rng, "float32", (10, 64))
    assert_matches_keras(_build(L.LayerNormalization(epsilon=1e-6), x, rng), x)


GN_CASES = [
    dict(groups=4),
    dict(groups=-1),
    dict(groups=1),
    dict(groups=2, axis=-1, epsilon=0.1),
    dict(groups=5, axis=1),
    dict(groups=2, center=False, scale=False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", GN_CASES)
def test_group_normalization_matches_keras(rng, dtype, kwargs) -> None:
    x = _input(rng, dtype)
    assert_matches_keras(_build(L.GroupNormalization(dtype=dtype, **kwargs), x, rng), x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kwargs", [dict(), dict(axis=1), dict(axis=[1, 2])])
def test_unit_normalization_matches_keras(rng, dtype, kwargs) -> None:
    x = _input(rng, dtype)
    assert_matches_keras(L.UnitNormalization(dtype=dtype, **kwargs), x)


def test_unit_normalization_of_zero_vectors(rng) -> None:
    """A zero vector: rsqrt(0) = inf is capped at 1e12, so the output is 0, not NaN."""
    x = _input(rng, "float32")
    x[0, 1] = 0.0
    assert_matches_keras(L.UnitNormalization(), x)


def _within_bound_with(layer, x: np.ndarray, **config_changes) -> bool:
    """Run the kernel with ``config_changes`` applied to the layer's config; compare with Keras."""
    keras_out = keras.ops.convert_to_numpy(layer(x, training=False))
    spec = layer_spec(layer)
    spec = dataclasses.replace(spec, config={**spec.config, **config_changes})
    run = run_kernel(find_kernel(type(layer), vars(L)), spec, [x])
    return within_bound(compare(keras_out, run.output, run.bound))


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_batch_normalization_wrong_epsilon_fails(rng, dtype) -> None:
    """Keras's default epsilon is 1e-3; a port from PyTorch often uses 1e-5."""
    x = _input(rng, dtype)
    layer = _build(L.BatchNormalization(dtype=dtype), x, rng)
    assert _within_bound_with(layer, x)
    assert not _within_bound_with(layer, x, epsilon=1e-5)


def test_batch_normalization_epsilon_off_by_ten_percent_fails(rng) -> None:
    x = _input(rng, "float32")
    layer = _build(L.BatchNormalization(epsilon=1e-3), x, rng)
    assert not _within_bound_with(layer, x, epsilon=1.1e-3)


def test_batch_normalization_wrong_axis_fails(rng) -> None:
    x = _input(rng, "float32", (8, 6, 8))  # 8 channels on axes 1 and 3
    layer = _build(L.BatchNormalization(axis=-1), x, rng)
    assert not _within_bound_with(layer, x, axis=1)


def test_layer_normalization_wrong_epsilon_fails(rng) -> None:
    x = _input(rng, "float32", (10, 16)) * 0.01  # small variance: epsilon matters
    layer = _build(L.LayerNormalization(), x, rng)
    assert _within_bound_with(layer, x)
    assert not _within_bound_with(layer, x, epsilon=1e-5)


def test_group_normalization_wrong_groups_fails(rng) -> None:
    x = _input(rng, "float32")
    layer = _build(L.GroupNormalization(groups=4), x, rng)
    assert not _within_bound_with(layer, x, groups=2)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("BatchNormalization", {"axis": [1, 3], "epsilon": 1e-3}),
        ("GroupNormalization", {"groups": 3, "axis": -1, "epsilon": 1e-3}),
        ("LayerNormalization", {"axis": 5, "epsilon": 1e-3}),
    ],
)
def test_unsupported_configs_are_named(name, config) -> None:
    spec = LayerSpec("n", name, config)
    kernel = find_kernel(getattr(L, name), vars(L))
    with pytest.raises(Unsupported):
        run_kernel(kernel, spec, [np.ones((2, 3, 4, 8), np.float32)])


def test_widen_keeps_an_explicit_accumulator() -> None:
    """float16 layers compute normalizations in float32; an accumulator the user chose wider or
    narrower than the layer's dtype stays, one equal to it widens along."""
    assert widen(Rounded("float32")).dtype == np.float32
    wide = widen(Rounded("float16", Order(accumulate="float16")))
    assert wide.dtype == np.float32 and wide.order.accumulate is None
    assert widen(Rounded("float16", Order(accumulate="bfloat16"))).order.accumulate == "bfloat16"
    bounded = widen(Bounded("float16", ("float16", "float64")))
    assert bounded.dtype == np.float32 and bounded.acc_units == [2.0**-24, 2.0**-53]
    assert widen(Bounded("float16")).acc_units == [2.0**-24, 2.0**-24]


def test_accumulating_in_the_layer_dtype_unless_chosen() -> None:
    """TF's AvgPool adds float16 in float16, while convdiff's default for half-precision layers
    is a float32 accumulator; an accumulator the user chose is kept."""
    assert accumulating_in(Rounded("float16"), "float16").order.accumulate == "float16"
    chosen = Rounded("float16", Order(accumulate="float64"))
    assert accumulating_in(chosen, "float16").order.accumulate == "float64"
    bounded = accumulating_in(Bounded("float16", ("float16", "float32")), "float16")
    assert bounded.dtype == np.float16 and bounded.acc_units == [2.0**-11, 2.0**-11]
    coarse = accumulating_in(Bounded("float16", ("float16", "bfloat16")), "float16")
    assert coarse.acc_units == [2.0**-11, 2.0**-8]
