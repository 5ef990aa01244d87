"""The library front door (convdiff.compare) leaves the process as it found it, and refuses
arguments that contradict each other."""

from __future__ import annotations

import os

import pytest

import convdiff
from convdiff.errors import OptionError
from convdiff.orders import Order


def test_compare_leaves_tensorflow_settings_and_environment_as_found(examples):
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    model, x = examples / "deep8.keras", examples / "deep8_input.npy"
    environ = dict(os.environ)
    for tf32 in (True, False):
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
        report = convdiff.compare(model, x, layers="conv0")
        assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32
        assert report.environment["tf32"] is False  # recorded only for a GPU run
        convdiff.compare(model, x, layers="conv0", tf32=not tf32)
        assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32
    report = convdiff.compare(model, x, layers="conv0", deterministic=True)
    assert report.environment["deterministic"] is True
    assert not tf_config.is_op_determinism_enabled()
    assert dict(os.environ) == environ


def test_an_order_object_and_contradicting_arguments_are_refused(examples):
    model, x = examples / "deep8.keras", examples / "deep8_input.npy"
    with pytest.raises(OptionError, match=r"order='sequential\+fma' already fixes .*fma=False"):
        convdiff.compare(model, x, order=Order(), fma=False)
    report = convdiff.compare(model, x, order=Order(fma=False), fma=False, layers="conv0")
    assert report.settings["fma"] is False and report.settings["order_label"] == "sequential-fma"


def test_prepared_model_is_shared_by_runs(examples):
    from convdiff.api import prepare_model

    prepared = prepare_model(examples / "deep8.keras")
    first = convdiff.compare(prepared, examples / "deep8_input.npy", layers="conv0")
    second = convdiff.compare(prepared, examples / "deep8_input.npy", order="pairwise")
    assert first.model == second.model == str(examples / "deep8.keras")
    assert len(second.layers) == 8 and first.layers[0].name == "conv0"
