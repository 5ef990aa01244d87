"""Model and input files -> validated objects. The only module that imports TensorFlow/Keras
at its top level of use (every import of them is inside a function, so that ``convdiff --help``
and the metric tests never pay for TensorFlow).

Before Keras sees a model file, the whole file is read and checked in a child process with a
time limit (h5py and zipfile only: libhdf5 can loop forever or crash on a damaged file) and its
stored configuration is checked: a Lambda layer (stored Python bytecode) is refused unless
``unsafe`` is set, and a custom class that nobody supplied is named, instead of surfacing as
Keras's deserialization traceback.

Input files are read without ``np.load``: pickles are refused before anything is unpickled, and
a header's shape is checked against the bytes that follow before anything is allocated. Every
damaged file gives a :class:`~convdiff.errors.ConvdiffError` (tests/test_fuzz.py mutates files to
check it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import struct
import sys
import time
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdiff import accel
from convdiff.errors import InputError, ModelLoadError, OptionError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------- TensorFlow set-up


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
    if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != wanted:
        raise OptionError(
            "--onednn/--no-onednn must be set before TensorFlow is imported; "
            "it was already imported in this process"
        )
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = wanted


def configure_tensorflow(onednn: bool | None = None, threads: int | None = None) -> None:
    """Import TensorFlow (quietly), after setting what must be set before its first import.

    Raises:
        OptionError: when TensorFlow is already imported and ``onednn`` asks for a change.
    """
    choose_onednn(onednn)
    _import_tensorflow_quietly()
    if threads is not None:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up log lines (oneDNN notice, CUDA probing) kept off
    stderr, unless the user set TF_CPP_MIN_LOG_LEVEL. Those lines are written by C++ before
    TensorFlow reads the variable from a running process, so stderr itself is muted meanwhile;
    an import error still surfaces as a Python exception."""
    if "tensorflow" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow

        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
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


# --------------------------------------------------------------------------- model files

# What h5py raises for a damaged file: it maps HDF5's error stack onto these built-in types.
_H5_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError)
# What zipfile (and zlib under it) raise for a damaged or unusual archive.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    OSError,
    EOFError,
    ValueError,  # includes UnicodeDecodeError for a member name flagged as UTF-8
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
    OverflowError,
)
# A model's stored configuration is read whole into memory: real ones are kilobytes to a few
# megabytes, so anything past this is refused instead of read.
MAX_CONFIG_BYTES = 64 * 2**20
# keras.saving.load_model picks its loader by the file name's ending, not by the content.
_H5_SUFFIXES = (".h5", ".hdf5")
_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})


