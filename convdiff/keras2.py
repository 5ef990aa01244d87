"""Keras 2 model files other than .h5, rebuilt as Keras 3 models: ``.keras`` archives written by
tf-keras (or by the Keras 2.13-2.15 inside TensorFlow), and SavedModel directories
(``model.save("dir")``, TensorFlow's default format up to 2.12).

Both go the way Keras 2 .h5 files go: the stored configuration passes through
:mod:`convdiff.compat`'s fix-ups and Keras 3's legacy deserializer (the one its .h5 loader
uses), in safe mode; then every layer's weights are assigned from the file, layer by layer,
their number and shapes checked, and every weight of the rebuilt model must have received a
value. Nothing stored in the file runs: a SavedModel's traced TensorFlow functions
(``saved_model.pb``) are never read, and Lambda layers are refused before this module is
reached unless the user passed ``--unsafe`` (:func:`convdiff.modelfile.check_model_config`).

Where Keras 2 keeps a layer's weights:

- ``.keras`` archive: in ``model.weights.h5``, the datasets ``layers/<name>/vars/0``, ``1``...
  in the order of ``layer.weights``. ``<name>`` is the snake_case class name (``conv2d``),
  numbered ``conv2d_1``, ``conv2d_2``... along the model's ``layers``; a nested model's layers
  lie under its own group (``layers/sequential/layers/conv2d``). A Sequential's ``layers``
  leave out the InputLayer its configuration starts with.
- SavedModel: ``keras_metadata.pb`` gives each layer's object path (``root.layer-2``,
  ``root.layer_with_weights-0.layer_with_weights-1`` inside a nested model) and name. The
  checkpoint's object graph leads from the root along that path to the layer, whose
  ``variables`` child lists its variables in the order of ``layer.weights``, each with its
  checkpoint key; TensorFlow's checkpoint reader reads the values (checking their CRC32C).

Keras 3 keeps a layer's weights in the same order as Keras 2 (trainable, then non-trainable, in
creation order); the tests compare every weight with what tf-keras itself loads.
"""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convdiff import compat, savedmodel
from convdiff.errors import ModelLoadError, one_line

# The root module of a model in a .keras archive written by Keras 2 (tf-keras; Keras 2.13-2.15).
_KERAS2_MODULES = ("tf_keras.", "keras.src.engine.", "keras.engine.")
_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})


def is_keras2(path: Path, config: dict[str, Any]) -> bool:
    """Whether a checked model path is a Keras 2 SavedModel directory or ``.keras`` archive
    (``config``: its stored configuration)."""
    if path.is_dir():
        return True
    if not zipfile.is_zipfile(path):
        return False
    module = config.get("module")
    if isinstance(module, str) and module.startswith(_KERAS2_MODULES):
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            version = json.loads(archive.read("metadata.json")).get("keras_version")
    except (KeyError, ValueError, AttributeError, OSError, zipfile.BadZipFile):
        return False  # no readable metadata.json: Keras 3 decides
    return isinstance(version, str) and version.split(".")[0] in {"1", "2"}


def load_model(
    path: Path, config: dict[str, Any], custom_objects: dict[str, Any], unsafe: bool
) -> Any:
    """Rebuild a Keras 2 ``.keras`` archive or SavedModel as a Keras 3 model with its weights.

    Args:
        path: the archive or the SavedModel directory, already read and checked
            (:class:`convdiff.modelfile.Probe`).
        config: its stored model configuration, as read there.
        custom_objects: classes by name for the deserializer.
        unsafe: let Keras deserialize Lambda layers.

    Raises:
        ModelLoadError: a configuration no fix-up brings to Keras 3, or weights that are
            missing, unreadable or do not fit the rebuilt layers.
    """
    model = build_model(config, path, custom_objects, unsafe)
    if path.is_dir():
        assigned = _assign_from_checkpoint(model, config, path)
    else:
        assigned = _assign_from_archive(model, config, path)
    missing = [layer.name for layer in _weighted_layers(model) if id(layer) not in assigned]
    if missing:
        raise ModelLoadError(
            f"{str(path)!r} stores no weights for the layers {missing}; "
            "the file is incomplete or corrupt"
        )
    return model


def build_model(
    config: dict[str, Any], path: Path, custom_objects: dict[str, Any], unsafe: bool
) -> Any:
    """The Keras 3 model of a Keras 2 configuration (a copy goes through the fix-ups), with
    the deserializer and scopes Keras 3's .h5 loader uses, weights as initialised."""
    import keras
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    config = copy.deepcopy(config)
    compat.archive_to_h5_layout(config)
    compat.upgrade_config(config, path)
    known = {**custom_objects, **keras.saving.get_custom_objects()}
    with (
        saving_options.keras_option_scope(use_legacy_config=True),
        serialization_lib.SafeModeScope(not unsafe),
    ):
        return saving_utils.model_from_config(config, custom_objects=known)


