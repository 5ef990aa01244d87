"""``--order auto`` on real TensorFlow layers, on whatever machine the tests run.

Nothing here says which tree a layer uses: that depends on the CPU, TensorFlow's build and
oneDNN. What must hold everywhere: the revealed trees reproduce the layer's raw op on random
data, and the whole layer (bias and activation included, Keras's own call) bit for bit.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from support import NCHW_NEEDS_ONEDNN

import convdiff
from convdiff import autoorder, treecache
from convdiff.api import compare, orders_to_try
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel

pytestmark = pytest.mark.onednn

L = keras.layers

LAYERS = [
    pytest.param(
        lambda: L.Conv2D(16, 3, padding="same", activation="relu"), (2, 12, 12, 8), id="conv2d"
    ),
    pytest.param(
        lambda: L.Conv2D(12, (3, 2), strides=2, dilation_rate=1), (1, 13, 11, 5), id="conv2d-stride"
    ),
    pytest.param(
        lambda: L.Conv2D(8, 3, padding="same", dilation_rate=(2, 1)),
        (1, 10, 10, 6),
        id="conv2d-dilated",
    ),
    pytest.param(
        lambda: L.Conv2D(8, 3, padding="same", groups=2), (1, 9, 9, 6), id="conv2d-groups"
    ),
    pytest.param(lambda: L.Conv2D(64, 1), (1, 7, 7, 300), id="conv2d-1x1-long"),
    pytest.param(lambda: L.Conv1D(8, 5, padding="causal"), (2, 30, 6), id="conv1d-causal"),
    pytest.param(lambda: L.Conv3D(4, 3, padding="same"), (1, 6, 5, 6, 3), id="conv3d"),
    pytest.param(
        lambda: L.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
        (2, 9, 9, 4),
        id="depthwise",
    ),
    pytest.param(lambda: L.DepthwiseConv1D(3), (1, 20, 5), id="depthwise1d"),
    pytest.param(
        lambda: L.SeparableConv2D(12, 3, padding="same", depth_multiplier=2),
        (2, 8, 8, 4),
        id="separable",
    ),
    # 104 output channels: on an AVX2 CPU (oneDNN off) channels 96-103, the tail of a
    # 16-wide GEMM kernel, add the pointwise stage's 96 terms in two chunks where the others
    # take one chain, and no probe of the first guess falls in those channels
    pytest.param(
        lambda: L.SeparableConv2D(104, 3, padding="same"), (1, 5, 5, 96), id="separable-tail"
    ),
    pytest.param(lambda: L.SeparableConv1D(6, 3, strides=2), (1, 20, 5), id="separable1d"),
    pytest.param(
        lambda: L.Conv2DTranspose(8, 3, strides=2, padding="same"), (1, 6, 6, 4), id="transpose"
    ),
    pytest.param(lambda: L.Conv1DTranspose(5, 3, strides=2), (1, 7, 4), id="transpose1d"),
    pytest.param(lambda: L.Dense(10, activation="relu"), (1, 300), id="dense-gemv"),
    pytest.param(lambda: L.Dense(24), (3, 200), id="dense"),
    pytest.param(lambda: L.Dense(16), (2, 5, 40), id="dense-3d"),
]


def _layer(make, shape, seed=0):
    keras.utils.set_random_seed(seed)
    layer = make()
    layer.build(shape)
    # a bias far from zero, so that adding it is a rounding step of its own
    if getattr(layer, "bias", None) is not None:
        layer.bias.assign(np.random.default_rng(seed).standard_normal(layer.bias.shape))
    return layer


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_revealed_trees_reproduce_the_raw_op(make, shape):
    layer = _layer(make, shape)
    kernel = find_kernel(type(layer), vars(keras.layers))
    found, mismatches = autoorder.reveal_layer(layer, kernel, layer_spec(layer), shape)
    assert mismatches == 0, [r.tree.describe() for _, r in found]
    assert all(r.calls > 0 for _, r in found)


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_auto_reproduces_the_whole_layer(make, shape):
    """Keras's own call (bias, activation) against the NumPy kernel in the revealed order."""
    layer = _layer(make, shape)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    report = compare(model, x, order="auto")
    (result,) = report.layers
    assert result.order_found["status"] == "reproduced"
    assert result.status == "identical", (result.order_found, result.comparison.max_ulp)