def _check_file(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse a missing, unreadable, non-regular (directory, FIFO, device) or empty file."""
    try:
        if not path.exists():
            raise error(f"{what} {str(path)!r} does not exist")
        if path.is_dir():
            raise error(f"{what} {str(path)!r} is a directory; expected a file")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise error(f"{what} {str(path)!r} is not a regular file")
        size = path.stat().st_size
    except OSError as exc:  # a parent without search permission, a name too long...
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise error(f"{what} {str(path)!r} is empty")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {str(path)!r} cannot be read (permission denied)")


def _head(path: Path, n: int, what: str, error: type[Exception]) -> bytes:
    """The first ``n`` bytes of a file (its signature)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None


def read_model_config(
    path: Path, isolated: bool = True, probe: Probe | None = None
) -> dict[str, Any]:
    """The stored model configuration of a .keras or .h5 file, without running anything.

    The whole file is read and checked first (every .keras member passes its CRC check, every
    HDF5 object, attribute and dataset can be read, inside .keras archives too), so that a
    damaged file is reported as such before Keras sees it. That reading runs in a child
    process with a time limit (see :data:`PROBE_TIMEOUT_S`): libhdf5 loops forever on some
    damaged files (measured: one flipped byte in the global heap holding ``model_config``) and
    can crash on others, which no exception handler in this process could stop.

    Args:
        path: the model file.
        isolated: read in a child process (False: in this one, for debugging).
        probe: that child, already started with :meth:`Probe.start` (it reads the file while
            this process imports TensorFlow).

    Raises:
        ModelLoadError: a missing, empty, unreadable, damaged, weights-only or misnamed file.
    """
    if probe is not None:
        return probe.result()
    _check_file(path, "model file", ModelLoadError)
    if not isolated or not sys.executable:  # embedded interpreters cannot start a child
        return _inspect_model_file(path)
    return Probe.start(path).result()


# libhdf5's worst case on a damaged file is an endless loop; a healthy file is read at disk
# speed. The limit is this many seconds plus PROBE_SECONDS_PER_GB per GB of file.
PROBE_TIMEOUT_S = 60.0
PROBE_SECONDS_PER_GB = 60.0
_PROBE_CODE = "import sys; from convdiff.loading import _probe_main; _probe_main(sys.argv[1])"


@dataclass
class Probe:
    """:func:`_inspect_model_file` running in a child process, killed if it runs too long."""

    path: Path
    process: Any = None
    started: float = 0.0
    fallback: bool = False

    @classmethod
    def start(cls, path: str | os.PathLike) -> Probe:
        """Check that the file exists and start reading it in a child process.

        Raises:
            ModelLoadError: a missing, unreadable or empty file.
        """
        import subprocess

        path = Path(path)
        _check_file(path, "model file", ModelLoadError)
        # the child imports this very package, wherever it was imported from here
        package_root = str(Path(__file__).resolve().parent.parent)
        paths = (package_root, os.environ.get("PYTHONPATH"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _PROBE_CODE, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError:  # no child can be started (process limit, memory): read it here
            return cls(path, fallback=True)
        return cls(path, process, time.monotonic())

    def result(self) -> dict[str, Any]:
        """The configuration the child read (waiting for it), or its one-line error."""
        import subprocess

        if self.fallback or self.process is None:
            return _inspect_model_file(self.path)
        limit = PROBE_TIMEOUT_S + PROBE_SECONDS_PER_GB * self.path.stat().st_size / 1e9
        remaining = max(0.0, limit - (time.monotonic() - self.started))
        try:
            stdout, stderr = self.process.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise ModelLoadError(
                f"{str(self.path)!r} could not be read within {limit:.0f} s (HDF5 loops on "
                "some damaged files); the file is corrupt"
            ) from None
        return _probe_answer(self.path, self.process.returncode, stdout, stderr)

    def close(self) -> None:
        """Stop the child if its answer is no longer wanted (an error elsewhere)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.communicate()


def _probe_answer(path: Path, returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    if returncode < 0:
        raise ModelLoadError(
            f"{str(path)!r} made the HDF5 or zip library crash (signal {-returncode}) "
            "while reading it; the file is corrupt"
        )
    try:
        answer = json.loads(stdout) if returncode == 0 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):  # an exception the probe does not expect: a bug
        raise RuntimeError(
            f"reading {str(path)!r} in a child process failed (exit status {returncode}):\n"
            + stderr.decode("utf-8", "replace")
        )
    if "error" in answer:
        raise ModelLoadError(answer["error"])
    return answer["config"]


def _probe_main(path: str) -> None:
    """The child process: print ``{"config": ...}`` or ``{"error": message}`` as JSON."""
    try:
        answer: dict[str, Any] = {"config": _inspect_model_file(Path(path))}
        text = json.dumps(answer)
    except ModelLoadError as exc:
        text = json.dumps({"error": str(exc)})
    except RecursionError:
        text = json.dumps({"error": f"{path!r} has a model configuration nested too deeply"})
    sys.stdout.write(text)


def _inspect_model_file(path: Path) -> dict[str, Any]:
    magic = _head(path, len(HDF5_MAGIC), "model file", ModelLoadError)
    if magic.startswith(ZIP_MAGIC):
        if path.suffix.lower() != ".keras":
            raise ModelLoadError(
                f"{str(path)!r} is a .keras archive (zip) but its name ends in "
                f"{path.suffix or 'no extension'!r}; Keras picks its loader by the name: "
                "rename it to .keras"
            )
        return _keras_zip_config(path)
    if magic == HDF5_MAGIC:
        return _h5_config(path)
    raise ModelLoadError(
        f"model file {str(path)!r} is neither a .keras archive (zip) nor an HDF5 .h5 file"
    )


def _keras_zip_config(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            text = _zip_config_text(archive, path)
            if "model.weights.h5" in archive.namelist():
                _check_weights_member(archive, path)
    except _ZIP_ERRORS as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a readable .keras archive ({_one_line(exc)})"
        ) from None
    return _parse_json(text, path)


def _zip_config_text(archive: zipfile.ZipFile, path: Path) -> bytes:
    if "config.json" not in archive.namelist():
        raise ModelLoadError(f"{str(path)!r} is a zip file without config.json; not a .keras model")
    damaged = archive.testzip()  # reads every member: CRC and decompression errors
    if damaged is not None:
        raise ModelLoadError(
            f"{str(path)!r} is not a readable .keras archive "
            f"(member {damaged!r} fails its CRC check: the file is corrupt)"
        )
    size = archive.getinfo("config.json").file_size
    if size > MAX_CONFIG_BYTES:
        raise ModelLoadError(
            f"{str(path)!r} has a config.json of {size:,} bytes; "
            f"more than {MAX_CONFIG_BYTES:,} is not read"
        )
    return archive.read("config.json")


def _check_weights_member(archive: zipfile.ZipFile, path: Path) -> None:
    """Read the archive's weights file whole with h5py, from a temporary copy (h5py seeking
    inside a zip member is slow: ~6 s for ResNet50's 100 MB, against 0.2 s from a file)."""
    import shutil
    import tempfile

    import h5py

    with tempfile.TemporaryDirectory(prefix="convdiff-") as tmp:
        copy = Path(tmp) / "model.weights.h5"
        with archive.open("model.weights.h5") as member, open(copy, "wb") as out:
            shutil.copyfileobj(member, out, _READ_CHUNK)
        try:
            with h5py.File(copy, "r") as f:
                _read_every_object(f, h5py)
        except _H5_ERRORS as exc:
            raise ModelLoadError(
                f"{str(path)!r} holds a corrupt model.weights.h5 ({_one_line(exc)})"
            ) from None


def _h5_config(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            version = _attr_text(f.attrs.get("keras_version"))
            has_weights = isinstance(f.get("model_weights"), h5py.Group)
            _read_every_object(f, h5py)
    except _H5_ERRORS as exc:
        raise ModelLoadError(
            f"{str(path)!r} is a corrupt or truncated HDF5 file ({_one_line(exc)})"
        ) from None
    if raw is None:
        raise ModelLoadError(
            f"{str(path)!r} holds weights only (no model_config); "
            "save the whole model with model.save('model.h5') or model.save('model.keras')"
        )
    if not has_weights:
        raise ModelLoadError(
            f"{str(path)!r} has a model configuration but no 'model_weights' group; "
            "the file is incomplete or corrupt"
        )
    keras2 = version is not None and version.split(".")[0] in {"1", "2"}
    if not keras2 and path.suffix.lower() not in _H5_SUFFIXES:
        # Keras 2 files go through convdiff.compat, which reads them whatever their name.
        raise ModelLoadError(
            f"{str(path)!r} is an HDF5 model file but its name ends in "
            f"{path.suffix or 'no extension'!r}; Keras picks its loader by the name: "
            "rename it to .h5"
        )
    return _parse_json(raw, path)


def _attr_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _read_every_object(f: Any, h5py: Any) -> None:
    """Open every group and dataset, read every attribute and every dataset's data: HDF5 checks
    its structures as they are read, so a damaged file fails here with HDF5's own reason.

    Keras reads the same objects right after, from the page cache."""

    def visit(name: str, obj: Any) -> None:
        for key in obj.attrs:
            obj.attrs[key]
        if isinstance(obj, h5py.Dataset):
            obj[()]

    for key in f.attrs:
        f.attrs[key]
    f.visititems(visit)


def _parse_json(text: Any, path: Path) -> dict[str, Any]:
    if not isinstance(text, str | bytes):
        raise ModelLoadError(
            f"{str(path)!r} stores its model configuration as {type(text).__name__}, not text; "
            "the file is corrupt"
        )
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelLoadError(
            f"{str(path)!r} has a model configuration of {len(text):,} bytes; "
            f"more than {MAX_CONFIG_BYTES:,} is not read"
        )
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError covers UnicodeDecodeError
        raise ModelLoadError(
            f"{str(path)!r} has an unreadable model configuration ({_one_line(exc)})"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelLoadError(f"{str(path)!r} does not hold a Keras model configuration")
    return config


def _layer_configs(config: Any) -> Iterator[dict[str, Any]]:
    """Every nested dict that names a class (layers, nested models, initializers...), walked
    without recursion so that a deeply nested (hostile) configuration cannot overflow the stack.
    """
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def check_model_config(
    config: dict[str, Any], path: Path, unsafe: bool, custom_objects: dict[str, Any]
) -> None:
    """Refuse what safe loading forbids, name custom classes nobody supplied, and refuse a
    configuration whose layer entries are malformed (a damaged file) before Keras sees it."""
    import keras

    known_custom = {**keras.saving.get_custom_objects(), **custom_objects}
    for item in _layer_configs(config):
        name = _field(item, "class_name", path)
        inner = item.get("config")
        layer_name = inner.get("name", "?") if isinstance(inner, dict) else "?"
        if name == "Lambda" and not unsafe:
            raise ModelLoadError(
                f"{str(path)!r} contains a Lambda layer ({layer_name!r}) whose stored Python code "
                "would run on loading; refused in safe mode. "
                "Pass --unsafe only if you trust the file"
            )
        if name in _MODEL_CLASSES:
            _check_layer_list(inner, name, path)
        module = _field(item, "module", path) or ""
        registered = _field(item, "registered_name", path) or name
        builtin = module.startswith("keras")
        if module and not builtin and not _known(registered, name, known_custom):
            raise ModelLoadError(
                f"{str(path)!r} needs the custom class {registered!r} (layer {layer_name!r}), "
                "which was not supplied; "
                "pass --custom-objects FILE.py that defines and registers it"
            )


def _field(item: dict[str, Any], key: str, path: Path) -> str | None:
    """A text field of a configuration entry (None when absent)."""
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise ModelLoadError(
            f"{str(path)!r} has a model configuration whose {key!r} is "
            f"{type(value).__name__}, not text; the file is corrupt"
        )
    return value


def _check_layer_list(inner: Any, model_class: str, path: Path) -> None:
    """A Sequential or Functional entry lists its layers (Keras 1 stored the list itself as
    the config), each an entry that names a class."""
    layers = inner.get("layers") if isinstance(inner, dict) else inner
    if not isinstance(layers, list):
        raise ModelLoadError(
            f"{str(path)!r} has a {model_class} configuration without a list of layers; "
            "the file is corrupt"
        )
    for i, layer in enumerate(layers):
        if not (isinstance(layer, dict) and isinstance(layer.get("class_name"), str)):
            raise ModelLoadError(
                f"{str(path)!r} has a malformed layer entry (number {i}) in its {model_class} "
                "configuration (no class_name); the file is corrupt"
            )


def _known(registered: str, name: str, known: dict[str, Any]) -> bool:
    return registered in known or name in known or registered.split(">")[-1] in known


def load_custom_objects(path: str | None) -> dict[str, Any]:
    """Import a user's Python file of custom layers; return its classes and functions by name.

    The file is the user's own code, named on the command line: importing it runs it.
    """
    if path is None:
        return {}
    file = Path(path)
    _check_file(file, "--custom-objects file", OptionError)
    if file.suffix != ".py":
        raise OptionError(f"--custom-objects expects a .py file; received {str(file)!r}")
    # the file will import Keras: TensorFlow's start-up lines are kept off stderr first
    _import_tensorflow_quietly()
    spec = importlib.util.spec_from_file_location(f"convdiff_custom_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return {k: v for k, v in vars(module).items() if isinstance(v, type) or callable(v)}


def load_model(
    path: str | os.PathLike,
    unsafe: bool = False,
    custom_objects: dict | None = None,
    probe: Probe | None = None,
):
    """Load a .keras or .h5 (Keras 3 or Keras 2) model in Keras safe mode (``probe``: the
    file's checks already started, see :func:`read_model_config`).

    An .h5 file is loaded from an in-memory copy whose configuration :mod:`convdiff.compat`
    brought to Keras 3 (a Keras 2 file's fix-ups, Keras 3's own ``keras.ops`` nodes); the file
    itself is never written.

    Raises:
        ModelLoadError: missing, empty, corrupt, weights-only, unsafe or incomplete files, and
            Keras 2 files that Keras 3 cannot load faithfully.
    """
    path = Path(path)
    custom_objects = custom_objects or {}
    config = read_model_config(path, probe=probe)
    check_model_config(config, path, unsafe, custom_objects)
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from convdiff import compat

    try:
        if _head(path, len(HDF5_MAGIC), "model file", ModelLoadError) != HDF5_MAGIC:
            return keras.saving.load_model(
                path, custom_objects=custom_objects, compile=False, safe_mode=not unsafe
            )
        with compat.upgraded_h5(path) as (h5_file, operations):
            known = {**h5_builtin_objects(operations), **custom_objects}
            # the loader keras.saving.load_model uses for .h5 paths; it also takes an open file
            return legacy_h5_format.load_model_from_hdf5(
                h5_file, custom_objects=known, compile=False, safe_mode=not unsafe
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # Keras raises many types for a file it cannot rebuild
        raise ModelLoadError(f"Keras could not load {str(path)!r}: {_one_line(exc)}") from None


def h5_builtin_objects(operations: set[str]) -> dict[str, Any]:
    """Keras's own classes that its .h5 loader cannot find by the name the file stores:
    the applications' internal layers, and the marked ``keras.ops`` operations
    (see :func:`convdiff.compat.mark_operations`)."""
    import keras
    from keras.src import ops

    from convdiff import compat

    objects = {}
    for module, names in _APPLICATION_LAYERS:
        try:
            source = importlib.import_module(module)
        except ImportError:  # an older or newer Keras: the file will name what is missing
            continue
        objects.update({n: getattr(source, n) for n in names if hasattr(source, n)})
    for name in operations:
        for module in (ops.numpy, ops.nn, ops.math, ops.core):
            cls = getattr(module, name, None)
            if _is_operation(cls, ops.Operation, keras.layers.Layer):
                objects[compat.OPERATION_PREFIX + name] = cls
                break
    return objects


def _is_operation(cls: Any, operation: type, layer: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, operation) and not issubclass(cls, layer)


# Layers defined inside keras.applications modules, which Keras 3 saves to .h5 without a module.
_APPLICATION_LAYERS = (
    ("keras.src.applications.convnext", ("LayerScale", "StochasticDepth")),
    ("keras.src.applications.inception_resnet_v2", ("CustomScaleLayer",)),
)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (None for free axes, batch first) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass
class Inputs:
    """Arrays for the model's inputs, in model input order, and notes about what was done."""

    arrays: list[np.ndarray]
    notes: list[str] = field(default_factory=list)


def input_specs(model: Any) -> list[InputSpec]:
    """The model's inputs, in order."""
    from convdiff.graph import build_graph

    names = build_graph(model).input_names
    return [
        InputSpec(name, tuple(t.shape), str(getattr(t, "dtype", "float32")))
        for name, t in zip(names, model.inputs, strict=True)
    ]


def random_inputs(specs: list[InputSpec], seed: int) -> Inputs:
    """Standard normal inputs of the model's shapes (batch 1), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = [1 if i == 0 and n is None else n for i, n in enumerate(spec.shape)]
        if any(n is None for n in shape):
            raise InputError(
                f"model input {spec.name!r} has shape {_fmt_shape(spec.shape)} with free axes; "
                "--random-input needs fixed sizes, give an input file instead"
            )
        arrays.append(rng.standard_normal(shape).astype(spec.dtype))
    return Inputs(arrays, [f"random standard-normal input, seed {seed}"])


def load_inputs(path: str | os.PathLike, specs: list[InputSpec]) -> Inputs:
    """Read ``.npy`` (one input) or ``.npz`` (one array per input) with pickles refused, and fit
    the arrays to the model's inputs (batch axis added, dtype cast, shape checked)."""
    path = Path(path)
    _check_file(path, "input file", InputError)
    return fit_inputs(_read_arrays(path, specs), specs, repr(str(path)))


def named_inputs(arrays: Mapping[str, Any], specs: list[InputSpec], source: str) -> list[Any]:
    """The values of a dict of arrays by input name, in model input order.

    Raises:
        InputError: when names are missing or unexpected.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(str(k) for k in arrays if k not in names)
    if missing or extra:
        raise InputError(
            f"{source} has arrays {sorted(str(k) for k in arrays)}; the model's inputs are "
            f"{names} (missing {missing}, unexpected {extra})"
        )
    return [arrays[n] for n in names]


def fit_inputs(arrays: list[np.ndarray], specs: list[InputSpec], source: str) -> Inputs:
    """Check arrays against the model's inputs: add a missing batch axis, cast another numeric
    dtype (with a note), refuse anything else with what was received and what was expected."""
    if len(arrays) != len(specs):
        raise InputError(
            f"{source} gives {len(arrays)} arrays; the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)})"
        )
    notes: list[str] = []
    return Inputs([_fit(a, s, source, notes) for a, s in zip(arrays, specs, strict=True)], notes)


# .npy reading. np.load is not used: it trusts the header's shape (a damaged header can make it
# allocate terabytes), turns any file it does not recognise into a pickle error, and lets zlib
# and zipfile errors through. The header is parsed by numpy's own (non-pickle) parser and checked
# against the bytes that actually follow before anything is allocated.

NPY_MAGIC = b"\x93NUMPY"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_PICKLE_PROTOCOL = b"\x80"  # pickle protocols 2 and later start with the PROTO opcode
_READ_CHUNK = 16 * 2**20
# What numpy's header parser raises on a damaged header (it evaluates a Python literal).
_NPY_HEADER_ERRORS = (
    ValueError,
    SyntaxError,
    TypeError,
    EOFError,
    OverflowError,
    RecursionError,
    MemoryError,
    struct.error,
    tokenize.TokenError,
)


def _read_arrays(path: Path, specs: list[InputSpec]) -> list[np.ndarray]:
    label = repr(str(path))
    head = _head(path, len(NPY_MAGIC), "input file", InputError)
    if head.startswith(NPY_MAGIC):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise InputError(
                f"{label} holds one array but the model has {len(specs)} inputs ({names}); "
                "give an .npz with one array per input name"
            )
        try:
            with open(path, "rb") as f:
                return [_read_npy(f, path.stat().st_size, label)]
        except OSError as exc:
            raise InputError(f"{label} cannot be read ({exc.strerror or exc})") from None
    if head.startswith((ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
        return _read_npz(path, specs, label)
    if head.startswith(_PICKLE_PROTOCOL):
        raise InputError(
            f"{label} holds Python objects (a pickle); refused: loading a pickle can run "
            "code, only numeric .npy/.npz arrays are read"
        )
    raise InputError(
        f"{label} is not a .npy or .npz file (it starts with neither the NumPy nor the zip "
        "signature); save the input with numpy.save or numpy.savez"
    )


def _read_npy(fp: Any, size: int, where: str) -> np.ndarray:
    """One array from an open .npy stream of ``size`` bytes, checked before allocation."""
    shape, fortran_order, dtype = _npy_header(fp, where)
    if dtype.hasobject:
        raise InputError(
            f"{where} holds Python objects (a pickle); refused: only numeric arrays are read"
        )
    if dtype.names is not None or dtype.subdtype is not None:
        raise InputError(f"{where} has the structured dtype {dtype}; expected a numeric array")
    if any(n < 0 for n in shape):
        raise InputError(
            f"{where} is not a readable .npy file: its header is damaged (shape {shape})"
        )
    nbytes = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
    follows = size - fp.tell()
    if nbytes > follows:
        raise InputError(
            f"{where} is not a readable .npy file: it is truncated (its header declares shape "
            f"{shape} of {dtype}, {nbytes:,} bytes of data, but {follows:,} bytes follow)"
        )
    from convdiff.memory import check_allocation

    check_allocation(nbytes, f"{where} (shape {shape}, {dtype})")
    if dtype.itemsize == 0:
        return np.zeros(shape, dtype)
    data = _read_exact(fp, nbytes, where)
    array = np.frombuffer(data, dtype=dtype)  # a bytearray: the array is writable
    return array.reshape(shape, order="F" if fortran_order else "C")


def _npy_header(fp: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on Python 2 era headers
            if version == (1, 0):
                return fmt.read_array_header_1_0(fp)
            if version == (2, 0):
                return fmt.read_array_header_2_0(fp)
    except _NPY_HEADER_ERRORS as exc:
        raise InputError(
            f"{where} is not a readable .npy file: its header is damaged ({_one_line(exc)})"
        ) from None
    # Version 3.0 exists only for structured dtypes with non-Latin-1 field names.
    raise InputError(
        f"{where} is a .npy file of format version {version[0]}.{version[1]}; "
        "only versions 1.0 and 2.0 (numeric arrays) are read"
    )


def _read_exact(fp: Any, nbytes: int, where: str) -> bytearray:
    """``nbytes`` from ``fp`` into one buffer, in chunks (no second full-size copy)."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    got = 0
    while got < nbytes:
        chunk = fp.read(min(_READ_CHUNK, nbytes - got))
        if not chunk:
            raise InputError(
                f"{where} is not a readable .npy file: it is truncated "
                f"({got:,} of {nbytes:,} bytes of data)"
            )
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buffer


def _read_npz(path: Path, specs: list[InputSpec], label: str) -> list[np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = _npz_members(archive, label)
            wanted = _npz_names(list(members), specs, label)
            return [_read_member(archive, members[k], f"{label} array {k!r}") for k in wanted]
    except _ZIP_ERRORS as exc:
        raise InputError(f"{label} is not a readable .npz archive ({_one_line(exc)})") from None


def _npz_members(archive: zipfile.ZipFile, label: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's arrays by name (``x.npy`` is array ``x``, as numpy.savez names them)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise InputError(
                f"{label} holds {info.filename!r}, which is not a .npy array; "
                "save the inputs with numpy.savez"
            )
        if info.flag_bits & 0x1:
            raise InputError(f"{label} holds the encrypted member {info.filename!r}; refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(
                f"{label} holds {info.filename!r} compressed with zip method "
                f"{info.compress_type}; numpy.savez writes stored or deflated members only"
            )
        members[info.filename[: -len(".npy")]] = info
    return members


def _npz_names(keys: list[str], specs: list[InputSpec], label: str) -> list[str]:
    """The archive's names in model input order: input names, or arr_0, arr_1, ..."""
    by_name = [s.name for s in specs]
    positional = [f"arr_{i}" for i in range(len(specs))]
    if set(keys) == set(by_name):
        return by_name
    if set(keys) == set(positional):
        return positional
    missing = sorted(set(by_name) - set(keys))
    extra = sorted(set(keys) - set(by_name))
    raise InputError(
        f"{label} has arrays {sorted(keys)}; the model's inputs are {by_name} "
        f"(missing {missing}, unexpected {extra}); name them by input or arr_0, arr_1, ..."
    )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    with archive.open(info) as fp:
        array = _read_npy(fp, info.file_size, where)
        while fp.read(_READ_CHUNK):  # to the member's end, where zipfile checks its CRC
            pass
    return array


def _fit(array: np.ndarray, spec: InputSpec, source: str, notes: list[str]) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"{source} input {spec.name!r} has dtype {array.dtype}; expected a numeric array "
            f"castable to {spec.dtype}"
        )
    if array.ndim == len(spec.shape) - 1 and _shape_fits(array.shape, spec.shape[1:]):
        array = array[None, ...]
        notes.append(f"input {spec.name!r}: added a batch axis, shape now {array.shape}")
    if not (array.ndim == len(spec.shape) and _shape_fits(array.shape, spec.shape)):
        raise InputError(
            f"input {spec.name!r} from {source} has shape {tuple(array.shape)}; "
            f"the model expects {_fmt_shape(spec.shape)}"
        )
    if array.size == 0:
        raise InputError(
            f"input {spec.name!r} from {source} has shape {tuple(array.shape)}, "
            "which holds no values; give at least one sample"
        )
    if array.dtype != np.dtype(spec.dtype):
        notes.append(f"input {spec.name!r}: cast from {array.dtype} to {spec.dtype}")
        array = array.astype(spec.dtype)
    _note_nonfinite(array, spec, notes)
    return np.ascontiguousarray(array)


def _note_nonfinite(array: np.ndarray, spec: InputSpec, notes: list[str]) -> None:
    """NaN and inf inputs run through (and are compared position by position); say so."""
    if array.dtype.kind != "f":
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    if nan or inf:
        notes.append(f"input {spec.name!r} holds {nan} NaN and {inf} infinite values")


def _shape_fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e is None or e == n for n, e in zip(shape, expected, strict=True)
    )


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return (
        "("
        + ", ".join("None" if n is None else str(n) for n in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )
