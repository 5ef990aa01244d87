"""A user's own NumPy implementation plugged in for a layer (--impl / impls=)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from support import run_cli

import convdiff


@pytest.fixture
def one_layer(examples):
    return examples / "one_layer.h5", examples / "one_layer_input.npy"


def report_for(one_layer, func: str, *extra):
    result = run_cli(
        *one_layer, "--impl", f"conv2d=examples/my_conv2d.py:{func}", "--json", "-", *extra
    )
    return result.exit_code, json.loads(result.stdout)


def test_float64_loop_is_rounding_and_closer_to_exact(one_layer):
    code, report = report_for(one_layer, "forward_loop")
    layer = report["layers"][0]
    assert code == 0 and layer["status"] in ("rounding", "identical")
    assert "returned float64; rounded to float32" in layer["reason"]
    assert layer["impl"] == "examples/my_conv2d.py:forward_loop"
    # A float64 sum rounded once is (almost always) the correctly rounded result.
    assert layer["numpy_vs_exact_ulp"] <= layer["keras_vs_exact_ulp"]
    assert layer["numpy_vs_exact_ulp"] <= 1


def test_vectorized_float32_within_bound(one_layer):
    code, report = report_for(one_layer, "forward_vectorized")
    assert code == 0 and report["layers"][0]["status"] in ("identical", "rounding")
    assert report["layers"][0]["reason"] is None  # float32 already: no note


@pytest.mark.parametrize("func", ["forward_flipped", "forward_shifted"])
def test_wrong_implementation_is_divergent_and_named(one_layer, func):
    code, report = report_for(one_layer, func)
    assert code == 1
    assert report["first_divergent"] == "conv2d"
    assert report["layers"][0]["status"] == "divergent"
    assert report["layers"][0]["bound_ratio"] > 1000


@pytest.fixture
def two_layer(tmp_path):
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="first"),
            keras.layers.Conv2D(4, 1, activation="relu", name="second"),
        ]
    )
    model.save(tmp_path / "two.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 6, 6, 2)).astype("f4"))
    (tmp_path / "impls.py").write_text(
        textwrap.dedent(
            """
        import numpy as np

        def broken(x, kernel, bias):
            return _inner(x)

        def _inner(x):
            raise RuntimeError("my bug on purpose")

        def wrong_shape(x, kernel, bias):
            return x[..., :1]

        def correct(x, kernel, bias):
            windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
            return np.einsum("nhwcij,ijcf->nhwf", windows.astype(np.float64), kernel) + bias

        def nan_at(x, kernel, bias):
            y = correct(x, kernel, bias)
            y[0, 1, 2, 0] = np.nan
            return y

        def as_list(x, kernel, bias):
            return correct(x, kernel, bias).tolist()

        def negated(x, kernel, bias):
            return -correct(x, kernel, bias)

        def with_config(x, kernel, bias, config):
            assert config["kernel_size"] == (1, 1) or config["kernel_size"] == [1, 1]
            y = np.einsum("nhwc,cf->nhwf", x.astype(np.float64), kernel[0, 0]) + bias
            return np.maximum(y, 0.0) if config["activation"] == "relu" else y
        """
        )
    )
    return tmp_path


def test_exception_in_user_code_is_error_with_its_traceback_and_run_goes_on(two_layer):
    d = two_layer
    result = run_cli(d / "two.keras", d / "x.npy", "--impl", f"first={d / 'impls.py'}:broken")
    assert result.exit_code == 1
    assert "Error in first:" in result.stdout and "RuntimeError: my bug on purpose" in result.stdout
    assert "in _inner" in result.stdout and "convdiff/" not in result.stdout.split("Error in")[1]
    data = json.loads(
        run_cli(
            d / "two.keras", d / "x.npy", "--impl", f"first={d / 'impls.py'}:broken", "--json", "-"
        ).stdout
    )
    first, second = data["layers"]
    assert first["status"] == "error" and "raise RuntimeError" in first["traceback"]
    assert second["status"] in ("identical", "rounding")  # compared after the error
    assert data["passed"] is False


def test_wrong_shape_is_error_with_expected_and_received(two_layer):
    d = two_layer
    data = json.loads(
        run_cli(
            d / "two.keras",
            d / "x.npy",
            "--impl",
            f"first={d / 'impls.py'}:wrong_shape",
            "--json",
            "-",
        ).stdout
    )
    reason = data["layers"][0]["reason"]
    assert data["layers"][0]["status"] == "error"
    assert "returned shape (1, 6, 6, 1)" in reason and "(1, 4, 4, 3)" in reason


def test_config_keyword_class_key_and_module_form(two_layer, monkeypatch):
    d = two_layer
    monkeypatch.syspath_prepend(str(d))
    data = json.loads(
        run_cli(
            d / "two.keras", d / "x.npy", "--impl", "second=impls:with_config", "--json", "-"
        ).stdout
    )
    assert data["layers"][1]["impl"] == "impls:with_config"
    assert data["layers"][1]["status"] in ("identical", "rounding")
    # keyed by class: both Conv2D layers; a name key wins over the class key
    data = json.loads(
        run_cli(
            d / "two.keras",
            d / "x.npy",
            "--impl",
            f"Conv2D={d / 'impls.py'}:broken",
            "--impl",
            "second=impls:with_config",
            "--json",
            "-",
        ).stdout
    )
    assert data["layers"][0]["status"] == "error"
    assert data["layers"][1]["impl"] == "impls:with_config"


def test_python_api_with_callables(examples):
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_conv2d", examples / "my_conv2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = convdiff.compare(
        str(examples / "one_layer.h5"),
        examples / "one_layer_input.npy",
        impls={"conv2d": module.forward_flipped},
    )
    assert report.first_divergent.name == "conv2d" and not report.passed
    data = report.to_dict()
    assert data["layers"][0]["status"] == "divergent"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("conv2d", "expects KEY=path/to/file.py:function"),
        ("conv2d=examples/nothere.py:f", "does not exist"),
        ("conv2d=examples/my_conv2d.py:nope", "has no function 'nope'"),
        ("conv9=examples/my_conv2d.py:forward_loop", "matches no layer"),
        ("conv2d=no_such_module_xyz:f", "cannot import module"),
    ],
)
def test_bad_impl_spec_is_one_error_line(one_layer, spec, fragment):
    result = run_cli(*one_layer, "--impl", spec)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]


def test_an_error_is_not_summed_up_as_all_within_bound(two_layer):
    d = two_layer
    result = run_cli(d / "two.keras", d / "x.npy", "--impl", f"first={d / 'impls.py'}:wrong_shape")
    assert result.exit_code == 1
    assert "every compared difference is within its rounding bound" not in result.stdout
    assert "No compared layer diverged, but 1 layer could not be compared: first" in (
        " ".join(result.stdout.split())
    )


def test_a_nan_against_a_number_is_said_in_the_row_summary_and_reason(two_layer):
    d = two_layer
    impl = f"first={d / 'impls.py'}:nan_at"
    data = json.loads(run_cli(d / "two.keras", d / "x.npy", "--impl", impl, "--json", "-").stdout)
    first = data["layers"][0]
    said = f"1 NaN from {d / 'impls.py'}:nan_at where Keras has a number, first at [0, 1, 2, 0]"
    assert first["status"] == "divergent" and first["nan_mismatch"] == 1
    assert first["reason"].endswith(said), first["reason"]
    assert first["bound_ratio"] == "inf"
    result = run_cli(d / "two.keras", d / "x.npy", "--impl", impl)
    text = " ".join(result.stdout.split())
    assert result.exit_code == 1
    assert f"First divergent layer: first (Conv2D) - {said}" in text
    row = next(line for line in result.stdout.splitlines() if " first " in line)
    assert "divergent" in row and "NaN" in row and "inf" in row


def test_propagated_mode_resumes_after_a_divergent_layer(two_layer):
    """Downstream of a divergence the NumPy side continues from Keras's output, so the next
    layer is judged on its own rounding, not on the difference it received."""
    d = two_layer
    impl = f"first={d / 'impls.py'}:negated"
    args = (d / "two.keras", d / "x.npy", "--impl", impl, "--mode", "propagated")
    data = json.loads(run_cli(*args, "--json", "-").stdout)
    first, second = data["layers"]
    assert first["status"] == "divergent" and first["resumed_after"] is None
    assert second["status"] in ("identical", "rounding"), second
    assert second["resumed_after"] == "first" and second["amplification"] is None
    assert second["bound_ratio"] <= 1
    text = " ".join(run_cli(*args).stdout.split())
    assert "Later layers are fed from Keras's output of first on the NumPy side" in text


def test_a_returned_list_is_named_as_such(two_layer):
    d = two_layer
    impl = f"first={d / 'impls.py'}:as_list"
    data = json.loads(run_cli(d / "two.keras", d / "x.npy", "--impl", impl, "--json", "-").stdout)
    first = data["layers"][0]
    assert first["status"] in ("identical", "rounding")
    assert first["reason"] == (
        f"your implementation {d / 'impls.py'}:as_list returned a list (read as float64); "
        "rounded to float32 for the comparison"
    )
