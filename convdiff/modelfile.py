"""Model files -> their stored configuration, checked, without running anything.

Before Keras sees a model file, the whole file is read and checked in a child process with a
time limit (h5py and zipfile only: libhdf5 can loop forever or crash on a damaged file; a
SavedModel directory is read by :mod:`convdiff.savedmodel`, without TensorFlow) and its
stored configuration is checked: a Lambda layer (stored Python bytecode) is refused unless
``unsafe`` is set, and a custom class that nobody supplied is named, instead of surfacing as
Keras's deserialization traceback. Every damaged file gives a
:class:`~convdiff.errors.ModelLoadError` (tests/test_fuzz.py mutates files to check it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convdiff import savedmodel
from convdiff.errors import ModelLoadError, one_line
from convdiff.files import HDF5_MAGIC, READ_CHUNK, ZIP_ERRORS, ZIP_MAGIC, check_file, read_head

# What h5py raises for a damaged file: it maps HDF5's error stack onto these built-in types.
_H5_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError)
# A model's stored configuration is read whole into memory: real ones are kilobytes to a few
# megabytes, so anything past this is refused instead of read.
MAX_CONFIG_BYTES = 64 * 2**20
# keras.saving.load_model picks its loader by the file name's ending, not by the content.
_H5_SUFFIXES = (".h5", ".hdf5")
_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})


def read_model_config(
    path: Path, isolated: bool = True, probe: Probe | None = None
) -> dict[str, Any]:
    """The stored model configuration of a .keras or .h5 file or of a SavedModel directory,
    without running anything.

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
    check_model_path(path)
    if not isolated or not sys.executable:  # embedded interpreters cannot start a child
        return _inspect_model_file(path)
    return Probe.start(path).result()


# libhdf5's worst case on a damaged file is an endless loop; a healthy file is read at disk
# speed. The limit is this many seconds plus PROBE_SECONDS_PER_GB per GB of file.
PROBE_TIMEOUT_S = 60.0
PROBE_SECONDS_PER_GB = 60.0
_PROBE_CODE = "import sys; from convdiff.modelfile import _probe_main; _probe_main(sys.argv[1])"


class _Drain:
    """Reads a child's standard output and error to their end in a thread of its own, so that
    the child never waits for this process to read: its answer (some 175 KB for ResNet50)
    fills a pipe's 64 KiB buffer, and a child blocked on a full pipe while this process
    imports TensorFlow would count that import against its own time limit."""

    def __init__(self, process: Any) -> None:
        import threading

        self.stdout = bytearray()
        self.stderr = bytearray()
        self.first_line = threading.Event()  # set once stdout holds a line, or at its end
        self._thread = threading.Thread(
            target=self._read, args=(process,), name="convdiff-model-probe", daemon=True
        )
        self._thread.start()

    def _read(self, process: Any) -> None:
        import selectors

        with selectors.DefaultSelector() as selector:
            for stream, buffer in ((process.stdout, self.stdout), (process.stderr, self.stderr)):
                selector.register(stream, selectors.EVENT_READ, buffer)
            while selector.get_map():
                for key, _ in selector.select():
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        if key.data is self.stdout:
                            self.first_line.set()
                        continue
                    key.data.extend(chunk)
                    if key.data is self.stdout and b"\n" in chunk:
                        self.first_line.set()

    def join(self) -> None:
        """Wait for the end of both streams (the child has exited or been killed)."""
        self._thread.join()