# --------------------------------------------------------------------------- layers


def _keras2_layers(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A model entry's layers as Keras 2's ``model.layers`` lists them: a Sequential's
    configuration starts with an InputLayer that its ``layers`` leave out."""
    layers = compat.listed_layers(entry)
    sequential = entry.get("class_name") == "Sequential"
    if sequential and layers and layers[0].get("class_name") == "InputLayer":
        return layers[1:]
    return layers


def _layer_name(entry: dict[str, Any]) -> str:
    inner = entry.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    return name if isinstance(name, str) else str(entry.get("name"))


def _is_model(entry: dict[str, Any]) -> bool:
    return entry.get("class_name") in _MODEL_CLASSES or bool(compat.listed_layers(entry))


def _weighted_layers(model: Any) -> Iterator[Any]:
    """Every layer with weights, inside nested models too (each model's own layers)."""
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "get_layer"):
            yield from _weighted_layers(layer)
        elif layer.weights:
            yield layer


def _assign(layer: Any, values: list[np.ndarray], where: str, path: Path) -> None:
    """Set a layer's weights after checking that the stored values fit them."""
    weights = layer.weights
    label = f"{str(path)!r}: layer {layer.name!r} ({type(layer).__name__})"
    if len(values) != len(weights):
        raise ModelLoadError(
            f"{label} has {len(weights)} weights in Keras 3, but the file stores "
            f"{len(values)} for it ({where})"
        )
    for weight, value in zip(weights, values, strict=True):
        if tuple(weight.shape) != tuple(value.shape):
            raise ModelLoadError(
                f"{label}: weight {weight.name!r} has shape {tuple(weight.shape)}, but the "
                f"file stores shape {tuple(value.shape)} ({where})"
            )
    layer.set_weights(values)


# --------------------------------------------------------------------------- .keras archives


def _snake_case(class_name: str) -> str:
    """Keras 2's name for a layer's group in a .keras weights file: ``Conv2D`` -> ``conv2d``,
    ``BatchNormalization`` -> ``batch_normalization``, ``_Private`` -> ``private_private``."""
    words = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", class_name)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", words).lower()
    return "private" + name if name.startswith("_") else name


def _archive_groups(entry: dict[str, Any], model: Any, prefix: str, seen: set[int]) -> Iterator:
    """(Keras 3 layer, group path) for each non-model layer, in Keras 2's order of saving.

    A layer object met before (shared with a nested model) is skipped without taking a
    number, as Keras 2 does."""
    counts: dict[str, int] = {}
    for layer_entry in _keras2_layers(entry):
        if layer_entry.get("class_name") == "InputLayer":
            continue  # no weights; Keras 3 may not list it as a layer
        layer = model.get_layer(_layer_name(layer_entry))
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        base = _snake_case(str(layer_entry.get("class_name")))
        counts[base] = counts.get(base, -1) + 1
        group = f"{prefix}layers/{base}" + (f"_{counts[base]}" if counts[base] else "")
        if _is_model(layer_entry):
            yield from _archive_groups(layer_entry, layer, group + "/", seen)
        else:
            yield layer, group


def _assign_from_archive(model: Any, config: dict[str, Any], path: Path) -> set[int]:
    import h5py

    with zipfile.ZipFile(path) as archive:
        if "model.weights.h5" not in archive.namelist():
            raise ModelLoadError(
                f"{str(path)!r} is a Keras 2 .keras archive without model.weights.h5; "
                "the file is incomplete"
            )
        data = archive.read("model.weights.h5")  # its CRC and HDF5 objects were checked
    assigned: set[int] = set()
    with h5py.File(io.BytesIO(data), "r") as weights:
        stored = _datasets(weights, "layers", h5py)
        used: set[str] = set()
        for layer, group in _archive_groups(config, model, "", set()):
            names = _group_datasets(weights.get(group), group, h5py)
            if not layer.weights and not names:
                continue
            _assign(layer, [np.asarray(weights[n]) for n in names], group, path)
            used.update(names)
            assigned.add(id(layer))
    unused = sorted(stored - used)
    if unused:
        raise ModelLoadError(
            f"{str(path)!r} stores weights that belong to no layer of its configuration "
            f"({', '.join(unused[:3])}); the file is inconsistent"
        )
    return assigned


