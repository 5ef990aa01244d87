"""Saved model files -> Keras models, in Keras safe mode, after their checks
(:mod:`convdiff.modelfile`). Keras is imported lazily (inside functions).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from convdiff.errors import ModelLoadError, OptionError, one_line
from convdiff.files import HDF5_MAGIC, check_file, read_head
from convdiff.modelfile import Probe, check_model_config, read_model_config
from convdiff.runtime import _import_tensorflow_quietly


def check_custom_objects(path: str | os.PathLike) -> Path:
    """A ``--custom-objects`` path that exists and names a .py file (checked before any slow
    work starts).

    Raises:
        OptionError: a missing or unreadable file, or not a .py file.
    """
    file = Path(path)
    check_file(file, "--custom-objects file", OptionError)
    if file.suffix != ".py":
        raise OptionError(f"--custom-objects expects a .py file; received {str(file)!r}")
    return file


def load_custom_objects(path: str | os.PathLike | None) -> dict[str, Any]:
    """Import a user's Python file of custom layers; return its classes and functions by name.

    The file is the user's own code, named on the command line: importing it runs it.
    """
    if path is None:
        return {}
    file = check_custom_objects(path)
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
    """Load a .keras or .h5 (Keras 3 or Keras 2) model, or a Keras 2 SavedModel directory, in
    Keras safe mode (``probe``: the file's checks already started, see
    :func:`read_model_config`).

    An .h5 file is loaded from an in-memory copy whose configuration :mod:`convdiff.compat`
    brought to Keras 3 (a Keras 2 file's fix-ups, Keras 3's own ``keras.ops`` nodes); the file
    itself is never written. Keras 2 .keras archives and SavedModels are rebuilt from their
    configuration with the same fix-ups, and their weights assigned layer by layer
    (:mod:`convdiff.keras2`).

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

    from convdiff import compat, keras2

    try:
        if keras2.is_keras2(path, config):
            known = {**h5_builtin_objects(set()), **custom_objects}
            return keras2.load_model(path, config, known, unsafe)
        if read_head(path, len(HDF5_MAGIC), "model file", ModelLoadError) != HDF5_MAGIC:
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
        raise ModelLoadError(f"Keras could not load {str(path)!r}: {one_line(exc)}") from None


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
