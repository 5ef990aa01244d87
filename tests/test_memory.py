"""The memory estimate: an upper bound on what the NumPy side allocates (measured with
tracemalloc on real layers and models), the activations freed by the graph's consumers, and the
stop before a run that would not fit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from convdiff import memory
from convdiff.errors import ConvdiffError, OptionError
from convdiff.memory import MemoryEstimate, ResourceError, check_memory, estimate, estimate_bytes
from convdiff.orders import parse_order


def _order(name: str):
    return parse_order(name, True, None, None)


def _peak(fn) -> int:
    """Peak bytes numpy allocates while ``fn`` runs (numpy reports to tracemalloc).

    ``fn`` runs once before the measured run: the first call of a compiled chain
    (convdiff.accel) loads or compiles it, and numba's own Python objects are no part of a
    layer's working memory (they are allocated once per process)."""
    fn()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _small_resnet(shape):
    import keras

    layers = keras.layers
    x = keras.Input(shape)
    y = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    z = layers.Conv2D(16, 3, padding="same")(y)
    z = layers.BatchNormalization()(z)
    y = layers.Add()([y, z])
    y = layers.MaxPooling2D(2)(y)
    y = layers.DepthwiseConv2D(3, padding="same")(y)
    y = layers.GlobalAveragePooling2D()(y)
    y = layers.Dense(10, activation="softmax")(y)
    return keras.Model(x, y)


# --------------------------------------------------------------------------- available memory


def test_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", "12345")
    assert memory.available_bytes() == 12345
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", "a lot")
    with pytest.raises(OptionError, match="CONVDIFF_MEMORY_LIMIT must be a whole number"):
        memory.available_bytes()


def test_available_memory_from_meminfo(monkeypatch):
    monkeypatch.delenv("CONVDIFF_MEMORY_LIMIT", raising=False)
    available = memory.available_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < available < 2**50


def test_check_memory_message(monkeypatch):
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", str(2**30))
    check_memory(2**29)  # fits: nothing happens
    peak = MemoryEstimate(total=3 * 2**30, layer="conv5", held=2**30, working=2**31, batch=64)
    with pytest.raises(ResourceError) as info:
        check_memory(peak)
    message = str(info.value)
    for fragment in (
        "needs about 3.0 GiB of memory at layer 'conv5'",
        "1.0 GiB of activations held, 2.0 GiB for the layer itself",
        "but 1.0 GiB is available (limit set by CONVDIFF_MEMORY_LIMIT)",
        "use a smaller batch (the input's batch is 64)",
        "--layers",
    ):
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ConvdiffError)
    with pytest.raises(ResourceError, match=r"needs about 2.0 GiB of memory but 1.0 GiB"):
        check_memory(2**31)
    check_memory(2**40, available=2**41)


# --------------------------------------------------------------------------- one layer


