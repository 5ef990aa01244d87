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


def application_images(name: str, count: int, seed: int, size: int | None = None) -> np.ndarray:
    """Random images as ``keras.applications.<name>`` expects them: pixels uniform in 0..255,
    through the application's own ``preprocess_input`` (caffe, torch or [-1, 1] scaling; the
    identity for the models that rescale inside)."""
    import importlib

    import keras

    size = size or MIN_SIZES.get(name, 32)
    module = importlib.import_module(getattr(keras.applications, name).__module__)
    pixels = np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3))
    return np.asarray(module.preprocess_input(pixels.astype("float32")), dtype="float32")


def randomize_constants(model, seed: int, images: np.ndarray | None = None) -> None:
    """Replace weights that start as constants with random values (the defaults hide formula
    errors: mean 0, variance 1, gamma 1, beta 0, zero biases; a LayerScale of 1e-6 makes every
    ConvNeXt residual branch vanish).

    BatchNormalization's moving statistics are the statistics of ``images`` (standard normal
    ones by default), set by one training-mode pass at momentum 0 with dropout off: random,
    distinct per channel, and consistent with the activations. Statistics drawn independently
    of the data make activations grow through a hundred layers until the final softmax
    saturates (features of 4e4 in EfficientNetB6 at 32x32) and the bounds become vacuous.
    """
    rng = np.random.default_rng(seed)
    draws = {
        "gamma": lambda shape: rng.uniform(0.5, 1.5, shape),
        "beta": lambda shape: rng.normal(0.0, 0.5, shape),
        "bias": lambda shape: rng.normal(0.0, 0.1, shape),
        "mean": lambda shape: rng.normal(0.0, 0.5, shape),  # Normalization (not adapted)
        "variance": lambda shape: rng.uniform(0.5, 2.0, shape),
    }
    for layer in _leaf_layers(model):
        for variable in layer.weights:
            if type(layer).__name__ == "LayerScale":
                draw = rng.uniform(0.2, 1.0, variable.shape)
            elif variable.name in draws and len(variable.shape) == 1:
                draw = draws[variable.name](variable.shape)
            else:
                continue
            variable.assign(draw.astype(variable.dtype))
    if images is None:
        images = rng.standard_normal((8, *model.inputs[0].shape[1:])).astype("float32")
    _calibrate_batch_normalization(model, images)


def _calibrate_batch_normalization(model, images: np.ndarray) -> None:
    layers = list(_leaf_layers(model))
    norms = [layer for layer in layers if type(layer).__name__ == "BatchNormalization"]
    # training mode without dropout: the statistics of the inference-time activations
    dropouts = [layer for layer in layers if type(layer).__name__ == "Dropout"]
    saved = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    for layer in norms:
        layer.momentum = 0.0
    for layer in dropouts:
        layer.rate = 0.0
    if norms:
        model(images, training=True)
    for layer, rate in zip(dropouts, saved[1], strict=True):
        layer.rate = rate
    for layer, momentum in zip(norms, saved[0], strict=True):
        layer.momentum = momentum
        # a channel constant on the calibration batch (dead ReLU, zero padding) would amplify
        # anything by 1/sqrt(epsilon): floor its variance at a twentieth of the median
        variance = np.asarray(layer.moving_variance)
        layer.moving_variance.assign(np.maximum(variance, 0.05 * np.median(variance) + 1e-6))


def application_input(name: str, size: int | None = None) -> np.ndarray:
    """The one image every comparison of ``name`` runs on (shape (1, size, size, 3))."""
    return application_images(name, 1, 2026, size)


def build_application(name: str, size: int | None = None, seed: int = 1):
    """``keras.applications.<name>`` with weights=None at ``size`` (its smallest by default),
    its constant-initialized weights randomized, its batch statistics calibrated on 64 images
    that include :func:`application_input` (at 32x32 the last stages are 1x1: statistics
    from other images alone drift away from the compared image's, layer after layer)."""
    import keras

    keras.utils.set_random_seed(seed)
    size = size or MIN_SIZES.get(name, 32)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    images = [application_input(name, size), application_images(name, 63, seed + 1000, size)]
    randomize_constants(model, seed, np.concatenate(images))
    return model


