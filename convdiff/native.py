"""convdiff's compiled kernels, called as C functions whose machine code is kept between runs.

numba compiles each kernel once per machine, through its C entry point in
:mod:`convdiff._entries`, and the machine code is written to convdiff's cache as an object
file. Later runs load that object with llvmlite (numba's own code generator, imported without
numba) and call the entry through ``ctypes``, which releases Python's lock during the call as
numba's ``nogil`` does, so that the threads of :func:`convdiff.accel.in_parallel` run it on
every core.

Why not numba's own cache: loading it costs every run 0.5 to 0.8 s on a 2-core machine,
importing numba (0.2 to 0.3 s) and, on the first compiled call, registering numba's
implementations of Python and NumPy (``numba.core.base.refresh``), which compiling needs and
running cached code does not. Loading the objects with llvmlite costs under 0.1 s.

The machine code is the same either way: the object is the one numba made for its own engine.
A kept object is used only by the same sources of the kernels, numba, llvmlite, CPU and
``NUMBA_*`` settings (all in its file name's hash). The object's external symbols are
Python's C API (in the process) and a few of numba's helpers, which reach them only to report
an exception from a kernel. None of the kernels raises (no bounds checks; integer divisions
never by zero): the helpers to hold Python's lock are defined here as numba's are, and those
that would build the exception stop the process rather than let a kernel return half done.
An object that needs any other symbol is not loaded: numba's own copy of the code runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.cachedir import cache_dir
from convdiff.errors import ConvdiffError, OutputError

# void entry(int64_t *ints, double *floats): every entry of convdiff._entries
_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
Array = np.ndarray


@cache
def available() -> bool:
    """Whether numba and llvmlite are installed (looked up without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("numba", "llvmlite"))


# --------------------------------------------------------------------------- the kernels


def tiled_chain(
    x: Array,
    w: Array,
    acc: Array,
    geometry: tuple[int, ...],
    count: int,
    fused: bool,
    mode: int,
    g_lo: int,
    g_hi: int,
    l_lo: int,
    l_hi: int,
) -> None:
    """:func:`convdiff._compiled.tiled_chain` (the same arguments)."""
    args = _Args().arrays(x, w, acc).numbers(*geometry, count, fused, mode, g_lo, g_hi, l_lo, l_hi)
    args.run(_entry("tiled_chain", (x.dtype.name, acc.dtype.name)))


def rounded_step(
    op: int | None,
    operands: Sequence[Array],
    strides: Array,
    dims: Array,
    outputs: Sequence[Array],
    part: tuple[int, int, int, int],
    units: tuple[float, float],
    flags: tuple[bool, ...],
    rows: Array,
) -> None:
    """:func:`convdiff._compiled_bounds.rounded_step` of the operation ``op``, or where ``op``
    is None, :func:`~convdiff._compiled_bounds.rounded_mul_add` (the same arguments after it);
    ``rows`` is the scratch matrix."""
    args = _Args() if op is None else _Args().numbers(op)
    args.arrays(*operands).matrix(strides).arrays(dims, *outputs)
    args.numbers(*part, *flags).matrix(rows).reals(*units)
    args.run(_entry("rounded_step" if op is not None else "rounded_mul_add", ()))


def reduction_bound(
    sum32: Array, scale: Array, err: Array, constants: tuple[float, float, float, float, float]
) -> int:
    """:func:`convdiff._compiled_bounds.reduction_bound` (``constants``: factor, tiny, gamma,
    floor, eta_sum); the count of sums that are not finite."""
    args = _Args().arrays(sum32, scale, err).reals(*constants)
    ints, _ = args.run(_entry("reduction_bound", ()), results=(1, 0))
    return int(ints[0])


def differences(
    ref: Array,
    cand: Array,
    r_bits: Array,
    c_bits: Array,
    bound: Array,
    scale: Array,
    nmant: int,
    minexp: int,
    ulps: Array,
    counts: Array,
) -> tuple:
    """:func:`convdiff._compiled_metrics.differences`'s figures, as it returns them."""
    args = _Args().arrays(ref, cand, r_bits, c_bits, bound, scale).numbers(nmant, minexp)
    args.arrays(ulps, counts, np.empty(1))
    ints, floats = args.run(_entry("differences", (ref.dtype.name,)), results=(12, 4))
    whole = [int(n) for n in ints]
    whole[4] = int(ints[4:5].view(np.uint64)[0])  # the largest ULP distance, unsigned
    return (
        *whole[:6],
        *(float(x) for x in floats),
        *whole[6:10],
        bool(whole[10]),
        bool(whole[11]),
    )


def max_ulp(ref: Array, cand: Array, r_bits: Array, c_bits: Array) -> int:
    """:func:`convdiff._compiled_metrics.max_ulp`."""
    args = _Args().arrays(ref, cand, r_bits, c_bits)
    ints, _ = args.run(_entry("max_ulp", (ref.dtype.name,)), results=(1, 0))
    return int(ints.view(np.uint64)[0])


