"""Kernels the Keras Applications need, against the real Keras code: the Keras-internal layers
(ConvNeXt's LayerScale and StochasticDepth, InceptionResNetV2's CustomScaleLayer), the
``keras.ops`` operations a functional graph records (``x + 3.0``, ``inputs + x``), and
Resizing."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from keras.src.applications.convnext import LayerScale, StochasticDepth
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import numpy as knp
from support import assert_matches_keras, check_layer

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import LayerSpec, Unsupported, find_kernel
from convdiff.metrics import compare, within_bound

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers


def _kernel(layer):
    kernel = find_kernel(type(layer), vars(L))
    assert kernel is not None, type(layer)
    return kernel


def _fails_with(layer, inputs, **config) -> bool:
    """Whether the check flags the kernel run with a deliberately wrong ``config``."""
    keras_out = keras.ops.convert_to_numpy(layer(inputs, training=False))
    spec = layer_spec(layer)
    spec = dataclasses.replace(spec, config={**spec.config, **config})
    xs = inputs if isinstance(inputs, list) else [inputs]
    run = run_kernel(_kernel(layer), spec, xs)
    if run.output.shape != keras_out.shape:
        return True
    return not within_bound(compare(keras_out, run.output, run.bound))


# --------------------------------------------------------------------------- Keras-internal


@pytest.mark.parametrize("shape", [(2, 5, 5, 8), (3, 8)])
def test_layer_scale(shape, rng):
    layer = LayerScale(1e-6, shape[-1])
    layer.build(shape)
    layer.set_weights([rng.uniform(0.1, 1.0, shape[-1]).astype("float32")])
    x = rng.standard_normal(shape).astype("float32")
    # one correctly rounded product on each side: bit for bit
    assert assert_matches_keras(layer, x).comparison.max_ulp == 0


def test_layer_scale_is_registered_by_dotted_path():
    assert find_kernel(LayerScale, vars(L)) is not None
    assert find_kernel(CustomScaleLayer, vars(L)) is not None
    assert find_kernel(StochasticDepth, vars(L)) is not None


def test_layer_scale_wrong_gamma_is_caught(rng):
    layer = LayerScale(1e-6, 4)
    layer.build((2, 4))
    layer.set_weights([np.array([0.1, 0.2, 0.3, 0.4], "float32")])
    x = rng.standard_normal((3, 4)).astype("float32")
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    ((name, gamma),) = spec.weights.items()  # built without a name: Keras names it
    wrong = dataclasses.replace(spec, weights={name: gamma[::-1]})
    run = run_kernel(_kernel(layer), wrong, [x])
    assert not within_bound(compare(keras_out, run.output, run.bound))


@pytest.mark.parametrize("scale", [0.17, 0.1, 0.2, 1.0, 1 / 3])
def test_custom_scale_layer(scale, rng):
    x = rng.standard_normal((2, 4, 4, 6)).astype("float32")
    r = rng.standard_normal((2, 4, 4, 6)).astype("float32")
    # a product then a sum, each rounded as TF's Mul and AddV2: bit for bit
    assert assert_matches_keras(CustomScaleLayer(scale), [x, r]).comparison.max_ulp == 0


def test_custom_scale_layer_wrong_scale_is_caught(rng):
    x = rng.standard_normal((2, 3, 3, 4)).astype("float32")
    r = rng.standard_normal((2, 3, 3, 4)).astype("float32")
    assert _fails_with(CustomScaleLayer(0.17), [x, r], scale=0.2)
    assert not _fails_with(CustomScaleLayer(0.17), [x, r])


def test_stochastic_depth_is_the_identity_at_inference(rng):
    x = rng.standard_normal((4, 3, 3, 2)).astype("float32")
    assert assert_matches_keras(StochasticDepth(0.3), x).comparison.max_ulp == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_internal_layers_in_half_precision(dtype, rng):
    layer = LayerScale(0.5, 6, dtype=f"mixed_{dtype}")
    layer.build((2, 6))
    check = check_layer(layer, rng.standard_normal((3, 6)).astype("float32"))
    assert check.keras_output.dtype == np.dtype(keras.backend.standardize_dtype(dtype))
    assert check.comparison.max_ulp == 0
    x, r = (rng.standard_normal((2, 5)).astype("float32") for _ in range(2))
    check = check_layer(CustomScaleLayer(0.17, dtype=f"mixed_{dtype}"), [x, r])
    assert within_bound(check.comparison)


# --------------------------------------------------------------------------- operations


def _op_check(op, args: list):
    """Run ``op`` on ``args`` (arrays and Python numbers) in Keras and through its kernel, the
    numbers handed over as the graph hands them: ``call_args`` with None for each tensor."""
    keras_out = keras.ops.convert_to_numpy(op(*args))
    tensors = [a for a in args if isinstance(a, np.ndarray)]
    call_args = [None if isinstance(a, np.ndarray) else a for a in args]
    spec = LayerSpec(op.name, type(op).__name__, {"name": op.name, "call_args": call_args})
    kernel = find_kernel(type(op), vars(L))
    assert kernel is not None
    run = run_kernel(kernel, spec, tensors)
    return keras_out, run


OPERATIONS = [
    ("add_constant", knp.Add, lambda x, y: [x, 3.0]),
    ("multiply_constant", knp.Multiply, lambda x, y: [x, 1.0 / 6.0]),
    ("constant_first", knp.Subtract, lambda x, y: [3.0, x]),
    ("add_tensors", knp.Add, lambda x, y: [x, y]),
    ("add_bias_vector", knp.Add, lambda x, y: [x, y[0, 0, 0]]),
    ("subtract_tensors", knp.Subtract, lambda x, y: [x, y]),
    ("multiply_broadcast", knp.Multiply, lambda x, y: [x, y[:, :1, :1, :]]),
    ("divide", knp.Divide, lambda x, y: [x, np.abs(y) + 0.5]),
    ("true_divide_constant", knp.TrueDivide, lambda x, y: [x, 7.0]),
    ("integer_constant", knp.Multiply, lambda x, y: [x, 3]),
]


@pytest.mark.parametrize(
    ("op_class", "make_args"), [o[1:] for o in OPERATIONS], ids=[o[0] for o in OPERATIONS]
)
def test_operation(op_class, make_args, rng):
    x, y = (rng.standard_normal((2, 3, 4, 5)).astype("float32") for _ in range(2))
    keras_out, run = _op_check(op_class(), make_args(x, y))
    assert run.output.dtype == keras_out.dtype
    # one correctly rounded IEEE operation on each side: bit for bit
    assert compare(keras_out, run.output, run.bound).max_ulp == 0


def test_operation_wrong_constant_is_caught(rng):
    x = rng.standard_normal((2, 6)).astype("float32")
    op = knp.Add()
    keras_out = keras.ops.convert_to_numpy(op(x, 3.0))
    spec = LayerSpec(op.name, "Add", {"name": op.name, "call_args": [None, 2.0]})
    run = run_kernel(find_kernel(type(op), vars(L)), spec, [x])
    assert not within_bound(compare(keras_out, run.output, run.bound))


def test_operation_without_its_constant_is_unsupported(rng):
    op = knp.Add()
    spec = LayerSpec(op.name, "Add", {"name": op.name})
    x = rng.standard_normal((2, 6)).astype("float32")
    with pytest.raises(Unsupported, match="constant operand"):
        run_kernel(find_kernel(type(op), vars(L)), spec, [x])


def test_operation_of_two_tensors_needs_no_call_args(rng):
    x, y = (rng.standard_normal((2, 6)).astype("float32") for _ in range(2))
    op = knp.Add()
    keras_out = keras.ops.convert_to_numpy(op(x, y))
    run = run_kernel(find_kernel(type(op), vars(L)), LayerSpec(op.name, "Add", {}), [x, y])
    assert compare(keras_out, run.output, run.bound).max_ulp == 0


def test_graph_operation_nodes_have_kernels():
    """``x + 3.0`` and ``inputs + x`` in a functional model are keras.ops nodes."""
    from convdiff.graph import build_graph

    inputs = keras.Input((4,))
    x = L.Dense(4)(inputs)
    model = keras.Model(inputs, (inputs + x) * (1.0 / 6.0) + 3.0)
    ops = [n.layer for n in build_graph(model).nodes if not isinstance(n.layer, L.Layer)]
    assert {type(op).__name__ for op in ops} == {"Add", "Multiply"}
    assert all(find_kernel(type(op), vars(L)) is not None for op in ops)


# --------------------------------------------------------------------------- Resizing

# Measured: TF's ResizeBilinear (float32 weights, three rounded lerps, no FMA) and
# ResizeNearestNeighbor (float32 source index) are reproduced bit for bit.
RESIZING = [
    ("up_bilinear", dict(height=8, width=8)),
    ("odd_bilinear", dict(height=5, width=7)),
    ("down_bilinear", dict(height=3, width=2)),
    ("up_odd_bilinear", dict(height=13, width=9)),
    ("same_size", dict(height=7, width=6)),
    ("up_nearest", dict(height=8, width=8, interpolation="nearest")),
    ("odd_nearest", dict(height=5, width=11, interpolation="nearest")),
    ("down_nearest", dict(height=3, width=2, interpolation="nearest")),
    ("crop_tall", dict(height=6, width=4, crop_to_aspect_ratio=True)),
    ("crop_wide", dict(height=4, width=9, crop_to_aspect_ratio=True)),
    ("pad_tall", dict(height=6, width=4, pad_to_aspect_ratio=True, fill_value=2.5)),
    ("pad_wide", dict(height=4, width=9, pad_to_aspect_ratio=True)),
    ("pad_nearest", dict(height=6, width=4, pad_to_aspect_ratio=True, interpolation="nearest")),
    ("channels_first", dict(height=6, width=5, data_format="channels_first")),
]


@pytest.mark.parametrize("shape", [(2, 7, 6, 3), (1, 4, 4, 1)])
@pytest.mark.parametrize("kwargs", [r[1] for r in RESIZING], ids=[r[0] for r in RESIZING])
def test_resizing(kwargs, shape, rng):
    x = (rng.standard_normal(shape) * 10).astype("float32")
    assert assert_matches_keras(L.Resizing(**kwargs), x).comparison.max_ulp == 0


def test_resizing_single_image(rng):
    x = rng.standard_normal((7, 6, 3)).astype("float32")
    assert assert_matches_keras(L.Resizing(5, 5), x).comparison.max_ulp == 0


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "mixed_float16", "mixed_bfloat16"])
def test_resizing_half_precision(policy, rng):
    x = rng.standard_normal((2, 7, 6, 3)).astype("float32")
    check = assert_matches_keras(L.Resizing(5, 9, dtype=policy), x)
    assert check.keras_output.dtype.name == policy.removeprefix("mixed_")
    assert check.comparison.max_ulp == 0


def test_resizing_nearest_uint8_keeps_the_dtype(rng):
    x = rng.integers(0, 256, (2, 7, 6, 3), dtype=np.uint8)
    layer = L.Resizing(5, 11, interpolation="nearest")
    keras_out = keras.ops.convert_to_numpy(layer(x))
    run = run_kernel(_kernel(layer), layer_spec(layer), [x])
    assert run.output.dtype == keras_out.dtype == np.uint8
    assert np.array_equal(run.output, keras_out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(interpolation="bicubic"), "bicubic"),
        (dict(interpolation="lanczos3"), "lanczos3"),
        (dict(antialias=True), "antialias"),
    ],
)
def test_resizing_unsupported(kwargs, match, rng):
    layer = L.Resizing(3, 3, **kwargs)
    x = rng.standard_normal((1, 6, 6, 1)).astype("float32")
    with pytest.raises(Unsupported, match=match):
        run_kernel(_kernel(layer), layer_spec(layer), [x])


def test_resizing_bilinear_of_integers_is_unsupported(rng):
    layer = L.Resizing(3, 3)
    x = rng.integers(0, 256, (1, 6, 6, 1), dtype=np.uint8)
    with pytest.raises(Unsupported, match="uint8"):
        run_kernel(_kernel(layer), layer_spec(layer), [x])


@pytest.mark.parametrize(
    "wrong",
    [dict(interpolation="nearest"), dict(crop_to_aspect_ratio=True), dict(height=4)],
    ids=["interpolation", "crop", "size"],
)
def test_resizing_wrong_config_is_caught(wrong, rng):
    x = rng.standard_normal((1, 7, 6, 2)).astype("float32")
    assert not _fails_with(L.Resizing(5, 4), x)
    assert _fails_with(L.Resizing(5, 4), x, **wrong)