@dataclass
class Probe:
    """:func:`_inspect_model_file` running in a child process, killed if it runs too long.

    The child sends two JSON lines: first the facts about the model that must be known before
    TensorFlow is imported (:func:`early_facts`), as soon as the configuration is read, then
    the checked configuration (or the error) once the whole file was read. Its output is read
    as it comes (:class:`_Drain`), so its time limit counts its own work only, however long
    this process takes before it asks for the answer.
    """

    path: Path
    process: Any = None
    started: float = 0.0
    fallback: bool = False
    output: _Drain | None = None

    @classmethod
    def start(cls, path: str | os.PathLike) -> Probe:
        """Check that the file exists and start reading it in a child process (or take the
        one :func:`start_early` started for it).

        Raises:
            ModelLoadError: a missing, unreadable or empty file.
        """
        import subprocess

        early = _STARTED_EARLY.pop(os.path.abspath(path), None)
        if early is not None:
            return early
        path = Path(path)
        check_model_path(path)
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
        return cls(path, process, time.monotonic(), output=_Drain(process))

    def early(self) -> dict[str, Any] | None:
        """The child's first answer (:func:`early_facts`), waiting for it; None when the child
        ends or runs out of time without sending it (:meth:`result` then says why)."""
        if self.fallback or self.process is None or self.output is None:
            return None
        remaining = self._limit() - (time.monotonic() - self.started)
        if not self.output.first_line.wait(max(0.0, remaining)):
            return None
        line, newline, _ = bytes(self.output.stdout).partition(b"\n")
        if not newline:  # the child ended without a line
            return None
        answer = json.loads(line)
        return answer.get("early") if isinstance(answer, dict) else None

    def _limit(self) -> float:
        return PROBE_TIMEOUT_S + PROBE_SECONDS_PER_GB * _model_bytes(self.path) / 1e9

    def result(self) -> dict[str, Any]:
        """The configuration the child read (waiting for it), or its one-line error."""
        import subprocess

        if self.fallback or self.process is None or self.output is None:
            return _inspect_model_file(self.path)
        limit = self._limit()
        remaining = max(0.0, limit - (time.monotonic() - self.started))
        try:
            self.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.close()
            raise ModelLoadError(
                f"{str(self.path)!r} could not be read within {limit:.0f} s (HDF5 loops on "
                "some damaged files); the file is corrupt"
            ) from None
        self.close()  # the child has exited: its output is read to the end
        return _probe_answer(
            self.path, self.process.returncode, bytes(self.output.stdout), bytes(self.output.stderr)
        )

    def close(self) -> None:
        """Stop the child if its answer is no longer wanted (an error elsewhere)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.output is not None:
            self.output.join()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


# Probes started by start_early, by absolute path, until Probe.start takes them
_STARTED_EARLY: dict[str, Probe] = {}


def start_early(path: str | os.PathLike) -> None:
    """Start reading ``path`` in a child process now, for the next :meth:`Probe.start` of the
    same path to take: the command line does this before its own slower imports, so that the
    child's first answer (needed before TensorFlow is imported) is ready when it is asked
    for (measured: a 0.1 s wait otherwise, on a 2-core machine). A path that cannot be a
    model starts nothing: :meth:`Probe.start` reports it in its turn, after the options'
    checks. A probe no run took is stopped when the process exits."""
    import atexit

    with contextlib.suppress(ModelLoadError, OSError):
        probe = Probe.start(path)
        _STARTED_EARLY[os.path.abspath(path)] = probe
        atexit.register(probe.close)


def check_model_path(path: Path) -> None:
    """Refuse what cannot be a model: a missing, empty or unreadable file, or a directory that
    is not a Keras SavedModel (see :func:`convdiff.savedmodel.describe_directory`)."""
    if path.is_dir():
        problem = savedmodel.describe_directory(path)
        if problem is not None:
            raise ModelLoadError(problem)
        return
    check_file(path, "model file", ModelLoadError)


def _model_bytes(path: Path) -> int:
    return savedmodel.directory_bytes(path) if path.is_dir() else path.stat().st_size


def _probe_answer(path: Path, returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    if returncode < 0:
        raise ModelLoadError(
            f"{str(path)!r} made the HDF5 or zip library crash (signal {-returncode}) "
            "while reading it; the file is corrupt"
        )
    try:
        answer = json.loads(stdout.splitlines()[-1]) if returncode == 0 else None
    except (ValueError, IndexError):
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
    """The child process: print ``{"early": ...}`` as soon as the configuration is read, then
    ``{"config": ...}`` or ``{"error": message}``, one JSON line each."""

    def send(answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    try:
        config = _inspect_model_file(Path(path), lambda c: send({"early": early_facts(c)}))
        send({"config": config})
    except ModelLoadError as exc:
        send({"error": str(exc)})
    except RecursionError:
        send({"error": f"{path!r} has a model configuration nested too deeply"})


# Layer classes whose channels_first form TensorFlow's CPU runs only through oneDNN: without
# it, its Conv2D and Conv2DBackpropInput kernels take NHWC alone (measured, TensorFlow 2.21;
# Conv3D, depthwise, separable and pooling layers run NCHW either way).
_ONEDNN_ONLY_NCHW = frozenset(
    {"Conv1D", "Conv2D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}
)


def early_facts(config: Any) -> dict[str, Any]:
    """What must be known of a model before TensorFlow is imported: the layers that need
    oneDNN on the CPU (``needs_onednn``, names)."""
    names = []
    for item in _layer_configs(config):
        inner = item.get("config")
        if (
            item.get("class_name") in _ONEDNN_ONLY_NCHW
            and isinstance(inner, dict)
            and inner.get("data_format") == "channels_first"
        ):
            names.append(str(inner.get("name", "?")))
    return {"needs_onednn": names}


def _inspect_model_file(
    path: Path, on_config: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """The checked configuration; ``on_config`` gets it as soon as it is read, before the
    rest of the file is checked."""
    on_config = on_config or (lambda _: None)
    if path.is_dir():
        return savedmodel.read_config(path, on_config)
    magic = read_head(path, len(HDF5_MAGIC), "model file", ModelLoadError)
    if magic.startswith(ZIP_MAGIC):
        if path.suffix.lower() != ".keras":
            raise ModelLoadError(
                f"{str(path)!r} is a .keras archive (zip) but its name ends in "
                f"{path.suffix or 'no extension'!r}; Keras picks its loader by the name: "
                "rename it to .keras"
            )
        return _keras_zip_config(path, on_config)
    if magic == HDF5_MAGIC:
        return _h5_config(path, on_config)
    raise ModelLoadError(
        f"model file {str(path)!r} is neither a .keras archive (zip) nor an HDF5 .h5 file"
    )


def _keras_zip_config(path: Path, on_config: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            config = _parse_json(_zip_config_text(archive, path), path)
            on_config(config)
            damaged = archive.testzip()  # reads every member: CRC and decompression errors
            if damaged is not None:
                raise ModelLoadError(
                    f"{str(path)!r} is not a readable .keras archive "
                    f"(member {damaged!r} fails its CRC check: the file is corrupt)"
                )
            if "model.weights.h5" in archive.namelist():
                _check_weights_member(archive, path)
    except ZIP_ERRORS as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a readable .keras archive ({one_line(exc)})"
        ) from None
    return config


def _zip_config_text(archive: zipfile.ZipFile, path: Path) -> bytes:
    if "config.json" not in archive.namelist():
        raise ModelLoadError(f"{str(path)!r} is a zip file without config.json; not a .keras model")
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
            shutil.copyfileobj(member, out, READ_CHUNK)
        try:
            with h5py.File(copy, "r") as f:
                _read_every_object(f, h5py)
        except _H5_ERRORS as exc:
            raise ModelLoadError(
                f"{str(path)!r} holds a corrupt model.weights.h5 ({one_line(exc)})"
            ) from None


def _h5_config(path: Path, on_config: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            config = _h5_model_config(f, path, h5py)
            on_config(config)
            _read_every_object(f, h5py)
    except _H5_ERRORS as exc:
        raise ModelLoadError(
            f"{str(path)!r} is a corrupt or truncated HDF5 file ({one_line(exc)})"
        ) from None
    return config


def _h5_model_config(f: Any, path: Path, h5py: Any) -> dict[str, Any]:
    raw = f.attrs.get("model_config")
    if raw is None:
        raise ModelLoadError(
            f"{str(path)!r} holds weights only (no model_config); "
            "save the whole model with model.save('model.h5') or model.save('model.keras')"
        )
    if not isinstance(f.get("model_weights"), h5py.Group):
        raise ModelLoadError(
            f"{str(path)!r} has a model configuration but no 'model_weights' group; "
            "the file is incomplete or corrupt"
        )
    version = _attr_text(f.attrs.get("keras_version"))
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
            f"{str(path)!r} has an unreadable model configuration ({one_line(exc)})"
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
        if name is None:  # the key is there (see _layer_configs), its value null
            raise ModelLoadError(
                f"{str(path)!r} has a model configuration entry whose 'class_name' is null; "
                "the file is corrupt"
            )
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
        builtin = module.startswith(("keras", "tf_keras"))  # Keras 3's, or Keras 2's own
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