def _group_datasets(group: Any, where: str, h5py: Any) -> list[str]:
    """The dataset paths of a layer's group in the order Keras 2 saved them: its own
    ``vars/0``, ``vars/1``..., then those of the objects it holds (an RNN's cell), which
    Keras 2 visits in reverse alphabetical order of their attribute names."""
    if group is None:
        return []
    if not isinstance(group, h5py.Group):
        raise ModelLoadError(f"model.weights.h5 holds a dataset at {where}, where a group is due")
    names = []
    own = group.get("vars")
    if isinstance(own, h5py.Group):
        names = [f"{where}/vars/{i}" for i in range(len(own))]
        if sorted(own) != sorted(str(i) for i in range(len(own))):
            raise ModelLoadError(
                f"model.weights.h5 has weights named {sorted(own)} under {where}/vars; "
                "expected 0, 1, ..."
            )
    for child in sorted((k for k in group if k != "vars"), reverse=True):
        names.extend(_group_datasets(group[child], f"{where}/{child}", h5py))
    return names


def _datasets(weights: Any, root: str, h5py: Any) -> set[str]:
    found: set[str] = set()
    group = weights.get(root)
    if isinstance(group, h5py.Group):
        group.visititems(
            lambda name, obj: found.add(f"{root}/{name}") if isinstance(obj, h5py.Dataset) else None
        )
    return found


# --------------------------------------------------------------------------- SavedModel


def _assign_from_checkpoint(model: Any, config: dict[str, Any], path: Path) -> set[int]:
    objects = savedmodel.read_metadata(path)
    reader = _checkpoint_reader(path)
    graph = savedmodel.object_graph(_read_tensor(reader, "_CHECKPOINTABLE_OBJECT_GRAPH", path))
    children = _children_by_name(objects)
    assigned: set[int] = set()
    for layer, object_path in _checkpoint_layers(config, model, "root", children, path):
        keys = _variable_keys(graph, object_path, path)
        values = [np.asarray(_read_tensor(reader, key, path)) for key in keys]
        _assign(layer, values, object_path, path)
        assigned.add(id(layer))
    return assigned


def _children_by_name(objects: list[savedmodel.KerasObject]) -> dict[str, dict[str, str]]:
    """For each object path, its layers' object paths by layer name."""
    children: dict[str, dict[str, str]] = {}
    for item in objects:
        name = item.metadata.get("name")
        if item.path == "root" or "." not in item.path or not isinstance(name, str):
            continue
        if item.identifier == "_tf_keras_metric":
            continue
        parent = item.path.rsplit(".", 1)[0]
        children.setdefault(parent, {}).setdefault(name, item.path)
    return children


def _checkpoint_layers(
    entry: dict[str, Any],
    model: Any,
    object_path: str,
    children: dict[str, dict[str, str]],
    path: Path,
) -> Iterator[tuple[Any, str]]:
    """(Keras 3 layer, object path) for each non-model layer that has weights."""
    known = children.get(object_path, {})
    for layer_entry in _keras2_layers(entry):
        if layer_entry.get("class_name") == "InputLayer":
            continue
        name = _layer_name(layer_entry)
        layer = model.get_layer(name)
        child = known.get(name)
        if child is None:
            if layer.weights:
                raise ModelLoadError(
                    f"{str(path)!r} (a SavedModel) has no entry for layer {name!r} in "
                    f"{savedmodel.METADATA_FILE}; the file is truncated or corrupt"
                )
            continue
        if _is_model(layer_entry):
            yield from _checkpoint_layers(layer_entry, layer, child, children, path)
        elif layer.weights:
            yield layer, child


def _variable_keys(graph: list[savedmodel.TrackableNode], object_path: str, path: Path) -> list:
    """The checkpoint keys of a layer's variables, in the order of its ``variables`` list."""
    node: int | None = 0
    for part in [*object_path.split(".")[1:], "variables"]:
        node = graph[node].child(part) if node is not None and node < len(graph) else None
    if node is None or node >= len(graph):
        raise ModelLoadError(
            f"{str(path)!r} (a SavedModel) has a checkpoint whose object graph lacks "
            f"{object_path}; the variables do not belong to this model"
        )
    keys = []
    for index, (local, child) in enumerate(graph[node].children):
        key = graph[child].tensors.get("VARIABLE_VALUE") if child < len(graph) else None
        if local != str(index) or key is None:
            raise ModelLoadError(
                f"{str(path)!r} (a SavedModel) has a checkpoint object graph whose variable "
                f"list for {object_path} is malformed; the checkpoint is corrupt"
            )
        keys.append(key)
    return keys


def _checkpoint_reader(path: Path) -> Any:
    import tensorflow as tf

    prefix = path / savedmodel.VARIABLES_PREFIX
    try:
        return tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} (a SavedModel) has an unreadable checkpoint in variables/ "
            f"({one_line(exc)})"
        ) from None


def _read_tensor(reader: Any, key: str, path: Path) -> Any:
    import tensorflow as tf

    try:
        return reader.get_tensor(key)
    except (tf.errors.OpError, ValueError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} (a SavedModel) has an unreadable checkpoint in variables/: "
            f"{key!r} cannot be read ({one_line(exc)})"
        ) from None
