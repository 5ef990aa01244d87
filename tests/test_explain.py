"""likely_cause: every hypothesis is recognised on a deliberately wrong NumPy implementation."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
from support import NCHW_NEEDS_ONEDNN

from convdiff.evaluate import run_kernel
from convdiff.explain import _ACTIVATIONS, _activated, _with, hypotheses, likely_cause
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel
from convdiff.orders import Order

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

# --- plain NumPy implementations, as a user writes them (float64 inside) -----------------------


def relu(v):
    return np.maximum(v, 0.0)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def np_conv2d(x, w, b=None, *, pads=((0, 0), (0, 0)), stride=1, dilation=1, act=None):
    """Correlation of NHWC ``x`` with (kh, kw, C, F) ``w``: im2col and one product."""
    n, _, _, c = x.shape
    kh, kw, _, f = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
    h = (xp.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    wd = (xp.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    taps = [
        xp[:, i * dilation :][:, : (h - 1) * stride + 1 : stride][:, :, j * dilation :][
            :, :, : (wd - 1) * stride + 1 : stride
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = np.stack(taps, axis=3).reshape(n * h * wd, kh * kw * c)
    out = (cols @ w.astype(np.float64).reshape(kh * kw * c, f)).reshape(n, h, wd, f)
    if b is not None:
        out = out + b
    return act(out) if act else out


def np_conv1d(x, w, b, pads):
    return np_conv2d(x[:, None], w[None], b, pads=((0, 0), pads))[:, 0]


def np_conv2d_transpose(x, w, b, stride):
    """Scatter: each input pixel adds ``x * w`` into the (valid) output; w is (kh, kw, F, C)."""
    n, h, wd, _ = x.shape
    kh, kw, f, _ = w.shape
    out = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, f))
    for i in range(h):
        for j in range(wd):
            contrib = np.einsum("nc,abfc->nabf", x[:, i, j].astype(np.float64), w)
            out[:, i * stride : i * stride + kh, j * stride : j * stride + kw] += contrib
    return out + b


def np_batchnorm(x, gamma, beta, mean, var, eps, center=True):
    y = (x.astype(np.float64) - mean) / np.sqrt(var + eps) * gamma
    return y + beta if center else y


def np_layernorm(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def np_pool2d(x, k, stride, pads, reduce):
    xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
    h = (xp.shape[1] - k) // stride + 1
    w = (xp.shape[2] - k) // stride + 1
    out = np.empty((x.shape[0], h, w, x.shape[3]))
    for i in range(h):
        for j in range(w):
            window = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, i, j] = reduce(window, axis=(1, 2))
    return out


# --- the layers under test -----------------------------------------------------------------------


def built(layer, shape, rng, scale=0.5):
    """Build a real Keras layer and give it random weights (a nonzero bias)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    layer(x)
    layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()])
    return layer, x


def explain(layer, x, candidate):
    kernel = find_kernel(type(layer), vars(keras.layers))
    return likely_cause(kernel, layer_spec(layer), [x], candidate)


def conv_case(shape, wrong: Callable, **config):
    config.setdefault("padding", "same")
    config.setdefault("filters", 4)
    config.setdefault("kernel_size", 3)

    def make(rng):
        layer, x = built(keras.layers.Conv2D(**config), shape, rng)
        w, b = layer.get_weights()
        return layer, x, wrong(x, w, b)

    return make


