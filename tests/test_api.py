"""The library front door (convdiff.compare) leaves the process as it found it, and refuses
arguments that contradict each other."""

from __future__ import annotations

import os

import numpy as np
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


def test_layers_are_handed_the_tensors_keras_made(examples, monkeypatch):
    """Each layer after the first reads the tensors Keras returned, not arrays made of them
    (every call would copy an array into a new tensor), and the arrays convdiff reads of
    Keras's outputs are read-only (they view tensors that later layers read); the figures are
    those of a run that hands arrays."""
    import numpy as np

    from convdiff import runner

    handed: list[list[type]] = []
    seen: list[bool] = []
    run_keras = runner._run_keras

    def recorded(node, values):
        handed.append([type(v) for v in values])
        arrays, tensors = run_keras(node, values)
        seen.extend(a.flags.writeable for a in arrays)
        return arrays, tensors

    monkeypatch.setattr(runner, "_run_keras", recorded)
    report = convdiff.compare(examples / "deep8.keras", examples / "deep8_input.npy")
    assert len(handed) == len(report.layers) == 8
    assert handed[0] == [np.ndarray]  # the model's input
    assert all(np.ndarray not in types for types in handed[1:]), handed
    assert seen and not any(seen)

    def copied(node, values):  # arrays handed, each copied into a new tensor
        arrays, _ = run_keras(node, [np.array(v) for v in values])
        return [np.array(a) for a in arrays], arrays

    monkeypatch.setattr(runner, "_run_keras", copied)
    again = convdiff.compare(examples / "deep8.keras", examples / "deep8_input.npy")

    def figures(layers) -> list[dict]:  # less the seconds, and the tree cache read this time
        found = ("probe_calls", "cached")
        rows = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in layers]
        for row in rows:
            if row["order_found"]:
                row["order_found"] = {k: v for k, v in row["order_found"].items() if k not in found}
        return rows

    assert figures(again.layers) == figures(report.layers)


def test_keras_runs_in_a_thread_of_its_own_under_the_runs_device(examples, monkeypatch):
    """Keras's layers run in a thread of their own, alongside the comparison, under the run's
    device placement (which TensorFlow keeps per thread); a layer's error surfaces at that
    layer, after the results of the layers before it; a run that raises or stops early
    leaves no such thread behind."""
    import threading

    from tensorflow.python.eager import context

    from convdiff import runner
    from convdiff.errors import BackendError
    from convdiff.runner import Settings, run_layers

    def alive() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "convdiff-keras"]

    calls: list[tuple[str, str]] = []
    run_keras = runner._run_keras

    def recorded(node, values):
        calls.append((threading.current_thread().name, context.context().device_name))
        if node.name == "conv2":
            raise BackendError("conv2 cannot run here")
        return run_keras(node, values)

    monkeypatch.setattr(runner, "_run_keras", recorded)
    seen: list[str] = []
    with pytest.raises(BackendError, match="conv2 cannot run here"):
        convdiff.compare(
            examples / "deep8.keras",
            examples / "deep8_input.npy",
            device="cpu",
            on_layer=lambda r: seen.append(r.name),
        )
    assert seen == ["conv0", "conv1"]
    assert [c[0] for c in calls] == ["convdiff-keras"] * 3
    assert all(c[1].endswith("device:CPU:0") for c in calls), calls
    assert not alive()

    # a run stopped after its first layer: the thread stops too
    monkeypatch.setattr(runner, "_run_keras", run_keras)
    from convdiff.api import prepare_model

    prepared = prepare_model(examples / "deep8.keras")
    x = np.load(examples / "deep8_input.npy")
    layers = run_layers(prepared.graph.model, [x], Settings())
    assert next(layers).name == "conv0"
    layers.close()
    assert not alive()


def test_keras_thread_reads_the_compared_layers_config_and_weights(examples, monkeypatch):
    """Each compared layer's config and weights (TensorFlow reads of its variables) are read in
    Keras's thread, once, and handed on with its outputs; where that read fails, the
    comparison reads again and the error surfaces at that layer, as a read of its own did."""
    import threading

    from convdiff.graph import GraphNode

    spec = GraphNode.spec
    readers: list[tuple[str, str]] = []

    def recorded(node):
        readers.append((node.name, threading.current_thread().name))
        return spec(node)

    monkeypatch.setattr(GraphNode, "spec", recorded)
    report = convdiff.compare(
        examples / "deep8.keras", examples / "deep8_input.npy", layers=["conv*"]
    )
    compared = [r.name for r in report.layers]
    assert compared and all(name.startswith("conv") for name in compared)
    assert readers == [(name, "convdiff-keras") for name in compared]

    def failing(node):
        readers.append((node.name, threading.current_thread().name))
        if node.name == "conv1":
            raise TypeError("conv1's config cannot be read")
        return spec(node)

    readers.clear()
    monkeypatch.setattr(GraphNode, "spec", failing)
    seen: list[str] = []
    with pytest.raises(TypeError, match="conv1's config"):
        convdiff.compare(
            examples / "deep8.keras",
            examples / "deep8_input.npy",
            on_layer=lambda r: seen.append(r.name),
        )
    assert seen == ["conv0"]
    assert ("conv1", "convdiff-keras") in readers and ("conv1", "MainThread") in readers
