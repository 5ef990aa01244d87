"""SavedModel directories written by Keras 2 (``model.save("dir")`` in TensorFlow 2.5-2.15,
or tf-keras), read and checked without TensorFlow.

A Keras SavedModel directory holds:

- ``keras_metadata.pb``: a ``SavedMetadata`` protobuf, one entry per Keras object (the model,
  each layer) with its object path in the checkpoint (``root.layer_with_weights-0``) and its
  JSON metadata (class name, name, and for the model its whole configuration);
- ``variables/variables.index`` and ``variables/variables.data-NNNNN-of-MMMMM``: a TensorFlow
  checkpoint. The index is a table in LevelDB's format that maps each variable's checkpoint key
  to its dtype, shape, data shard, offset and size;
- ``saved_model.pb``: the traced TensorFlow graph functions. convdiff never reads them: the
  Keras side of a comparison is the model rebuilt from its configuration.

The protobuf wire format is decoded here in a few lines (varints and length-delimited fields)
instead of with TensorFlow's generated classes, so that the child process that checks model
files (:class:`convdiff.modelfile.Probe`) never imports TensorFlow: it starts in a fraction of a
second, and a damaged file is refused before any TensorFlow C++ parser sees it. The weights
themselves are read later, in the parent, by TensorFlow's checkpoint reader
(:mod:`convdiff.keras2`), which checks each tensor's CRC32C as it reads it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convdiff.errors import ModelLoadError, one_line

METADATA_FILE = "keras_metadata.pb"
GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
VARIABLES_PREFIX = Path("variables") / "variables"
# keras_metadata.pb holds JSON text of kilobytes to a few megabytes; past this it is refused.
MAX_METADATA_BYTES = 256 * 2**20
_READ_CHUNK = 16 * 2**20


class _Malformed(Exception):
    """Bytes that do not decode as the expected protobuf message or table."""


# --------------------------------------------------------------------------- protobuf wire format

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint at ``pos``: its value and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("a varint runs past the end of its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> dict[int, list[Any]]:
    """A message's fields by number, each a list of its values in order: ints for varints and
    fixed-width fields, bytes for length-delimited ones (strings, nested messages)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        elif wire == _LENGTH:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise _Malformed(f"field {key >> 3} has the unknown wire type {wire}")
        if pos > len(data):
            raise _Malformed(f"field {key >> 3} runs past the end of its message")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _one(fields: dict[int, list[Any]], number: int, kind: type, default: Any) -> Any:
    """The last value of a field (protobuf's rule for a repeated scalar), checked for type."""
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, kind):
        raise _Malformed(f"field {number} has the wrong wire type")
    return value


def _text(fields: dict[int, list[Any]], number: int) -> str:
    try:
        return _one(fields, number, bytes, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"field {number} is not UTF-8 text") from None


def _messages(fields: dict[int, list[Any]], number: int) -> list[dict[int, list[Any]]]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise _Malformed(f"field {number} has the wrong wire type")
    return [_fields(v) for v in values]


# --------------------------------------------------------------------------- keras_metadata.pb


@dataclass(frozen=True)
class KerasObject:
    """One entry of ``keras_metadata.pb``: a Keras object of the saved model."""

    path: str  # its object path in the checkpoint: "root", "root.layer_with_weights-0", ...
    identifier: str  # "_tf_keras_network", "_tf_keras_sequential", "_tf_keras_layer", ...
    metadata: dict[str, Any]  # its JSON metadata: class_name, name, config (the model's)


def read_metadata(directory: Path) -> list[KerasObject]:
    """Every entry of a SavedModel's ``keras_metadata.pb``.

    Raises:
        ModelLoadError: a missing, unreadable, truncated or corrupt file.
    """
    where = f"{str(directory)!r} (a SavedModel)"
    data = _read_small(directory / METADATA_FILE, where)
    try:
        objects = [_keras_object(node) for node in _messages(_fields(data), 1)]
    except (_Malformed, ValueError, RecursionError) as exc:  # ValueError: JSON
        raise ModelLoadError(
            f"{where} has a truncated or corrupt {METADATA_FILE} ({one_line(exc)})"
        ) from None
    if not objects or objects[0].path != "root":
        raise ModelLoadError(
            f"{where} has a {METADATA_FILE} without the model's own entry ('root'); "
            "the file is truncated or corrupt"
        )
    return objects


def _keras_object(node: dict[int, list[Any]]) -> KerasObject:
    metadata = json.loads(_text(node, 5), object_hook=_untuple)
    if not isinstance(metadata, dict):
        raise _Malformed("an entry's metadata is not a JSON object")
    return KerasObject(_text(node, 3), _text(node, 4), metadata)


def _untuple(item: dict[str, Any]) -> Any:
    """Keras 2 writes tuples in SavedModel metadata as ``{"class_name": "__tuple__",
    "items": [...]}``; they are lists in every other format."""
    if item.get("class_name") == "__tuple__" and isinstance(item.get("items"), list):
        return item["items"]
    return item