CONV_CASES = {
    "flipped kernel": (
        conv_case(
            (1, 6, 6, 2),
            lambda x, w, b: np_conv2d(x, w[::-1, ::-1], b, pads=((1, 1),) * 2, act=relu),
            activation="relu",
        ),
        "the kernel is flipped: this implementation computes a convolution, Keras a correlation",
    ),
    "valid instead of same": (
        conv_case((1, 6, 6, 2), lambda x, w, b: np_conv2d(x, w, b)),
        "matches padding='valid': the layer uses padding='same'",
    ),
    "same padding all after": (
        conv_case((1, 6, 6, 2), lambda x, w, b: np_conv2d(x, w, b, pads=((0, 2), (0, 2)))),
        "padded (before, after) rows (0, 2), columns (0, 2): TensorFlow's 'same' padding here "
        "is (1, 1), (1, 1)",
    ),
    "same padding shifted along columns only": (
        conv_case((1, 6, 6, 2), lambda x, w, b: np_conv2d(x, w, b, pads=((1, 1), (2, 0)))),
        "rows (1, 1), columns (2, 0)",
    ),
    "odd padding pixel before (even kernel)": (
        conv_case(
            (1, 5, 5, 2), lambda x, w, b: np_conv2d(x, w, b, pads=((1, 0), (1, 0))), kernel_size=2
        ),
        "rows (1, 0), columns (1, 0): TensorFlow's 'same' padding here is (0, 1), (0, 1)",
    ),
    "PyTorch padding=1 with stride 2": (
        conv_case(
            (1, 8, 8, 2),
            lambda x, w, b: np_conv2d(x, w, b, pads=((1, 1),) * 2, stride=2),
            strides=2,
        ),
        "rows (1, 1), columns (1, 1): TensorFlow's 'same' padding here is (0, 1), (0, 1)",
    ),
    "channels_last data read as channels_first": (
        conv_case(
            (1, 4, 4, 4),
            lambda x, w, b: np_conv2d(x.transpose(0, 2, 3, 1), w, b, pads=((1, 1),) * 2).transpose(
                0, 3, 1, 2
            ),
        ),
        "read as channels_first: the layer's data is channels_last",
    ),
    "bias missing": (
        conv_case(
            (1, 6, 6, 2),
            lambda x, w, b: np_conv2d(x, w, None, pads=((1, 1),) * 2, act=relu),
            activation="relu",
        ),
        "the bias is left out",
    ),
    "activation missing": (
        conv_case(
            (1, 6, 6, 2), lambda x, w, b: np_conv2d(x, w, b, pads=((1, 1),) * 2), activation="relu"
        ),
        "matches without the activation: the layer applies 'relu'",
    ),
    "kernel spatial axes transposed": (
        conv_case(
            (1, 6, 6, 2),
            lambda x, w, b: np_conv2d(x, w.transpose(1, 0, 2, 3), b, pads=((1, 1),) * 2),
        ),
        "the kernel's spatial axes are transposed",
    ),
    "kernel channel axes swapped": (
        conv_case(
            (1, 6, 6, 3),
            lambda x, w, b: np_conv2d(x, w.swapaxes(2, 3), b, pads=((1, 1),) * 2),
            filters=3,
        ),
        "the kernel's input and output channel axes are swapped",
    ),
    "dilation 1 instead of 2": (
        conv_case(
            (1, 8, 8, 2), lambda x, w, b: np_conv2d(x, w, b, pads=((1, 1),) * 2), dilation_rate=2
        ),
        "dilation_rate=(1, 1) instead of (2, 2)",
    ),
    "stride 1 instead of 2": (
        conv_case((1, 7, 7, 2), lambda x, w, b: np_conv2d(x, w, b), strides=2, padding="valid"),
        "strides=(1, 1) instead of (2, 2)",
    ),
}


def test_symmetric_same_padding_is_not_called_odd(rng):
    """A 3x3 'same' convolution pads (1, 1): the cause names no odd pixel; a 4x4 one pads
    (1, 2), and only there is the odd pixel after."""
    layer, x = built(keras.layers.Conv2D(2, 3, padding="same"), (1, 6, 6, 2), rng)
    w, b = layer.get_weights()
    cause = explain(layer, x, np_conv2d(x, w, b, pads=((0, 2), (0, 2))))
    assert cause is not None and cause.endswith("here is (1, 1), (1, 1)"), cause
    layer, x = built(keras.layers.Conv2D(2, 4, padding="same"), (1, 6, 6, 2), rng)
    w, b = layer.get_weights()
    cause = explain(layer, x, np_conv2d(x, w, b, pads=((2, 1), (2, 1))))
    assert cause is not None and cause.endswith("here is (1, 2), (1, 2), the odd pixel after")


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv2d_mistakes_are_named(rng, case):
    make, expected = CONV_CASES[case]
    layer, x, wrong = make(rng)
    cause = explain(layer, x, wrong)
    assert cause is not None and expected in cause, cause


def test_causal_conv1d_computed_as_same(rng):
    layer, x = built(keras.layers.Conv1D(3, 3, padding="causal"), (1, 8, 2), rng)
    w, b = layer.get_weights()
    assert explain(layer, x, np_conv1d(x, w, b, (1, 1))) == (
        "matches padding='same': the layer uses padding='causal'"
    )
    assert explain(layer, x, np_conv1d(x, w, b, (2, 0))) is None  # the right one


