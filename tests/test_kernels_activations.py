"""Activation kernels against real Keras: every built-in activation as an ``Activation`` layer and
as ``Dense(activation=...)``, in float32 and float16; the activation layers (ReLU, LeakyReLU, PReLU,
ELU, Softmax) over config tables; TensorFlow's flush-to-zero of subnormal results (covered by
numerics.underflow_unit); and checks that a wrong activation or config is caught.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from support import assert_matches_keras, check_layer

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import LayerSpec, Unsupported, find_kernel
from convdiff.kernels import activations as acts
from convdiff.metrics import compare, is_identical, within_bound
from convdiff.numerics import Rounded

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers
NAMES = sorted(acts.ACTIVATIONS)
AXIS_NAMES = {"softmax", "log_softmax", "sparsemax", "glu"}  # act along the last axis

# TensorFlow's CPU kernels run with flush-to-zero: a result that would be subnormal comes out as 0
# (measured: tf.exp(-88.) == 0, 1e-40 * 1.0 == 0). numerics.underflow_unit allows the smallest
# normal number per step for that; inputs whose activation underflows have their own test below:
# exp(x) for very negative x, exp(-x) for log_sigmoid, row spreads of softmax beyond ~87, erfc
# beyond 9.2 in gelu (x in -14.2..-13).
UNDERFLOW_BELOW = {"exponential", "sigmoid", "silu", "swish", "softplus", "mish", "softmax"}
UNDERFLOW_ABOVE = {"log_sigmoid", "softmax"}


def _inputs(rng: np.random.Generator, name: str, dtype: str = "float32") -> np.ndarray:
    """(rows, 8) inputs: a grid over [-12, 12], noise, values around 0 (tiny ones included),
    +-20, and +-90 for saturation and overflow (where TensorFlow does not flush a subnormal)."""
    tiny = (1e-30, 1e-7) if dtype == "float32" else (1e-3, 2e-4)
    special = [0.0, -0.0, 0.5, 1.0, 3.0, 6.0, 20.0, *tiny]
    special += [-v for v in special]
    special += [90.0] if name not in UNDERFLOW_ABOVE else []
    special += [-90.0] if name not in UNDERFLOW_BELOW else []
    grid = np.linspace(-12, 12, 97)
    noise = np.clip(rng.normal(0, 3, 64), -12, 12)
    values = np.concatenate([special, grid, noise])
    pad = (-values.size) % 8
    values = np.concatenate([values, rng.uniform(-2, 2, pad)])
    return rng.permutation(values).reshape(-1, 8).astype(dtype)


def test_every_builtin_keras_activation_has_a_kernel():
    public = {n for n in dir(keras.activations) if not n.startswith("_")}
    builtins = public - {"deserialize", "get", "serialize"}
    assert builtins == set(acts.ACTIVATIONS) | {"threshold"}


@pytest.mark.parametrize("name", NAMES)
def test_activation_layer(name, rng):
    assert_matches_keras(L.Activation(name), _inputs(rng, name))


@pytest.mark.parametrize("name", NAMES)
def test_dense_identity_activation(name, rng):
    """An identity Dense passes its input through exactly, so the activation sees every
    interesting value."""
    x = _inputs(rng, name)
    dense = L.Dense(8, activation=name)
    dense.build((None, 8))
    dense.set_weights([np.eye(8, dtype="float32"), np.zeros(8, "float32")])
    assert_matches_keras(dense, x)


@pytest.mark.parametrize("name", NAMES)
def test_dense_random_activation(name, rng):
    """Pre-activations rounded by the matmul and the bias (within about -8..8: no underflow)."""
    dense = L.Dense(6, activation=name)
    dense.build((None, 8))
    bias = rng.normal(0, 1, 6).astype("float32")
    dense.set_weights([rng.normal(0, 0.5, (8, 6)).astype("float32"), bias])
    assert_matches_keras(dense, rng.normal(0, 2, (16, 8)).astype("float32"))


@pytest.mark.parametrize("name", NAMES)
def test_activation_layer_float16(name, rng):
    layer = L.Activation(name, dtype="float16")
    check = assert_matches_keras(layer, _inputs(rng, name, "float16"))
    assert check.keras_output.dtype == np.float16


@pytest.mark.parametrize("name", ["gelu", "softplus", "silu", "softmax", "elu", "tanh"])
def test_dense_mixed_float16(name, rng):
    dense = L.Dense(8, activation=name, dtype=keras.DTypePolicy("mixed_float16"))
    dense.build((None, 8))
    dense.set_weights([np.eye(8, dtype="float32"), np.zeros(8, "float32")])
    assert_matches_keras(dense, _inputs(rng, name, "float16"))


def test_float16_softplus_uses_eigens_half_epsilon(rng, monkeypatch):
    """TensorFlow's float16 softplus switches branches at log(2**-13) + 2 = -7.0078 (Eigen's
    half epsilon), not at log(2**-10) + 2: the machine-epsilon threshold is caught."""
    layer = L.Activation("softplus", dtype="float16")
    x = np.linspace(-8, 8, 257).astype("float16").reshape(-1, 1)
    assert is_identical(check_layer(layer, x).comparison)
    wrong = float(np.float16(np.log(2.0**-10)) + np.float16(2))
    monkeypatch.setattr(acts, "_softplus_threshold", lambda dtype: wrong)
    assert not within_bound(check_layer(layer, x).comparison)


@pytest.mark.parametrize(
    "name, values",
    [
        ("exponential", [-88.0, -90.0, -100.0, 0.0]),
        ("sigmoid", [-88.0, -90.0, -100.0, 0.0]),
        ("silu", [-88.0, -90.0, -100.0, 0.0]),
        ("softplus", [-88.0, -90.0, -100.0, 0.0]),
        ("log_sigmoid", [88.0, 90.0, 100.0, 0.0]),
        ("mish", [-88.0, -90.0, -100.0, 0.0]),
        ("gelu", [-13.25, -13.5, -14.0, 0.0]),
        ("softmax", [0.0, -90.0, -100.0, -1.0]),
    ],
)
def test_underflow_to_subnormal(name, values):
    x = np.array([values], dtype="float32")
    assert_matches_keras(L.Activation(name), x)


RELU_CASES = [
    {},
    {"max_value": 6.0},
    {"max_value": 6},
    {"max_value": 1.5},
    {"max_value": 0.0},
    {"negative_slope": 0.1},
    {"negative_slope": 0.3, "max_value": 6.0},
    {"threshold": 0.3},
    {"threshold": 1.0, "max_value": 4.0},
    {"negative_slope": 0.2, "threshold": 0.5},
    {"negative_slope": 0.2, "threshold": 0.5, "max_value": 3.0},
    {"negative_slope": 1.5, "threshold": 1.1},
]
LAYER_CASES = [
    *[(L.ReLU, kwargs) for kwargs in RELU_CASES],
    (L.LeakyReLU, {}),
    (L.LeakyReLU, {"negative_slope": 0.01}),
    (L.LeakyReLU, {"negative_slope": 0.0}),
    (L.LeakyReLU, {"negative_slope": 2.5}),
    (L.ELU, {}),
    (L.ELU, {"alpha": 0.5}),
    (L.ELU, {"alpha": 2.3}),
    (L.ELU, {"alpha": 0.0}),
    (L.Softmax, {}),
    (L.Softmax, {"axis": 1}),
    (L.Softmax, {"axis": 0}),
    (L.Softmax, {"axis": [1]}),
    (L.Softmax, {"axis": [1, 2]}),
    (L.Softmax, {"axis": [0, 2]}),
    (L.PReLU, {}),
    (L.PReLU, {"alpha_initializer": "random_normal"}),
    (L.PReLU, {"alpha_initializer": "random_normal", "shared_axes": [1]}),
    (L.PReLU, {"alpha_initializer": "random_normal", "shared_axes": [1, 2]}),
]


def _layer_input(rng: np.random.Generator, dtype: str = "float32") -> np.ndarray:
    """(4, 5, 6) inputs: noise, a grid through the thresholds, and exact threshold values."""
    grid = np.linspace(-8, 8, 41)
    exact = np.array([0.0, -0.0, 0.3, 0.5, 1.0, 1.1, 1.5, 3.0, 4.0, 6.0, -0.5, -20, 20])
    noise = rng.normal(0, 3, 120 - grid.size - exact.size)
    return rng.permutation(np.concatenate([grid, exact, noise])).reshape(4, 5, 6).astype(dtype)


def _ids(case) -> str:
    cls, kwargs = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", LAYER_CASES, ids=_ids)
def test_activation_layer_class(case, rng):
    cls, kwargs = case
    assert_matches_keras(cls(**kwargs), _layer_input(rng))


@pytest.mark.parametrize(
    "case",
    [
        (L.ReLU, {"negative_slope": 0.2, "threshold": 0.3, "max_value": 3.0}),
        (L.LeakyReLU, {"negative_slope": 0.1}),
        (L.ELU, {"alpha": 0.3}),
        (L.Softmax, {"axis": 1}),
        (L.Softmax, {"axis": [1, 2]}),
        (L.PReLU, {"alpha_initializer": "random_normal", "shared_axes": [1]}),
    ],
    ids=_ids,
)
@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_activation_layer_class_float16(case, policy, rng):
    cls, kwargs = case
    layer = cls(**kwargs, dtype=policy)
    assert_matches_keras(layer, _layer_input(rng, "float16"))


def test_elu_config_without_alpha_is_unsupported():
    """Keras's ELU has no get_config: its automatic config (with alpha) is skipped when an
    argument is not a plain value, so get_config raises and the kernel cannot know alpha."""
    layer = L.ELU(alpha=0.3, dtype=keras.DTypePolicy("mixed_float16"))
    with pytest.raises(NotImplementedError):
        layer.get_config()
    kernel = find_kernel(L.ELU, vars(L))
    with pytest.raises(Unsupported, match="no 'alpha'"):
        run_kernel(kernel, layer_spec(layer), [np.zeros((2, 3), "float16")])


def test_softmax_mask(rng):
    layer = L.Softmax(axis=-1)
    x = rng.normal(0, 3, (3, 4, 6)).astype("float32")
    mask = rng.uniform(size=(3, 1, 6)) > 0.4
    keras_out = keras.ops.convert_to_numpy(layer(x, mask=mask))
    kernel = find_kernel(L.Softmax, vars(L))
    run = run_kernel(kernel, layer_spec(layer), [x, mask.astype("float32")])
    assert within_bound(compare(keras_out, run.output, run.bound))


def test_dense_with_layer_object_activation(rng):
    dense = L.Dense(5, activation=L.ReLU(max_value=1.0, negative_slope=0.1))
    assert_matches_keras(dense, rng.normal(0, 2, (6, 4)).astype("float32"))


def test_serialized_function_entry(rng):
    x = rng.normal(0, 3, (4, 8)).astype("float32")
    entry = {"module": "keras.activations", "class_name": "function", "config": "elu"}
    nx = Rounded("float32")
    np.testing.assert_array_equal(acts.activate(entry, x, nx), acts.activate("elu", x, nx))
    assert acts.activate(None, x, nx) is x


def test_threshold_function(rng):
    """``threshold`` needs arguments, so no layer config reaches it; checked as a function."""
    x = _layer_input(rng)
    keras_out = keras.ops.convert_to_numpy(keras.activations.threshold(x, 0.3, -2.0))
    spec = LayerSpec("threshold", "Activation", {})
    run = run_kernel(lambda spec, xs, nx: acts.threshold(xs[0], nx, 0.3, -2.0), spec, [x])
    assert is_identical(compare(keras_out, run.output, run.bound))


def test_sparsemax_mirrors_keras_threshold():
    """Keras's sparsemax takes tau = (sum of the supported cumulative sums - 1) / k; for a
    support of two the output does not sum to 1. The kernel follows Keras."""
    x = np.array([[0.5, 0.4, -1.0]], dtype="float32")
    check = assert_matches_keras(L.Activation("sparsemax"), x)
    np.testing.assert_allclose(check.keras_output, [[0.3, 0.2, 0.0]], atol=1e-6)


@pytest.mark.parametrize("name", ["sparsemax", "softmax", "elu", "gelu", "mish", "hard_silu"])
def test_propagated_inputs(name, rng):
    """With inputs that differ from Keras's by a few ULPs (propagated mode), the bound still
    covers Keras's output, including sparsemax's data-dependent sort and support."""
    base = rng.normal(0, 2, (32, 8)).astype("float32")
    base[:, 1] = base[:, 0]  # ties, which a perturbation reorders
    layer = L.Activation(name)
    keras_out = keras.ops.convert_to_numpy(layer(base))
    steps = rng.integers(-3, 4, base.shape)
    mine = (base.view(np.int32) + steps.astype(np.int32)).view(np.float32)
    kernel = find_kernel(L.Activation, vars(L))
    run = run_kernel(kernel, layer_spec(layer), [mine], reference_inputs=[base])
    assert within_bound(compare(keras_out, run.output, run.bound))


def _wrong(layer, x, **config):
    """Keras's layer against the kernel run with a changed config."""
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    spec = dataclasses.replace(spec, config={**spec.config, **config})
    run = run_kernel(find_kernel(type(layer), vars(L)), spec, [x])
    return compare(keras_out, run.output, run.bound)


