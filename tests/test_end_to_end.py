"""Real saved models (Keras 3 .h5/.keras, Keras 2 .h5) through the whole pipeline."""

from __future__ import annotations

import model_zoo
import numpy as np
import pytest
from support import keras2_writer

from convdiff.api import compare

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, keras2_dir) -> dict:
    """Every zoo model written by Keras 3 (.h5, .keras) and by Keras 2 (.k2.h5), by file key."""
    keras2 = {f"{name}.k2.h5": keras2_dir / f"zoo_{name}.h5" for name in model_zoo.BUILDERS}
    return {**model_zoo.save_keras3(tmp_path_factory.mktemp("zoo")), **keras2}


keras2_writer("zoo", model_zoo.KERAS2_SCRIPT)

FILES = [f"{n}.{ext}" for n in model_zoo.BUILDERS for ext in ("h5", "keras", "k2.h5")]


@pytest.fixture(scope="module", params=FILES)
def prepared(request, zoo):
    """One zoo file loaded through convdiff's checks and loader once, for both modes."""
    from convdiff.api import prepare_model

    return prepare_model(zoo[request.param])


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
def test_every_layer_identical_or_rounding(prepared, mode):
    report = compare(prepared, None, seed=3, mode=mode)
    bad = [
        (r.name, r.status, r.reason)
        for r in report.layers
        if r.status not in ("identical", "rounding")
    ]
    assert not bad, bad
    assert report.passed and report.first_divergent is None
    assert len(report.layers) >= 5


def test_nested_model_inner_layers_are_rows(zoo):
    report = compare(str(zoo["nested.keras"]), None)
    names = [r.name for r in report.layers]
    assert "block/inner_conv" in names and "block/inner_bn" in names
    assert "shared" in names and "shared#2" in names  # a shared layer: one row per call


def test_multi_input_by_name_and_position(zoo, tmp_path, rng):
    img = rng.standard_normal((2, 8, 8, 2)).astype("float32")
    vec = rng.standard_normal((2, 5)).astype("float32")
    np.savez(tmp_path / "named.npz", vec=vec, img=img)
    np.savez(tmp_path / "positional.npz", img, vec)
    named = compare(str(zoo["multi_io.keras"]), tmp_path / "named.npz")
    positional = compare(str(zoo["multi_io.keras"]), tmp_path / "positional.npz")
    assert [r.to_dict()["max_abs"] for r in named.layers] == [
        r.to_dict()["max_abs"] for r in positional.layers
    ]
    assert named.layers[0].output_shape[0] == 2


def test_one_layer_example_identical_in_default_order(examples):
    """The quickstart's claim: the default order reproduces TensorFlow's CPU convolution of the
    one-layer example bit for bit. Measured with oneDNN on (AVX-512 and AVX2) and off (AVX2):
    its nine terms a sum are one fused multiply-add chain from zero in tap order on each path."""
    report = compare(str(examples / "one_layer.h5"), examples / "one_layer_input.npy")
    assert [r.status for r in report.layers] == ["identical"], report.layers[0].comparison