def test_depthwise_flipped(rng):
    layer, x = built(keras.layers.DepthwiseConv2D(3, padding="same"), (1, 5, 5, 2), rng)
    w, b = layer.get_weights()  # (3, 3, C, 1)
    per_channel = [
        np_conv2d(x[..., c : c + 1], w[::-1, ::-1, c : c + 1], b[c], pads=((1, 1),) * 2)
        for c in range(2)
    ]
    cause = explain(layer, x, np.concatenate(per_channel, axis=-1))
    assert cause is not None and "the kernel is flipped" in cause


def test_conv2d_transpose_flipped(rng):
    layer, x = built(keras.layers.Conv2DTranspose(3, 3, strides=2), (1, 3, 3, 2), rng)
    w, b = layer.get_weights()  # (kh, kw, F, C)
    assert explain(layer, x, np_conv2d_transpose(x, w, b, 2)) is None  # the right scatter
    cause = explain(layer, x, np_conv2d_transpose(x, w[::-1, ::-1], b, 2))
    assert cause is not None and "the kernel is flipped spatially" in cause


def test_dense_activation_different(rng):
    layer, x = built(keras.layers.Dense(5, activation="sigmoid"), (3, 6), rng)
    w, b = layer.get_weights()
    y = x.astype(np.float64) @ w + b
    assert explain(layer, x, sigmoid(y)) is None
    assert explain(layer, x, np.tanh(y)) == "matches with activation 'tanh' instead of 'sigmoid'"
    assert explain(layer, x, y) == (
        "matches without the activation: the layer applies 'sigmoid' last"
    )


def test_dense_kernel_transposed_and_bias_missing(rng):
    layer, x = built(keras.layers.Dense(4), (2, 4), rng)
    w, b = layer.get_weights()
    assert explain(layer, x, x @ w.T + b) == (
        "matches if the Dense kernel is transposed: this implementation computes x @ kernel.T, "
        "Keras x @ kernel"
    )
    assert "the bias is left out" in explain(layer, x, x @ w)


@pytest.fixture
def batchnorm(rng):
    layer, x = built(keras.layers.BatchNormalization(epsilon=1e-3), (2, 4, 4, 3), rng)
    gamma, beta, mean, _ = layer.get_weights()
    var = rng.uniform(1e-3, 1e-2, 3).astype(np.float32)  # small: epsilon matters
    layer.set_weights([gamma, beta, mean, var])
    return layer, x, (gamma, beta, mean, var)


def test_batchnorm_epsilon_and_beta(batchnorm):
    layer, x, (gamma, beta, mean, var) = batchnorm
    assert explain(layer, x, np_batchnorm(x, gamma, beta, mean, var, 1e-3)) is None
    assert explain(layer, x, np_batchnorm(x, gamma, beta, mean, var, 1e-5)) == (
        "matches with epsilon=1e-05 instead of the layer's 0.001"
    )
    assert explain(layer, x, np_batchnorm(x, gamma, beta, mean, var, 0.0)) == (
        "matches with epsilon=0 instead of the layer's 0.001"
    )
    assert explain(layer, x, np_batchnorm(x, gamma, beta, mean, var, 1e-3, center=False)) == (
        "matches if beta (the offset) is left out: Keras applies it"
    )


def test_layernorm_epsilon(rng):
    layer, x = built(keras.layers.LayerNormalization(epsilon=1e-3), (2, 8), rng, scale=0.03)
    gamma, beta = layer.get_weights()
    assert explain(layer, x, np_layernorm(x, gamma, beta, 1e-3)) is None
    assert explain(layer, x, np_layernorm(x, gamma, beta, 1e-6)) == (
        "matches with epsilon=1e-06 instead of the layer's 0.001"
    )


def test_average_pooling_counts_padding(rng):
    layer, x = built(keras.layers.AveragePooling2D(3, strides=1, padding="same"), (1, 5, 5, 2), rng)
    cause = explain(layer, x, np_pool2d(x, 3, 1, ((1, 1), (1, 1)), np.mean))
    assert cause is not None and "zero padding is counted in the average" in cause


