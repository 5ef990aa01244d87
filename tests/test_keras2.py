"""Keras 2 .keras archives and SavedModel directories (convdiff.keras2, convdiff.savedmodel):
real files written by tf-keras, in the session's one tf-keras subprocess (conftest's
keras2_files; the two Keras versions never share a process). Each model is saved as .keras, as
a SavedModel and as .h5, and tf-keras's own loading of the .keras and SavedModel files is
recorded beside them, so that each weight convdiff assigns is checked against what tf-keras
itself reads from the same file, and each comparison against the one of the .h5 saved from the
same model.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from support import assert_error, keras2_writer, run_cli

from convdiff.errors import ModelLoadError
from convdiff.loading import load_model
from convdiff.modelfile import read_model_config

# Run by the subprocess below with ``k`` = tf_keras. Weights are drawn at random (biases too,
# and BatchNormalization's statistics) so that no weight can be left at its initial value
# unnoticed and no two layers' weights can be swapped unnoticed.
_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
import tf_keras as k
L = k.layers
out, tests = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
import model_zoo


def functional_mix():
    # every class the issue names, twice for some (conv2d_1: Keras 2 numbers its groups),
    # two frozen layers (their weights leave the trainable list)
    x = k.Input((10, 10, 3), name="img")
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(x)
    b = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise")(x)
    c = L.Concatenate(name="concat")([a, b])
    c = L.BatchNormalization(name="bn", trainable=False)(c)
    c = L.SeparableConv2D(6, 3, activation="tanh", name="separable")(c)
    c = L.MaxPooling2D(2, name="maxpool")(c)
    d = L.Conv2D(6, 1, name="conv_b", trainable=False)(c)
    e = L.AveragePooling2D(2, name="avgpool")(L.Concatenate(name="concat2")([c, d]))
    out = L.Dense(5, activation="softmax", name="dense")(L.Flatten(name="flatten")(e))
    return k.Model(x, out, name="functional_mix")


def mixed_float16():
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        return k.Sequential([k.Input((6, 6, 2)), L.Conv2D(3, 3), L.BatchNormalization(),
                             L.Flatten(), L.Dense(3), L.Activation("softmax", dtype="float32")])
    finally:
        k.mixed_precision.set_global_policy("float32")


def randomize(model, rng):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            randomize(layer, rng)
        elif layer.get_weights():
            positive = type(layer).__name__ == "BatchNormalization"  # variances
            layer.set_weights([
                (rng.uniform(0.2, 1.0, w.shape) if positive else rng.normal(0, 0.4, w.shape))
                .astype(w.dtype) for w in layer.get_weights()])


def weights(model, prefix=""):
    found = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found.update(weights(layer, prefix + layer.name + "/"))
        else:
            for i, w in enumerate(layer.get_weights()):
                found[f"{prefix}{layer.name}/{i}"] = w
    return found


builders = {name: (lambda name=name: model_zoo.build(name, k)) for name in model_zoo.BUILDERS}
builders.update(functional_mix=functional_mix, mixed_float16=mixed_float16,
                lambda_layer=lambda: k.Sequential([k.Input((4,)), L.Dense(3),
                                                   L.Lambda(lambda t: t * 2.0)]))
for name, build in builders.items():
    k.utils.set_random_seed(3)
    model = build()
    randomize(model, np.random.default_rng(11))
    base = os.path.join(out, name)
    model.save(base + ".keras")
    model.save(base + ".h5")
    model.save(base + "_savedmodel")
    unsafe = name == "lambda_layer"
    for ext in (".keras", "_savedmodel"):
        kw = {"safe_mode": False} if unsafe and ext == ".keras" else {}
        np.savez(f"{base}{ext}.weights.npz",
                 **weights(k.models.load_model(base + ext, compile=False, **kw)))


class Subclassed(k.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


sub = Subclassed()
sub(np.zeros((1, 3), "float32"))
sub.save(os.path.join(out, "subclassed_savedmodel"))
module = tf.Module()
module.v = tf.Variable([1.0, 2.0])
module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([2], tf.float32)])
tf.saved_model.save(module, os.path.join(out, "tf_module_savedmodel"))
"""

MODELS = ["sequential_cnn", "functional_branches", "multi_io", "nested", "functional_mix"]
FORMATS = [".keras", "_savedmodel"]


keras2_writer("formats", _SCRIPT)


@pytest.fixture(scope="session")
def k2(keras2_files) -> Path:
    """Every model above written by tf-keras, with what tf-keras loads back."""
    return keras2_files("formats")


def _weights(model, prefix: str = "") -> dict[str, np.ndarray]:
    found = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found.update(_weights(layer, f"{prefix}{layer.name}/"))
        else:
            for i, w in enumerate(layer.get_weights()):
                found[f"{prefix}{layer.name}/{i}"] = w
    return found