def _layer_cases():
    import keras

    layers = keras.layers
    return [
        (layers.Conv2D(16, 3, padding="same", activation="relu"), (2, 24, 24, 8)),
        (layers.Conv2D(8, 5, strides=2, dilation_rate=1), (2, 24, 24, 16)),
        (layers.Conv2D(32, 1), (2, 12, 12, 32)),
        (layers.Conv2D(16, 3, groups=4), (2, 12, 12, 16)),
        (layers.Conv1D(16, 5, dilation_rate=2), (2, 48, 8)),
        (layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (2, 24, 24, 8)),
        (layers.SeparableConv2D(16, 3, padding="same"), (2, 24, 24, 8)),
        (layers.Conv2DTranspose(8, 3, strides=2), (2, 12, 12, 16)),
        (layers.Dense(64, activation="gelu"), (32, 128)),
        (layers.MaxPooling2D(3, strides=1, padding="same"), (2, 24, 24, 8)),
        (layers.AveragePooling2D(2), (2, 24, 24, 8)),
        (layers.BatchNormalization(), (2, 24, 24, 8)),
        (layers.LayerNormalization(), (2, 24, 24, 8)),
        (layers.Softmax(), (2, 24, 24, 8)),
    ]


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
@pytest.mark.parametrize("order", ["sequential", "pairwise", "float64", "exact"])
def test_one_layer_estimate_bounds_what_numpy_allocates(order, mode):
    """Both modes: in propagated mode the bounded pass starts from Keras's inputs and carries
    their distance from the NumPy side's as an error, patched and multiplied as the values."""
    import keras

    from convdiff.evaluate import run_kernel
    from convdiff.graph import build_graph, layer_spec
    from convdiff.kernels import find_kernel

    rng = np.random.default_rng(3)
    for layer, shape in _layer_cases():
        model = keras.Sequential([keras.Input(shape[1:]), layer])
        x = rng.standard_normal(shape).astype(np.float32)
        kernel = find_kernel(type(layer), vars(keras.layers))
        spec = layer_spec(layer)
        keras_x = [x + np.float32(1e-3) * rng.standard_normal(shape).astype(np.float32)]
        reference = keras_x if mode == "propagated" else None

        def compared() -> None:
            run_kernel(kernel, spec, [x], _order(order), reference_inputs=reference)  # noqa: B023

        measured = _peak(compared)
        node = build_graph(model).nodes[0]
        sizes = memory._tensor_sizes(model, build_graph(model), [x])
        ins = [sizes[k] for k in node.inputs]
        outs = [sizes[k] for k in node.outputs]
        estimated = memory._working(layer, ins, outs, order)
        name = type(layer).__name__
        assert estimated >= measured, (name, order, mode, estimated, measured)
        assert estimated <= 6 * measured, (name, order, mode, estimated, measured)


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    ("shape", "batch", "order"),
    [((32, 32, 3), 1, "sequential"), ((32, 32, 3), 4, "exact"), ((None, None, 3), 2, "float64")],
)
def test_model_estimate_bounds_a_real_run(monkeypatch, shape, batch, order):
    """The estimate bounds the run, and is within 3x of a run whose every layer takes the whole
    bounded pass (its outputs differing from Keras's: the worst case, which the estimate
    describes; a layer that agrees to the bit takes the float64 reference alone, and which
    layers agree depends on the machine's summation order)."""
    from convdiff import evaluate, runner
    from convdiff.runner import Settings, run_layers

    # Keras's outputs are held as views of TensorFlow's tensors, whose memory tracemalloc
    # does not see; copied into NumPy's, the measured peak holds them as the estimate does
    as_array = runner._as_array
    monkeypatch.setattr(runner, "_as_array", lambda t, convert: np.array(as_array(t, convert)))
    model = _small_resnet(shape)
    x = np.random.default_rng(5).standard_normal((batch, 32, 32, 3)).astype(np.float32)
    peak = estimate(model, [x], _order(order))

    def run() -> None:
        list(run_layers(model, [x], Settings(order=_order(order))))

    measured = _peak(run)
    assert measured <= peak.total, (peak, measured)
    monkeypatch.setattr(evaluate, "_bit_equal", lambda *_: False)
    bounded_everywhere = _peak(run)
    assert bounded_everywhere <= peak.total <= 3 * bounded_everywhere, (peak, bounded_everywhere)
    assert peak.layer is not None and peak.layer.startswith("conv2d")
    assert peak.batch == batch and peak.held + peak.working == peak.total
    assert estimate_bytes(model, [x], order) == peak.total


def test_estimate_grows_with_the_batch_and_the_free_axes():
    model = _small_resnet((None, None, 3))
    sizes = {}
    for batch, side in [(1, 16), (4, 16), (1, 32)]:
        x = np.zeros((batch, side, side, 3), np.float32)
        sizes[batch, side] = estimate_bytes(model, [x])
    assert 3.5 * sizes[1, 16] <= sizes[4, 16] <= 4.5 * sizes[1, 16]
    assert 3.5 * sizes[1, 16] <= sizes[1, 32] <= 4.5 * sizes[1, 16]


def test_freed_activations_are_not_counted():
    """A chain frees each tensor once its reader has run; a skip connection holds its input
    until the Add: the same layers, more memory held at the peak."""
    import keras

    layers = keras.layers
    x = np.zeros((1, 64, 64, 8), np.float32)

    def build(skip: bool):
        inp = keras.Input((64, 64, 8))
        y = inp
        for _ in range(4):
            y = layers.ReLU()(y)
        return keras.Model(inp, layers.Add()([y, inp if skip else y]))

    chain, skip = estimate(build(False), [x]), estimate(build(True), [x])
    # At the Add: the chain holds only the last ReLU's output (Keras's and NumPy's copies);
    # the skip connection also holds the model's input (one copy, shared by both sides).
    assert chain.layer.startswith("add") and skip.layer.startswith("add")
    assert chain.held == 2 * x.nbytes and skip.held == 3 * x.nbytes
    assert skip.total == chain.total + x.nbytes