# --------------------------------------------------------------------------- saved once per session


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """``saved(name)``: the application built once (randomized), saved as .h5 and .keras, and
    the image it is compared on, as .npy (keys ``h5``, ``keras``, ``input``)."""
    directory = tmp_path_factory.mktemp("applications")
    cache: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in cache:
            model = build_application(name)
            paths = {ext: directory / f"{name}.{ext}" for ext in ("h5", "keras")}
            for path in paths.values():
                model.save(path)
            paths["input"] = directory / f"{name}.npy"
            np.save(paths["input"], application_input(name))
            keras_module().backend.clear_session()
            cache[name] = paths
        return cache[name]

    return get


def keras_module():
    import keras

    return keras


def run_cli(path: Path, mode: str, image: Path | None = None) -> dict:
    """``convdiff PATH IMAGE --mode MODE --json -`` (``--random-input`` without an image);
    the parsed report."""
    source = [str(image)] if image else ["--random-input", "--seed", "3"]
    result = CliRunner().invoke(cli, [str(path), *source, "--mode", mode, "--json", "-"])
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

FAST = ["MobileNetV2", "MobileNetV3Small", "EfficientNetB0", "VGG16", "ResNet50"]
SLOW = ["ConvNeXtTiny", "DenseNet121", "InceptionResNetV2", "NASNetMobile", "Xception"]


def _cases(names: list[str], combos: list[tuple[str, str]], slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [
        pytest.param(name, ext, mode, marks=marks, id=f"{name}-{ext}-{mode}")
        for name in names
        for ext, mode in combos
    ]


# Every model from both files, in both modes; the slow ones (5 to 20 s a run on 2 cores) are
# marked so that a quick local run can leave them out (CI runs them).
ALL_COMBOS = [(ext, mode) for ext in ("h5", "keras") for mode in ("isolated", "propagated")]
CASES = _cases(FAST, ALL_COMBOS, False) + _cases(SLOW, ALL_COMBOS, True)


@pytest.mark.parametrize(("name", "ext", "mode"), CASES)
def test_application_every_layer_explained(saved, name, ext, mode):
    report = run_cli(saved(name)[ext], mode, saved(name)["input"])
    assert_all_explained(report)
    assert len(report["layers"]) > 20
    assert report["settings"]["mode"] == mode


def test_nested_sequential_blocks_are_expanded(saved):
    """ConvNeXt's stem and downsampling blocks are nested Sequential models: their layers are
    rows of their own, and its Keras-internal LayerScale layers are compared."""
    files = saved("ConvNeXtTiny")
    report = run_cli(files["keras"], "isolated", files["input"])
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
            if name != "small_cnn":
                paths["input"] = directory / f"{name}.{policy}.npy"
                np.save(paths["input"], application_input(name))
            cache[name, policy] = paths
        return cache[name, policy]

    return get


MIXED = [
    pytest.param(
        name,
        policy,
        ext,
        mode,
        marks=[] if name == "small_cnn" else [pytest.mark.slow],
        id=f"{name}-{policy}-{ext}-{mode}",
    )
    for name in ("small_cnn", "MobileNetV2")
    for policy in ("mixed_float16", "mixed_bfloat16")
    for ext, mode in ALL_COMBOS
]


@pytest.mark.parametrize(("name", "policy", "ext", "mode"), MIXED)
def test_mixed_precision_compared_in_compute_dtype(saved_mixed, name, policy, ext, mode):
    files = saved_mixed(name, policy)
    report = run_cli(files[ext], mode, files.get("input"))
    assert keras_module().mixed_precision.dtype_policy().name == "float32"
    assert_all_explained(report)
    # every layer computes, and is counted in ULPs, in the half dtype; small_cnn's head is float32
    expected = [policy.removeprefix("mixed_")] * len(report["layers"])
    if name == "small_cnn":
        expected[-1] = "float32"
    assert [row["dtype"] for row in report["layers"]] == expected