def mismatches(ref: Array, cand: Array, r_bits: Array, c_bits: Array) -> tuple[int, int]:
    """:func:`convdiff._compiled_metrics.mismatches`."""
    args = _Args().arrays(ref, cand, r_bits, c_bits)
    ints, _ = args.run(_entry("mismatches", (ref.dtype.name,)), results=(2, 0))
    return int(ints[:1].view(np.uint64)[0]), int(ints[1])


def rounded_max_ulp(
    reference: Array, first: Array, second: Array, first_bits: Array, second_bits: Array
) -> tuple[int, int]:
    """:func:`convdiff._compiled_metrics.rounded_max_ulp`."""
    args = _Args().arrays(reference, first, second, first_bits, second_bits)
    args.arrays(np.empty(1, first.dtype))
    ints, _ = args.run(_entry("rounded_max_ulp", (first.dtype.name,)), results=(2, 0))
    largest = ints.view(np.uint64)
    return int(largest[0]), int(largest[1])


class _Args:
    """An entry's arguments as its two arrays: each array as its address and length (a
    matrix: address, rows, columns), each integer or flag as itself, each float apart."""

    def __init__(self) -> None:
        self.ints: list[int] = []
        self.floats: list[float] = []
        self.held: list[np.ndarray] = []  # the arrays, alive until the call returns

    def arrays(self, *arrays: np.ndarray) -> _Args:
        for array in arrays:
            self.ints += [_address(array), array.size]
        self.held += arrays  # a scratch array made for the call has no other reference
        return self

    def matrix(self, array: np.ndarray) -> _Args:
        self.ints += [_address(array), *array.shape]
        self.held.append(array)
        return self

    def numbers(self, *values: Any) -> _Args:
        self.ints += [int(v) for v in values]
        return self

    def reals(self, *values: float) -> _Args:
        self.floats += [float(v) for v in values]
        return self

    def run(self, entry: Any, results: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
        """Call ``entry``; the ``results`` integers and floats it writes after the arguments."""
        ints = np.array(self.ints + [0] * results[0], np.int64)
        floats = np.array(self.floats + [0.0] * results[1], np.float64)
        entry(ints.ctypes.data, floats.ctypes.data)
        return ints[len(self.ints) :], floats[len(self.floats) :]


def _address(array: np.ndarray) -> int:
    """The address of a C-contiguous array's first element (what the entry reads from)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"compiled kernels read C-contiguous arrays; received {array.strides}")
    return int(array.ctypes.data)


# --------------------------------------------------------------------------- the entries

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple[str, tuple[str, ...]], Any] = {}
_COMPILED: list[Any] = []


def _entry(name: str, variant: tuple[str, ...]) -> Any:
    """Entry ``name`` for ``variant`` (dtype names) as a ``ctypes`` function, made once per
    process (threads may ask at once: one makes it)."""
    key = (name, variant)
    function = _FUNCTIONS.get(key)
    if function is None:
        with _LOCK:
            function = _FUNCTIONS.get(key)
            if function is None:
                function = _FUNCTIONS[key] = _make(name, variant)
    return function


def _make(name: str, variant: tuple[str, ...]) -> Any:
    """The entry from its kept object; else compiled now (numba), kept and loaded, or where
    the object cannot be loaded, numba's own copy."""
    path = _object_path(name, variant)
    if path is not None and path.exists():
        address = _load(path.read_bytes())
        if address is not None:
            return _ENTRY(address)
    compiled = _compile(name, variant)
    data = _object_file(compiled)
    if data is not None and path is not None:
        _write(path, data)
    address = _load(data) if data is not None else None
    if address is None:
        _COMPILED.append(compiled)  # numba's own copy runs: alive while the process may call it
        address = compiled.address
    return _ENTRY(address)


def _compile(name: str, variant: tuple[str, ...]) -> Any:
    try:
        from convdiff._entries import ENTRIES
    except ImportError as exc:  # installed (available() found it) but broken
        raise ConvdiffError(
            f"numba is installed but cannot be imported ({exc}); reinstall it, or set "
            "CONVDIFF_NUMBA=0 to run the NumPy engine instead"
        ) from None
    return ENTRIES[name](*variant)


def _object_file(compiled: Any) -> bytes | None:
    """The compiled entry's object file with a header: its symbol, the external symbols it
    needs and a hash of the object (a torn or altered file is not loaded). None where numba
    does not give the object (another numba than the one this was written for)."""
    try:
        _, kind, (code, _bitcode) = compiled._library.serialize_using_object_code()
    except (AttributeError, TypeError, ValueError):
        return None
    if kind != "object":
        return None
    # what the module declares and does not define: functions and global variables
    externals = sorted(
        match[1] or match[2]
        for match in re.finditer(
            r'^declare [^@]*@"?([^"(]+)"?\(|^@"?([^"\s]+)"? = external ',
            compiled.inspect_llvm(),
            re.MULTILINE,
        )
    )
    header = {
        "symbol": compiled.native_name,
        "externals": [name for name in externals if not name.startswith("llvm.")],
        "sha256": hashlib.sha256(code).hexdigest(),
    }
    return json.dumps(header).encode() + b"\n" + bytes(code)


def _load(data: bytes) -> int | None:
    """The entry's address once its object is loaded; None where the file is not whole or
    the object needs a symbol neither this process nor :data:`_HELPERS` has."""
    head, _, code = data.partition(b"\n")
    try:
        header = json.loads(head)
        symbol, externals, sha256 = header["symbol"], header["externals"], header["sha256"]
    except (ValueError, TypeError, KeyError):  # not a header this version wrote
        return None
    if hashlib.sha256(code).hexdigest() != sha256 or not isinstance(externals, list):
        return None
    if not all(_resolvable(str(name)) for name in externals):
        return None
    import llvmlite.binding as llvm

    engine = _engine()
    engine.add_object_file(llvm.ObjectFileRef.from_data(code))
    return engine.get_function_address(str(symbol)) or None


def _resolvable(name: str) -> bool:
    return name in _HELPERS or hasattr(_process(), name)


@cache
def _process() -> Any:
    """This process's symbols (Python's C API, the C library); None where the platform
    cannot list them (no object is loaded there)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


# numba's helpers that the entries' objects name, defined for them (see the module's
# docstring): the lock's two as numba defines them, the others only on the way to raise
_HELPERS = {
    "numba_gil_ensure": "define void @numba_gil_ensure(ptr %state) {\n"
    "  %held = call i32 @PyGILState_Ensure()\n  store i32 %held, ptr %state\n  ret void\n}",
    "numba_gil_release": "define void @numba_gil_release(ptr %state) {\n"
    "  %held = load i32, ptr %state\n  call void @PyGILState_Release(i32 %held)\n  ret void\n}",
    **{
        name: f"define void @{name}() {{\n  call void @abort()\n  unreachable\n}}"
        for name in (
            "numba_do_raise",
            "numba_unpickle",
            "numba_runtime_build_excinfo_struct",
            "NRT_Free",
            "NRT_MemInfo_call_dtor",
        )
    },
}
_DECLARED = "declare i32 @PyGILState_Ensure()\ndeclare void @PyGILState_Release(i32)\n"
_DECLARED += "declare void @abort() noreturn\n"


@cache
def _engine() -> Any:
    """llvmlite's engine that holds the loaded objects (and :data:`_HELPERS`)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine()
    helpers = llvm.parse_assembly(_DECLARED + "\n".join(_HELPERS.values()))
    engine = llvm.create_mcjit_compiler(helpers, machine)
    engine.finalize_object()
    return engine


# --------------------------------------------------------------------------- the cache


def _object_path(name: str, variant: tuple[str, ...]) -> Path | None:
    """Where the entry's object is kept: the directory of numba's cache (``NUMBA_CACHE_DIR``
    when set, else convdiff's ``numba``), under a name that changes with anything that
    changes the machine code; None without a writable directory."""
    directory = _directory()
    if directory is None:
        return None
    label = "-".join((name, *variant))
    digest = hashlib.sha256(f"{_machine_key()}|{label}".encode()).hexdigest()[:20]
    return directory / f"convdiff-{label}-{digest}.o"


@cache
def _directory() -> Path | None:
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if not chosen:
        return cache_dir("numba")
    try:
        Path(chosen).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(chosen)


@cache
def _machine_key() -> str:
    """What the machine code depends on: the kernels' sources, numba's and llvmlite's
    versions, the CPU and its features, and numba's settings from the environment."""
    import llvmlite
    import llvmlite.binding as llvm

    here = Path(__file__).parent
    sources = ("_compiled.py", "_compiled_bounds.py", "_compiled_metrics.py", "_entries.py")
    digest = hashlib.sha256()
    for source in sources:
        digest.update((here / source).read_bytes())
    numba_spec = importlib.util.find_spec("numba")
    if numba_spec is not None and numba_spec.origin is not None:
        version = Path(numba_spec.origin).parent / "_version.py"  # numba's version, unimported
        digest.update(version.read_bytes() if version.exists() else numba_spec.origin.encode())
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("NUMBA_"))
    parts = [
        digest.hexdigest(),
        llvmlite.__version__,
        llvm.get_host_cpu_name(),
        llvm.get_host_cpu_features().flatten(),
        repr([s for s in settings if s[0] != "NUMBA_CACHE_DIR"]),
    ]
    return "|".join(parts)


def _write(path: Path, data: bytes) -> None:
    """Write the object whole or not at all (another process may be writing the same); a
    directory that cannot take it leaves the next run to compile again."""
    from convdiff.outputs import write_atomic

    with contextlib.suppress(OutputError):
        write_atomic(str(path), data)
