"""Layers whose two sides agree to the bit get the float64 reference alone
(convdiff.numerics.ValueOnly): the same reference bits as the bounded pass, and a report with
the same figures as when every layer is bounded."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from support import batch_statistics, report_figures, residual_block

from convdiff import api, evaluate
from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel

LAYERS = [
    (lambda: keras.layers.Conv2D(8, 3, padding="same", activation="relu"), (2, 9, 9, 5)),
    (lambda: keras.layers.Conv2D(4, 3, strides=2, use_bias=False), (1, 11, 11, 3)),
    (lambda: keras.layers.Dense(7, activation="softmax"), (3, 40)),
    (lambda: keras.layers.DepthwiseConv2D(3, padding="same"), (2, 8, 8, 6)),
    (lambda: keras.layers.SeparableConv2D(5, 3, activation="tanh"), (1, 9, 9, 4)),
    (lambda: keras.layers.BatchNormalization(), (2, 6, 6, 4)),
    (lambda: keras.layers.LayerNormalization(), (3, 10)),
    (lambda: keras.layers.AveragePooling2D(2), (2, 8, 8, 3)),
    (lambda: keras.layers.GlobalAveragePooling2D(), (2, 7, 7, 3)),
    (lambda: keras.layers.MaxPooling2D(3, strides=2, padding="same"), (2, 9, 9, 3)),
    (lambda: keras.layers.GlobalMaxPooling2D(), (2, 7, 7, 3)),
    (lambda: keras.layers.ReLU(max_value=1.0), (2, 50)),
]


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_the_reference_alone_has_the_bounded_passs_bits(make, shape):
    keras.utils.set_random_seed(5)
    layer = make()
    layer.build(shape)
    if isinstance(layer, keras.layers.BatchNormalization):
        rng = np.random.default_rng(1)
        layer.set_weights(batch_statistics(rng, shape[-1]))
    spec = layer_spec(layer)
    kernel = find_kernel(type(layer), vars(keras.layers))
    x = np.random.default_rng(2).standard_normal(shape).astype("float32")
    bounded = run_kernel(kernel, spec, [x])
    alone = run_kernel(kernel, spec, [x], keras_output=bounded.output)
    np.testing.assert_array_equal(alone.output.view("u4"), bounded.output.view("u4"))
    np.testing.assert_array_equal(alone.reference.view("u8"), bounded.reference.view("u8"))
    assert alone.agreed and not bounded.agreed
    assert not np.any(alone.bound) and not np.any(alone.scale)
    # another output (one bit off) gets the bound
    other = bounded.output.copy()
    other.reshape(-1)[0] = np.nextafter(other.reshape(-1)[0], np.float32(np.inf))
    again = run_kernel(kernel, spec, [x], keras_output=other)
    assert not again.agreed
    np.testing.assert_array_equal(again.bound, bounded.bound)


def test_a_report_has_the_same_figures_when_every_layer_is_bounded(monkeypatch, tmp_path):
    """A model with identical layers (ReLU, Add, pooling) and rounding ones (BatchNormalization,
    a softmax): every figure the same as when the bounded pass runs on every layer."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((10, 10, 6))
    y = keras.layers.GlobalAveragePooling2D(name="pool")(residual_block(inputs, 12))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="head")(y))
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights(batch_statistics(rng, 12))
    path = tmp_path / "model.keras"
    model.save(path)
    x = rng.standard_normal((2, 10, 10, 6)).astype("float32")
    agreed = []
    real = evaluate._bit_equal

    def counted(out, keras_out):
        agreed.append(real(out, keras_out))
        return agreed[-1]

    monkeypatch.setattr(evaluate, "_bit_equal", counted)
    report = api.compare(str(path), x, order="sequential", histogram=True, show_worst=3)
    assert any(agreed) and not all(agreed), agreed  # both kinds of layer
    monkeypatch.setattr(evaluate, "_bit_equal", lambda *_: False)
    assert report_figures(report) == report_figures(
        api.compare(str(path), x, order="sequential", histogram=True, show_worst=3)
    )


def test_bit_equality_reads_the_whole_output_where_the_head_agrees():
    """run_kernel's check that the two outputs hold the same bits: a difference anywhere
    counts (the first row, the last element, past a 1-D output's head), +0 and -0 differ, the
    same NaN agrees, and strided views and 0-d outputs are read as they are."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 7, 5)).astype("float32")
    assert evaluate._bit_equal(x, x.copy())
    for at in [(0, 0, 0, 0), (2, 6, 6, 4), (1, 3, 0, 2)]:
        y = x.copy()
        y[at] = np.nextafter(y[at], np.inf)
        assert not evaluate._bit_equal(x, y), at
    flat = rng.standard_normal(evaluate._HEAD_ELEMENTS + 10).astype("float32")
    tail = flat.copy()
    tail[-1] = -tail[-1]
    assert evaluate._bit_equal(flat, flat.copy()) and not evaluate._bit_equal(flat, tail)
    zeros = np.zeros((2, 3), "float32")
    assert not evaluate._bit_equal(zeros, -zeros)
    nan = np.full((2, 3), np.nan, "float32")
    assert evaluate._bit_equal(nan, nan.copy())
    view = x[:, ::2, 1:, :]
    assert evaluate._bit_equal(view, view.copy())
    assert evaluate._bit_equal(np.float32(2.5) * np.ones((), "float32"), np.array(2.5, "float32"))
    assert not evaluate._bit_equal(np.array(2.5, "float32"), np.array(3.5, "float32"))
    assert not evaluate._bit_equal(x, x.astype("float64"))
