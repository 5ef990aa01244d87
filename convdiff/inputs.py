"""Input files and arrays -> the model's inputs, checked and fitted.

Input files are read without ``np.load``: pickles are refused before anything is unpickled, and
a header's shape is checked against the bytes that follow before anything is allocated. Every
damaged file gives an :class:`~convdiff.errors.InputError` (tests/test_fuzz.py mutates files to
check it).
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.errors import InputError, one_line
from convdiff.files import READ_CHUNK, ZIP_ERRORS, ZIP_MAGIC, check_file, read_head
from convdiff.graph import as_graph


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
    """The inputs of a model (or of its :class:`~convdiff.graph.Graph`), in order."""
    graph = as_graph(model)
    return [
        InputSpec(name, tuple(t.shape), str(getattr(t, "dtype", "float32")))
        for name, t in zip(graph.input_names, graph.model.inputs, strict=True)
    ]


def random_inputs(specs: list[InputSpec], seed: int) -> Inputs:
    """Standard normal inputs of the model's shapes (batch 1), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        sizes = [1 if i == 0 and n is None else n for i, n in enumerate(spec.shape)]
        shape = [n for n in sizes if n is not None]
        if len(shape) < len(sizes):
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
    check_file(path, "input file", InputError)
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
    head = read_head(path, len(NPY_MAGIC), "input file", InputError)
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
            f"{where} is not a readable .npy file: its header is damaged ({one_line(exc)})"
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
        chunk = fp.read(min(READ_CHUNK, nbytes - got))
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
    except ZIP_ERRORS as exc:
        raise InputError(f"{label} is not a readable .npz archive ({one_line(exc)})") from None


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
        while fp.read(READ_CHUNK):  # to the member's end, where zipfile checks its CRC
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