def test_order_exact_needs_the_products(monkeypatch):
    """The exact order on the NumPy engine holds a block of float64 products per reduction (n
    per output); compiled, only its double-double state (three float64 numbers per output)."""
    from convdiff import accel

    model = _small_resnet((32, 32, 3))
    x = np.zeros((1, 32, 32, 3), np.float32)
    monkeypatch.setenv("CONVDIFF_NUMBA", "0")
    sequential = estimate_bytes(model, [x], "sequential")
    products = estimate_bytes(model, [x], "exact")
    assert products > 1.5 * sequential
    assert estimate_bytes(model, [x], "float64") == sequential
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    if accel.enabled():
        assert sequential < estimate_bytes(model, [x], "exact") < products


def test_a_model_too_big_for_the_limit_is_stopped(monkeypatch):
    model = _small_resnet((32, 32, 3))
    x = np.zeros((64, 32, 32, 3), np.float32)
    peak = estimate(model, [x])
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", str(peak.total // 2))
    with pytest.raises(ResourceError, match=r"the input's batch is 64\) or compare fewer"):
        check_memory(peak)
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", str(peak.total))
    check_memory(peak)


def test_compare_stops_before_running_when_memory_is_short(monkeypatch, tmp_path):
    """api.compare checks the estimate before the first layer runs; the CLI says it in one line."""
    from click.testing import CliRunner

    import convdiff
    from convdiff.cli import cli

    model = _small_resnet((32, 32, 3))
    x = np.zeros((8, 32, 32, 3), np.float32)
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", str(estimate_bytes(model, [x]) - 1))
    seen = []
    with pytest.raises(ResourceError, match="use a smaller batch"):
        convdiff.compare(model, x, on_layer=seen.append)
    assert seen == []
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(cli, [str(tmp_path / "m.keras"), str(tmp_path / "x.npy")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: the comparison needs about")
    assert len(result.stderr.splitlines()) == 1 and "--layers" in result.stderr


def test_the_command_line_keeps_freed_blocks_on_glibc():
    """glibc accepts both mallopt settings (elsewhere the call reports that it did nothing)."""
    import platform

    kept = memory.keep_freed_memory()
    assert kept is (platform.libc_ver()[0] == "glibc")


def test_the_console_entry_pauses_the_collector_until_the_comparison_begins(tmp_path):
    """cli.main (a process that ends with the run) turns the cycle collector off for start-up
    and back on, with start-up's objects frozen, when the layers are about to be compared."""
    import json
    import subprocess
    import sys

    _small_resnet((16, 16, 3)).save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.zeros((1, 16, 16, 3), np.float32))
    script = f"""
import atexit, gc, json
import convdiff.runner as runner
seen = []
resume = runner.resume_collector
def spy():
    seen.append([gc.isenabled(), gc.get_freeze_count() > 0])
    resume()
    seen.append([gc.isenabled(), gc.get_freeze_count() > 0])
runner.resume_collector = spy
atexit.register(lambda: print(json.dumps(seen)))
from convdiff.cli import main
main([{str(tmp_path / "m.keras")!r}, {str(tmp_path / "x.npy")!r}, "-q"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # off (and nothing frozen) through imports and loading; on, with start-up frozen, after
    assert seen == [[False, False], [True, True]]


def test_a_library_caller_keeps_its_collector_as_it_was(tmp_path):
    """convdiff.compare and cli.invoke (which leave the interpreter running) neither pause nor
    freeze the caller's collector."""
    import gc

    import convdiff
    from convdiff.cli import invoke

    frozen = gc.get_freeze_count()
    model, x = _small_resnet((8, 8, 3)), np.zeros((1, 8, 8, 3), np.float32)
    convdiff.compare(model, x)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(SystemExit) as ended:
        invoke([str(tmp_path / "m.keras"), str(tmp_path / "x.npy"), "-q"])
    assert ended.value.code == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    memory.resume_collector()  # not paused here: nothing to resume, nothing frozen
    assert gc.isenabled() and gc.get_freeze_count() == frozen
