"""TensorFlow runtime settings that change the numbers: device, TF32, op determinism, threads.

Every function imports TensorFlow lazily; call :func:`apply_runtime` before a model is loaded
(thread counts can only be set before TensorFlow creates its runtime).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from convdiff.errors import OptionError

DEVICES = ("cpu", "gpu")
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # backend -> module
# CPU features that select different kernels (and so summation orders) in oneDNN and Eigen.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


@dataclass(frozen=True)
class Runtime:
    """Where and how the Keras side runs.

    Attributes:
        device: ``cpu`` or ``gpu``.
        tf32: allow TensorFloat-32 for float32 matmuls and convolutions on Ampere and newer GPUs
            (inputs rounded to 10 mantissa bits). Off by default, as Keras's own tests run.
        deterministic: TensorFlow op determinism (same result run to run on the same machine).
        threads: intra-op thread count (None: TensorFlow's default).
    """

    device: str = "cpu"
    tf32: bool = False
    deterministic: bool = False
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_backend(backend: str | None) -> str:
    """Make ``backend`` Keras's backend (KERAS_BACKEND, before Keras is imported); return the
    backend in use.

    Raises:
        OptionError: an unknown backend, one whose package is not installed (with the extra to
            install), or a change after Keras was already imported with another backend.
    """
    import importlib.util
    import os
    import sys

    current = os.environ.get("KERAS_BACKEND", "tensorflow")
    backend = backend or current
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; valid choices are {', '.join(BACKENDS)}")
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        raise OptionError(
            f"--backend {backend} needs the {BACKENDS[backend]} package, which is not installed; "
            f"install it with: pip install 'convdiff[{backend}]'"
        )
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise OptionError(
            f"--backend {backend}: Keras was already imported with the "
            f"{sys.modules['keras'].backend.backend()} backend in this process"
        )
    os.environ["KERAS_BACKEND"] = backend
    return backend


def backend_environment() -> dict[str, Any]:
    """The Keras backend in use and its version."""
    import importlib

    import keras

    backend = keras.backend.backend()
    module = importlib.import_module(BACKENDS.get(backend, backend))
    return {"backend": backend, "backend_version": getattr(module, "__version__", "unknown")}


def apply_runtime(runtime: Runtime) -> None:
    """Configure TensorFlow for ``runtime``.

    Raises:
        OptionError: an unknown device, ``gpu`` where TensorFlow sees none, or thread counts
            asked for after TensorFlow's runtime already started.
    """
    import keras
    import tensorflow as tf

    if runtime.device not in DEVICES:
        raise OptionError(f"unknown device {runtime.device!r}; valid choices are cpu, gpu")
    if runtime.device == "gpu" and keras.backend.backend() != "tensorflow":
        raise OptionError(
            f"--device gpu is supported with the tensorflow backend; this run uses "
            f"{keras.backend.backend()} (which runs on the CPU here)"
        )
    if runtime.device == "gpu" and not tf.config.list_physical_devices("GPU"):
        seen = (
            ", ".join(
                d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()
            )
            or "nothing"
        )
        raise OptionError(
            f"--device gpu: TensorFlow sees no GPU (it sees {seen}); run on a machine with an "
            "NVIDIA GPU and a CUDA build of TensorFlow (pip install 'tensorflow[and-cuda]')"
        )
    tf.config.experimental.enable_tensor_float_32_execution(runtime.tf32)
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    if runtime.threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
        except RuntimeError:
            if tf.config.threading.get_intra_op_parallelism_threads() != runtime.threads:
                raise OptionError(
                    "--threads must be set before TensorFlow starts its runtime; "
                    "pass a model path rather than a model object"
                ) from None


@contextlib.contextmanager
def device_scope(runtime: Runtime) -> Iterator[None]:
    """Run the Keras side on the chosen device."""
    import keras

    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    with tf.device("/GPU:0" if runtime.device == "gpu" else "/CPU:0"):
        yield


def runtime_environment(runtime: Runtime) -> dict[str, Any]:
    """What the report records about the device the Keras side ran on."""
    import tensorflow as tf

    environment: dict[str, Any] = {
        **backend_environment(),
        "device": runtime.device,
        "tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled())
        and runtime.device == "gpu",
        "deterministic": runtime.deterministic,
        "cpu_flags": cpu_flags(),
    }
    gpus = tf.config.list_physical_devices("GPU")
    if runtime.device == "gpu" and gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        environment["device_name"] = details.get("device_name", gpus[0].name)
        environment["compute_capability"] = details.get("compute_capability")
    return environment


def cpu_flags() -> list[str]:
    """The CPU features among :data:`CPU_FLAGS` this machine has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in present]