@pytest.mark.parametrize(
    "name, other",
    [
        ("elu", "selu"),
        ("sigmoid", "hard_sigmoid"),
        ("silu", "hard_silu"),
        ("tanh", "hard_tanh"),
        ("softplus", "relu"),
        ("gelu", "silu"),
        ("softmax", "sparsemax"),
        ("log_softmax", "softmax"),
    ],
)
def test_wrong_activation_is_caught(name, other, rng):
    assert not within_bound(_wrong(L.Activation(name), _layer_input(rng), activation=other))


@pytest.mark.parametrize(
    "layer, config",
    [
        (L.ELU(alpha=0.5), {"alpha": 0.52}),
        (L.ReLU(threshold=0.3), {"threshold": 0.0}),
        (L.ReLU(max_value=1.5), {"max_value": 2.0}),
        (L.ReLU(negative_slope=0.1, max_value=3.0), {"negative_slope": 0.11}),
        (L.LeakyReLU(negative_slope=0.1), {"negative_slope": 0.12}),
        (L.Softmax(axis=1), {"axis": -1}),
        (L.Softmax(axis=[1, 2]), {"axis": [2]}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_layer_config_is_caught(layer, config, rng):
    assert not within_bound(_wrong(layer, _layer_input(rng), **config))


def test_gelu_approximation_is_caught(rng):
    x = _layer_input(rng)
    keras_out = keras.ops.convert_to_numpy(keras.activations.gelu(x, approximate=False))
    spec = LayerSpec("gelu", "Activation", {})
    run = run_kernel(lambda spec, xs, nx: acts.gelu(xs[0], nx, approximate=True), spec, [x])
    assert not within_bound(compare(keras_out, run.output, run.bound))


def test_prelu_negated_alpha_is_caught(rng):
    layer = L.PReLU(alpha_initializer="random_normal")
    x = _layer_input(rng)
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    spec = dataclasses.replace(spec, weights={"alpha": -spec.weights["alpha"]})
    run = run_kernel(find_kernel(L.PReLU, vars(L)), spec, [x])
    assert not within_bound(compare(keras_out, run.output, run.bound))


def _custom(x):
    return x * 2.0


@pytest.mark.parametrize(
    "activation, message",
    [
        (_custom, "custom activation function '_custom'"),
        (L.PReLU(), "activation 'PReLU'"),
    ],
)
def test_unsupported_activation(activation, message, rng):
    dense = L.Dense(4, activation=activation)
    dense.build((None, 3))
    kernel = find_kernel(L.Dense, vars(L))
    with pytest.raises(Unsupported, match=message):
        run_kernel(kernel, layer_spec(dense), [np.ones((2, 3), "float32")])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("threshold", "needs arguments"),
        ("no_such_activation", "activation 'no_such_activation'"),
        (42, "activation 42"),
    ],
)
def test_unsupported_entry(entry, message):
    with pytest.raises(Unsupported, match=message):
        acts.activate(entry, np.zeros((2, 4), "float32"), Rounded("float32"))


def test_glu_odd_axis_unsupported():
    with pytest.raises(Unsupported, match="odd size 5"):
        acts.activate("glu", np.zeros((2, 5), "float32"), Rounded("float32"))
