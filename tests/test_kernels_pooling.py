"""Pooling kernels against real Keras layers: window sizes, strides (None too), 'valid'/'same',
channels_first, 1-D/2-D/3-D, global pooling with keepdims, float16; and checks that the classic
pooling mistakes (zero padding for max, padded positions counted in the average) fail the bound.
"""

from __future__ import annotations

import dataclasses

import keras
import ml_dtypes
import numpy as np
import pytest
from support import assert_matches_keras, check_layer

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import LayerSpec, Unsupported, find_kernel, registry
from convdiff.metrics import compare, is_identical, within_bound

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers

# (constructor kwargs, input shape without batch), run for both MaxPooling and AveragePooling.
POOL_CASES = {
    1: [
        (dict(pool_size=2), (9, 3)),
        (dict(pool_size=3, strides=1, padding="same"), (9, 3)),
        (dict(pool_size=3, strides=2, padding="same"), (10, 3)),
        (dict(pool_size=4, strides=None, padding="same"), (9, 3)),
        (dict(pool_size=2, padding="same", data_format="channels_first"), (3, 9)),
    ],
    2: [
        (dict(pool_size=2), (7, 8, 3)),
        (dict(pool_size=(2, 3), strides=None), (7, 9, 3)),
        (dict(pool_size=3, strides=1, padding="same"), (7, 8, 3)),
        (dict(pool_size=3, strides=2, padding="same"), (7, 8, 3)),
        (dict(pool_size=(4, 2), strides=(1, 2), padding="same"), (7, 8, 3)),
        (dict(pool_size=2, strides=1, padding="valid"), (5, 6, 3)),
        (dict(pool_size=3, strides=2, padding="same", data_format="channels_first"), (3, 7, 8)),
    ],
    3: [
        (dict(pool_size=2), (5, 6, 4, 2)),
        (dict(pool_size=(3, 2, 2), strides=1, padding="same"), (5, 6, 4, 2)),
        (dict(pool_size=2, strides=(1, 2, 1), padding="valid"), (5, 6, 4, 2)),
        (dict(pool_size=3, strides=2, padding="same", data_format="channels_first"), (2, 5, 6, 4)),
    ],
}
MAX = {1: L.MaxPooling1D, 2: L.MaxPooling2D, 3: L.MaxPooling3D}
AVG = {1: L.AveragePooling1D, 2: L.AveragePooling2D, 3: L.AveragePooling3D}
POOL_PARAMS = [
    pytest.param(rank, kwargs, shape, id=f"{rank}d-{i}")
    for rank, cases in POOL_CASES.items()
    for i, (kwargs, shape) in enumerate(cases)
]


def _input(rng: np.random.Generator, shape, dtype: str = "float32", batch: int = 2) -> np.ndarray:
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return rng.standard_normal((batch, *shape)).astype(np_dtype)


def test_every_pooling_layer_is_registered() -> None:
    names = {
        f"{kind}Pooling{rank}D"
        for kind in ("Max", "Average", "GlobalMax", "GlobalAverage")
        for rank in (1, 2, 3)
    }
    assert names <= set(registry())


@pytest.mark.parametrize(("rank", "kwargs", "shape"), POOL_PARAMS)
def test_max_pooling_is_exact(rng, rank, kwargs, shape) -> None:
    check = assert_matches_keras(MAX[rank](**kwargs), _input(rng, shape))
    assert is_identical(check.comparison)


@pytest.mark.parametrize(("rank", "kwargs", "shape"), POOL_PARAMS)
def test_average_pooling_matches_keras(rng, rank, kwargs, shape) -> None:
    assert_matches_keras(AVG[rank](**kwargs), _input(rng, shape))


@pytest.mark.parametrize(("rank", "kwargs", "shape"), [p for p in POOL_PARAMS if p.values[0] < 3])
def test_average_pooling_bfloat16_matches_keras(rng, rank, kwargs, shape) -> None:
    """TF sums bfloat16 windows in float32 with oneDNN (its x86 default), in bfloat16 without:
    the bound covers both."""
    x = _input(rng, shape, "bfloat16")
    assert_matches_keras(AVG[rank](dtype="bfloat16", **kwargs), x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("rank", "kwargs", "shape"), [p for p in POOL_PARAMS if p.values[0] < 3])
def test_average_pooling_sequential_is_bit_exact(rng, dtype, rank, kwargs, shape) -> None:
    """TF's CPU AvgPool adds the window row by row in the layer's dtype and divides by the
    count: the default sequential order reproduces it bit for bit (float16 accumulates in
    float16). TF has no float16 AvgPool3D/MaxPool3D CPU kernel, hence 1-D and 2-D only."""
    check = assert_matches_keras(AVG[rank](dtype=dtype, **kwargs), _input(rng, shape, dtype))
    assert is_identical(check.comparison), check.comparison


