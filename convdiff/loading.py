"""Model and input files -> validated objects. The only module that imports TensorFlow/Keras
at its top level of use (every import of them is inside a function, so that ``convdiff --help``
and the metric tests never pay for TensorFlow).

Before Keras sees a model file, its stored configuration is read with h5py/zipfile and checked:
a Lambda layer (stored Python bytecode) is refused unless ``unsafe`` is set, and a custom class
that nobody supplied is named, instead of surfacing as Keras's deserialization traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.errors import InputError, ModelLoadError, OptionError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------- TensorFlow set-up


def configure_tensorflow(onednn: bool | None = None, threads: int | None = None) -> None:
    """Set what must be set before TensorFlow is first imported.

    Raises:
        OptionError: when TensorFlow is already imported and ``onednn`` asks for a change.
    """
    if onednn is not None:
        wanted = "1" if onednn else "0"
        if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != wanted:
            raise OptionError(
                "--onednn/--no-onednn must be set before TensorFlow is imported; "
                "it was already imported in this process"
            )
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = wanted
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


def _check_file(path: Path, what: str, error: type[Exception]) -> None:
    if not path.exists():
        raise error(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory; expected a file")
    if path.stat().st_size == 0:
        raise error(f"{what} {str(path)!r} is empty")


def read_model_config(path: Path) -> dict[str, Any]:
    """The stored model configuration of a .keras or .h5 file, without running anything."""
    _check_file(path, "model file", ModelLoadError)
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(ZIP_MAGIC):
        return _keras_zip_config(path)
    if magic == HDF5_MAGIC:
        return _h5_config(path)
    raise ModelLoadError(
        f"model file {str(path)!r} is neither a .keras archive (zip) nor an HDF5 .h5 file"
    )


def _keras_zip_config(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read("config.json")
    except KeyError:
        raise ModelLoadError(
            f"{str(path)!r} is a zip file without config.json; not a .keras model"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a readable .keras archive ({exc})") from None
    return _parse_json(text, path)


def _h5_config(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} is a corrupt or truncated HDF5 file ({_one_line(exc)})"
        ) from None
    if raw is None:
        raise ModelLoadError(
            f"{str(path)!r} holds weights only (no model_config); "
            "save the whole model with model.save('model.h5') or model.save('model.keras')"
        )
    return _parse_json(raw.decode() if isinstance(raw, bytes) else raw, path)


def _parse_json(text: str | bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} has an unreadable model configuration ({exc})"
        ) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelLoadError(f"{str(path)!r} does not hold a Keras model configuration")
    return config


def _layer_configs(config: Any) -> Iterator[dict[str, Any]]:
    """Every nested dict that names a class (layers, nested models, initializers...)."""
    if isinstance(config, dict):
        if "class_name" in config:
            yield config
        for value in config.values():
            yield from _layer_configs(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layer_configs(value)


def check_model_config(
    config: dict[str, Any], path: Path, unsafe: bool, custom_objects: dict[str, Any]
) -> None:
    """Refuse what safe loading forbids, and name custom classes nobody supplied."""
    import keras

    known_custom = {**keras.saving.get_custom_objects(), **custom_objects}
    for item in _layer_configs(config):
        name = item.get("class_name")
        layer_name = (
            (item.get("config") or {}).get("name", "?")
            if isinstance(item.get("config"), dict)
            else "?"
        )
        if name == "Lambda" and not unsafe:
            raise ModelLoadError(
                f"{str(path)!r} contains a Lambda layer ({layer_name!r}) whose stored Python code "
                "would run on loading; refused in safe mode. "
                "Pass --unsafe only if you trust the file"
            )
        module = item.get("module") or ""
        registered = item.get("registered_name") or name
        builtin = module.startswith("keras")
        if module and not builtin and not _known(registered, name, known_custom):
            raise ModelLoadError(
                f"{str(path)!r} needs the custom class {registered!r} (layer {layer_name!r}), "
                "which was not supplied; "
                "pass --custom-objects FILE.py that defines and registers it"
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
    spec = importlib.util.spec_from_file_location(f"convdiff_custom_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return {k: v for k, v in vars(module).items() if isinstance(v, type) or callable(v)}


def load_model(path: str | os.PathLike, unsafe: bool = False, custom_objects: dict | None = None):
    """Load a .keras or .h5 (Keras 3 or Keras 2) model in Keras safe mode.

    An .h5 file written by Keras 2 (tf-keras) is loaded from an in-memory copy whose
    configuration :mod:`convdiff.compat` brought to Keras 3; the file itself is never written.

    Raises:
        ModelLoadError: missing, empty, corrupt, weights-only, unsafe or incomplete files, and
            Keras 2 files that Keras 3 cannot load faithfully.
    """
    path = Path(path)
    custom_objects = custom_objects or {}
    config = read_model_config(path)
    check_model_config(config, path, unsafe, custom_objects)
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from convdiff import compat

    try:
        if compat.keras2_version(path) is None:
            return keras.saving.load_model(
                path, custom_objects=custom_objects, compile=False, safe_mode=not unsafe
            )
        with compat.upgraded_h5(path) as h5_file:
            # the loader keras.saving.load_model uses for .h5 paths; it also takes an open file
            return legacy_h5_format.load_model_from_hdf5(
                h5_file, custom_objects=custom_objects, compile=False, safe_mode=not unsafe
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # Keras raises many types for a file it cannot rebuild
        raise ModelLoadError(f"Keras could not load {str(path)!r}: {_one_line(exc)}") from None


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


def _read_arrays(path: Path, specs: list[InputSpec]) -> list[np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(
                f"{str(path)!r} holds Python objects (a pickle); "
                "refused: only numeric arrays are read"
            ) from None
        raise InputError(
            f"{str(path)!r} is not a readable .npy/.npz file ({_one_line(exc)})"
        ) from None
    except (OSError, EOFError) as exc:
        raise InputError(
            f"{str(path)!r} is not a readable .npy/.npz file ({_one_line(exc)})"
        ) from None
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise InputError(
                f"{str(path)!r} holds one array but the model has {len(specs)} inputs ({names}); "
                "give an .npz with one array per input name"
            )
        return [loaded]
    with loaded:
        return _npz_arrays(loaded, path, specs)


def _npz_arrays(npz: Any, path: Path, specs: list[InputSpec]) -> list[np.ndarray]:
    keys = list(npz.files)
    by_name = [s.name for s in specs]
    positional = [f"arr_{i}" for i in range(len(specs))]
    if set(keys) == set(by_name):
        wanted = by_name
    elif set(keys) == set(positional):
        wanted = positional
    else:
        missing = sorted(set(by_name) - set(keys))
        extra = sorted(set(keys) - set(by_name))
        raise InputError(
            f"{str(path)!r} has arrays {keys}; the model's inputs are {by_name} "
            f"(missing {missing}, unexpected {extra}); name them by input or arr_0, arr_1, ..."
        )
    try:
        return [np.asarray(npz[k]) for k in wanted]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{str(path)!r}: cannot read an array ({_one_line(exc)})") from None


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
    if array.dtype != np.dtype(spec.dtype):
        notes.append(f"input {spec.name!r}: cast from {array.dtype} to {spec.dtype}")
        array = array.astype(spec.dtype)
    return np.ascontiguousarray(array)


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
