"""The runtime: importing TensorFlow (after what must be set before), the environment record
of every report, and the settings that change the numbers: the device (for every Keras
backend), TF32 (by each backend's own switch), TensorFlow's op determinism and threads.

Every function imports TensorFlow lazily, so ``convdiff --help`` and the metric tests never pay
for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convdiff import accel
from convdiff.errors import OptionError

# --------------------------------------------------------------------------- TensorFlow set-up


# CPU features for which TensorFlow turns oneDNN on by default on Linux (its
# DefaultOneDnnPolicy in tensorflow/core/util/port.cc: CPUs with neural-network instructions).
_ONEDNN_DEFAULT_FLAGS = (
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def onednn_default() -> bool:
    """Whether TensorFlow turns oneDNN on by default on this CPU (Linux x86-64)."""
    return any(flag in cpu_flags() for flag in _ONEDNN_DEFAULT_FLAGS)


def onednn_setting() -> bool:
    """Whether TensorFlow's oneDNN path is on (or will be, when it is imported): the
    ``TF_ENABLE_ONEDNN_OPTS`` values TensorFlow reads (``1``/``true``, ``0``/``false``, any
    case), else the CPU's default."""
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    return onednn_default()


def prepare_onednn(
    onednn: bool | None, device: str, needs_onednn: Callable[[], list[str]]
) -> str | None:
    """Choose TensorFlow's oneDNN path for the import to come; return a note when convdiff
    turned it on itself.

    With ``onednn`` None and no choice in the environment, oneDNN is turned on where the CPU
    leaves it off by default and the model has layers TensorFlow's CPU runs only through it
    (``needs_onednn()``: their names, e.g. channels_first Conv2D): without it Keras cannot run
    them at all. TensorFlow must not be imported yet for that.

    Raises:
        OptionError: when TensorFlow is already imported and ``onednn`` asks for a change.
    """
    if onednn is not None:
        choose_onednn(onednn)
        return None
    chosen = "TF_ENABLE_ONEDNN_OPTS" in os.environ or "tensorflow" in sys.modules
    if chosen or device != "cpu" or onednn_default():
        return None
    names = needs_onednn()
    if not names:
        return None
    choose_onednn(True)
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return (
        f"oneDNN turned on (TF_ENABLE_ONEDNN_OPTS=1): TensorFlow's CPU runs the channels_first "
        f"layers {shown} only through oneDNN, which this CPU leaves off by default "
        "(--no-onednn keeps it off)"
    )


def choose_onednn(onednn: bool | None) -> None:
    """Turn TensorFlow's oneDNN path on or off (None: its default) for the import to come.

    Only the environment is set: TensorFlow itself is imported later, by
    :func:`configure_tensorflow`, so that the model file's checks can run meanwhile.

    Raises:
        OptionError: when TensorFlow is already imported and ``onednn`` asks for a change.
    """
    if onednn is None:
        return
    wanted = "1" if onednn else "0"
    if "tensorflow" in sys.modules and onednn_setting() != onednn:
        raise OptionError(
            "--onednn/--no-onednn must be set before TensorFlow is imported; "
            "it was already imported in this process"
        )
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = wanted