def test_max_pooling_pads_with_zeros(rng):
    layer, x = built(keras.layers.MaxPooling2D(2, padding="same"), (1, 5, 5, 2), rng)
    x = -np.abs(x) - 0.1  # all negative: a zero pad wins at the border
    cause = explain(layer, x, np_pool2d(x, 2, 2, ((0, 1), (0, 1)), np.max))
    assert cause is not None and "padded with zeros before the max" in cause


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_correct_implementations_have_no_cause(rng, dtype):
    layer, x = built(
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"), (1, 6, 6, 2), rng
    )
    w, b = layer.get_weights()
    out = np_conv2d(x, w, b, pads=((1, 1),) * 2, act=relu).astype(dtype)
    assert explain(layer, x, out) is None
    keras_out = keras.ops.convert_to_numpy(layer(x))
    assert explain(layer, x, keras_out) is None


def test_unexplained_mistake_has_no_cause(rng):
    layer, x = built(keras.layers.Conv2D(4, 3, padding="same"), (1, 6, 6, 2), rng)
    w, b = layer.get_weights()
    right = np_conv2d(x, w, b, pads=((1, 1),) * 2)
    assert explain(layer, x, right * 1.01) is None
    assert explain(layer, x, right[:, :5]) is None  # a shape no hypothesis gives
    assert explain(layer, x, right.astype(np.int32)) is None


def test_hypotheses_apply_only_to_their_layers(rng):
    dense, xd = built(keras.layers.Dense(3), (2, 4), rng)
    causes = [h.cause for h in hypotheses(layer_spec(dense), [xd])]
    assert not any("flipped" in c or "padding" in c or "epsilon" in c for c in causes)
    assert not any("Dense kernel is transposed" in c for c in causes)  # (4, 3) is not square
    assert any("bias" in c for c in causes) and any("'relu'" in c for c in causes)
    norm, xn = built(keras.layers.LayerNormalization(), (2, 4), rng)
    causes = [h.cause for h in hypotheses(layer_spec(norm), [xn])]
    assert sum("epsilon" in c for c in causes) == 5
    assert not any("activation" in c for c in causes)


def test_every_hypothesis_runs_and_none_explains_garbage(rng, monkeypatch):
    """An output no hypothesis explains makes every one run: each is computed (none fails to
    build or to run; as many input channels as rows and columns, so that even the
    channels_first reading fits the kernel) and none explains it. How long that takes at the
    seed model's size is measured by benchmarks/explain_speed.py."""
    from convdiff import explain as explain_module

    layer, x = built(
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), (1, 16, 16, 16), rng
    )
    garbage = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    tried = []
    explains = explain_module._explains

    def recorded(candidate, run):
        tried.append(run)
        return explains(candidate, run)

    monkeypatch.setattr(explain_module, "_explains", recorded)
    assert explain(layer, x, garbage) is None
    # the layer itself first, then each hypothesis
    assert len(tried) == 1 + len(list(hypotheses(layer_spec(layer), [x])))
    assert all(run is not None for run in tried)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: keras.layers.Conv2D(3, 2, activation="relu"), (1, 4, 4, 2)),
        pytest.param(
            lambda: keras.layers.Conv2D(3, 2, data_format="channels_first"),
            (1, 2, 4, 5),
            marks=NCHW_NEEDS_ONEDNN,
        ),
        (lambda: keras.layers.Dense(3), (2, 5)),
        (lambda: keras.layers.Activation("tanh"), (2, 5)),
    ],
    ids=["conv2d", "conv2d-channels_first", "dense", "activation"],
)
def test_shared_activation_runs_equal_the_kernel(rng, layer, shape):
    """The activation hypotheses' shortcut gives what run_kernel gives for that activation."""
    layer, x = built(layer(), shape, rng, scale=3.0)
    spec, kernel = layer_spec(layer), find_kernel(type(layer), vars(keras.layers))
    order = Order(name="blas")
    linear = run_kernel(kernel, _with(spec, {"activation": "linear"}), [x], order)
    shared = [h.activation for h in hypotheses(spec, [x]) if h.activation]
    assert len(shared) >= len(_ACTIVATIONS) - 2  # all but the current (and channels_first softmax)
    for name in shared:
        full = run_kernel(kernel, _with(spec, {"activation": name}), [x], order)
        quick = _activated(linear, name, spec.dtype, order)
        np.testing.assert_array_equal(quick.output, full.output, err_msg=name)
        np.testing.assert_array_equal(quick.reference, full.reference, err_msg=name)
        np.testing.assert_array_equal(quick.bound, full.bound, err_msg=name)