@NCHW_NEEDS_ONEDNN
def test_channels_first():
    shape = (1, 5, 9, 9)
    layer = _layer(lambda: L.Conv2D(7, 3, padding="same", data_format="channels_first"), shape)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    x = np.random.default_rng(2).standard_normal(shape).astype("float32")
    (result,) = compare(model, x, order="auto").layers
    assert result.status == "identical", result.order_found


def test_positions_that_read_padding_where_the_tree_starts(examples):
    """deep8's convolutions (3x3 'same', 32x32, 3 and 16 input channels). With oneDNN on an
    AVX2 CPU, the last two output columns of each row take another kernel (two interleaved
    accumulators, products rounded); on the top row they read the first term, where every
    sweep starts, as padding, so no probe showed their tree and they were taken for the main
    one. Wherever the backend is deterministic, auto must reproduce them."""
    report = compare(
        examples / "deep8.keras",
        examples / "deep8_input.npy",
        order="auto",
        layers=["conv0", "conv1"],
        cache=False,
    )
    for result in report.layers:
        assert result.order_found["status"] == "reproduced", result.order_found["description"]
        assert result.status == "identical", result.comparison.max_ulp


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(8, 3, padding="same", name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
            L.GlobalAveragePooling2D(name="pool"),
            L.Dense(4, name="head"),
        ]
    )


