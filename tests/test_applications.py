"""Keras Applications end to end: real architectures, saved as .h5 and .keras, loaded through
convdiff's checks and loader, every layer compared in both modes.

The file format only matters for loading: each model's two files are checked to load as the
same model (the same graph of layers, configs, dtypes and weights, the same output bits), and
its layers are compared, in both modes, on the model loaded from the .keras file. Each
architecture is built, saved and loaded once (a module-scoped fixture per architecture: pytest
runs its tests together and frees it before the next one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


# --------------------------------------------------------------------------- built and loaded once


@dataclass
class Application:
    """One model saved as .h5 and .keras and loaded back from each file.

    Attributes:
        name: the model's name in these tests.
        policy: the dtype policy it was built under.
        files: the saved files by extension (``h5``, ``keras``).
        models: the model loaded from each file through convdiff's checks and loader, its
            graph built (``convdiff.api.PreparedModel``).
        image: the input it is compared on, or None for ``--random-input`` (seed 3).
    """

    name: str
    policy: str
    files: dict[str, Path]
    models: dict[str, Any]
    image: np.ndarray | None
    _reports: dict[str, dict] = field(default_factory=dict)

    def report(self, mode: str) -> dict:
        """convdiff's JSON report on the model loaded from the .keras file, in ``mode``
        (computed once)."""
        if mode not in self._reports:
            from convdiff.api import compare
            from convdiff.report import to_json

            report = compare(self.models["keras"], self.image, mode=mode, seed=3)
            self._reports[mode] = json.loads(to_json(report))
        return self._reports[mode]


def save_and_load(
    directory: Path, name: str, model, image: np.ndarray | None, policy: str = "float32"
) -> Application:
    """``model`` saved as .h5 and .keras in ``directory``, each file loaded back through
    convdiff's model-file checks and loader (the in-memory model is not used again)."""
    from convdiff.api import prepare_model

    files = {ext: directory / f"{name}.{ext}" for ext in ("h5", "keras")}
    for path in files.values():
        model.save(path)
    models = {ext: prepare_model(path) for ext, path in files.items()}
    return Application(name, policy, files, models, image)


def keras_module():
    import keras

    return keras


def assert_all_explained(report: dict) -> None:
    """Every layer identical or rounding: none divergent, none skipped, no error."""
    bad = [
        (row["name"], row["class"], row["status"], row["reason"])
        for row in report["layers"]
        if row["status"] not in ("identical", "rounding")
    ]
    assert not bad, bad
    assert report["passed"] is True and report["first_divergent"] is None


def _graph_signature(graph) -> list[tuple]:
    """What convdiff reads from a loaded model's graph: every layer call, with its class,
    config, dtype, weights (as raw bytes, in order, by name) and wiring (tensors numbered in
    order of appearance, since their ids differ between two loads)."""
    numbers: dict[int, int] = {}

    def number(keys: list[int]) -> list[int]:
        return [numbers.setdefault(key, len(numbers)) for key in keys]

    rows: list[tuple] = [("inputs", number(graph.inputs), graph.input_names)]
    for node in graph.nodes:
        spec = node.spec()
        # an unnamed variable (LayerScale's) is numbered by a process-wide counter
        weights = [
            (_AUTO_NAMED.sub("variable", name), w.dtype.str, w.shape, w.tobytes())
            for name, w in spec.weights.items()
        ]
        inputs, outputs = number(node.inputs), number(node.outputs)
        rows.append((node.name, spec.class_name, spec.dtype, spec.config, weights, inputs, outputs))
    rows.append(("outputs", number(graph.outputs)))
    return rows


_AUTO_NAMED = re.compile(r"^variable(_\d+)?$")


def assert_files_hold_the_same_model(app: Application, image: np.ndarray) -> None:
    """The .h5 and the .keras file loaded as the same model: the same graph of layers,
    configs, dtypes and weights, and Keras gives the same output bits on ``image``."""
    h5, native = app.models["h5"].graph, app.models["keras"].graph
    h5_rows, native_rows = _graph_signature(h5), _graph_signature(native)
    assert len(h5_rows) == len(native_rows)
    for h5_row, native_row in zip(h5_rows, native_rows, strict=True):
        assert h5_row == native_row, (h5_row[:3], native_row[:3])
    outputs = [
        keras_module().ops.convert_to_numpy(g.model(image, training=False)) for g in (h5, native)
    ]
    assert outputs[0].dtype == outputs[1].dtype
    assert outputs[0].tobytes() == outputs[1].tobytes()


