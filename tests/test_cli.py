"""The command line: exit statuses, exact one-line errors, JSON, on real saved models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from support import assert_error, run_cli, save_with_user_layers

# --------------------------------------------------------------------------- success and failure


def test_example_exit_0_and_table(examples):
    result = run_cli(examples / "one_layer.h5", examples / "one_layer_input.npy")
    assert result.exit_code == 0, result.output
    assert "conv2d" in result.stdout and "Conv2D" in result.stdout and "1x64x64x32" in result.stdout
    assert "No layer diverged" in result.stdout and "PASS" in result.stdout


def test_json_stdout_has_required_fields(examples):
    result = run_cli(examples / "deep8.keras", examples / "deep8_input.npy", "--json", "-")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    for key in ("passed", "first_divergent", "settings", "environment", "layers"):
        assert key in report
    assert report["passed"] is True and report["first_divergent"] is None
    assert report["settings"]["order"] == "auto" and report["settings"]["fma"] is True
    assert {"tensorflow", "keras", "numpy", "onednn"} <= set(report["environment"])
    layer = report["layers"][0]
    for key in (
        "index",
        "name",
        "class",
        "output_shape",
        "dtype",
        "status",
        "reason",
        "max_ulp",
        "mean_ulp",
        "p99_ulp",
        "max_abs",
        "max_rel",
        "mismatch_fraction",
        "bound_ratio",
        "over_budget",
        "worst",
    ):
        assert key in layer
    assert [entry["name"] for entry in report["layers"]] == [f"conv{i}" for i in range(8)]


def test_json_file_and_table(examples, tmp_path):
    out = tmp_path / "report.json"
    result = run_cli(examples / "one_layer.keras", examples / "one_layer_input.npy", "--json", out)
    assert result.exit_code == 0 and "conv2d" in result.stdout
    assert json.loads(out.read_text())["layers"][0]["class"] == "Conv2D"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def test_over_budget_exits_1(examples):
    # Without FMA the products are rounded before the add: ~26% of outputs differ by a few ULP.
    args = [examples / "one_layer.h5", examples / "one_layer_input.npy", "--no-fma", "--json", "-"]
    report = json.loads(run_cli(*args).stdout)
    assert report["layers"][0]["status"] == "rounding" and report["layers"][0]["max_ulp"] > 0
    result = run_cli(*args, "--max-ulp", "0")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["over_budget"] == ["conv2d"]
    assert data["layers"][0]["over_budget"] is True and data["first_divergent"] is None
    roomy = run_cli(*args, "--max-ulp", str(report["layers"][0]["max_ulp"]))
    assert roomy.exit_code == 0


def test_propagated_mode_and_orders(examples):
    for order in ("pairwise", "kahan", "blocked:8", "blas", "float64", "exact", "reverse"):
        result = run_cli(
            examples / "deep8.keras",
            examples / "deep8_input.npy",
            "--mode",
            "propagated",
            "--order",
            order,
            "--json",
            "-",
        )
        report = json.loads(result.stdout)
        assert result.exit_code == 0, (order, report["counts"])
        assert report["settings"]["mode"] == "propagated"


def test_random_input(examples):
    result = run_cli(examples / "deep8.keras", "--random-input", "--seed", "4", "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["inputs"] == "random"


def test_notes_for_cast_and_batch_axis(examples, tmp_path):
    x = np.load(examples / "one_layer_input.npy")[0].astype(np.float64)  # no batch axis, float64
    np.save(tmp_path / "x.npy", x)
    result = run_cli(examples / "one_layer.h5", tmp_path / "x.npy")
    assert result.exit_code == 0
    assert "added a batch axis" in result.stderr and "cast from float64 to float32" in result.stderr


def test_the_command_ends_as_a_normal_exit_does_less_the_teardown(examples):
    """python -m convdiff ends its process without Python's teardown, yet a reader of its
    pipe gets the whole report (stdout is flushed), and the exit status is the command's."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "convdiff",
            str(examples / "one_layer.h5"),
            str(examples / "one_layer_input.npy"),
            "--json",
            "-",
            "--max-ulp",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    report = json.loads(done.stdout)  # the whole document, not a block of it
    over = any(layer["status"] != "identical" for layer in report["layers"])
    assert done.returncode == (1 if over else 0), done.stderr


