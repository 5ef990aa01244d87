"""convdiff.testing.assert_layers_match on real tiny Keras models."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
from support import exact_order

from convdiff import kernels
from convdiff.report import Report
from convdiff.testing import assert_layers_match, failing_layers

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn


class Twice(keras.layers.Layer):
    """A custom layer computing x * 2 (convdiff has no kernel for it until a test registers one)."""

    def call(self, x):
        return x * 2


TWICE_KEY = f"{Twice.__module__}.{Twice.__qualname__}"


@pytest.fixture(scope="module")
def conv_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((8, 8, 8)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(4, name="head"),
        ]
    )


@pytest.fixture(scope="module")
def conv_input() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 8, 8, 8)).astype(np.float32)


@pytest.fixture
def twice_model() -> keras.Model:
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="d"),
            Twice(name="twice"),
            keras.layers.Dense(2, name="after"),
        ]
    )


def test_passing_model_returns_the_report(conv_model, conv_input):
    report = assert_layers_match(conv_model, conv_input)
    assert isinstance(report, Report) and report.passed
    assert [r.name for r in report.layers] == ["conv", "flat", "head"]
    assert failing_layers(report) == []
    # Where an order reproduces Keras's layers bit for bit on this machine, a budget of 0 ULP
    # holds with it, also in propagated mode.
    order = exact_order(conv_model, conv_input, ["conv", "head"])
    assert_layers_match(conv_model, [conv_input], max_ulp=0, mode="propagated", order=order)


def test_over_budget_names_the_layer_and_its_figures(conv_model, conv_input):
    # Rounding each product before the add (no FMA) makes rounding differences Keras never made:
    # still within the rounding bound, but over a budget of 0 ULP.
    with pytest.raises(AssertionError) as info:
        assert_layers_match(conv_model, conv_input, max_ulp=0, fma=False)
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert first_line.startswith("convdiff: layer 0 'conv' (Conv2D) over budget (rounding): max ")
    assert re.search(r"max ULP [\d,]+ > 0 \(--max-ulp 0\);", first_line)
    assert "x the rounding bound" in first_line
    assert "worst element (0, " in message and "order sequential" in message
    report = assert_layers_match(conv_model, conv_input, max_ulp=10_000, fma=False)
    assert report.layers[0].comparison.max_ulp > 0  # the same run passes a roomier budget


def test_float64_order_is_rounding_but_over_a_zero_budget(conv_model, conv_input):
    with pytest.raises(AssertionError, match=r"layer 0 'conv' \(Conv2D\) over budget"):
        assert_layers_match(conv_model, conv_input, max_ulp=0, order="float64")


def test_divergent_custom_layer_is_named_first(twice_model, monkeypatch):
    kernels.registry()
    x = np.ones((1, 4), np.float32)
    # No kernel for Twice: skipped, which does not fail.
    report = assert_layers_match(twice_model, x)
    assert [r.status for r in report.layers][1] == "skipped"
    # A wrong kernel (x * 3 for a layer computing x * 2) is divergent.
    monkeypatch.setitem(
        kernels.REGISTRY, TWICE_KEY, lambda spec, inputs, nx: nx.mul(inputs[0], 3.0)
    )
    with pytest.raises(AssertionError) as info:
        assert_layers_match(twice_model, x)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("convdiff: layer 1 'twice' (Twice) divergent: max ")
    assert "inf" not in lines[0] and "x the rounding bound" in lines[0]
    assert "NumPy" in lines[1] and "Keras" in lines[1]
    # The right kernel passes.
    monkeypatch.setitem(
        kernels.REGISTRY, TWICE_KEY, lambda spec, inputs, nx: nx.mul(inputs[0], 2.0)
    )
    assert assert_layers_match(twice_model, x, max_ulp=0).passed


def test_error_from_a_user_implementation_fails_with_its_reason(conv_model, conv_input):
    def broken(x, kernel, bias):
        raise ValueError("shapes do not align")

    with pytest.raises(AssertionError) as info:
        assert_layers_match(conv_model, conv_input, impls={"conv": broken})
    lines = str(info.value).splitlines()
    assert lines[0] == "convdiff: layer 0 'conv' (Conv2D) error: not compared"
    assert "ValueError: shapes do not align" in lines[1]
    assert any("raise ValueError" in line for line in lines[2:])  # the user's own traceback


def test_later_failures_are_counted(conv_model, conv_input):
    with pytest.raises(AssertionError) as info:
        assert_layers_match(conv_model, conv_input, max_ulp=0, order="float64")
    later = [line for line in str(info.value).splitlines() if "later layer" in line]
    # The Dense head's 384-term dot products also round differently in float64 order.
    assert later == ["  1 later layer failed too: head: over budget (rounding)"]
