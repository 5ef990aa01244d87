"""Device, TF32, determinism, threads and --repeat: switches that change where Keras runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import run_cli

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def test_gpu_without_gpu_is_one_error_line(examples):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    result = run_cli(examples / "deep8.keras", "--random-input", "--device", "gpu")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("Error: --device gpu: TensorFlow sees no GPU (it sees CPU:0)")
    assert "\n" not in line


def test_repeat_and_environment(examples):
    result = run_cli(
        examples / "deep8.keras",
        "--random-input",
        "--repeat",
        "3",
        "--deterministic",
        "--json",
        "-",
    )
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["settings"]["repeat"] == 3
    # On a CPU the same op on the same input gives the same bits every run.
    assert [layer["repeat_max_ulp"] for layer in report["layers"]] == [0] * 8
    env = report["environment"]
    assert env["device"] == "cpu" and env["tf32"] is False and env["deterministic"] is True
    assert isinstance(env["cpu_flags"], list) and "onednn" in env
    table = run_cli(examples / "deep8.keras", "--random-input", "--repeat", "2").stdout
    assert "Keras gave bit-identical outputs in all 2 runs." in table


def test_repeat_must_be_positive(examples):
    result = run_cli(examples / "deep8.keras", "--random-input", "--repeat", "0")
    assert result.exit_code == 2 and result.stderr.startswith("Error: ")


@pytest.mark.parametrize("onednn", [True, False])
def test_threads_and_onednn_in_a_fresh_process(examples, onednn):
    """Thread counts and oneDNN must be set before TensorFlow starts: a fresh process."""
    flag = "--onednn" if onednn else "--no-onednn"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convdiff",
            str(examples / "deep8.keras"),
            "--random-input",
            "--threads",
            "1",
            flag,
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)["environment"]
    assert env["intra_op_threads"] == 1
    assert env["onednn"] is onednn


@pytest.mark.gpu
def test_gpu_run_records_the_card(examples):
    if not has_gpu():
        pytest.skip("no GPU visible to TensorFlow")
    for tf32 in ("--tf32", "--no-tf32"):
        result = run_cli(
            examples / "one_layer.h5",
            examples / "one_layer_input.npy",
            "--device",
            "gpu",
            tf32,
            "--json",
            "-",
        )
        report = json.loads(result.stdout)
        assert report["environment"]["device"] == "gpu" and report["environment"]["device_name"]
        assert report["environment"]["tf32"] is (tf32 == "--tf32")
        assert report["first_divergent"] is None


def _fresh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convdiff", *args], capture_output=True, text=True, check=False
    )


def test_jax_backend_against_numpy(examples):
    pytest.importorskip("jax", reason="the jax extra is not installed")
    proc = _fresh(
        str(examples / "deep8.keras"),
        str(examples / "deep8_input.npy"),
        "--backend",
        "jax",
        "--mode",
        "propagated",
        "--json",
        "-",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["environment"]["backend"] == "jax" and report["environment"]["backend_version"]
    assert {layer["status"] for layer in report["layers"]} <= {"identical", "rounding"}


def test_missing_backend_says_how_to_install(examples):
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    proc = _fresh(str(examples / "deep8.keras"), "--random-input", "--backend", "torch")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "Error: --backend torch needs the torch package, which is not installed; "
        "install it with: pip install 'convdiff[torch]'"
    )


# --------------------------------------------------------------------------- oneDNN


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("0", False), ("false", False), ("False", False)],
)
def test_onednn_setting_reads_what_tensorflow_reads(monkeypatch, value, expected):
    from convdiff.runtime import onednn_default, onednn_setting

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", value)
    assert onednn_setting() is expected
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "maybe")  # TensorFlow warns, keeps its default
    assert onednn_setting() is onednn_default()


def test_tensorflow_agrees_with_the_predicted_setting():
    """convdiff predicts oneDNN's state before TensorFlow is imported (to decide whether a
    channels_first model needs it turned on): the prediction is what TensorFlow then does."""
    from convdiff.runtime import environment, onednn_setting

    assert environment()["onednn"] is onednn_setting()


@pytest.fixture(scope="module")
def channels_first_model(tmp_path_factory):
    import keras
    import numpy as np

    d = tmp_path_factory.mktemp("channels_first")
    keras.utils.set_random_seed(4)
    layer = keras.layers.Conv2D(4, 3, padding="same", data_format="channels_first", name="conv")
    model = keras.Sequential([keras.Input((3, 8, 8)), layer])
    model.save(d / "cf.keras")
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype("float32")
    np.save(d / "x.npy", x)
    return d / "cf.keras", d / "x.npy"


def _env_without_onednn_choice(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    return {**env, **extra}


def test_channels_first_model_runs_on_any_cpu(channels_first_model):
    """TensorFlow's CPU runs a channels_first Conv2D only through oneDNN: convdiff turns it on
    before importing TensorFlow where the CPU leaves it off by default, and says so."""
    from convdiff.runtime import onednn_default

    model, x = channels_first_model
    proc = subprocess.run(
        [sys.executable, "-m", "convdiff", str(model), str(x), "--json", "-"],
        capture_output=True,
        text=True,
        env=_env_without_onednn_choice(),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layers"][0]["status"] in ("identical", "rounding")
    assert report["environment"]["onednn"] is True
    note = "oneDNN turned on (TF_ENABLE_ONEDNN_OPTS=1): TensorFlow's CPU runs the channels_first"
    assert (note in " ".join(proc.stderr.split())) is (not onednn_default()), proc.stderr
    assert "Traceback" not in proc.stderr


def test_channels_first_model_with_onednn_off_is_one_error_line(channels_first_model):
    model, x = channels_first_model
    proc = subprocess.run(
        [sys.executable, "-m", "convdiff", str(model), str(x), "--no-onednn"],
        capture_output=True,
        text=True,
        env=_env_without_onednn_choice(),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0] == (
        "Error: Keras cannot run layer 'conv' (Conv2D, channels_first) on this CPU: TensorFlow "
        "runs it only through oneDNN, which is off here; run with --onednn (or "
        "TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported)"
    )


def _jax_gpus() -> list[str]:
    """The GPUs JAX sees, in a process of its own (the backend is chosen at Keras's import)."""
    pytest.importorskip("jax", reason="the jax extra is not installed")
    code = "import jax\ntry: print(len(jax.devices('gpu')))\nexcept RuntimeError: print(0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return ["gpu"] * int(done.stdout.strip() or 0)


def test_jax_gpu_without_gpu_is_one_error_line(examples):
    if _jax_gpus():
        pytest.skip("JAX sees a GPU here")
    proc = _fresh(
        str(examples / "deep8.keras"), "--random-input", "--backend", "jax", "--device", "gpu"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "Error: --device gpu: JAX sees no GPU; run on a machine with an NVIDIA GPU and a CUDA "
        "build of JAX (pip install 'jax[cuda12]')"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", ["--tf32", "--no-tf32"])
def test_jax_gpu_run_records_the_card(examples, tf32):
    """With a CUDA build of JAX, --backend jax --device gpu runs the Keras side on the GPU:
    the report names the card, and with TF32 off every layer is within its rounding bound."""
    if not _jax_gpus():
        pytest.skip("no GPU visible to JAX")
    args = ["--backend", "jax", "--device", "gpu", tf32, "--json", "-"]
    proc = _fresh(str(examples / "one_layer.h5"), str(examples / "one_layer_input.npy"), *args)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["environment"]["device"] == "gpu" and report["environment"]["device_name"]
    assert report["environment"]["tf32"] is (tf32 == "--tf32")
    if tf32 == "--no-tf32":
        assert report["first_divergent"] is None