def test_cache_is_reused_and_can_be_bypassed(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDIFF_CACHE_DIR", str(tmp_path))
    model = _model()
    x = np.random.default_rng(4).standard_normal((2, 10, 10, 3)).astype("float32")
    first = compare(model, x, order="auto", layers=["conv", "head"])
    again = compare(model, x, order="auto", layers=["conv", "head"])
    fresh = compare(model, x, order="auto", layers=["conv", "head"], cache=False)
    for a, b, c in zip(first.layers, again.layers, fresh.layers, strict=True):
        assert not a.order_found["cached"] and a.order_found["probe_calls"] > 0
        assert b.order_found["cached"] and b.order_found["probe_calls"] == 0
        assert not c.order_found["cached"]
        assert a.order_found["trees"] == b.order_found["trees"] == c.order_found["trees"]
        assert a.status == b.status == c.status == "identical"
    entries = list((tmp_path / "trees").glob("*.json"))
    assert len(entries) == 2
    stored = json.loads(entries[0].read_text())
    assert stored["key"]["machine"] == treecache.machine_key()
    assert stored["key"]["machine"]["convdiff"] == convdiff.__version__
    assert stored["key"]["machine"]["device"] == "cpu"
    # another batch is another problem: revealed again
    other = compare(model, x[:1], order="auto", layers=["conv"])
    assert not other.layers[0].order_found["cached"]
    # another runtime (op determinism on) is another key: revealed again, not read
    strict = compare(model, x, order="auto", layers=["conv"], deterministic=True)
    assert not strict.layers[0].order_found["cached"]
    assert len(list((tmp_path / "trees").glob("*.json"))) == 4


def test_normalization_over_several_axes_is_named():
    """LayerNormalization's statistics (over a list of axes) are reductions auto does not
    probe: named, in the default run as under --order auto (a regression: counting them
    failed on a list of axes)."""
    model = keras.Sequential(
        [keras.Input((6, 6, 8)), L.LayerNormalization(axis=[1, 3]), L.LayerNormalization()]
    )
    x = np.random.default_rng(7).standard_normal((2, 6, 6, 8)).astype("float32")
    report = compare(model, x)
    assert report.settings["order"] == "auto"
    for r in report.layers:
        assert r.status in ("identical", "rounding"), r.reason
        assert r.order_found["status"] == "not revealed"
        assert r.order_found["description"].startswith("2 reductions not probed by auto")


def test_layers_without_a_tree_are_named():
    model = _model()
    x = np.random.default_rng(5).standard_normal((1, 10, 10, 3)).astype("float32")
    autoorder.modelled_functions.cache_clear()
    report = compare(model, x, order="auto")
    # no layer uses a function convdiff models (sigmoid): the models were not checked
    assert autoorder.modelled_functions.cache_info().misses == 0
    found = {r.name: r.order_found for r in report.layers}
    assert found["bn"]["status"] == "not a tree" and "rsqrt" in found["bn"]["description"]
    assert found["pool"]["status"] == "not revealed"
    assert found["relu"] is None
    assert found["conv"]["status"] == found["head"]["status"] == "reproduced"


def test_a_layer_problem_is_counted_once_per_process():
    """auto counts the reductions and functions of a layer it does not probe once per kernel
    and layer problem: layers that differ only in name share the count; another config,
    input shape or dtype is counted again, and each finding is what a count of its own says."""
    calls = []
    bn_kernel = find_kernel(L.BatchNormalization, vars(L))

    def counting(spec, inputs, arithmetic):
        calls.append(spec.name)
        return bn_kernel(spec, inputs, arithmetic)

    def finding(layer, shape):
        layer.build(shape)
        return autoorder._unrevealed(counting, layer_spec(layer), [shape])

    first = finding(L.BatchNormalization(name="bn_a"), (2, 5, 5, 4))
    same = finding(L.BatchNormalization(name="bn_b"), (7, 5, 5, 4))  # another batch only
    assert calls == ["bn_a"] and same == first
    assert first.status == "not a tree" and "rsqrt" in first.text
    finding(L.BatchNormalization(name="bn_c", epsilon=0.1), (2, 5, 5, 4))
    finding(L.BatchNormalization(name="bn_d"), (2, 5, 5, 6))
    finding(L.BatchNormalization(name="bn_e", dtype="float64"), (2, 5, 5, 4))
    assert calls == ["bn_a", "bn_c", "bn_d", "bn_e"]
    # LayerNormalization's two reductions, counted by its own kernel
    ln = L.LayerNormalization(name="ln")
    ln.build((2, 5, 5, 4))
    ln_kernel = find_kernel(L.LayerNormalization, vars(L))
    counted = autoorder._unrevealed(ln_kernel, layer_spec(ln), [(2, 5, 5, 4)])
    assert counted.text.startswith("2 reductions not probed by auto")


def test_the_checks_random_input_is_drawn_once_per_shape_with_the_same_numbers_and_rows():
    """verify and verify_stage draw a standard-normal input from their seed, then sample rows
    from the same generator. The last input drawn is handed out again: the same numbers, the
    generator where a new draw leaves it, read-only, and one input held at a time."""

    def fresh(shape, dtype, seed):
        rng = np.random.default_rng(seed)
        return rng.standard_normal(shape, dtype=dtype), rng

    for shape, dtype, seed in [
        ((2, 6, 6, 3), np.float32, 0),
        ((2, 6, 6, 3), np.float32, 0),
        ((2, 6, 6, 3), np.float64, 0),
        ((2, 6, 6, 3), np.float64, 5),
        ((1, 4, 3), np.float64, 5),
        ((1, 4, 3), np.float64, 5),
    ]:
        held = autoorder._LAST_INPUT[0]
        x, rng = autoorder._random_input(shape, dtype, seed)
        want, want_rng = fresh(shape, dtype, seed)
        assert x.dtype == want.dtype and x.shape == want.shape
        np.testing.assert_array_equal(x, want)
        assert not x.flags.writeable
        # the rows sampled next are a fresh draw's
        np.testing.assert_array_equal(rng.integers(0, 1 << 30, 8), want_rng.integers(0, 1 << 30, 8))
        reused = held is not None and held[0] == (shape, np.dtype(dtype).str, seed)
        assert (x is held[1]) if reused else (held is None or x is not held[1])
    assert autoorder._LAST_INPUT[0][1] is x  # one input held, the last one


def test_order_all_tries_auto_first():
    assert orders_to_try()[0].name == "auto"
    model = _model()
    x = np.random.default_rng(6).standard_normal((1, 10, 10, 3)).astype("float32")
    report = compare(model, x, order="all", layers=["conv"])
    (result,) = report.layers
    assert result.orders[0]["order"] == "auto" and result.orders[0]["bit_exact"]
    assert result.status == "identical"


def test_cli_names_the_order_found(examples, tmp_path):
    from click.testing import CliRunner

    from convdiff.cli import cli

    args = [str(examples / "one_layer.h5"), str(examples / "one_layer_input.npy")]
    result = CliRunner().invoke(cli, [*args, "--order", "auto", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "Order: conv2d: " in result.stdout and "[reproduced]" in result.stdout
    out = tmp_path / "r.json"
    CliRunner().invoke(cli, [*args, "--order", "auto", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["order"] == "auto" and report["settings"]["cache"] is True
    assert report["layers"][0]["order_found"]["status"] == "reproduced"
    assert report["layers"][0]["status"] == "identical"


def test_layers_with_one_finding_share_one_line(examples, tmp_path, fresh_tree_cache):
    """A deep model repeats a few problems: the terminal says each finding once, naming its
    layers (deep8's conv1-conv7 are one problem, conv0 another); the JSON keeps every
    layer's own ``order_found``."""
    from click.testing import CliRunner

    from convdiff.cli import cli

    out = tmp_path / "r.json"
    args = [str(examples / "deep8.keras"), str(examples / "deep8_input.npy"), "--order", "auto"]
    result = CliRunner().invoke(cli, [*args, "--json", str(out)])
    assert result.exit_code in (0, 1), result.output
    found = [layer["order_found"] for layer in json.loads(out.read_text())["layers"]]
    assert len(found) == 8 and all(found)
    distinct = {(f["description"], f["status"]) for f in found}
    text = " ".join(result.stdout.split())  # lines longer than the width are wrapped
    assert text.count("Order: ") == len(distinct) < len(found)
    grouped = f"Order: conv1, conv2, conv3 and 4 more (7 layers): {found[1]['description']} ["
    assert grouped + f"{found[1]['status']}]" in text, text
    # the run's cost stays in the JSON: conv1 revealed its problem, conv2-conv7 read it
    assert found[1]["probe_calls"] > 0 and not found[1]["cached"]
    assert all(f["cached"] and f["probe_calls"] == 0 for f in found[2:])


@pytest.mark.slow
def test_xception_middle_flow_separable_conv():
    """Xception's middle-flow SeparableConv2D (19x19x728, 728 filters). On an AVX2 CPU with
    oneDNN off, output channels 720-727 add each 248-term slice as two interleaved chains:
    revealed through those 8 channels only, which takes more probe calls than one budget."""
    shape = (1, 19, 19, 728)
    layer = _layer(lambda: L.SeparableConv2D(728, 3, padding="same", use_bias=False), shape)
    kernel = find_kernel(type(layer), vars(keras.layers))
    found, mismatches = autoorder.reveal_layer(layer, kernel, layer_spec(layer), shape)
    assert mismatches == 0, [r.tree.describe() for _, r in found]


SQUEEZE_EXCITE = [
    # EfficientNet's se_reduce (swish) and se_expand (sigmoid): 1x1 convolutions of a pooled
    # map; 18 outputs leave a tail of 2 after Eigen's packets of 8, which takes its scalar path
    pytest.param(lambda: L.Conv2D(6, 1, activation="swish"), (3, 1, 1, 144), id="se-reduce"),
    pytest.param(lambda: L.Conv2D(96, 1, activation="sigmoid"), (2, 1, 1, 24), id="se-expand"),
]


@pytest.mark.parametrize(("make", "shape"), SQUEEZE_EXCITE)
def test_auto_models_tensorflows_sigmoid(make, shape):
    """The sum reproduced, and the activation too: Eigen's float32 logistic, modelled where
    it matches TensorFlow here (the correctly rounded sigmoid differs by a few ULPs)."""
    layer = _layer(make, shape)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    x = (np.random.default_rng(7).standard_normal(shape) * 3).astype("float32")
    (result,) = compare(model, x, order="auto", cache=False).layers
    found = result.order_found
    assert found["status"] == "reproduced"
    if "sigmoid" not in autoorder.modelled_functions():
        pytest.skip("Eigen's logistic model does not match this TensorFlow build")
    assert found["functions_modelled"] == ["sigmoid"]
    assert "sigmoid is TensorFlow's own float32 algorithm" in found["description"]
    assert result.status == "identical", (found, result.comparison.max_ulp)


def test_activation_layer_sigmoid_is_modelled():
    shape = (2, 9, 9, 5)  # 810 values: packets and a tail of 2
    model = keras.Sequential([keras.Input(shape[1:]), L.Activation("sigmoid", name="act")])
    x = (np.random.default_rng(8).standard_normal(shape) * 5).astype("float32")
    (result,) = compare(model, x, order="auto", cache=False).layers
    assert result.order_found["status"] == "not a tree"
    assert result.order_found["functions_modelled"] == list(autoorder.modelled_functions())
    if result.order_found["functions_modelled"]:
        assert result.status == "identical", result.comparison.max_ulp


def test_unmodelled_activation_after_a_reproduced_sum_is_named():
    layer = _layer(lambda: L.Dense(10, activation="tanh"), (1, 40))
    model = keras.Sequential([keras.Input((40,)), layer])
    x = np.random.default_rng(9).standard_normal((1, 40)).astype("float32")
    (result,) = compare(model, x, order="auto", cache=False).layers
    found = result.order_found
    assert found["status"] == "reproduced" and found["functions_modelled"] == []
    assert "tanh is TensorFlow's own approximation" in found["description"]
    assert "the sum is reproduced" in found["description"]


@pytest.mark.parametrize(
    ("make", "shape", "in_rows"),
    [
        (lambda: keras.layers.Dense(6, use_bias=False), (3, 10), [True]),
        (lambda: keras.layers.Conv2D(4, 3, padding="same", use_bias=False), (2, 5, 5, 3), [True]),
        # the depthwise stage's kernel comes first; the pointwise one lies after it
        (lambda: keras.layers.SeparableConv2D(4, 3, use_bias=False), (1, 5, 5, 3), [True, False]),
    ],
)
def test_probe_weights_reach_the_kernel_as_through_the_index(make, shape, in_rows):
    """A Dense or Conv2D kernel takes the probe's weights in one strided copy; the answers
    are those of the general scatter through each term's weight index."""
    layer = make()
    layer.build(shape)
    spec = layer_spec(layer)
    kernel = find_kernel(type(layer), vars(keras.layers))
    reductions = autoorder.map_reductions(kernel, spec, shape)
    op = autoorder.raw_op(layer, spec.class_name)
    shapes = {k: tuple(v.shape) for k, v in autoorder._kernels(spec).items()}
    rng = np.random.default_rng(0)
    for i, (reduction, fast) in enumerate(zip(reductions, in_rows, strict=True)):
        passing = autoorder._pass_through(spec, i, reductions) if len(reductions) > 1 else {}
        backend = autoorder.LayerBackend(reduction, op, shape, shapes, np.dtype("float32"), passing)
        assert backend._in_rows is fast
        weights = rng.standard_normal((backend.terms, backend.columns - 1)).astype("float32")
        answers = backend.run(1.0, weights)
        backend.__dict__["_in_rows"] = False  # the general path
        np.testing.assert_array_equal(answers, backend.run(1.0, weights))
