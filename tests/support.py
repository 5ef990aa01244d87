"""Test helpers shared by the test files: run one real Keras layer and convdiff's kernel for it
on the same input; run the command line in-process and check its one-line errors; check a
JUnit report; save a model whose custom layers the loader must not know; register a script
that writes Keras 2 files (conftest's keras2_files runs them all in one subprocess)."""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from convdiff.cli import cli
from convdiff.evaluate import KernelRun, run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel
from convdiff.metrics import Comparison, compare, within_bound
from convdiff.orders import Order
from convdiff.runtime import cpu_flags, onednn_setting


# Where the sequential order (one FMA chain over the tap axes) was measured to reproduce
# TensorFlow's CPU convolutions and Dense layers bit for bit: AVX-512 with oneDNN on. Other
# machines add some of them in other orders (their figures stay within the bound).
def sequential_is_exact() -> bool:
    return "avx512f" in cpu_flags() and onednn_setting()


SEQUENTIAL_IS_EXACT = pytest.mark.skipif(
    not sequential_is_exact(),
    reason="the sequential order reproduces these bit for bit where measured: AVX-512, oneDNN on",
)

# TensorFlow's CPU runs a channels_first Conv2D (and the transposed convolutions) only through
# oneDNN; .ci/run runs the tests again with oneDNN's other setting, so these run there.
NCHW_NEEDS_ONEDNN = pytest.mark.skipif(
    not onednn_setting(),
    reason="TensorFlow's CPU runs channels_first Conv2D only through oneDNN, off in this run",
)


@dataclass
class LayerCheck:
    keras_output: np.ndarray
    run: KernelRun
    comparison: Comparison


def check_layer(
    layer, inputs: np.ndarray | Sequence[np.ndarray], order: Order | None = None
) -> LayerCheck:
    """Call the real Keras ``layer`` on ``inputs`` (inference mode) and convdiff's kernel on the
    same inputs; compare with the kernel's bound."""
    import keras

    xs = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
    arg = xs if isinstance(inputs, list | tuple) else xs[0]
    keras_out = keras.ops.convert_to_numpy(layer(arg, training=False))
    kernel = find_kernel(type(layer), vars(keras.layers))
    assert kernel is not None, f"no kernel registered for {type(layer).__name__}"
    run = run_kernel(kernel, layer_spec(layer), xs, order)
    assert run.output.shape == keras_out.shape, (run.output.shape, keras_out.shape)
    assert run.output.dtype == keras_out.dtype, (run.output.dtype, keras_out.dtype)
    return LayerCheck(keras_out, run, compare(keras_out, run.output, run.bound))


def assert_matches_keras(
    layer, inputs: np.ndarray | Sequence[np.ndarray], order: Order | None = None
) -> LayerCheck:
    """The kernel agrees with Keras within its rigorous rounding bound (identical or rounding)."""
    check = check_layer(layer, inputs, order)
    c = check.comparison
    assert within_bound(c), (
        f"{layer.name}: max_ulp={c.max_ulp} bound_ratio={c.bound_ratio} "
        f"nan_mismatch={c.nan_mismatch} inf_mismatch={c.inf_mismatch} worst={c.worst}"
    )
    return check


def exact_order(model, inputs, layers: Sequence[str]) -> Order:
    """The first of ``--order all``'s candidate orders that reproduces every one of ``layers``
    bit for bit on this machine (isolated mode): a bit-exactness expectation computed where the
    test runs. Skips the test when no candidate reproduces them all here."""
    from convdiff.api import compare, orders_to_try

    report = compare(model, inputs, order="all", layers=list(layers))
    exact = [{o["order"] for o in r.orders if o["bit_exact"]} for r in report.layers]
    common = set.intersection(*exact) if exact else set()
    for order in orders_to_try():
        if order.label in common:
            return order
    where = f"CPU flags {' '.join(cpu_flags()) or 'unknown'}, oneDNN {onednn_setting()}"
    pytest.skip(f"no candidate order reproduces {', '.join(layers)} bit for bit here ({where})")