def model_config(directory: Path, objects: list[KerasObject]) -> dict[str, Any]:
    """The model's configuration (``{"class_name": ..., "config": ...}``) from the root entry.

    Raises:
        ModelLoadError: the root is not a Sequential or functional model with a stored
            configuration (a subclassed model, or a single layer saved on its own).
    """
    root = objects[0].metadata
    class_name = root.get("class_name")
    config = root.get("config")
    if class_name not in ("Sequential", "Functional", "Model") or not isinstance(config, dict):
        raise ModelLoadError(
            f"{str(directory)!r} is a SavedModel of the Keras class {class_name!r} "
            "without a stored layer graph (a subclassed model); convdiff rebuilds Sequential "
            "and functional models only: save such a model's layers as a functional model"
        )
    return {"class_name": class_name, "config": config}


# --------------------------------------------------------------------------- variables/


@dataclass(frozen=True)
class BundleEntry:
    """Where one checkpoint tensor's bytes lie (a ``BundleEntryProto``)."""

    dtype: int  # TensorFlow's DataType enum
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


# Bytes per element of TensorFlow's fixed-width DataType values (DT_STRING, 7, is variable).
_DTYPE_BYTES = {1: 4, 2: 8, 3: 4, 4: 1, 5: 2, 6: 1, 9: 8, 10: 1, 14: 2, 17: 2, 19: 2, 22: 4, 23: 8}


def shard_path(directory: Path, shard: int, shards: int) -> Path:
    return directory / f"{VARIABLES_PREFIX}.data-{shard:05d}-of-{shards:05d}"


def check_variables(directory: Path) -> dict[str, BundleEntry]:
    """Read and check a SavedModel's checkpoint: the index decodes (every block passes its
    CRC32C), every data shard it names is present, and every tensor lies inside its shard.
    Every shard is read to its end, so an unreadable disk block shows here. Returns the
    entries by checkpoint key.

    Raises:
        ModelLoadError: a missing, truncated or corrupt index or data shard.
    """
    where = f"{str(directory)!r} (a SavedModel)"
    index = f"{VARIABLES_PREFIX}.index"
    data = _read_small(directory / index, where)
    try:
        shards, entries = _bundle(data)
    except (_Malformed, struct.error) as exc:
        raise ModelLoadError(
            f"{where} has a truncated or corrupt {index} ({one_line(exc)})"
        ) from None
    sizes = [_shard_size(shard_path(directory, i, shards), where) for i in range(shards)]
    for key, entry in entries.items():
        if entry.shard >= shards or entry.offset + entry.size > sizes[entry.shard]:
            raise ModelLoadError(
                f"{where} has a truncated or corrupt checkpoint: variable {key!r} lies "
                f"past the end of {shard_path(directory, entry.shard, shards).name}"
            )
    return entries


def _bundle(data: bytes) -> tuple[int, dict[str, BundleEntry]]:
    """The number of data shards and the entries of a checkpoint index."""
    shards = None
    entries = {}
    for key, value in _table(data):
        fields = _fields(value)
        if key == b"":  # the BundleHeaderProto
            shards = _one(fields, 1, int, 0)
            if _one(fields, 2, int, 0) != 0:
                raise _Malformed("the checkpoint is big-endian")
            continue
        entry = _bundle_entry(fields)
        try:
            entries[key.decode("utf-8")] = entry
        except UnicodeDecodeError:
            raise _Malformed("a checkpoint key is not UTF-8") from None
    if shards is None or not 0 < shards < 100_000:
        raise _Malformed(f"its header gives {shards} data shards")
    return shards, entries


def _bundle_entry(fields: dict[int, list[Any]]) -> BundleEntry:
    dims = _messages(_fields(_one(fields, 2, bytes, b"")), 2)
    shape = tuple(_one(dim, 1, int, 0) for dim in dims)
    entry = BundleEntry(
        dtype=_one(fields, 1, int, 0),
        shape=shape,
        shard=_one(fields, 3, int, 0),
        offset=_one(fields, 4, int, 0),
        size=_one(fields, 5, int, 0),
    )
    itemsize = _DTYPE_BYTES.get(entry.dtype)
    if itemsize is not None and not fields.get(7) and math.prod(shape) * itemsize != entry.size:
        raise _Malformed(f"an entry of shape {shape} declares {entry.size} bytes")
    return entry


def _shard_size(path: Path, where: str) -> int:
    """A data shard's size, after reading it to its end."""
    try:
        with open(path, "rb") as f:
            while f.read(_READ_CHUNK):
                pass
            return f.tell()
    except FileNotFoundError:
        raise ModelLoadError(
            f"{where} is incomplete: its checkpoint has no data shard {path.name} in variables/"
        ) from None
    except OSError as exc:
        raise ModelLoadError(
            f"{where}: {path.name} cannot be read ({exc.strerror or exc})"
        ) from None


# --------------------------------------------------------------------------- LevelDB tables

# TensorFlow writes checkpoint indexes with its copy of LevelDB's table format: data blocks of
# prefix-compressed (key, value) entries, an index block of their handles, and a fixed footer.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48
_BLOCK_TRAILER_BYTES = 5  # a compression-type byte and a masked CRC32C


