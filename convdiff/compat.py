""".h5 model files (Keras 2 from tf-keras, and Keras 3's own), loaded by Keras 3.

Keras 3 writes two things to .h5 that its own .h5 loader cannot read back, which
:func:`mark_operations` bridges: ``keras.ops`` operations recorded in a functional graph
(``x + 3.0``) are stored as a bare class name (``"Add"``) that the loader resolves to the layer of
that name, and Keras-internal layers of the applications (ConvNeXt's LayerScale) are stored
without their module (:mod:`convdiff.loading` supplies them).

Keras 3 reads the legacy .h5 format, but some configurations that Keras 2 writes make it fail
(keys its constructors reject, removed classes, a different numbering of a nested model's call
nodes) and some make it silently compute something else (``hard_sigmoid``). This module fixes the
stored ``model_config`` with a small table of named fix-ups, one function per difference, and
gives :mod:`convdiff.loading` an in-memory copy of the file holding the fixed configuration for
Keras's .h5 loader: the user's file is only read, never written. It imports h5py, not Keras.

Each fix-up is a function ``fix(layer) -> str | None`` on one layer entry (``class_name`` and
``config``) that changes the entry in place and returns a one-line note of what it did, or
None when the entry needs nothing; :data:`LAYER_FIXUPS` lists them in the order they run.
:data:`MODEL_FIXUPS` (call-node renumbering, single inputs/outputs) work on whole Functional
configurations and run after them. A difference with no faithful bridge is refused by name.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from convdiff.errors import ModelLoadError
from convdiff.files import HDF5_MAGIC

LayerFixup = Callable[[dict[str, Any]], str | None]

# Keras 2 classes whose call nodes it numbers from 1 when they are used as a layer: a model
# built on an Input owns a node 0 linking its inputs to its outputs.
_FUNCTIONAL_CLASSES = frozenset({"Functional", "Model"})


# --------------------------------------------------------------------------- detection


def keras2_version(path: Path) -> str | None:
    """The Keras version that wrote a model file when it is a Keras 1 or 2 .h5 file, else None.

    Keras 2 and Keras 3 both store ``keras_version`` and ``backend`` in the file's root
    attributes; only the version tells them apart (tf-keras writes its own version, "2.x").
    """
    import h5py

    with open(path, "rb") as f:
        if f.read(len(HDF5_MAGIC)) != HDF5_MAGIC:
            return None  # a .keras archive: only Keras 3 writes those
    with h5py.File(path, "r") as f:
        version = _text(f.attrs.get("keras_version"))
        backend = _text(f.attrs.get("backend"))
    if version is None or version.split(".")[0] not in {"1", "2"}:
        return None
    if backend not in (None, "tensorflow"):
        # Keras 2 converted Theano/CNTK kernels on loading (flipped convolution kernels);
        # Keras 3 loads them as stored, which would silently compute another model.
        raise ModelLoadError(
            f"{str(path)!r} was written by Keras {version} with the {backend!r} backend, whose "
            "convolution kernels Keras 3 cannot convert; re-save it with TensorFlow's Keras 2"
        )
    return version


def _text(value: Any) -> str | None:
    return value.decode("utf8") if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- loading


@contextmanager
def upgraded_h5(path: Path) -> Iterator[tuple[Any, set[str]]]:
    """An in-memory copy of an .h5 model file, open as an ``h5py.File``, whose ``model_config``
    went through :func:`upgrade_config` (a Keras 2 file) and :func:`mark_operations`; with it,
    the class names of the marked operations. The weights are the file's own.

    The whole file is read into memory and opened there, so that the attribute can be replaced
    without writing anything to disk. Keras's legacy .h5 loader (the one
    ``keras.saving.load_model`` calls for .h5 paths) accepts the open file.

    Raises:
        ModelLoadError: a configuration no fix-up can bring to Keras 3 faithfully.
    """
    import h5py

    keras2 = keras2_version(path) is not None
    with h5py.File(io.BytesIO(path.read_bytes()), "r+") as f:
        config = json.loads(_text(f.attrs["model_config"]) or "")
        if keras2:
            upgrade_config(config, path)
        operations = mark_operations(config)
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        yield f, operations


# A prefix no Keras class name has: the loader resolves marked entries only through the custom
# objects convdiff.loading passes, never to a layer of the same name.
OPERATION_PREFIX = "__keras_operation__"


def mark_operations(config: Any) -> set[str]:
    """Rename every ``keras.ops`` operation entry of a functional configuration to
    ``OPERATION_PREFIX + name`` (in place); return the operation names found.

    Keras 3 stores an operation (``x + 3.0`` while building a model) with a bare class name and
    a config that holds nothing but its ``name``: no ``module``, unlike every layer, and none of
    the ``trainable`` and ``dtype`` every layer's config has.
    """
    names = set()
    for entry in _layer_entries(config):
        inner = entry["config"]
        if "module" in entry or "inbound_nodes" not in entry or set(inner) != {"name"}:
            continue
        names.add(entry["class_name"])
        entry["class_name"] = OPERATION_PREFIX + entry["class_name"]
    return names


def upgrade_config(config: dict[str, Any], path: Path) -> list[str]:
    """Apply every fix-up to a Keras 2 model configuration, in place; return the notes.

    Raises:
        ModelLoadError: a fix-up found a configuration Keras 3 cannot express.
    """
    notes = []
    try:
        for layer in _layer_entries(config):
            for fixup in LAYER_FIXUPS:
                note = fixup(layer)
                if note:
                    notes.append(note)
        for model_fixup in MODEL_FIXUPS:
            notes.extend(model_fixup(config))
    except _Unbridgeable as exc:
        raise ModelLoadError(f"{str(path)!r} (written by Keras 2): {exc}") from None
    return notes


class _Unbridgeable(Exception):
    """A Keras 2 configuration with no faithful Keras 3 equivalent."""


def _layer_entries(config: Any) -> Iterator[dict[str, Any]]:
    """Every dict with a ``class_name`` and a dict ``config``: layers at any depth (inside
    nested models and wrappers), and also initializers, regularizers and dtype policies, which
    the fix-ups tell apart by class name."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
        for value in list(config.values()):
            yield from _layer_entries(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layer_entries(value)


def _name(layer: dict[str, Any]) -> str:
    return str(layer["config"].get("name", "?"))


# --------------------------------------------------------------------------- .keras layout

# Keys tf-keras's .keras serializer adds to every layer entry, which its .h5 writer does not.
_ARCHIVE_LAYER_KEYS = ("module", "registered_name", "build_config", "compile_config")


def archive_to_h5_layout(config: dict[str, Any]) -> None:
    """Bring the config.json of a Keras 2 ``.keras`` archive to the layout of Keras 2's .h5
    files (in place), so that both go through the same fix-ups and the same deserializer.

    tf-keras's .keras writer adds ``module``, ``registered_name`` and ``build_config`` to every
    layer entry. Keras 3 sends a layer entry with a ``module`` to its new deserializer, which
    hands the Keras 2 config to the constructor as it is (BatchNormalization's ``axis: [3]``
    fails there), and an entry without it to the legacy deserializer its .h5 loader uses, which
    converts Keras 2 configurations. Only the model and layer entries change; the objects
    inside a layer's config (initializers...) keep their keys, as in .h5 files.
    """
    models = [config]
    while models:
        model = models.pop()
        for key in _ARCHIVE_LAYER_KEYS:
            model.pop(key, None)
        for layer in listed_layers(model):
            for key in _ARCHIVE_LAYER_KEYS:
                layer.pop(key, None)
            if listed_layers(layer):
                models.append(layer)


def listed_layers(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer entries a Sequential or Functional entry lists, in the order of its
    ``layers`` (none for another layer)."""
    body = entry.get("config")
    layers = body.get("layers") if isinstance(body, dict) else None
    if not isinstance(layers, list):
        return []
    return [layer for layer in layers if isinstance(layer, dict)]


# --------------------------------------------------------------------------- layer fix-ups

_GROUPLESS_CONVS = frozenset(
    {
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
    }
)


def drop_conv_groups(layer: dict[str, Any]) -> str | None:
    """Keras 2's depthwise, separable and transposed convolutions subclass ``Conv`` and store
    its ``groups`` (always 1: their constructors do not take it); Keras 3's constructors reject
    the key. ``groups=1`` is the only value they compute, so the key is dropped."""
    if layer["class_name"] not in _GROUPLESS_CONVS or "groups" not in layer["config"]:
        return None
    groups = layer["config"].pop("groups")
    if groups != 1:
        raise _Unbridgeable(
            f"{layer['class_name']} {_name(layer)!r} has groups={groups}, which Keras 3's "
            f"{layer['class_name']} does not implement"
        )
    return f"{_name(layer)}: dropped Keras 2's groups=1"


_SEPARABLE_CONVS = frozenset({"SeparableConv1D", "SeparableConv2D"})
_UNUSED_SEPARABLE_KEYS = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")


def drop_separable_kernel_arguments(layer: dict[str, Any]) -> str | None:
    """Keras 2's ``SeparableConv1D/2D`` subclass ``Conv`` and also store its
    ``kernel_initializer/regularizer/constraint``, which they never use (their kernels are
    ``depthwise_*`` and ``pointwise_*``); Keras 3's constructors reject the keys."""
    if layer["class_name"] not in _SEPARABLE_CONVS:
        return None
    for key in _UNUSED_SEPARABLE_KEYS:
        layer["config"].pop(key, None)
    return None


def dtype_policy_name(layer: dict[str, Any]) -> str | None:
    """Keras 2 stores a mixed-precision layer's dtype as a serialized ``Policy`` object,
    ``{"class_name": "Policy", "config": {"name": "mixed_float16"}}``; Keras 3 cannot
    deserialize that class (it fails with "'str' object has no attribute
    'quantization_mode'") but takes the policy by name, with the same compute and variable
    dtypes (``mixed_float16``: float16 compute, float32 variables)."""
    dtype = layer["config"].get("dtype")
    if not (isinstance(dtype, dict) and dtype.get("class_name") in {"Policy", "PolicyV1"}):
        return None
    name = (dtype.get("config") or {}).get("name")
    if not isinstance(name, str) or name == "_infer":
        raise _Unbridgeable(f"layer {_name(layer)!r} has an unreadable dtype policy {dtype!r}")
    layer["config"]["dtype"] = name
    return f"{_name(layer)}: dtype policy {name!r} by name"


def thresholded_relu_as_relu(layer: dict[str, Any]) -> str | None:
    """Keras 3 removed ``ThresholdedReLU(theta)``; ``ReLU(threshold=theta)`` is its
    replacement. Keras 2 computes ``x * cast(x > theta)``, Keras 3 ``where(x > theta, x, 0)``:
    the same value for every finite x; they differ only in the sign of a zero (Keras 2 gives
    -0 for a negative x) and for x = -inf or NaN (Keras 2: NaN; Keras 3: 0). ``theta`` is
    stored as the float32 value both cast it to."""
    if layer["class_name"] != "ThresholdedReLU":
        return None
    config = layer["config"]
    theta = config.pop("theta", 1.0)  # Keras 2's default theta
    layer["class_name"] = "ReLU"
    config.update(threshold=theta, negative_slope=0.0, max_value=None)
    return f"{_name(layer)}: ThresholdedReLU(theta={theta}) as ReLU(threshold={theta})"


def leaky_relu_negative_slope(layer: dict[str, Any]) -> str | None:
    """Keras 2's ``LeakyReLU(alpha)`` is Keras 3's ``LeakyReLU(negative_slope)``. Keras 3
    still maps ``alpha`` itself, with a deprecation warning on every load; renaming it here
    keeps that warning out of convdiff's output. (The defaults differ, 0.3 vs 0.2, but Keras 2
    always stores the value.)"""
    config = layer["config"]
    if layer["class_name"] != "LeakyReLU" or "alpha" not in config:
        return None
    config["negative_slope"] = config.pop("alpha")
    return None  # a pure rename: nothing the user needs to know


def rnn_time_major(layer: dict[str, Any]) -> str | None:
    """Keras 2's recurrent layers store ``time_major``; Keras 3's reject the key and only
    compute batch-major (``time_major=False``) input."""
    config = layer["config"]
    if "time_major" not in config or "return_sequences" not in config:
        return None
    if config.pop("time_major"):
        raise _Unbridgeable(
            f"recurrent layer {_name(layer)!r} is time-major; Keras 3 has no such mode"
        )
    return None


def spatial_dropout_arguments(layer: dict[str, Any]) -> str | None:
    """Keras 2's ``SpatialDropout1D/2D/3D`` subclass ``Dropout`` and store its ``trainable``
    and ``noise_shape`` (always None: the spatial layers derive the shape); Keras 3's
    constructors take neither. Neither changes inference."""
    if not layer["class_name"].startswith("SpatialDropout"):
        return None
    layer["config"].pop("trainable", None)
    layer["config"].pop("noise_shape", None)
    return None


def refuse_virtual_batch_size(layer: dict[str, Any]) -> str | None:
    """Keras 2's ``BatchNormalization(virtual_batch_size=n)`` ("ghost" batch norm) stores its
    weights with an extra virtual-batch axis, shape (1, 1, ..., C), and its ``axis`` shifted
    by one for it. Keras 3 has no such argument: loading would need the weights reshaped as
    well as the configuration, so such a file is refused rather than half-converted."""
    if layer["class_name"] == "BatchNormalization" and layer["config"].get("virtual_batch_size"):
        raise _Unbridgeable(
            f"BatchNormalization {_name(layer)!r} uses virtual_batch_size, which Keras 3 does not "
            "implement (its weights carry an extra axis)"
        )
    return None


_ACTIVATION_KEYS = ("activation", "recurrent_activation")


def refuse_hard_sigmoid(layer: dict[str, Any]) -> str | None:
    """``hard_sigmoid`` is a different function in each version: Keras 2 computes
    ``clip(0.2 * x + 0.5, 0, 1)``, Keras 3 ``relu6(x + 3) / 6``. Keras 3 would load the name
    and silently compute another model, so the file is refused."""
    for key in _ACTIVATION_KEYS:
        value = layer["config"].get(key)
        if isinstance(value, dict):  # {"class_name": "function", "config": "hard_sigmoid"}
            value = value.get("config")
        if value == "hard_sigmoid":
            raise _Unbridgeable(
                f"layer {_name(layer)!r} uses {key}='hard_sigmoid', which is "
                "clip(0.2*x + 0.5, 0, 1) in Keras 2 but relu6(x + 3)/6 in Keras 3; "
                "Keras 3 cannot load this model faithfully"
            )
    return None


LAYER_FIXUPS: tuple[LayerFixup, ...] = (
    refuse_hard_sigmoid,
    drop_conv_groups,
    drop_separable_kernel_arguments,
    dtype_policy_name,
    thresholded_relu_as_relu,
    leaky_relu_negative_slope,
    rnn_time_major,
    spatial_dropout_arguments,
    refuse_virtual_batch_size,
)


# --------------------------------------------------------------------------- graph fix-up


def renumber_nested_model_nodes(config: Any) -> list[str]:
    """Renumber the call nodes of nested models in every Functional configuration (in place).

    Keras 2 numbers a nested model's calls from 1 when the model was built on an Input (a
    Functional model, or a Sequential whose first stored layer is an InputLayer): its node 0
    is the one linking its own inputs to its outputs. Keras 3 models own no such node, so it
    looks for call ``k`` at node ``k - 1``. Keras 3 already subtracts 1 where an output
    reference names a nested *Functional* model (``functional_from_config.get_tensor``), but
    neither in layers' ``inbound_nodes`` nor for a nested Sequential, so exactly those are
    renumbered here.
    """
    notes = []
    for model in _functional_configs(config):
        body = model["config"]
        nested = {
            entry["name"]: entry["class_name"] for entry in body["layers"] if _owns_node0(entry)
        }
        if not nested:
            continue
        for entry in body["layers"]:
            for node in entry.get("inbound_nodes") or []:
                _shift_references(node, nested.keys())
        sequential = {name for name, cls in nested.items() if cls == "Sequential"}
        _shift_references(body.get("output_layers") or [], sequential)
        notes.append(
            f"{body.get('name', '?')}: renumbered calls of nested {', '.join(sorted(nested))}"
        )
    return notes


def unwrap_single_inputs_outputs(config: Any) -> list[str]:
    """Store a Functional model's single input and single output as one reference, not a list
    of one (in place).

    Keras 2 always writes ``input_layers``/``output_layers`` as lists, ``[["dense", 0, 0]]``
    for one tensor, and its models with one output return a tensor. Keras 3 keeps the list: its
    model then returns a list of one tensor, which breaks a nested model followed by another
    layer in a Sequential ("Cannot convert '((None, 4), 2)' to a shape") and warns about the
    input structure on every call. Keras 3 itself writes one tensor as ``["dense", 0, 0]``.
    """
    for model in _functional_configs(config):
        body = model["config"]
        for key in ("input_layers", "output_layers"):
            references = body.get(key)
            if _is_single_reference_list(references):
                body[key] = references[0]
    return []  # no change in meaning: nothing to note


def _is_single_reference_list(value: Any) -> bool:
    """``[["layer", node_index, tensor_index]]``."""
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], list)):
        return False
    return len(value[0]) == 3 and isinstance(value[0][0], str)