# --------------------------------------------------------------------------- the zoo

FAST = ["MobileNetV2", "MobileNetV3Small", "EfficientNetB0", "VGG16", "ResNet50"]
SLOW = ["ConvNeXtTiny", "DenseNet121", "InceptionResNetV2", "NASNetMobile", "Xception"]


# The slow ones (5 to 20 s a run on 2 cores) are marked so that a quick local run can leave
# them out (CI runs them).
@pytest.fixture(
    scope="module",
    params=FAST + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW],
)
def application(request, tmp_path_factory):
    """The architecture ``request.param`` built (randomized), saved and loaded back."""
    name = request.param
    model = build_application(name)
    yield save_and_load(tmp_path_factory.mktemp(name), name, model, application_input(name))
    keras_module().backend.clear_session()


def test_h5_and_keras_files_hold_the_same_model(application):
    assert_files_hold_the_same_model(application, application.image)


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
def test_application_every_layer_explained(application, mode):
    report = application.report(mode)
    assert_all_explained(report)
    assert len(report["layers"]) > 20
    assert report["settings"]["mode"] == mode


@pytest.mark.parametrize("application", ["ConvNeXtTiny"], indirect=True)
def test_nested_sequential_blocks_are_expanded(application):
    """ConvNeXt's stem and downsampling blocks are nested Sequential models: their layers are
    rows of their own, and its Keras-internal LayerScale layers are compared."""
    report = application.report("isolated")
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


MIXED = [
    pytest.param(
        (name, policy),
        marks=[] if name == "small_cnn" else [pytest.mark.slow],
        id=f"{name}-{policy}",
    )
    for name in ("small_cnn", "MobileNetV2")
    for policy in ("mixed_float16", "mixed_bfloat16")
]


@pytest.fixture(scope="module", params=MIXED)
def mixed(request, tmp_path_factory):
    """A model built under a mixed-precision dtype policy (the global policy is reset to
    float32 straight after), saved and loaded back. small_cnn runs on random input."""
    keras = keras_module()
    name, policy = request.param
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
    image = None if name == "small_cnn" else application_input(name)
    directory = tmp_path_factory.mktemp(f"{name}-{policy}")
    yield save_and_load(directory, name, model, image, policy)
    keras.backend.clear_session()


def test_mixed_precision_h5_and_keras_files_hold_the_same_model(mixed):
    image = mixed.image
    if image is None:
        image = np.random.default_rng(3).standard_normal((1, 12, 12, 3)).astype("float32")
    assert_files_hold_the_same_model(mixed, image)


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
def test_mixed_precision_compared_in_compute_dtype(mixed, mode):
    report = mixed.report(mode)
    assert keras_module().mixed_precision.dtype_policy().name == "float32"
    assert_all_explained(report)
    # every layer computes, and is counted in ULPs, in the half dtype; small_cnn's head is float32
    expected = [mixed.policy.removeprefix("mixed_")] * len(report["layers"])
    if mixed.name == "small_cnn":
        expected[-1] = "float32"
    assert [row["dtype"] for row in report["layers"]] == expected


@pytest.mark.parametrize(
    "mixed", [("small_cnn", "mixed_float16")], indirect=True, ids=["small_cnn-mixed_float16"]
)
def test_same_model_check_sees_one_changed_bit(mixed):
    """A negative control for the check above: one weight one ULP off is a different model."""
    variable = mixed.models["h5"].graph.model.layers[1].kernel
    saved = np.array(variable.numpy())
    changed = saved.copy()
    changed.flat[0] = np.nextafter(changed.flat[0], np.inf, dtype=changed.dtype)
    variable.assign(changed)
    try:
        with pytest.raises(AssertionError):
            assert_files_hold_the_same_model(mixed, np.zeros((1, 12, 12, 3), "float32"))
    finally:
        variable.assign(saved)
    assert_files_hold_the_same_model(mixed, np.zeros((1, 12, 12, 3), "float32"))