# --------------------------------------------------------------------------- faithful loading


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [*MODELS, "mixed_float16"])
def test_weights_are_what_tf_keras_loads(k2, name, fmt):
    model = load_model(k2 / f"{name}{fmt}")
    got = _weights(model)
    with np.load(k2 / f"{name}{fmt}.weights.npz") as expected:
        assert sorted(got) == sorted(expected.files)
        for key in expected.files:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_plain_keras3_fails_on_both_formats(k2):
    import keras

    for fmt in FORMATS:
        with pytest.raises(Exception):  # noqa: B017 - TypeError, ValueError, ...
            keras.saving.load_model(k2 / f"sequential_cnn{fmt}", compile=False)


def test_the_archive_needs_its_layout_fixup(k2, monkeypatch):
    """Without compat.archive_to_h5_layout, Keras 3's new deserializer gets the Keras 2
    entries of config.json and fails on them (BatchNormalization's axis list)."""
    from convdiff import compat

    monkeypatch.setattr(compat, "archive_to_h5_layout", lambda config: None)
    with pytest.raises(ModelLoadError, match=r"Keras could not load .*BatchNormalization"):
        load_model(k2 / "sequential_cnn.keras")


_H5_REPORTS: dict[str, list] = {}


def _rows(path: Path) -> list[tuple]:
    from convdiff.api import compare

    report = compare(path, None, seed=3)
    return [(r.name, r.class_name, r.status, r.to_dict()["max_ulp"]) for r in report.layers]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["sequential_cnn", "nested", "functional_mix"])
def test_same_verdicts_as_the_h5_of_the_same_model(k2, name, fmt):
    if name not in _H5_REPORTS:
        _H5_REPORTS[name] = _rows(k2 / f"{name}.h5")
    rows = _rows(k2 / f"{name}{fmt}")
    assert rows == _H5_REPORTS[name]
    assert {status for _, _, status, _ in rows} <= {"identical", "rounding"}
    assert len(rows) >= 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_runs_on_both_formats(k2, fmt):
    result = run_cli(k2 / f"functional_mix{fmt}", "--random-input")
    assert result.exit_code == 0, result.output
    assert "separable" in result.stdout and "SeparableConv2D" in result.stdout
    assert "PASS" in result.stdout


def test_the_users_files_are_not_written(k2):
    def digest(path: Path) -> list[tuple[str, str]]:
        files = sorted(p for p in [path, *path.rglob("*")] if p.is_file())
        return [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]

    paths = [k2 / "nested.keras", k2 / "nested_savedmodel"]
    before = [digest(p) for p in paths]
    for path in paths:
        load_model(path)
    assert [digest(p) for p in paths] == before


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("fmt", FORMATS)
def test_lambda_is_refused_in_safe_mode(k2, fmt):
    path = k2 / f"lambda_layer{fmt}"
    with pytest.raises(ModelLoadError, match="contains a Lambda layer"):
        load_model(path)
    assert_error(run_cli(path, "--random-input"), "Lambda layer", "--unsafe")


@pytest.mark.parametrize("fmt", FORMATS)
def test_lambda_loads_when_unsafe(k2, fmt):
    model = load_model(k2 / f"lambda_layer{fmt}", unsafe=True)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype("float32")
    dense = model.layers[0]
    kernel, bias = dense.get_weights()
    np.testing.assert_allclose(np.asarray(model(x)), 2.0 * (x @ kernel + bias), rtol=1e-6)