def _functional_configs(config: Any) -> Iterator[dict[str, Any]]:
    for entry in _layer_entries(config):
        body = entry["config"]
        if isinstance(body.get("layers"), list) and "input_layers" in body:
            yield entry


def _owns_node0(entry: dict[str, Any]) -> bool:
    body = entry.get("config") or {}
    if "input_layers" in body or entry.get("class_name") in _FUNCTIONAL_CLASSES:
        return True
    layers = body.get("layers")
    return (
        entry.get("class_name") == "Sequential"
        and isinstance(layers, list)
        and bool(layers)
        and layers[0].get("class_name") == "InputLayer"
    )


def _shift_references(references: list[Any], shifted: Collection[str]) -> None:
    """Lower by one the node index of each ``[layer_name, node_index, tensor_index, ...]``
    that names a layer in ``shifted``."""
    if len(references) >= 3 and isinstance(references[0], str) and isinstance(references[1], int):
        if references[0] in shifted:
            if references[1] < 1:
                raise _Unbridgeable(
                    f"nested model {references[0]!r} is called at node 0, which Keras 2 reserves"
                )
            references[1] -= 1
        return
    for item in references:
        if isinstance(item, list):
            _shift_references(item, shifted)


MODEL_FIXUPS: tuple[Callable[[Any], list[str]], ...] = (
    renumber_nested_model_nodes,
    unwrap_single_inputs_outputs,
)
