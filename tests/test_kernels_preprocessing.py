"""Preprocessing kernels against the real Keras layers: Rescaling, Normalization, CenterCrop."""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from support import assert_matches_keras

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import Unsupported, find_kernel
from convdiff.metrics import compare, within_bound

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers

# Each kernel is a few correctly rounded IEEE operations (*, +, -, /, sqrt) in Keras's order,
# so it must reproduce Keras bit for bit.
RESCALING = [
    ("imagenet_255", dict(scale=1 / 255.0), (2, 4, 4, 3)),
    ("centre", dict(scale=1 / 127.5, offset=-1.0), (2, 4, 4, 3)),
    ("scale_only_int", dict(scale=3), (2, 5)),
    (
        "per_channel",
        dict(scale=np.array([0.1, 0.2, 0.3]), offset=np.array([1.0, -2.0, 0.5])),
        (2, 4, 3),
    ),
    ("odd_offset", dict(scale=0.7, offset=1e-3), (3, 7)),
]


@pytest.mark.parametrize(
    ("kwargs", "shape"), [r[1:] for r in RESCALING], ids=[r[0] for r in RESCALING]
)
def test_rescaling(kwargs, shape, rng):
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    check = assert_matches_keras(L.Rescaling(**kwargs), x)
    assert check.comparison.max_ulp == 0


def test_rescaling_of_uint8_images(rng):
    x = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    check = assert_matches_keras(L.Rescaling(1 / 127.5, offset=-1.0), x)
    assert check.comparison.max_ulp == 0


NORMALIZATION_CONFIG = [
    ("scalar", dict(axis=None, mean=2.0, variance=3.0), (3, 5)),
    ("last_axis", dict(axis=-1, mean=[0.5, -1.0, 2.0], variance=[1.0, 4.0, 0.3]), (4, 2, 3)),
    ("axis1", dict(axis=1, mean=[0.1, 0.2], variance=[2.0, 0.5]), (3, 2, 4)),
    (
        "two_axes",
        dict(axis=(1, 2), mean=[[1.0, 2.0], [3, 4]], variance=[[1.0, 2], [3, 4]]),
        (3, 2, 2),
    ),
    ("broadcast_scalar", dict(axis=-1, mean=1.5, variance=2.5), (3, 4)),
    ("invert", dict(axis=-1, mean=[0.5, -1.0], variance=[1.0, 4.0], invert=True), (5, 2)),
    ("zero_variance", dict(axis=-1, mean=[0.5, 1.0], variance=[0.0, 1e-20]), (5, 2)),
]


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [n[1:] for n in NORMALIZATION_CONFIG],
    ids=[n[0] for n in NORMALIZATION_CONFIG],
)
def test_normalization_from_config(kwargs, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    check = assert_matches_keras(L.Normalization(**kwargs), x)
    assert check.comparison.max_ulp == 0


@pytest.mark.parametrize(
    ("axis", "invert", "shape"),
    [
        (-1, False, (4, 3, 5)),
        ((1, 2), False, (4, 3, 5)),
        (1, True, (4, 3, 5)),
        (None, False, (6, 2)),
    ],
    ids=["last", "two_axes", "invert_axis1", "global"],
)
def test_normalization_adapted(axis, invert, shape, rng):
    """Statistics from ``adapt`` come as the layer's ``mean``/``variance`` weights."""
    data = (rng.standard_normal((32, *shape[1:])) * 3 + 1).astype(np.float32)
    layer = L.Normalization(axis=axis, invert=invert)
    layer.adapt(data)
    x = rng.standard_normal(shape).astype(np.float32)
    check = assert_matches_keras(layer, x)
    assert check.comparison.max_ulp == 0


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16), ("mixed_float16", np.float16)],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: L.Rescaling(1 / 3.0, offset=0.1, dtype=dtype),
        lambda dtype: L.Normalization(mean=[0.3, -1.0], variance=[2.0, 0.7], dtype=dtype),
        lambda dtype: L.Normalization(
            mean=[0.3, -1.0], variance=[2.0, 0.7], invert=True, dtype=dtype
        ),
    ],
    ids=["rescaling", "normalization", "normalization_invert"],
)
def test_reduced_precision_is_bit_exact(make, dtype, np_dtype, rng):
    x = rng.standard_normal((6, 2)).astype(np_dtype)
    check = assert_matches_keras(make(dtype), x)
    assert check.comparison.max_ulp == 0


CENTER_CROP = [
    ("even", dict(height=2, width=4), (2, 6, 6, 3), "channels_last"),
    ("odd_margin", dict(height=3, width=2), (2, 6, 5, 3), "channels_last"),
    ("same_size", dict(height=4, width=5), (1, 4, 5, 2), "channels_last"),
    ("channels_first", dict(height=3, width=2), (2, 3, 6, 5), "channels_first"),
    ("unbatched", dict(height=2, width=3), (5, 6, 3), "channels_last"),
]


@pytest.mark.parametrize(
    ("kwargs", "shape", "data_format"),
    [c[1:] for c in CENTER_CROP],
    ids=[c[0] for c in CENTER_CROP],
)
def test_center_crop(kwargs, shape, data_format, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    check = assert_matches_keras(L.CenterCrop(data_format=data_format, **kwargs), x)
    assert check.comparison.max_ulp == 0


def test_center_crop_of_uint8_images(rng):
    x = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    check = assert_matches_keras(L.CenterCrop(3, 4), x)
    assert check.comparison.max_ulp == 0


def test_center_crop_larger_than_the_image_is_unsupported(rng):
    layer = L.CenterCrop(8, 8)
    x = rng.standard_normal((1, 4, 6, 1)).astype(np.float32)
    layer(x)
    kernel = find_kernel(L.CenterCrop, vars(keras.layers))
    with pytest.raises(Unsupported, match="smart_resize"):
        run_kernel(kernel, layer_spec(layer), [x])


def _kernel_vs_keras(keras_layer, kernel_layer, x):
    keras_out = keras.ops.convert_to_numpy(keras_layer(x))
    kernel_layer(x)
    kernel = find_kernel(type(kernel_layer), vars(keras.layers))
    run = run_kernel(kernel, layer_spec(kernel_layer), [x])
    return compare(keras_out, run.output, run.bound)


@pytest.mark.parametrize(
    ("truth", "wrong"),
    [
        (L.Rescaling(1 / 255.0), L.Rescaling(1 / 256.0)),
        (L.Rescaling(2.0, offset=1.0), L.Rescaling(2.0, offset=1.0001)),
        (
            L.Normalization(mean=[0.5, 1.0, 2.0], variance=[1.0, 4.0, 9.0]),
            L.Normalization(mean=[0.5, 1.0, 2.0], variance=[1.0, 4.0, 9.0], invert=True),
        ),
        (
            L.Normalization(mean=[0.5, 1.0, 2.0], variance=[1.0, 4.0, 9.0]),
            L.Normalization(mean=[0.5, 1.0, 2.0], variance=[1.0, 4.0, 9.001]),
        ),
        (L.CenterCrop(2, 2), L.Cropping2D(((1, 1), (2, 0)))),
    ],
    ids=["scale", "offset", "invert", "variance", "crop_offset"],
)
def test_a_wrong_config_is_detected(truth, wrong, rng):
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    assert not within_bound(_kernel_vs_keras(truth, wrong, x))