def test_depthwise_padding_all_after(rng):
    layer, x = built(keras.layers.DepthwiseConv2D(3, padding="same"), (1, 5, 5, 2), rng)
    w, b = layer.get_weights()
    per_channel = [
        np_conv2d(x[..., c : c + 1], w[:, :, c : c + 1], b[c], pads=((0, 2), (0, 2)))
        for c in range(2)
    ]
    cause = explain(layer, x, np.concatenate(per_channel, axis=-1))
    assert cause is not None and "rows (0, 2), columns (0, 2)" in cause


def test_batchnorm_parameters_along_the_wrong_axis(rng):
    layer, x = built(keras.layers.BatchNormalization(), (2, 3, 4, 3), rng)
    gamma, beta, mean, var = (w.reshape(3, 1, 1) for w in layer.get_weights())
    var = np.abs(var) + 0.5
    layer.set_weights([w.ravel() for w in (gamma, beta, mean, var)])
    cause = explain(layer, x, np_batchnorm(x, gamma, beta, mean, var, 1e-3))
    assert cause == (
        "matches with axis=1 instead of the layer's axis=-1: the channels are read from the "
        "other end (channels_first vs channels_last)"
    )


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: keras.layers.Conv1D(2, 3, padding="same", activation="tanh"), (1, 6, 2)),
        (lambda: keras.layers.Conv3D(2, 2, padding="same"), (1, 3, 3, 3, 2)),
        (lambda: keras.layers.SeparableConv1D(2, 3, padding="same"), (1, 6, 2)),
        (lambda: keras.layers.SeparableConv2D(2, 3, padding="same"), (1, 4, 4, 2)),
        (lambda: keras.layers.DepthwiseConv1D(3, padding="same"), (1, 6, 2)),
        (lambda: keras.layers.Conv1DTranspose(2, 3, padding="same"), (1, 4, 2)),
        (lambda: keras.layers.Conv3DTranspose(2, 2, strides=2), (1, 2, 2, 2, 2)),
        pytest.param(
            lambda: keras.layers.Conv2D(2, 3, padding="same", data_format="channels_first"),
            (1, 2, 4, 4),
            marks=NCHW_NEEDS_ONEDNN,
        ),
        (lambda: keras.layers.AveragePooling1D(2, padding="same"), (1, 5, 2)),
        (lambda: keras.layers.MaxPooling3D(2, padding="same"), (1, 3, 3, 3, 2)),
        (lambda: keras.layers.GroupNormalization(groups=2), (2, 4, 4)),
        (lambda: keras.layers.Add(), None),
    ],
    ids=lambda v: v if isinstance(v, tuple) else None,
)
def test_every_layer_family_runs_without_error(rng, make, shape):
    """Unexplainable output: every applicable hypothesis is built and run, none raises."""
    if shape is None:  # a multi-input layer: no hypothesis applies
        layer = make()
        xs = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2)]
        layer(xs)
    else:
        layer, x = built(make(), shape, rng)
        xs = [x]
    out = keras.ops.convert_to_numpy(layer(xs if len(xs) > 1 else xs[0]))
    kernel = find_kernel(type(layer), vars(keras.layers))
    spec = layer_spec(layer)
    assert likely_cause(kernel, spec, xs, out) is None  # Keras's own output: nothing to explain
    garbage = rng.standard_normal(out.shape).astype(out.dtype) * 7
    assert likely_cause(kernel, spec, xs, garbage) is None
    list(hypotheses(spec, xs))  # the strict generator builds every family too


@pytest.fixture(scope="module")
def one_layer_model(examples):
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_conv2d", examples / "my_conv2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = keras.models.load_model(examples / "one_layer.h5", compile=False)
    x = np.load(examples / "one_layer_input.npy")
    return model.layers[-1], x, module


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("forward_loop", None),
        ("forward_vectorized", None),
        ("forward_flipped", "the kernel is flipped: this implementation computes a convolution"),
        ("forward_shifted", "padded (before, after) rows (0, 2), columns (0, 2)"),
    ],
)
def test_example_implementations(one_layer_model, function, expected):
    """The README's example functions on the one-layer model (64x64, 32 filters)."""
    layer, x, module = one_layer_model
    candidate = getattr(module, function)(x, *layer.get_weights())
    cause = explain(layer, x, candidate)
    assert cause is None if expected is None else expected in cause, cause
