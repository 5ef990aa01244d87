"""Recorded references: every layer's Keras output, the inputs and the environment in one
compressed .npz, so outputs recorded on one machine (a GPU, another CPU, an older TensorFlow)
can be compared with this machine's.

File layout (a plain zip of .npy members, readable with ``numpy.load(path, allow_pickle=False)``):

- ``layer/<name>``: one layer call's output (``<name>`` as in the report, e.g. ``conv2d``,
  ``outer/conv``, ``shared#2``);
- ``input/<name>``: the model inputs, in model input order;
- ``meta``: UTF-8 JSON as a uint8 array (never a pickle) with the format tag, the convdiff
  version, the environment, the settings, the layer and input order, and each array's dtype
  name (bfloat16 and other ml_dtypes arrays are stored as their raw bits, since .npy cannot
  name their dtype, and restored on load).

Writing goes to a temporary file beside the target, renamed into place when complete: a reader
never sees half a recording.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convdiff import __version__
from convdiff.errors import InputError, OutputError, one_line
from convdiff.outputs import json_safe, temp_beside

__all__ = [
    "FORMAT",
    "Recording",
    "RecordingWriter",
    "environment_changes",
    "load_recording",
    "match_layers",
    "save_outputs",
]

FORMAT = "convdiff-recording"
VERSION = 1
_META = "meta"
_LAYER = "layer/"
_INPUT = "input/"

# Dtypes .npy cannot describe (it writes them as opaque void): stored as raw bits, by name.
_BITS = {
    "bfloat16": (ml_dtypes.bfloat16, np.uint16),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, np.uint8),
    "float8_e5m2": (ml_dtypes.float8_e5m2, np.uint8),
}


@dataclass
class Recording:
    """A loaded recording.

    Attributes:
        path: the file it was read from.
        layers: each layer call's output by name, in execution order.
        inputs: the model inputs by name, in model input order.
        environment: the environment it was recorded in (versions, oneDNN, CPU...).
        settings: the settings of the run that recorded it.
        convdiff_version: the version of convdiff that wrote it.
    """

    path: str
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    convdiff_version: str | None = None


# --------------------------------------------------------------------------- writing


class RecordingWriter:
    """Writes a recording one layer at a time, so outputs need not all be held in memory.

    Use as a context manager; the file appears (atomically) only when the block ends without an
    exception::

        with RecordingWriter("ref.npz", inputs, names, environment, settings) as rec:
            for name, output in outputs:
                rec.add(name, output)

    Raises:
        OutputError: if the file cannot be written (directory missing, permission, disk full).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[np.ndarray],
        input_names: Sequence[str],
        environment: Mapping[str, Any],
        settings: Mapping[str, Any],
    ) -> None:
        if len(inputs) != len(input_names):
            raise ValueError(f"{len(inputs)} inputs but {len(input_names)} input names")
        self.path = Path(path)
        self._inputs = list(zip(input_names, inputs, strict=True))
        self._meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "convdiff_version": __version__,
            "environment": dict(environment),
            "settings": dict(settings),
            "layers": [],
            "inputs": [str(n) for n in input_names],
            "dtypes": {},
        }
        self._tmp: str | None = None
        self._file: Any = None
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> RecordingWriter:
        fd, self._tmp = temp_beside(self.path)
        try:
            self._file = os.fdopen(fd, "wb")
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_DEFLATED)
            for name, array in self._inputs:
                self._write(_INPUT + str(name), array)
        except BaseException:
            self._abort()
            raise
        return self

    def add(self, name: str, output: np.ndarray) -> None:
        """Store one layer call's output (names must be unique, as in the report)."""
        self._archive()
        if _LAYER + name in self._meta["dtypes"]:
            raise ValueError(f"layer {name!r} recorded twice")
        self._write(_LAYER + name, output)
        self._meta["layers"].append(name)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            meta = json.dumps(json_safe(self._meta)).encode()
            self._write_raw(_META, np.frombuffer(meta, dtype=np.uint8))
            self._archive().close()  # writes the zip's central directory
            self._zip = None
            self._file.close()  # ZipFile leaves a file object it was given open
            self._file = None
            tmp, self._tmp = self._tmp, None
            os.replace(str(tmp), self.path)
        except OSError as exc:
            self._abort()
            raise OutputError(f"cannot write {str(self.path)!r}: {exc.strerror or exc}") from None
        except BaseException:
            self._abort()
            raise

    def _write(self, key: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        name = array.dtype.name
        if name in _BITS:
            array = array.view(_BITS[name][1])
        elif array.dtype.hasobject or array.dtype.kind == "V":
            raise ValueError(f"cannot record {key!r}: dtype {array.dtype} is not a plain array")
        self._meta["dtypes"][key] = name
        self._write_raw(key, array)

    def _write_raw(self, key: str, array: np.ndarray) -> None:
        try:
            with self._archive().open(key + ".npy", "w", force_zip64=True) as member:
                # write_array handles any memory layout; np.ascontiguousarray would turn a
                # 0-d output into shape (1,).
                np.lib.format.write_array(member, array, allow_pickle=False)
        except OSError as exc:
            self._abort()
            raise OutputError(f"cannot write {str(self.path)!r}: {exc.strerror or exc}") from None

    def _archive(self) -> zipfile.ZipFile:
        """The open archive; writing outside the with-block is a programming error."""
        if self._zip is None:
            raise RuntimeError("RecordingWriter used outside its with-block")
        return self._zip

    def _abort(self) -> None:
        """Close and remove the temporary file (never the target)."""
        for handle in (self._zip, self._file):
            if handle is not None:
                with contextlib.suppress(OSError, ValueError):
                    handle.close()
        self._zip = self._file = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None


def save_outputs(
    path: str | os.PathLike,
    per_layer_outputs: Mapping[str, np.ndarray],
    inputs: Sequence[np.ndarray],
    input_names: Sequence[str],
    environment: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    """Write a recording in one go (see :class:`RecordingWriter` to write layer by layer).

    Args:
        path: the .npz file to write (replaced atomically if it exists).
        per_layer_outputs: each layer call's Keras output by name, in execution order.
        inputs: the model inputs, in model input order.
        input_names: their names.
        environment: :func:`convdiff.runtime.environment` of this run.
        settings: the run's settings (``Settings.to_dict()``).

    Raises:
        OutputError: if the file cannot be written.
    """
    with RecordingWriter(path, inputs, input_names, environment, settings) as writer:
        for name, output in per_layer_outputs.items():
            writer.add(name, output)


# --------------------------------------------------------------------------- reading


def load_recording(path: str | os.PathLike) -> Recording:
    """Read a recording written by :func:`save_outputs` or :class:`RecordingWriter`.

    Raises:
        InputError: if the file is missing, a directory, not a convdiff recording, truncated or
            corrupt, or holds anything that would need pickle to load.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise InputError(f"recording {where!r} does not exist")
    if path.is_dir():
        raise InputError(f"recording {where!r} is a directory; expected a .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise InputError(
                f"{where!r} holds a single array, not a convdiff recording (a .npz written by "
                "--save-outputs)"
            )
        with loaded as npz:
            return _read(npz, where)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(
            f"cannot read recording {where!r}: {one_line(exc)} (expected a complete .npz "
            "written by --save-outputs)"
        ) from None


def _read(npz: Any, where: str) -> Recording:
    meta = _read_meta(npz, where)
    dtypes = meta.get("dtypes", {})
    recording = Recording(
        path=where,
        environment=meta.get("environment", {}),
        settings=meta.get("settings", {}),
        convdiff_version=meta.get("convdiff_version"),
    )
    for name in meta["inputs"]:
        recording.inputs[name] = _array(npz, _INPUT + name, dtypes, where)
    for name in meta["layers"]:
        recording.layers[name] = _array(npz, _LAYER + name, dtypes, where)
    return recording


def _read_meta(npz: Any, where: str) -> dict[str, Any]:
    if _META not in npz.files:
        raise InputError(
            f"{where!r} is not a convdiff recording: it has no 'meta' entry (write one with "
            "convdiff --save-outputs)"
        )
    raw = npz[_META]
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"meta entry has dtype {raw.dtype}, shape {raw.shape}")
        meta = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{where!r}: unreadable 'meta' entry ({one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{where!r} is not a convdiff recording (its 'meta' has another format)")
    if meta.get("version") != VERSION:
        raise InputError(
            f"{where!r} is a convdiff recording of format version {meta.get('version')!r}; this "
            f"convdiff reads version {VERSION}"
        )
    if not isinstance(meta.get("layers"), list) or not isinstance(meta.get("inputs"), list):
        raise InputError(f"{where!r}: 'meta' does not list the layers and inputs")
    return meta


def _array(npz: Any, key: str, dtypes: Mapping[str, str], where: str) -> np.ndarray:
    if key not in npz.files:
        raise InputError(f"{where!r} is incomplete: 'meta' lists {key!r} but the file lacks it")
    array = npz[key]
    name = dtypes.get(key, array.dtype.name)
    if name in _BITS:
        bits = _BITS[name][1]
        if array.dtype != bits:
            raise InputError(f"{where!r}: {key!r} should hold {name} bits, found {array.dtype}")
        return array.view(_BITS[name][0])
    if array.dtype.name != name:
        raise InputError(f"{where!r}: {key!r} has dtype {array.dtype}; 'meta' says {name}")
    return array


# --------------------------------------------------------------------------- matching


def match_layers(
    recording: Recording, current_names: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """Pair the recording's layers with this run's, by name.

    Returns:
        ``(matched, only_in_recording, only_in_current)``: names in both (in the current run's
        order), names only recorded (in recorded order) and names only in this run (in its
        order). Callers must list the last two, never drop them silently.
    """
    recorded = recording.layers.keys()
    current = set(current_names)
    matched = [n for n in current_names if n in recorded]
    only_in_recording = [n for n in recorded if n not in current]
    only_in_current = [n for n in current_names if n not in recorded]
    return matched, only_in_recording, only_in_current


def environment_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the recording's environment and this one, as short phrases
    (e.g. ``"tensorflow 2.20.0 -> 2.21.0"``), for the report's notes."""
    keys = list(recorded) + [k for k in current if k not in recorded]
    return [
        f"{key} {recorded.get(key, '(not recorded)')} -> {current.get(key, '(unknown)')}"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]
