"""Reshaping kernels against the real Keras layers: padding, cropping, upsampling, flatten,
reshape, permute, repeat, and the layers that are the identity at inference."""

from __future__ import annotations

import platform

import keras
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

# (id, layer factory, input shape). Data movement must be bit-exact, not merely within bound.
MOVES = [
    ("zp1_int", lambda: L.ZeroPadding1D(2), (2, 5, 3)),
    ("zp1_pair", lambda: L.ZeroPadding1D((1, 3)), (2, 5, 3)),
    ("zp1_cf", lambda: L.ZeroPadding1D((2, 0), data_format="channels_first"), (2, 3, 5)),
    ("zp2_int", lambda: L.ZeroPadding2D(1), (2, 4, 5, 3)),
    ("zp2_sym", lambda: L.ZeroPadding2D((1, 2)), (2, 4, 5, 3)),
    ("zp2_full", lambda: L.ZeroPadding2D(((0, 1), (2, 3))), (2, 4, 5, 3)),
    ("zp2_cf", lambda: L.ZeroPadding2D(((1, 0), (0, 2)), "channels_first"), (2, 3, 4, 5)),
    ("zp3", lambda: L.ZeroPadding3D(((1, 0), (0, 2), (1, 1))), (1, 3, 4, 2, 2)),
    ("zp3_cf", lambda: L.ZeroPadding3D(1, data_format="channels_first"), (1, 2, 3, 4, 2)),
    ("crop1", lambda: L.Cropping1D((1, 2)), (2, 6, 3)),
    ("crop1_left", lambda: L.Cropping1D((2, 0)), (2, 6, 3)),
    ("crop2_int", lambda: L.Cropping2D(1), (2, 5, 6, 3)),
    ("crop2_full", lambda: L.Cropping2D(((0, 2), (1, 0))), (2, 5, 6, 3)),
    ("crop2_cf", lambda: L.Cropping2D(((1, 2), (2, 1)), "channels_first"), (2, 3, 5, 6)),
    ("crop3", lambda: L.Cropping3D(((1, 0), (0, 1), (1, 2))), (1, 4, 4, 5, 2)),
    ("crop3_cf", lambda: L.Cropping3D(1, data_format="channels_first"), (1, 2, 4, 4, 5)),
    ("up1", lambda: L.UpSampling1D(3), (2, 4, 3)),
    ("up2", lambda: L.UpSampling2D((2, 3)), (2, 3, 4, 2)),
    ("up2_cf", lambda: L.UpSampling2D(2, data_format="channels_first"), (2, 2, 3, 4)),
    ("up3", lambda: L.UpSampling3D((1, 2, 3)), (1, 2, 3, 2, 2)),
    ("up3_cf", lambda: L.UpSampling3D(2, data_format="channels_first"), (1, 2, 2, 3, 2)),
    ("flatten", lambda: L.Flatten(), (2, 3, 4, 5)),
    ("flatten_cf", lambda: L.Flatten(data_format="channels_first"), (2, 3, 4, 5)),
    ("flatten_1d", lambda: L.Flatten(), (3, 4)),
    ("reshape", lambda: L.Reshape((6, 4)), (2, 3, 8)),
    ("reshape_infer", lambda: L.Reshape((-1, 2)), (2, 3, 4)),
    ("permute", lambda: L.Permute((2, 1)), (2, 3, 4)),
    ("permute3", lambda: L.Permute((3, 1, 2)), (2, 3, 4, 5)),
    ("repeat", lambda: L.RepeatVector(3), (2, 5)),
    ("dropout", lambda: L.Dropout(0.5), (2, 7)),
    ("spatial_dropout1d", lambda: L.SpatialDropout1D(0.5), (2, 4, 3)),
    ("spatial_dropout2d", lambda: L.SpatialDropout2D(0.5), (2, 4, 4, 3)),
    ("spatial_dropout3d", lambda: L.SpatialDropout3D(0.5), (1, 2, 3, 4, 3)),
    ("gaussian_noise", lambda: L.GaussianNoise(1.0), (2, 7)),
    ("gaussian_dropout", lambda: L.GaussianDropout(0.3), (2, 7)),
    ("alpha_dropout", lambda: L.AlphaDropout(0.3), (2, 7)),
    ("activity_reg", lambda: L.ActivityRegularization(l1=0.1, l2=0.1), (2, 7)),
    ("identity", lambda: L.Identity(), (2, 7)),
]


@pytest.mark.parametrize(("make", "shape"), [m[1:] for m in MOVES], ids=[m[0] for m in MOVES])
def test_data_movement_is_bit_exact(make, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    check = assert_matches_keras(make(), x)
    assert check.comparison.max_ulp == 0


BILINEAR = [
    ("2x2_c1", (2, 2), (2, 4, 5, 1), "channels_last"),
    ("3x3_c3", (3, 3), (1, 5, 4, 3), "channels_last"),
    ("2x5_c4", (2, 5), (1, 3, 4, 4), "channels_last"),
    ("7x3_c2_cf", (7, 3), (1, 2, 3, 4), "channels_first"),
]


@pytest.mark.parametrize(
    ("size", "shape", "data_format"), [b[1:] for b in BILINEAR], ids=[b[0] for b in BILINEAR]
)
def test_bilinear_upsampling(size, shape, data_format, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    layer = L.UpSampling2D(size, data_format=data_format, interpolation="bilinear")
    check = assert_matches_keras(layer, x)
    if platform.machine() in ("x86_64", "AMD64"):
        # Measured: TF's x86 build rounds each lerp step separately (no FMA contraction).
        assert check.comparison.max_ulp == 0


def _unsupported(layer, x) -> str:
    layer(x)
    kernel = find_kernel(type(layer), vars(keras.layers))
    with pytest.raises(Unsupported) as info:
        run_kernel(kernel, layer_spec(layer), [x])
    return str(info.value)


def test_other_interpolations_are_unsupported(rng):
    x = rng.standard_normal((1, 3, 3, 1)).astype(np.float32)
    message = _unsupported(L.UpSampling2D(2, interpolation="bicubic"), x)
    assert "bicubic" in message


def _kernel_vs_keras(keras_layer, kernel_layer, x):
    """Keras's output of one layer against the kernel run with another layer's config."""
    keras_out = keras.ops.convert_to_numpy(keras_layer(x, training=False))
    kernel_layer(x)
    kernel = find_kernel(type(kernel_layer), vars(keras.layers))
    run = run_kernel(kernel, layer_spec(kernel_layer), [x])
    return compare(keras_out, run.output, run.bound)


@pytest.mark.parametrize(
    ("truth", "wrong", "shape"),
    [
        (L.ZeroPadding2D(((1, 2), (0, 0))), L.ZeroPadding2D(((2, 1), (0, 0))), (1, 3, 3, 2)),
        (L.Cropping2D(((1, 0), (0, 0))), L.Cropping2D(((0, 1), (0, 0))), (1, 4, 3, 2)),
        (L.Flatten(data_format="channels_first"), L.Flatten(), (1, 2, 3, 4)),
        (L.Permute((2, 1)), L.Reshape((4, 3)), (1, 3, 4)),
        (
            L.UpSampling2D(2, interpolation="bilinear"),
            L.UpSampling2D(2, interpolation="nearest"),
            (1, 3, 3, 1),
        ),
    ],
    ids=["padding_sides", "cropping_sides", "flatten_layout", "permute_vs_reshape", "bilinear"],
)
def test_a_wrong_config_is_detected(truth, wrong, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    assert not within_bound(_kernel_vs_keras(truth, wrong, x))