def _table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a table, in key order."""
    if len(data) < _FOOTER_BYTES:
        raise _Malformed(f"{len(data)} bytes is shorter than a table's footer")
    footer = data[-_FOOTER_BYTES:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise _Malformed("no table footer (bad magic number)")
    _, pos = _handle(footer, 0)  # the meta-index block: TensorFlow writes it empty
    (offset, size), _ = _handle(footer, pos)
    for _, value in _block_entries(_block(data, offset, size)):
        (offset, size), _ = _handle(value, 0)
        yield from _block_entries(_block(data, offset, size))


def _handle(data: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(data, pos)
    size, pos = _varint(data, pos)
    return (offset, size), pos


def _block(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + _BLOCK_TRAILER_BYTES > len(data) - _FOOTER_BYTES:
        raise _Malformed("a block lies past the end of the table")
    kind = data[end]
    stored = struct.unpack("<I", data[end + 1 : end + _BLOCK_TRAILER_BYTES])[0]
    if _unmask(stored) != crc32c(data[offset : end + 1]):
        raise _Malformed("a block fails its CRC32C check")
    if kind != 0:  # 1 is Snappy, which TensorFlow never uses for checkpoint indexes
        raise _Malformed(f"a block has the compression type {kind}")
    return data[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A block's entries: each key shares a prefix with the one before it."""
    if len(block) < 4:
        raise _Malformed("a block is shorter than its restart count")
    restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise _Malformed("a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + size > end:
            raise _Malformed("a block entry runs past the end of its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, bit-reversed
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``: in pure Python, for the index's few kilobytes only
    (TensorFlow's reader checks the data shards' CRCs itself)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """LevelDB stores CRCs rotated and offset, so that a CRC of data holding CRCs stays strong."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- object graph


@dataclass(frozen=True)
class TrackableNode:
    """One object of a checkpoint's object graph: its children by local name (in order), and
    the checkpoint keys of the tensors it holds by attribute name."""

    children: list[tuple[str, int]]
    tensors: dict[str, str]

    def child(self, name: str) -> int | None:
        return next((node for local, node in self.children if local == name), None)


def object_graph(data: bytes) -> list[TrackableNode]:
    """A checkpoint's ``_CHECKPOINTABLE_OBJECT_GRAPH`` (a ``TrackableObjectGraph``).

    Raises:
        ModelLoadError: bytes that do not decode.
    """
    try:
        return [_trackable(node) for node in _messages(_fields(data), 1)]
    except _Malformed as exc:
        raise ModelLoadError(f"a corrupt checkpoint object graph ({one_line(exc)})") from None


def _trackable(node: dict[int, list[Any]]) -> TrackableNode:
    children = [(_text(c, 2), _one(c, 1, int, 0)) for c in _messages(node, 1)]
    tensors = {_text(t, 1): _text(t, 3) for t in _messages(node, 2)}
    return TrackableNode(children, tensors)


# --------------------------------------------------------------------------- directories


def read_config(
    directory: Path, on_config: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """The model configuration of a Keras SavedModel directory, after checking what will be
    read from it: ``keras_metadata.pb`` decodes, and the checkpoint in ``variables/`` is whole
    (:func:`check_variables`). ``on_config`` gets the configuration as soon as it is read.

    Raises:
        ModelLoadError: not a Keras SavedModel, or a missing, truncated or corrupt part.
    """
    problem = describe_directory(directory)
    if problem is not None:
        raise ModelLoadError(problem)
    config = model_config(directory, read_metadata(directory))
    if on_config is not None:
        on_config(config)
    check_variables(directory)
    return config


def describe_directory(directory: Path) -> str | None:
    """Why a directory cannot be read as a Keras SavedModel, or None when it can."""
    if (directory / METADATA_FILE).is_file():
        return None
    if any((directory / name).is_file() for name in GRAPH_FILES):
        return (
            f"{str(directory)!r} is a SavedModel without {METADATA_FILE}: it was saved with "
            "tf.saved_model.save (or by TensorFlow before 2.5), not by Keras's model.save, so "
            "it holds no Keras layers to compare; save the Keras model with "
            "model.save('model.keras') or model.save('model.h5')"
        )
    return (
        f"model file {str(directory)!r} is a directory but not a SavedModel (it holds no "
        f"saved_model.pb or {METADATA_FILE}); expected a .keras or .h5 file or a SavedModel "
        "directory"
    )


def directory_bytes(directory: Path) -> int:
    """The size of what is read: the metadata and the variables."""
    files = [directory / METADATA_FILE, *(directory / "variables").glob("variables.*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def _read_small(path: Path, where: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise ModelLoadError(
                f"{where} has a {path.name} of {size:,} bytes; "
                f"more than {MAX_METADATA_BYTES:,} is not read"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"{where} is incomplete: it has no {_relative(path)}") from None
    except OSError as exc:
        raise ModelLoadError(
            f"{where}: {_relative(path)} cannot be read ({exc.strerror or exc})"
        ) from None
    if not data:
        raise ModelLoadError(f"{where} has an empty {_relative(path)}")
    return data


def _relative(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name == "variables" else path.name
