"""NaN and inf inputs run through: equal where both sides are NaN (or the same infinity),
counted apart (``nan_mismatch``, ``inf_mismatch``) where only one side is, never a huge ULP
figure, and never a pass because a NaN reached the bound."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from convdiff.metrics import compare, is_identical, within_bound

NAN, INF = np.nan, np.inf
LAYERS = ("conv", "relu", "pool", "flat", "dense", "softmax")


def nonfinite_input() -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((1, 8, 8, 2)).astype(np.float32)
    x[0, 1, 1, 0] = NAN
    x[0, 5, 5, 1] = INF
    x[0, 6, 2, 0] = -INF
    return x


@pytest.fixture(scope="module")
def model():
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(4, 3, padding="same", name="conv"),
            layers.ReLU(name="relu"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flat"),
            layers.Dense(5, name="dense"),
            layers.Softmax(name="softmax"),
        ]
    )


def _strict_json(text: str) -> dict:
    """JSON without the NaN/Infinity literals that strict parsers reject."""

    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def assert_nonfinite_rules(layer: dict) -> None:
    """The rules every row of a report obeys, whatever the kernels do with NaN."""
    name, status = layer["name"], layer["status"]
    assert layer["nan_mismatch"] is not None and layer["inf_mismatch"] is not None, name
    # a finite value against inf or NaN would be ~2**31 ULPs: those positions are not ULPs
    assert layer["max_ulp"] < 2**16, (name, layer["max_ulp"])
    if layer["nan_mismatch"] or layer["inf_mismatch"]:
        assert status == "divergent", (name, status, layer)
    if status in ("identical", "rounding"):
        assert layer["nan_mismatch"] == 0 and layer["inf_mismatch"] == 0, name


# --------------------------------------------------------------------------- a real model


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
def test_model_runs_through_nan_and_inf(model, mode):
    from convdiff.api import compare as compare_model
    from convdiff.report import to_json

    report = compare_model(model, nonfinite_input(), mode=mode)
    data = _strict_json(to_json(report))
    assert [layer["name"] for layer in data["layers"]] == list(LAYERS)
    for layer in data["layers"]:
        assert_nonfinite_rules(layer)
    conv = data["layers"][0]
    # The convolution spreads the NaN and the infinities over their 3x3 neighbourhoods on both
    # sides alike: NaN against NaN and inf against inf are matches.
    assert conv["status"] in ("identical", "rounding") and conv["nan_mismatch"] == 0
    assert any("holds 1 NaN and 2 infinite values" in note for note in data["notes"])


def test_keras_really_produces_nan_and_inf_there(model):
    """The model test above compares positions that are NaN and inf on the Keras side."""
    import keras

    out = keras.ops.convert_to_numpy(model.get_layer("conv")(nonfinite_input()))
    assert np.isnan(out).any() and np.isfinite(out).any()


def test_cli_on_nan_input_is_a_report_not_a_crash(model, tmp_path):
    from convdiff.cli import cli

    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", nonfinite_input())
    out = tmp_path / "report.json"
    args = [tmp_path / "m.keras", tmp_path / "x.npy", "--json", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and "Warning" not in result.stderr, result.stderr
    assert "Note: input" in result.stderr and "1 NaN and 2 infinite values" in result.stderr
    for layer in _strict_json(out.read_text())["layers"]:
        assert_nonfinite_rules(layer)


# --------------------------------------------------------------------------- one kernel


def test_bound_stays_finite_away_from_nonfinite_inputs():
    """A NaN or inf input poisons only the outputs that read it, in the value and the bound."""
    import keras

    from convdiff.evaluate import run_kernel
    from convdiff.graph import layer_spec
    from convdiff.kernels import find_kernel

    layer = keras.layers.Conv2D(4, 3, padding="same")
    x = nonfinite_input()
    keras_out = keras.ops.convert_to_numpy(layer(x))
    kernel = find_kernel(type(layer), vars(keras.layers))
    run = run_kernel(kernel, layer_spec(layer), [x])
    finite = np.isfinite(run.reference)
    assert finite.any() and (~finite).any()
    assert np.isfinite(run.bound[finite]).all()
    np.testing.assert_array_equal(np.isnan(run.output), np.isnan(keras_out))
    np.testing.assert_array_equal(np.isinf(run.output), np.isinf(keras_out))


def test_no_floating_point_warnings_on_nonfinite_inputs(model):
    """NaN and inf are data here, not accidents: a run stays silent (no RuntimeWarning)."""
    from convdiff.api import compare as compare_model

    x = nonfinite_input()
    model(x)  # builds it; Keras's own warnings (if any) are not ours
    for mode in ("isolated", "propagated"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compare_model(model, x, mode=mode)


# --------------------------------------------------------------------------- the metric


def test_both_nan_is_a_match_one_side_is_counted():
    ref = np.array([NAN, 1.0, INF, -INF, 2.0, 3.0, INF], np.float32)
    cand = np.array([NAN, NAN, INF, -3.4e38, INF, 3.0, -INF], np.float32)
    c = compare(ref, cand, np.full(ref.shape, np.inf))
    assert c.nan_mismatch == 1  # position 1
    assert c.inf_mismatch == 3  # -inf vs -max, 2 vs inf, inf vs -inf
    assert c.max_ulp == 0 and c.worst is None  # only position 5 is finite on both sides
    assert c.mismatch_count == 4
    # An infinite bound explains any finite difference, never a NaN or an infinity.
    assert not within_bound(c) and not is_identical(c)
    same = compare(ref, ref.copy(), np.zeros(ref.shape))
    assert is_identical(same) and same.nan_mismatch == same.inf_mismatch == 0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_nonfinite_positions_are_not_ulps(dtype):
    finfo = np.finfo(dtype)
    ref = np.array([finfo.max, -finfo.max, 1.0, 0.0], dtype)
    cand = np.array([INF, INF, NAN, -INF], dtype)
    c = compare(ref, cand)
    assert c.max_ulp == 0 and c.mean_ulp == 0.0 and c.max_abs == 0.0
    assert c.inf_mismatch == 3 and c.nan_mismatch == 1 and c.mismatch_fraction == 1.0


def test_nan_in_the_bound_never_passes_a_difference():
    """A NaN bound (e.g. 0 * inf in the bounded pass) is no bound: a difference there fails,
    an exact match still matches."""
    ref = np.array([1.0, 2.0], np.float32)
    cand = np.array([1.0, np.nextafter(np.float32(2.0), np.float32(3.0))], np.float32)
    bound = np.array([NAN, NAN])
    c = compare(ref, cand, bound)
    assert c.bound_ratio == INF and not within_bound(c)
    exact = compare(ref, ref.copy(), bound)
    assert is_identical(exact) and exact.bound_ratio == 0.0


def test_nan_in_the_scale_falls_back_to_the_values_own_ulp():
    """A NaN terms' magnitude gives no credit for large terms: the scaled figure is then the
    value's own ULP distance, never NaN (which every budget comparison would let through)."""
    ref = np.array([2.0, 3.0], np.float32)
    cand = np.array([np.nextafter(np.float32(2.0), np.float32(3.0)), 3.0], np.float32)
    c = compare(ref, cand, scale=np.array([NAN, NAN]))
    assert c.max_ulp == 1 and c.max_ulp_scaled is not None
    assert 0.5 <= c.max_ulp_scaled <= 2.0


def test_a_minus_inf_mask_keeps_the_bound_finite():
    """Softmax over rows with -inf entries (an attention mask) has finite outputs: their bound
    must stay finite, or any kernel, however wrong, would pass as rounding."""
    import keras
    from support import check_layer

    x = 3 * np.random.default_rng(11).standard_normal((4, 16)).astype(np.float32)
    x[:, ::3] = -INF
    check = check_layer(keras.layers.Softmax(), x)
    finite = np.isfinite(check.keras_output)
    assert finite.all() and np.isfinite(check.run.bound).all()
    assert within_bound(check.comparison)
    wrong = (check.keras_output * np.float32(1.5)).astype(np.float32)
    assert not within_bound(compare(check.keras_output, wrong, check.run.bound))
