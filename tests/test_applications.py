"""Keras Applications end to end through the CLI: real architectures, saved and loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convdiff.cli import cli

# Smallest input each application accepts with weights=None (keras.applications checks it);
# every other application accepts 32x32.
MIN_SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def _leaf_layers(model):
    """Every layer, nested models expanded (ConvNeXt's Sequential blocks)."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def randomize_constants(model, seed: int) -> None:
    """Replace weights that start as constants with random values: BatchNormalization's moving
    statistics, gamma and beta (mean 0, variance 1, gamma 1 and beta 0 hide formula errors),
    LayerNormalization's gamma and beta, ConvNeXt's LayerScale (1e-6 would make every
    residual branch vanish) and every bias (zeros hide a missing bias)."""
    rng = np.random.default_rng(seed)
    draws = {
        "gamma": lambda n: rng.uniform(0.5, 1.5, n),
        "beta": lambda n: rng.normal(0.0, 0.5, n),
        "moving_mean": lambda n: rng.normal(0.0, 0.5, n),
        "moving_variance": lambda n: rng.uniform(0.2, 2.0, n),
        "bias": lambda n: rng.normal(0.0, 0.1, n),
    }
    for layer in _leaf_layers(model):
        for variable in layer.weights:
            name = variable.name
            if type(layer).__name__ == "LayerScale":
                name = "layer_scale"
                draw = rng.uniform(0.2, 1.0, variable.shape)
            elif name in draws and len(variable.shape) == 1:
                draw = draws[name](variable.shape[0])
            else:
                continue
            variable.assign(draw.astype(variable.dtype))


def build_application(name: str, size: int | None = None, seed: int = 1):
    """``keras.applications.<name>`` with weights=None at ``size`` (its smallest by default),
    its constant-initialized weights randomized."""
    import keras

    keras.utils.set_random_seed(seed)
    size = size or MIN_SIZES.get(name, 32)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    randomize_constants(model, seed)
    return model


# --------------------------------------------------------------------------- saved once per session


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """``saved(name)``: the application built once (randomized) and saved as .h5 and .keras."""
    directory = tmp_path_factory.mktemp("applications")
    cache: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in cache:
            model = build_application(name)
            cache[name] = {ext: directory / f"{name}.{ext}" for ext in ("h5", "keras")}
            for path in cache[name].values():
                model.save(path)
            keras_module().backend.clear_session()
        return cache[name]

    return get


def keras_module():
    import keras

    return keras


def run_cli(path: Path, mode: str) -> dict:
    """``convdiff PATH --random-input --mode MODE --json -``; the parsed report."""
    result = CliRunner().invoke(
        cli, [str(path), "--random-input", "--seed", "3", "--mode", mode, "--json", "-"]
    )
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, (result.exit_code, result.stderr[-2000:], result.stdout[-2000:])
    return json.loads(result.stdout)


def assert_all_explained(report: dict) -> None:
    """Every layer identical or rounding: none divergent, none skipped, no error."""
    bad = [
        (row["name"], row["class"], row["status"], row["reason"])
        for row in report["layers"]
        if row["status"] not in ("identical", "rounding")
    ]
    assert not bad, bad
    assert report["passed"] is True and report["first_divergent"] is None


# --------------------------------------------------------------------------- the zoo, via the CLI

# Keras 3 writes these applications to .h5 in a form its own .h5 loader rejects: Keras-internal
# classes (LayerScale, CustomScaleLayer) and keras.ops nodes (``x + 3.0``) are stored without
# their module. convdiff's loader has to bridge it (see issue 4).
H5_NOT_LOADABLE = {"ConvNeXtTiny", "InceptionResNetV2", "MobileNetV3Small"}
# ``x + 3.0`` in MobileNetV3's hard sigmoid: the kernel needs the constant, which the graph
# does not hand to kernels yet (``spec.config["call_args"]``, see issue 4).
CONSTANT_OPERANDS = {"MobileNetV3Small"}

FAST = ["MobileNetV2", "MobileNetV3Small", "EfficientNetB0", "VGG16", "ResNet50"]
SLOW = ["ConvNeXtTiny", "DenseNet121", "InceptionResNetV2", "NASNetMobile", "Xception"]


def _known_gap(name: str, ext: str) -> list:
    if ext == "h5" and name in H5_NOT_LOADABLE:
        reason = f"Keras 3 cannot reload its own .h5 of {name} without a loader bridge"
    elif name in CONSTANT_OPERANDS:
        reason = f"{name}'s keras.ops nodes with a constant operand need call_args in the spec"
    else:
        return []
    return [pytest.mark.xfail(reason=reason, strict=True)]


def _cases(names: list[str], combos: list[tuple[str, str]], slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [
        pytest.param(
            name, ext, mode, marks=marks + _known_gap(name, ext), id=f"{name}-{ext}-{mode}"
        )
        for name in names
        for ext, mode in combos
    ]


# The fast models run from both files in both modes; the slow ones once from each file, each
# file in another mode, so that both files and both modes are still covered per model.
ALL_COMBOS = [(ext, mode) for ext in ("h5", "keras") for mode in ("isolated", "propagated")]
CASES = _cases(FAST, ALL_COMBOS, False) + _cases(
    SLOW, [("keras", "isolated"), ("h5", "propagated")], True
)


@pytest.mark.parametrize(("name", "ext", "mode"), CASES)
def test_application_every_layer_explained(saved, name, ext, mode):
    report = run_cli(saved(name)[ext], mode)
    assert_all_explained(report)
    assert len(report["layers"]) > 20
    assert report["settings"]["mode"] == mode


def test_nested_sequential_blocks_are_expanded(saved):
    """ConvNeXt's stem and downsampling blocks are nested Sequential models: their layers are
    rows of their own, and its Keras-internal LayerScale layers are compared."""
    report = run_cli(saved("ConvNeXtTiny")["keras"], "isolated")
    names = {row["name"]: row for row in report["layers"]}
    assert "convnext_tiny_stem/convnext_tiny_stem_conv" in names
    assert "convnext_tiny_downsampling_block_0/convnext_tiny_downsampling_conv_0" in names
    scales = [row for row in report["layers"] if row["class"] == "LayerScale"]
    assert scales and all(row["status"] in ("identical", "rounding") for row in scales)


# --------------------------------------------------------------------------- mixed precision


def small_cnn(keras):
    L = keras.layers
    x = keras.Input((12, 12, 3))
    y = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = L.BatchNormalization()(y)
    z = L.DepthwiseConv2D(3, padding="same")(y)
    y = L.Add()([y, z])
    y = L.SeparableConv2D(12, 3, strides=2, activation="swish")(y)
    y = L.LayerNormalization()(y)
    y = L.MaxPooling2D()(y)
    y = L.GlobalAveragePooling2D()(y)
    y = L.Dense(16, activation="gelu")(y)
    y = L.Dense(10)(y)
    # the usual mixed-precision head: softmax in float32
    return keras.Model(x, L.Activation("softmax", dtype="float32")(y), name="small_cnn")


@pytest.fixture(scope="session")
def saved_mixed(tmp_path_factory):
    """``saved_mixed(name, policy)``: a model built under a mixed-precision dtype policy (the
    global policy is reset to float32 straight after), saved as .h5 and .keras."""
    directory = tmp_path_factory.mktemp("mixed")
    cache: dict[tuple[str, str], dict[str, Path]] = {}

    def get(name: str, policy: str) -> dict[str, Path]:
        keras = keras_module()
        if (name, policy) not in cache:
            keras.mixed_precision.set_dtype_policy(policy)
            try:
                if name == "small_cnn":
                    keras.utils.set_random_seed(4)
                    model = small_cnn(keras)
                    randomize_constants(model, 4)
                else:
                    model = build_application(name)
            finally:
                keras.mixed_precision.set_dtype_policy("float32")
            paths = {ext: directory / f"{name}.{policy}.{ext}" for ext in ("h5", "keras")}
            for path in paths.values():
                model.save(path)
            cache[name, policy] = paths
        return cache[name, policy]

    return get


# runner._judge treats only dtype kind "f" as floating: bfloat16 (kind "V") layers that are not
# bit-identical get no verdict ("skipped"), see issue 4.
BFLOAT16_VERDICT = pytest.mark.xfail(
    reason="bfloat16 outputs are not recognised as floating by the runner's verdict",
    strict=False,
)

MIXED = [
    pytest.param(name, policy, ext, mode, marks=marks, id=f"{name}-{policy}-{ext}-{mode}")
    for name, combos, slow in (
        ("small_cnn", ALL_COMBOS, False),
        ("MobileNetV2", [("keras", "isolated"), ("h5", "propagated")], True),
    )
    for policy in ("mixed_float16", "mixed_bfloat16")
    for ext, mode in combos
    for marks in [
        ([pytest.mark.slow] if slow else []) + ([BFLOAT16_VERDICT] if "bfloat" in policy else [])
    ]
]


@pytest.mark.parametrize(("name", "policy", "ext", "mode"), MIXED)
def test_mixed_precision_compared_in_compute_dtype(saved_mixed, name, policy, ext, mode):
    report = run_cli(saved_mixed(name, policy)[ext], mode)
    assert keras_module().mixed_precision.dtype_policy().name == "float32"
    assert_all_explained(report)
    # every layer computes, and is counted in ULPs, in the half dtype; small_cnn's head is float32
    expected = [policy.removeprefix("mixed_")] * len(report["layers"])
    if name == "small_cnn":
        expected[-1] = "float32"
    assert [row["dtype"] for row in report["layers"]] == expected