@functools.cache
def save_with_user_layers(layer_file: Path, build: Callable[[dict], Any], path: Path) -> None:
    """Run a user's file of custom layers here, save ``build(its namespace)`` to ``path``, then
    take the file's registrations out of Keras's global registry again: as for a model saved
    in another process, the loader under test must be told about the classes (with
    ``--custom-objects``) to know them."""
    import runpy

    import keras

    registry = keras.saving.get_custom_objects()
    before = dict(registry)
    try:
        build(runpy.run_path(str(layer_file))).save(path)
    finally:
        registry.clear()
        registry.update(before)


# --------------------------------------------------------------------------- the command line


def count_compiled_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time compiled chains run (every compiled entry point of
    convdiff.accel runs its tiles through ``_run_tiles``): a case meant for the compiled engine
    asserts that it reached it."""
    from convdiff import accel

    calls: list[int] = []
    run = accel._run_tiles

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        run(*args, **kwargs)

    monkeypatch.setattr(accel, "_run_tiles", counted)
    return calls


def run_cli(*args: Any) -> Result:
    """``convdiff ARGS...`` in this process (click's runner); an exception that is not a
    SystemExit is raised again, with its traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_error(result: Result, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr starting 'Error: ', no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------- JUnit reports

JUNIT_SCHEMA = Path(__file__).resolve().parent / "fixtures" / "junit.xsd"


def assert_valid_junit(data: bytes, schema) -> ET.Element:
    """Schema-valid (when xmlschema is there) and structurally consistent: the checks CI readers
    make (counts equal to the test cases' outcomes, one outcome per case, required names)."""
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    if schema is not None:
        schema.validate(data.decode())
    root = ET.fromstring(data)
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    outcomes = [[c.tag for c in case if c.tag in ("failure", "error", "skipped")] for case in cases]
    assert all(len(o) <= 1 for o in outcomes)
    for key, tag in (("failures", "failure"), ("errors", "error"), ("skipped", "skipped")):
        assert int(suite.get(key)) == sum(o == [tag] for o in outcomes), key
    assert int(suite.get("tests")) == len(cases) == int(root.get("tests"))
    assert root.get("failures") == suite.get("failures") and root.get("errors") == suite.get(
        "errors"
    )
    for case in cases:
        assert case.get("name") and case.get("classname")
    names = [case.get("name") for case in cases]
    assert len(set(names)) == len(names)
    return suite


# --------------------------------------------------------------------------- Keras 2 files

# Scripts that write Keras 2 files with tf-keras, by name, registered by the test modules that
# read those files when they are imported (at collection). conftest's ``keras2_files`` runs
# every registered script in one subprocess the first time a test asks for one: the two Keras
# versions never share a process, and TensorFlow and tf-keras are imported once per session.
# A script reads its output directory from sys.argv[1] and the tests directory from
# sys.argv[2].
KERAS2_WRITERS: dict[str, str] = {}


def keras2_writer(name: str, script: str) -> None:
    """Register ``script`` as the Keras 2 writer ``name`` (the same script again is a no-op)."""
    if KERAS2_WRITERS.setdefault(name, script) != script:
        raise ValueError(f"another Keras 2 writer is already called {name!r}")


def report_figures(report) -> list[dict]:
    """Every figure of each layer of a report, without what the run cost (its seconds, and
    whether auto's trees came from the cache: a second run reads what the first revealed)."""
    figures = []
    for r in report.layers:
        row = {k: v for k, v in r.to_dict().items() if k != "seconds"}
        if row.get("order_found"):
            row["order_found"] = {
                k: v for k, v in row["order_found"].items() if k not in ("cached", "probe_calls")
            }
        figures.append(row)
    return figures


def residual_block(inputs: Any, filters: int) -> Any:
    """A ResNet-like block of real layers: a 3x3 Conv2D with bias, BatchNormalization (see
    :func:`batch_statistics`) and ReLU, added to a 1x1 Conv2D of ``inputs``."""
    import keras

    y = keras.layers.Conv2D(filters, 3, padding="same", name="conv")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU(name="relu")(y)
    z = keras.layers.Conv2D(filters, 1, name="skip")(inputs)
    return keras.layers.Add(name="add")([y, z])


def batch_statistics(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """BatchNormalization's gamma, beta and moving statistics for ``n`` channels, away from
    the identity (a freshly built layer's mean 0 and variance 1 round like no real model's)."""
    gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n)
    return [gamma, beta, rng.normal(0, 0.2, n), rng.uniform(0.5, 2, n)]