GLOBAL_CASES = [
    (1, dict(), (9, 3)),
    (1, dict(keepdims=True), (9, 3)),
    (1, dict(data_format="channels_first"), (3, 9)),
    (2, dict(), (7, 8, 3)),
    (2, dict(keepdims=True), (7, 8, 3)),
    (2, dict(data_format="channels_first"), (3, 7, 8)),
    (2, dict(data_format="channels_first", keepdims=True), (3, 7, 8)),
    (2, dict(), (6, 6, 20)),  # channels in and out of Eigen's 8-wide packets
    (3, dict(), (4, 5, 3, 2)),
    (3, dict(data_format="channels_first", keepdims=True), (2, 4, 5, 3)),
]
GLOBAL_MAX = {1: L.GlobalMaxPooling1D, 2: L.GlobalMaxPooling2D, 3: L.GlobalMaxPooling3D}
GLOBAL_AVG = {1: L.GlobalAveragePooling1D, 2: L.GlobalAveragePooling2D, 3: L.GlobalAveragePooling3D}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("rank", "kwargs", "shape"), GLOBAL_CASES)
def test_global_max_pooling_is_exact(rng, dtype, rank, kwargs, shape) -> None:
    layer = GLOBAL_MAX[rank](dtype=dtype, **kwargs)
    check = assert_matches_keras(layer, _input(rng, shape, dtype))
    assert is_identical(check.comparison)


@pytest.mark.parametrize("dtype", ["float32", "float16", "mixed_float16", "bfloat16"])
@pytest.mark.parametrize(("rank", "kwargs", "shape"), GLOBAL_CASES)
def test_global_average_pooling_matches_keras(rng, dtype, rank, kwargs, shape) -> None:
    x_dtype = {"float32": "float32", "bfloat16": "bfloat16"}.get(dtype, "float16")
    assert_matches_keras(GLOBAL_AVG[rank](dtype=dtype, **kwargs), _input(rng, shape, x_dtype))


def test_global_average_pooling_float16_sums_in_float32(rng) -> None:
    """Keras's ops.mean upcasts float16 to float32: 1024 positive float16 terms near 1 summed
    in float16 would lose most of their low bits, in float32 the mean is correctly rounded."""
    x = rng.uniform(1.0, 2.0, (2, 32, 32, 3)).astype("float16")
    check = assert_matches_keras(L.GlobalAveragePooling2D(dtype="float16"), x)
    assert check.comparison.max_ulp <= 1


def _wrong(layer, x, spec_changes: dict, pads) -> bool:
    """Whether a kernel run with ``spec_changes`` on the zero-padded input stays within the
    bound of Keras's output on ``x`` (it must not)."""
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    spec = dataclasses.replace(spec, config={**spec.config, **spec_changes})
    run = run_kernel(find_kernel(type(layer), vars(L)), spec, [np.pad(x, pads)])
    assert run.output.shape == keras_out.shape
    return within_bound(compare(keras_out, run.output, run.bound))


def test_max_pooling_zero_padding_fails(rng) -> None:
    """A re-implementation that pads 'same' with zeros instead of ignoring the padding."""
    layer = L.MaxPooling2D(pool_size=3, strides=1, padding="same")
    x = -np.abs(_input(rng, (6, 7, 2)))  # all negative: a zero pad wins at every border
    assert not _wrong(layer, x, {"padding": "valid"}, [(0, 0), (1, 1), (1, 1), (0, 0)])


def test_average_pooling_counting_padding_fails(rng) -> None:
    """A re-implementation that divides by the full window size at the borders ('same')."""
    layer = L.AveragePooling2D(pool_size=3, strides=1, padding="same")
    x = _input(rng, (6, 7, 2)) + 2.0
    assert not _wrong(layer, x, {"padding": "valid"}, [(0, 0), (1, 1), (1, 1), (0, 0)])


def test_average_pooling_same_padding_split_the_wrong_way_fails(rng) -> None:
    """'same' padding split with the larger half first (TF puts the odd pixel after)."""
    layer = L.AveragePooling2D(pool_size=4, strides=1, padding="same")
    x = _input(rng, (6, 6, 2))
    assert within_bound(check_layer(layer, x).comparison)
    # TF pads (1, 2); padding (2, 1) by hand and pooling 'valid' shifts every window.
    assert not _wrong(layer, x, {"padding": "valid"}, [(0, 0), (2, 1), (2, 1), (0, 0)])


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("AveragePooling2D", {"pool_size": (2, 2), "strides": (2, 2), "padding": "full"}),
        ("MaxPooling2D", {"pool_size": (0, 2), "strides": (2, 2), "padding": "valid"}),
    ],
)
def test_unsupported_configs_are_named(name, config) -> None:
    spec = LayerSpec("p", name, config)
    kernel = find_kernel(getattr(L, name), vars(L))
    with pytest.raises(Unsupported):
        run_kernel(kernel, spec, [np.zeros((1, 4, 4, 1), np.float32)])