@pytest.mark.parametrize(
    ("status", "code", "stderr"),
    [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("stopped here", 1, "stopped here\n")],
)
def test_ending_the_process_runs_atexit_and_flushes(tmp_path, status, code, stderr):
    """_end_process: atexit functions run, a pipe gets every buffered block, the status is
    SystemExit's (a message goes to stderr with status 1), and nothing after it runs."""
    marker = tmp_path / "atexit.txt"
    script = textwrap.dedent(
        f"""
        import atexit, sys
        from convdiff.cli import _end_process
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
        sys.stdout.write("x" * 300_000)  # several blocks of a block-buffered pipe
        _end_process({status!r})
        print("after the end")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (code, stderr)
    assert done.stdout == "x" * 300_000
    assert marker.read_text() == "ran"


def test_help_does_not_import_tensorflow():
    code = (
        "import sys; from convdiff.cli import invoke; sys.argv=['convdiff','--help']\n"
        "try:\n    invoke()\nexcept SystemExit:\n    pass\nassert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("OPENBLAS_THREAD_TIMEOUT", None, "4"),
        ("OPENBLAS_THREAD_TIMEOUT", "20", "20"),
        ("NUMPY_MADVISE_HUGEPAGE", None, "0"),
        ("NUMPY_MADVISE_HUGEPAGE", "1", "1"),
    ],
)
def test_numpy_settings_are_made_before_numpy_loads(name, given, expected):
    """The command line sets OpenBLAS's idle wait to its least and turns NumPy's advice for
    2 MiB pages off before NumPy (and so OpenBLAS) is loaded; a value the user set stays."""
    code = (
        "import os, sys; from convdiff.cli import invoke; sys.argv=['convdiff','--help']\n"
        "assert 'numpy' not in sys.modules\n"
        "try:\n    invoke()\nexcept SystemExit:\n    pass\n"
        f"print(os.environ[{name!r}])"
    )
    env = {k: v for k, v in os.environ.items() if k != name}
    if given is not None:
        env[name] = given
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    assert done.stdout.splitlines()[-1] == expected


def test_paths_are_checked_before_tensorflow_is_imported(examples, tmp_path):
    """A missing input file is reported at once, not after TensorFlow's import (seconds)."""
    argv = ["convdiff", str(examples / "one_layer.h5"), str(tmp_path / "no.npy")]
    code = (
        f"import sys; from convdiff.cli import invoke\nsys.argv = {argv!r}\n"
        "try:\n    invoke()\nexcept SystemExit as exc:\n    assert exc.code == 2, exc.code\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported first'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"Error: input file {str(tmp_path / 'no.npy')!r} does not exist"


def test_a_broken_installation_is_one_error_line(examples, monkeypatch):
    """An import failure inside convdiff (a stale or shadowed install) exits 2 with one line:
    a CI must not read it as exit 1, a layer that failed."""
    monkeypatch.setitem(sys.modules, "convdiff.api", None)  # importing it raises ImportError
    result = run_cli(examples / "one_layer.h5", examples / "one_layer_input.npy")
    assert_error(result, "convdiff could not import convdiff.api", "reinstall")


# --------------------------------------------------------------------------- errors: exit 2


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.h5").write_bytes(b"")
    (d / "text.h5").write_text("not a model")
    (d / "notzip.keras").write_bytes(b"PK\x03\x04garbage")
    with zipfile.ZipFile(d / "nocfg.keras", "w") as z:
        z.writestr("other.txt", "x")
    good = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    good.save(d / "good.h5")
    good.save_weights(d / "weights.weights.h5")
    (d / "weights_only.h5").write_bytes((d / "weights.weights.h5").read_bytes())
    data = (d / "good.h5").read_bytes()
    (d / "truncated.h5").write_bytes(data[: len(data) // 3])
    lam = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
    lam.save(d / "lambda.keras")
    lam.save(d / "lambda.h5")
    np.save(d / "x.npy", np.zeros((1, 4), np.float32))
    raw = (d / "x.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[:-7])
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array([["a", "b", "c", "d"]]))
    np.save(d / "wrong_shape.npy", np.zeros((1, 5), np.float32))
    np.save(d / "wrong_rank.npy", np.zeros((1, 2, 4), np.float32))
    np.savez(d / "extra.npz", x=np.zeros((1, 4), np.float32), y=np.zeros((1, 4), np.float32))
    return d


@pytest.mark.parametrize(
    ("model", "inp", "fragments"),
    [
        ("missing.h5", "x.npy", ["does not exist"]),
        (".", "x.npy", ["is a directory"]),
        ("empty.h5", "x.npy", ["is empty"]),
        ("text.h5", "x.npy", ["neither a .keras archive", "nor an HDF5"]),
        ("notzip.keras", "x.npy", ["not a readable .keras archive"]),
        ("nocfg.keras", "x.npy", ["without config.json"]),
        ("weights_only.h5", "x.npy", ["weights only"]),
        ("truncated.h5", "x.npy", ["corrupt or truncated"]),
        ("lambda.keras", "x.npy", ["Lambda layer", "--unsafe"]),
        ("lambda.h5", "x.npy", ["Lambda layer", "--unsafe"]),
        ("good.h5", "missing.npy", ["input file", "does not exist"]),
        ("good.h5", "truncated.npy", ["not a readable .npy"]),
        ("good.h5", "objects.npy", ["Python objects", "refused"]),
        ("good.h5", "strings.npy", ["dtype <U1", "expected a numeric array"]),
        ("good.h5", "wrong_shape.npy", ["has shape (1, 5)", "the model expects (None, 4)"]),
        ("good.h5", "wrong_rank.npy", ["has shape (1, 2, 4)", "the model expects (None, 4)"]),
        ("good.h5", "extra.npz", ["unexpected ['x', 'y']"]),
    ],
)
def test_bad_input_is_one_error_line(bad_files, model, inp, fragments):
    model_path = bad_files / model if model != "." else bad_files
    assert_error(run_cli(model_path, bad_files / inp), *fragments)


def test_lambda_runs_with_unsafe(bad_files):
    result = run_cli(bad_files / "lambda.keras", bad_files / "x.npy", "--unsafe", "--json", "-")
    report = json.loads(result.stdout)
    assert report["layers"][0]["status"] == "skipped"
    assert "no NumPy kernel for Lambda" in report["layers"][0]["reason"]
    assert result.exit_code == 0


def test_usage_errors(bad_files, tmp_path):
    good, x = bad_files / "good.h5", bad_files / "x.npy"
    assert_error(run_cli(good), "INPUT file or --random-input")
    assert_error(run_cli(good, x, "--random-input"), "not both")
    assert_error(run_cli(good, x, "--order", "zigzag"), "unknown order 'zigzag'", "valid choices")
    assert_error(run_cli(good, x, "--order", "blocked:0"), "positive block size")
    assert_error(run_cli(good, x, "--accumulate", "int8"), "unknown accumulator dtype")
    assert_error(run_cli(good, x, "--mode", "sideways"), "Invalid value for '--mode'")
    assert_error(run_cli(good, x, "--json", tmp_path / "no" / "dir.json"), "does not exist")
    assert_error(run_cli(good, x, "--json", tmp_path), "is a directory")


def test_tap_order_is_checked(bad_files, examples):
    good, x = bad_files / "good.h5", bad_files / "x.npy"
    assert_error(
        run_cli(good, x, "--tap-order", "xyz"), "--tap-order 'xyz' is not an order", "hwc (Conv2D"
    )
    assert_error(run_cli(good, x, "--tap-order", "hhw"), "--tap-order 'hhw' is not an order")
    # wc is an order of Conv1D's axes, but this model has only a Dense layer
    assert_error(
        run_cli(good, x, "--tap-order", "wc"), "applies to no layer", "none (no convolution)"
    )
    deep = (examples / "deep8.keras", examples / "deep8_input.npy")
    assert_error(run_cli(*deep, "--tap-order", "wc"), "applies to no layer", "hwc (Conv2D)")


def test_tap_order_changes_the_sum(examples):
    """Input channels outermost is another order of the same terms: the header says so and the
    figures are those of that order (16 input channels: some sums round differently)."""
    deep = (examples / "deep8.keras", examples / "deep8_input.npy")
    default = json.loads(run_cli(*deep, "--json", "-", "--layers", "conv1").stdout)
    result = run_cli(*deep, "--tap-order", "chw", "--json", "-", "--layers", "conv1")
    chw = json.loads(result.stdout)
    assert chw["settings"]["tap_order"] == "chw" and "taps=chw" in chw["settings"]["order_label"]
    assert chw["layers"][0]["status"] in ("identical", "rounding")
    figures = [
        (r["layers"][0]["max_ulp"], r["layers"][0]["mismatch_count"]) for r in (default, chw)
    ]
    assert figures[0] != figures[1], figures


def test_missing_custom_object_names_class(tmp_path, keras_registry):
    """A custom class that the user's file registers, in a model saved where that file ran: the
    loader, which has not run it, names the class; with --custom-objects it loads."""
    import keras

    layer_file = tmp_path / "my_layers.py"
    layer_file.write_text(
        textwrap.dedent(
            """
        import keras

        @keras.saving.register_keras_serializable(package="demo")
        class Doubler(keras.layers.Layer):
            def call(self, x):
                return x * 2
        """
        )
    )

    def build(user):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), user["Doubler"]()])

    save_with_user_layers(layer_file, build, tmp_path / "custom.keras")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    assert "demo>Doubler" not in keras.saving.get_custom_objects()
    assert_error(
        run_cli(tmp_path / "custom.keras", tmp_path / "x.npy"),
        "custom class 'demo>Doubler'",
        "--custom-objects",
    )
    result = run_cli(
        tmp_path / "custom.keras", tmp_path / "x.npy", "--custom-objects", layer_file, "--json", "-"
    )
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [entry["status"] for entry in layers][1] == "skipped"
    assert "no NumPy kernel for Doubler" in layers[1]["reason"]
    assert layers[0]["status"] in ("identical", "rounding")


def test_divergent_layer_exits_1_and_is_named(tmp_path, monkeypatch, keras_registry):
    """A kernel with the wrong maths (x*3 for a layer computing x*2) is divergent: exit 1."""
    import keras

    from convdiff import kernels

    layer_file = tmp_path / "scale_layers.py"
    layer_file.write_text(
        textwrap.dedent(
            """
        import keras

        @keras.saving.register_keras_serializable(package="demo")
        class Twice(keras.layers.Layer):
            def call(self, x):
                return x * 2
        """
        )
    )

    def build(user):
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, name="d"),
                user["Twice"](name="twice"),
                keras.layers.Dense(2, name="after"),
            ]
        )

    save_with_user_layers(layer_file, build, tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    key = "convdiff_custom_scale_layers.Twice"
    args = [tmp_path / "m.keras", tmp_path / "x.npy", "--custom-objects", layer_file]
    kernels.registry()
    monkeypatch.setitem(kernels.REGISTRY, key, lambda spec, inputs, nx: nx.mul(inputs[0], 3.0))
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "First divergent layer: twice (Twice)" in result.stdout and "FAIL" in result.stdout
    data = json.loads(run_cli(*args, "--json", "-").stdout)
    assert data["first_divergent"] == "twice" and data["passed"] is False
    assert [entry["status"] for entry in data["layers"]][2] in ("identical", "rounding")
    monkeypatch.setitem(kernels.REGISTRY, key, lambda spec, inputs, nx: nx.mul(inputs[0], 2.0))
    assert run_cli(*args).exit_code == 0


def test_order_all_ranks_every_candidate(examples):
    result = run_cli(
        examples / "deep8.keras",
        examples / "deep8_input.npy",
        "--order",
        "all",
        "--layers",
        "conv0",
        "--json",
        "-",
    )
    report = json.loads(result.stdout)
    layer = report["layers"][0]
    assert report["settings"]["order_label"] == "all (best per layer)"
    names = [o["order"] for o in layer["orders"]]
    assert len(names) == len(set(names)) >= 16 and "eigen" in names and "exact" in names
    keys = [(not o["bit_exact"], o["max_ulp"], o["mismatch_fraction"]) for o in layer["orders"]]
    assert keys == sorted(keys)  # best first
    assert layer["status"] in ("identical", "rounding")
    # the layer's own figures are those of the best order
    assert layer["max_ulp"] == layer["orders"][0]["max_ulp"]


def test_histogram_worst_and_growth(examples):
    args = [
        examples / "deep8.keras",
        examples / "deep8_input.npy",
        "--mode",
        "propagated",
        "--no-fma",
        "--layers",
        "conv[67]",
    ]
    table = run_cli(*args, "--histogram", "--show-worst", "3").stdout
    assert "ULP distribution" in table and "Worst elements" in table
    assert "Growth over depth" in table and "Largest amplification" in table
    report = json.loads(run_cli(*args, "--histogram", "--show-worst", "3", "--json", "-").stdout)
    for layer in report["layers"][1:]:  # the first layer receives no difference to amplify
        counts = dict((bucket, n) for bucket, n in layer["histogram"])
        assert sum(counts.values()) == 1 * 32 * 32 * 16 and counts["0"] > 0
        worst = layer["worst_elements"]
        assert len(worst) == 3 and worst[0]["ulp"] == layer["max_ulp"]
        assert {"index", "reference", "candidate", "exact", "bound"} <= set(worst[0])
        assert layer["amplification"] is not None and layer["amplification"] > 0
        assert 0 < layer["max_ulp_scaled"] < layer["max_ulp"]


def test_scaled_ulp_metric_budget(examples):
    args = [examples / "deep8.keras", examples / "deep8_input.npy", "--no-fma", "--json", "-"]
    raw = json.loads(run_cli(*args, "--max-ulp", "100").stdout)
    scaled = json.loads(run_cli(*args, "--max-ulp", "100", "--ulp-metric", "scaled").stdout)
    # raw ULPs explode where outputs are small differences of large terms; scaled ones do not
    assert raw["passed"] is False and scaled["passed"] is True


def test_tensorflow_is_imported_after_the_model_check_starts(examples):
    """The command line leaves TensorFlow's import to compare(), which starts the model file's
    check in a child process first, so that the two overlap (importing TensorFlow takes
    seconds). A fresh process records whether TensorFlow was loaded when compare() began."""
    script = textwrap.dedent(
        f"""
        import sys
        import convdiff.api as api

        def compare(*args, **kwargs):
            print("tensorflow imported:", "tensorflow" in sys.modules)
            raise SystemExit(0)

        api.compare = compare
        from convdiff.cli import main
        main([{str(examples / "one_layer.h5")!r}, {str(examples / "one_layer_input.npy")!r},
              "--no-onednn"])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tensorflow imported: False" in done.stdout


def test_help_lists_commands_and_options_by_concern():
    result = run_cli("--help")
    assert result.exit_code == 0
    text = result.stdout
    sections = ["Input:", "What the NumPy side computes:", "Budgets and reports (CI):"]
    sections += ["Looking closer:", "Where Keras runs:", "Loading:"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions), positions
    assert "compare-runs" in text.split("Commands:")[1] and "--order" in text
    assert text.index("--tf32") > text.index("Where Keras runs:") > text.index("--show-worst")
    assert "RECORDING_A RECORDING_B" in run_cli("compare-runs", "--help").stdout


def test_the_compare_command_is_the_default(examples):
    args = [examples / "one_layer.h5", examples / "one_layer_input.npy", "--json", "-"]
    default, named = run_cli(*args), run_cli("compare", *args)
    assert default.exit_code == named.exit_code == 0
    layers = [json.loads(r.stdout)["layers"][0]["status"] for r in (default, named)]
    assert layers[0] == layers[1] in ("identical", "rounding")