def configure_tensorflow(backend: str | None = None) -> None:
    """Import Keras (with ``backend``, validated by :func:`select_backend`) and TensorFlow,
    quietly, after what must be set before their first import (:func:`prepare_onednn`).

    Raises:
        OptionError: an unknown or missing backend, or another one than Keras already has.
    """
    backend = select_backend(backend)
    with _environment(KERAS_BACKEND=backend):
        _import_tensorflow_quietly()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set for the duration (read by a library's import), then put back
    as they were: a library call leaves the process's environment as it found it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_tensorflow_quietly() -> None:
    """Import Keras and TensorFlow with their start-up log lines (oneDNN notice, CUDA probing)
    kept off stderr, unless the user asked for them (TF_CPP_MIN_LOG_LEVEL 0 or 1). Some of
    those lines are written by C++ before TensorFlow reads the variable, whatever it says, so
    stderr itself is muted meanwhile; an import error still surfaces as a Python exception."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        import keras
        import tensorflow

        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with (
            open(os.devnull, "w") as devnull,
            _environment(TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")),
        ):
            os.dup2(devnull.fileno(), 2)
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def environment() -> dict[str, Any]:
    """Versions and settings that change the numbers (recorded in every report)."""
    import keras
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        # compiled FMA chains (same bits as the NumPy engine; recorded to tell runs apart)
        "numba": accel.version(),
        "python": platform.python_version(),
        "onednn": onednn,
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- runtime settings

DEVICES = ("cpu", "gpu")
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # backend -> module
# CPU features that select different kernels (and so summation orders) in oneDNN and Eigen.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class Runtime:
    """Where and how the Keras side runs.

    Attributes:
        device: ``cpu`` or ``gpu``.
        tf32: allow TensorFloat-32 for float32 matmuls and convolutions on Ampere and newer GPUs
            (inputs rounded to 10 mantissa bits); None leaves TensorFlow's setting as it is.
        deterministic: TensorFlow op determinism (same result run to run on the same machine).
        threads: intra-op thread count (None: TensorFlow's default); TensorFlow takes it only
            before its runtime starts, and keeps it for the rest of the process.
    """

    device: str = "cpu"
    tf32: bool | None = None
    deterministic: bool = False
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The runtime the Keras side runs under now (set by runtime_scope): what --order auto's probes
# run under too, and so part of what they reveal.
_CURRENT_RUNTIME: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "convdiff_runtime", default=None
)


def current_runtime() -> Runtime:
    """The runtime of the enclosing :func:`runtime_scope` (the default one outside any)."""
    return _CURRENT_RUNTIME.get() or Runtime()


def select_backend(backend: str | None) -> str:
    """The Keras backend to use: ``backend``, else ``KERAS_BACKEND``, else tensorflow, checked
    (:func:`configure_tensorflow` sets it for Keras's import).

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
    return backend


def backend_environment() -> dict[str, Any]:
    """The Keras backend in use and its version."""
    import importlib

    import keras

    backend = keras.backend.backend()
    module = importlib.import_module(BACKENDS.get(backend, backend))
    return {"backend": backend, "backend_version": getattr(module, "__version__", "unknown")}


def prepare_runtime(runtime: Runtime) -> None:
    """Check ``runtime`` against this machine and set what TensorFlow takes only before its
    runtime starts (the thread count); the rest is applied by :func:`runtime_scope`.

    Raises:
        OptionError: an unknown device, ``gpu`` where the backend sees none, or thread counts
            asked for after TensorFlow's runtime already started.
    """
    import keras
    import tensorflow as tf

    if runtime.device not in DEVICES:
        raise OptionError(f"unknown device {runtime.device!r}; valid choices are cpu, gpu")
    backend = keras.backend.backend()
    if runtime.device == "gpu" and not gpu_names(backend):
        raise OptionError(
            f"--device gpu: {_NO_GPU[backend].format(seen=_tensorflow_devices())}; run on a "
            f"machine with an NVIDIA GPU and {_CUDA_BUILD[backend]}"
        )
    if runtime.threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
        except RuntimeError:
            if tf.config.threading.get_intra_op_parallelism_threads() != runtime.threads:
                raise OptionError(
                    "--threads must be set before TensorFlow starts its runtime; "
                    "pass a model path rather than a model object"
                ) from None


# What a backend without a GPU says, and how to get one that has it.
_NO_GPU = {
    "tensorflow": "TensorFlow sees no GPU (it sees {seen})",
    "jax": "JAX sees no GPU",
    "torch": "PyTorch sees no CUDA device",
}
_CUDA_BUILD = {
    "tensorflow": "a CUDA build of TensorFlow (pip install 'tensorflow[and-cuda]')",
    "jax": "a CUDA build of JAX (pip install 'jax[cuda12]')",
    "torch": "a CUDA build of PyTorch",
}


def _tensorflow_devices() -> str:
    import tensorflow as tf

    devices = tf.config.list_physical_devices()
    return ", ".join(d.name.replace("/physical_device:", "") for d in devices) or "nothing"


def gpu_names(backend: str) -> list[str]:
    """The GPUs the Keras backend sees, by name (empty where it sees none)."""
    if backend == "jax":
        import jax

        try:
            return [d.device_kind for d in jax.devices("gpu")]
        except RuntimeError:  # no GPU platform
            return []
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]


def device_scope(runtime: Runtime) -> contextlib.AbstractContextManager:
    """Keras's placement on the runtime's device, for every backend: the model's weights are
    made under it (a torch tensor stays on the device it was made on) and its layers run under
    it (a JAX or torch build with CUDA would otherwise take the GPU for --device cpu)."""
    import keras

    return keras.device(f"{runtime.device}:0")


@contextlib.contextmanager
def _tf32(backend: str, allowed: bool | None) -> Iterator[None]:
    """TensorFloat-32 (float32 matmul and convolution inputs rounded to 10 mantissa bits on
    Ampere and newer GPUs) allowed or not, each backend by its own switch, put back after;
    None leaves the backend's setting as it is."""
    if allowed is None:
        yield
    elif backend == "jax":
        import jax

        with jax.default_matmul_precision("tensorfloat32" if allowed else "float32"):
            yield
    elif backend == "torch":
        import torch

        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        import tensorflow as tf

        before = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(allowed)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(before)


@contextlib.contextmanager
def runtime_scope(runtime: Runtime) -> Iterator[None]:
    """Run the Keras side on the chosen device with TF32 and op determinism as asked, and put
    both settings back as they were afterwards: a library call leaves the backend as it found
    it (the thread count, which TensorFlow fixes once, is the exception). Op determinism is
    TensorFlow's."""
    from tensorflow.python.framework import config as tf_config

    determinism_before = tf_config.is_op_determinism_enabled()
    if runtime.deterministic:
        tf_config.enable_op_determinism()
    token = _CURRENT_RUNTIME.set(runtime)
    try:
        with _placement(runtime):
            yield
    finally:
        _CURRENT_RUNTIME.reset(token)
        if not determinism_before:
            tf_config.disable_op_determinism()


@contextlib.contextmanager
def _placement(runtime: Runtime) -> Iterator[None]:
    """The device and the TF32 switch of ``runtime``, which TensorFlow and JAX keep per thread."""
    import keras

    with _tf32(keras.backend.backend(), runtime.tf32), device_scope(runtime):
        yield


def thread_scope() -> contextlib.AbstractContextManager:
    """For another thread that runs Keras's layers (in a copy of the caller's context): the
    device and TF32 switch of the enclosing :func:`runtime_scope`, which that thread does not
    inherit; nothing outside one. Op determinism is process-wide and already in force."""
    runtime = _CURRENT_RUNTIME.get()
    return contextlib.nullcontext() if runtime is None else _placement(runtime)


def runtime_environment(runtime: Runtime) -> dict[str, Any]:
    """What the report records about the device the Keras side ran on (inside
    :func:`runtime_scope`: the settings in force)."""
    import keras
    from tensorflow.python.framework import config as tf_config

    backend = keras.backend.backend()
    environment: dict[str, Any] = {
        **backend_environment(),
        "device": runtime.device,
        "tf32": runtime.device == "gpu" and _tf32_enabled(backend),
        "deterministic": bool(tf_config.is_op_determinism_enabled()),
        "cpu_flags": cpu_flags(),
    }
    if runtime.device == "gpu":
        environment["device_name"] = next(iter(gpu_names(backend)), None)
        if backend == "tensorflow":
            import tensorflow as tf

            details = tf.config.experimental.get_device_details(
                tf.config.list_physical_devices("GPU")[0]
            )
            environment["compute_capability"] = details.get("compute_capability")
    return environment


def _tf32_enabled(backend: str) -> bool:
    """Whether the backend's float32 matmuls and convolutions may use TF32 now."""
    if backend == "jax":
        import jax

        precision = getattr(jax.config, "jax_default_matmul_precision", None)
        return precision in (None, "tensorfloat32", "default")
    if backend == "torch":
        import torch

        return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    import tensorflow as tf

    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


@functools.cache
def cpu_flags() -> list[str]:
    """The CPU features among :data:`CPU_FLAGS` this machine has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in present]