def test_the_savedmodel_graph_is_never_read(k2, tmp_path):
    """saved_model.pb (the traced TensorFlow functions) may be anything: it is not read."""
    path = tmp_path / "graphless"
    shutil.copytree(k2 / "sequential_cnn_savedmodel", path)
    (path / "saved_model.pb").write_bytes(b"not a graph")
    expected = _weights(load_model(k2 / "sequential_cnn_savedmodel"))
    got = _weights(load_model(path))
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_the_probe_reads_a_savedmodel_without_tensorflow(k2):
    code = (
        "import sys; from pathlib import Path; from convdiff import modelfile; "
        f"config = modelfile._inspect_model_file(Path({str(k2 / 'nested_savedmodel')!r})); "
        "assert config['class_name'] == 'Functional', config; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- refused files


def test_a_savedmodel_without_keras_metadata_says_how_it_was_saved(k2):
    path = k2 / "tf_module_savedmodel"
    message = "without keras_metadata.pb: it was saved with tf.saved_model.save"
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
    assert_error(run_cli(path, "--random-input"), "tf_module_savedmodel", message)


def test_a_subclassed_savedmodel_is_refused_by_name(k2):
    with pytest.raises(ModelLoadError, match="of the Keras class 'Subclassed' without a stored"):
        read_model_config(k2 / "subclassed_savedmodel")


def _savedmodel_copy(k2: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model_savedmodel"
    shutil.copytree(k2 / "functional_mix_savedmodel", path)
    return path


def _cut(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


_SHARD = "variables/variables.data-00000-of-00001"
_INDEX = "variables/variables.index"

DAMAGED_SAVEDMODELS = {
    "no data shard": (
        lambda p: (p / _SHARD).unlink(),
        "is incomplete: its checkpoint has no data shard variables.data-00000-of-00001",
    ),
    "no index": (
        lambda p: (p / _INDEX).unlink(),
        "is incomplete: it has no variables/variables.index",
    ),
    "no variables": (
        lambda p: shutil.rmtree(p / "variables"),
        "it has no variables/variables.index",
    ),
    "metadata cut short": (
        lambda p: _cut(p / "keras_metadata.pb"),
        "has a truncated or corrupt keras_metadata.pb",
    ),
    "metadata empty": (
        lambda p: _cut(p / "keras_metadata.pb", 0.0),
        "has an empty keras_metadata.pb",
    ),
    "index cut short": (
        lambda p: _cut(p / _INDEX),
        "truncated or corrupt variables/variables.index",
    ),
    "index flipped": (
        lambda p: _flip(p / _INDEX, 0.3),
        "truncated or corrupt variables/variables.index (a block fails its CRC32C check)",
    ),
    "shard cut short": (
        lambda p: _cut(p / _SHARD),
        "lies past the end of variables.data-00000-of-00001",
    ),
    "shard flipped": (
        lambda p: _flip(p / _SHARD, 0.2),
        "has an unreadable checkpoint in variables/",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_SAVEDMODELS))
def test_a_damaged_savedmodel_is_one_error_line(k2, tmp_path, damage):
    path = _savedmodel_copy(k2, tmp_path)
    spoil, fragment = DAMAGED_SAVEDMODELS[damage]
    spoil(path)
    report = tmp_path / "report.json"
    assert_error(run_cli(path, "--random-input", "--json", report), "model_savedmodel", fragment)
    assert not report.exists()


def test_a_shard_flip_is_caught_by_tensorflows_crc(k2, tmp_path):
    """The data shards are not CRC-checked by the probe (pure Python would be slow on large
    models): TensorFlow's reader checks each tensor as it reads it."""
    path = _savedmodel_copy(k2, tmp_path)
    _flip(path / _SHARD, 0.2)
    read_model_config(path)  # the probe finds nothing wrong
    with pytest.raises(ModelLoadError, match="Checksum does not match"):
        load_model(path)


def test_a_directory_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_error(
        run_cli(tmp_path / "empty", "--random-input"),
        "is a directory but not a SavedModel (it holds no saved_model.pb or keras_metadata.pb)",
    )


def _rezip(src: Path, dst: Path, drop: str = "", replace: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            if name != drop:
                out.writestr(name, (replace or {}).get(name, z.read(name)))


def _weights_without(src: Path, group: str) -> bytes:
    """The archive's model.weights.h5 with one layer's group deleted."""
    with zipfile.ZipFile(src) as z:
        data = z.read("model.weights.h5")
    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as f:
        del f[group]
    return buffer.getvalue()


def test_damaged_keras2_archives(k2, tmp_path):
    src = k2 / "functional_mix.keras"
    cases = {
        "noconfig.keras": ({"drop": "config.json"}, "is a zip file without config.json"),
        "noweights.keras": ({"drop": "model.weights.h5"}, "without model.weights.h5"),
        "nolayer.keras": (
            {"replace": {"model.weights.h5": _weights_without(src, "layers/separable_conv2d")}},
            "layer 'separable' (SeparableConv2D) has 3 weights in Keras 3, but the file stores 0",
        ),
        "extra.keras": (
            {"replace": {"model.weights.h5": _extra_weights(src)}},
            "stores weights that belong to no layer of its configuration (layers/stray/vars/0)",
        ),
    }
    for name, (change, fragment) in cases.items():
        path = tmp_path / name
        _rezip(src, path, **change)
        report = tmp_path / "report.json"
        assert_error(run_cli(path, "--random-input", "--json", report), name, fragment)
        assert not report.exists()
    path = tmp_path / "cut.keras"
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_error(run_cli(path, "--random-input"), "cut.keras", "not a readable .keras archive")


def _extra_weights(src: Path) -> bytes:
    with zipfile.ZipFile(src) as z:
        data = z.read("model.weights.h5")
    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as f:
        f["layers/stray/vars/0"] = np.zeros(3, "float32")
    return buffer.getvalue()


def test_exact_error_lines(k2, tmp_path):
    """The whole line, for the cases a user meets most."""
    shardless = _savedmodel_copy(k2, tmp_path)
    (shardless / _SHARD).unlink()
    configless = tmp_path / "configless.keras"
    _rezip(k2 / "functional_mix.keras", configless, drop="config.json")
    expected = {
        shardless: "is incomplete: its checkpoint has no data shard "
        "variables.data-00000-of-00001 in variables/",
        configless: "is a zip file without config.json; not a .keras model",
        k2 / "tf_module_savedmodel": "is a SavedModel without keras_metadata.pb: it was saved "
        "with tf.saved_model.save (or by TensorFlow before 2.5), not by Keras's model.save, so "
        "it holds no Keras layers to compare; save the Keras model with "
        "model.save('model.keras') or model.save('model.h5')",
    }
    for path, message in expected.items():
        result = run_cli(path, "--random-input")
        label = f"{str(path)!r} (a SavedModel)" if path == shardless else repr(str(path))
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == f"Error: {label} {message}\n"
