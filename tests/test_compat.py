"""Keras 2 (tf-keras) .h5 files loaded through convdiff.compat: real files written by tf-keras
in one subprocess (tests/model_zoo.py, the ``keras2_dir`` fixture; the two Keras versions never
share a process), with the tf-keras model's output on a fixed input saved beside each file, so
that each fix-up is checked end to end: plain Keras 3 fails on the file, convdiff loads it, and
the loaded model computes what tf-keras computed.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from model_zoo import BUILDERS, KERAS2_SCRIPT
from support import keras2_writer

from convdiff import compat
from convdiff.errors import ModelLoadError
from convdiff.loading import load_model

keras2_writer("zoo", KERAS2_SCRIPT)

# Which case needs which fix-up (the case fails without it).
FIXUP_CASES = {
    "drop_conv_groups": "depthwise_transpose",
    "drop_separable_kernel_arguments": "separable",
    "dtype_policy_name": "mixed_float16",
    "thresholded_relu_as_relu": "thresholded_relu",
    "rnn_time_major": "lstm",
    "spatial_dropout_arguments": "spatial_dropout",
    "renumber_nested_model_nodes": "zoo_nested",
    "unwrap_single_inputs_outputs": "functional_in_sequential",
}
# Fix-ups checked by their own tests below: refusals and a rename Keras 3 also does.
OTHER_FIXUPS = {"refuse_hard_sigmoid", "refuse_virtual_batch_size", "leaky_relu_negative_slope"}
NESTED = ["nested_sequential_output", "nested_functional_shared"]
LOADABLE = [*FIXUP_CASES.values(), "leaky_relu", *NESTED] + [
    f"zoo_{name}" for name in BUILDERS if f"zoo_{name}" not in FIXUP_CASES.values()
]


def _arrays(directory: Path, name: str, prefix: str) -> list[np.ndarray]:
    with np.load(directory / f"{name}.npz") as data:
        return [data[f"{prefix}{i}"] for i in range(len(data.files)) if f"{prefix}{i}" in data]


def _outputs(model, directory: Path, name: str) -> list[np.ndarray]:
    xs = _arrays(directory, name, "x")
    ys = model(xs if len(xs) > 1 else xs[0], training=False)
    ys = ys if isinstance(ys, list | tuple) else [ys]
    return [np.asarray(y, dtype="float32") for y in ys]


def _plain_keras_load(path: Path):
    import keras

    return keras.saving.load_model(path, compile=False)


@pytest.mark.parametrize("name", sorted(set(FIXUP_CASES.values()) - {"zoo_nested"}))
def test_plain_keras3_fails_on_the_case(keras2_dir, name):
    with pytest.raises(Exception):  # noqa: B017 - Keras raises TypeError, ValueError, ...
        _plain_keras_load(keras2_dir / f"{name}.h5")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("zoo_sequential_cnn", "deserializing class 'DepthwiseConv2D'"),
        ("zoo_nested", "Invalid Functional model configuration"),
        ("nested_functional_shared", "Invalid Functional model configuration"),
        ("nested_sequential_output", "list index out of range"),  # node 1 of a 1-node list
    ],
)
def test_plain_keras3_fails_on_nested_models(keras2_dir, name, message):
    with pytest.raises(Exception, match=message):
        _plain_keras_load(keras2_dir / f"{name}.h5")


@pytest.mark.parametrize("name", LOADABLE)
def test_loads_and_computes_what_tf_keras_computed(keras2_dir, name):
    model = load_model(keras2_dir / f"{name}.h5")
    expected = _arrays(keras2_dir, name, "y")
    got = _outputs(model, keras2_dir, name)
    assert len(got) == len(expected)
    for y, e in zip(got, expected, strict=True):
        if _has_batch_norm(model) and name.startswith("zoo_"):
            # tf-keras runs the fused FusedBatchNormV3 kernel on 4-D input, Keras 3 the ops of
            # tf.nn.batch_normalization (x * (gamma * rsqrt(var + eps)) + (beta - mean * ...)):
            # the same weights give results about 1 float32 ulp apart (1.2e-7 measured).
            # Wrong weights or a wrong axis are far outside this.
            np.testing.assert_allclose(y, e, rtol=2e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(y, e)


def _all_layers(model) -> list:
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_all_layers(layer))
    return layers


def _has_batch_norm(model) -> bool:
    return any(type(layer).__name__ == "BatchNormalization" for layer in _all_layers(model))


def test_every_fixup_has_a_case():
    names = {f.__name__ for f in (*compat.LAYER_FIXUPS, *compat.MODEL_FIXUPS)}
    assert names == set(FIXUP_CASES) | OTHER_FIXUPS


@pytest.mark.parametrize("fixup", sorted(FIXUP_CASES))
def test_the_case_needs_its_fixup(keras2_dir, monkeypatch, fixup):
    """Without the fix-up, its case does not load: the fix-up is what makes it work."""
    for table in ("LAYER_FIXUPS", "MODEL_FIXUPS"):
        kept = tuple(f for f in getattr(compat, table) if f.__name__ != fixup)
        monkeypatch.setattr(compat, table, kept)
    with pytest.raises(ModelLoadError, match="Keras could not load"):
        load_model(keras2_dir / f"{FIXUP_CASES[fixup]}.h5")


def test_leaky_relu_alpha_loads_without_the_deprecation_warning(keras2_dir):
    path = keras2_dir / "leaky_relu.h5"
    with pytest.warns(UserWarning, match="alpha"):
        _plain_keras_load(path)  # Keras 3 maps alpha itself, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(path)
    assert model.layers[0].negative_slope == pytest.approx(0.1)


def test_hard_sigmoid_is_refused_because_keras3_computes_another_function(keras2_dir):
    path = keras2_dir / "hard_sigmoid.h5"
    plain = _outputs(_plain_keras_load(path), keras2_dir, "hard_sigmoid")[0]
    assert not np.allclose(plain, _arrays(keras2_dir, "hard_sigmoid", "y")[0], atol=1e-3)
    with pytest.raises(ModelLoadError, match=r"hard_sigmoid.*clip\(0.2\*x \+ 0.5, 0, 1\)"):
        load_model(path)


def test_virtual_batch_size_is_refused_by_name(keras2_dir):
    with pytest.raises(ModelLoadError, match="uses virtual_batch_size"):
        load_model(keras2_dir / "virtual_batch.h5")


def test_keras2_lambda_is_refused_in_safe_mode(keras2_dir):
    with pytest.raises(ModelLoadError, match="Lambda layer"):
        load_model(keras2_dir / "lambda.h5")


def test_keras2_lambda_loads_when_unsafe(keras2_dir):
    model = load_model(keras2_dir / "lambda.h5", unsafe=True)
    expected = _arrays(keras2_dir, "lambda", "y")[0]
    np.testing.assert_array_equal(_outputs(model, keras2_dir, "lambda")[0], expected)


def test_the_users_file_is_not_written(keras2_dir):
    path = keras2_dir / "zoo_nested.h5"
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    load_model(path)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


def test_keras3_files_are_not_keras2(tmp_path):
    import keras

    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Dense(2)(x))
    for ext in ("h5", "keras"):
        model.save(tmp_path / f"m.{ext}")
        assert compat.keras2_version(tmp_path / f"m.{ext}") is None


def test_keras2_version_is_read(keras2_dir):
    assert compat.keras2_version(keras2_dir / "separable.h5").startswith("2.")


def test_a_theano_file_is_refused(keras2_dir, tmp_path):
    path = tmp_path / "theano.h5"
    shutil.copy(keras2_dir / "separable.h5", path)
    with h5py.File(path, "r+") as f:
        f.attrs["backend"] = b"theano"
    with pytest.raises(ModelLoadError, match="'theano' backend"):
        load_model(path)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_compare_runs_on_every_zoo_model_written_by_keras2(keras2_dir, name):
    from convdiff.api import compare

    report = compare(keras2_dir / f"zoo_{name}.h5")
    assert report.layers, "no layer was compared"
    assert {layer.status for layer in report.layers} <= {"identical", "rounding", "skipped"}


# --------------------------------------------------------------------------- Keras 3's own .h5


def _ops_model():
    """``keras.ops`` arithmetic on symbolic tensors (MobileNetV3's hard sigmoid, ConvNeXt's
    residual), which Keras 3 records as operation nodes and writes to .h5 by bare class name."""
    import keras

    keras.utils.set_random_seed(5)
    x = keras.Input((4, 4, 3), name="x")
    y = keras.layers.Conv2D(3, 3, padding="same", name="conv")(x)
    gate = keras.layers.ReLU(6.0, name="relu6")(y + 3.0) * (1.0 / 6.0)
    return keras.Model(x, x + y * gate - 0.5, name="ops")


@pytest.fixture(scope="module")
def ops_files(tmp_path_factory) -> dict[str, Path]:
    model = _ops_model()
    directory = tmp_path_factory.mktemp("ops")
    files = {ext: directory / f"ops.{ext}" for ext in ("h5", "keras")}
    for path in files.values():
        model.save(path)
    np.save(directory / "x.npy", np.random.default_rng(0).normal(size=(2, 4, 4, 3)))
    files["expected"] = directory / "expected.npy"
    np.save(files["expected"], np.asarray(model(np.load(directory / "x.npy").astype("float32"))))
    return files


def test_plain_keras3_cannot_reload_its_own_h5_of_operations(ops_files):
    with pytest.raises(Exception, match="passed as a keyword argument"):
        _plain_keras_load(ops_files["h5"])


def test_operations_in_keras3_h5_load_and_compute_what_was_saved(ops_files):
    model = load_model(ops_files["h5"])
    x = np.load(ops_files["h5"].parent / "x.npy").astype("float32")
    np.testing.assert_array_equal(np.asarray(model(x)), np.load(ops_files["expected"]))


@pytest.mark.parametrize("ext", ["h5", "keras"])
def test_operation_constants_reach_the_kernels(ops_files, ext):
    """``y + 3.0``, ``* (1/6)`` and ``- 0.5`` are compared with their constants, not skipped."""
    from convdiff.api import compare

    report = compare(ops_files[ext], ops_files["h5"].parent / "x.npy")
    operations = [row for row in report.layers if row.class_name in ("Add", "Multiply", "Subtract")]
    assert len(operations) == 5
    assert {row.status for row in report.layers} <= {"identical", "rounding"}
    assert {row.dtype for row in operations} == {"float32"}
