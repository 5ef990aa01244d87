"""The compiled FMA chains (:mod:`convdiff.accel`, numba) against the NumPy engine, bit for bit.

Each engine is also checked on its own against exact rational references in
tests/test_orders.py (every case there whose reduction runs compiled chains runs on both
engines; the others reach the NumPy engine only).
"""

from __future__ import annotations

import numpy as np
import pytest
from support import count_compiled_runs

from convdiff import accel, orders
from convdiff.orders import parse_order, reduce_terms

# Operand layouts of real reductions: (a shape, b shape), terms first.
LAYOUTS = {
    "conv": ((200, 300, 1), (200, 1, 24)),  # positions x channels
    "conv-wide": ((40, 7, 1), (40, 1, 900)),  # few positions, many channels
    "conv-whole-tiles": ((64, 48, 1), (64, 1, 12)),  # no remainder of rows or positions
    "few-positions": ((50, 5, 1), (50, 1, 3)),  # fewer positions than a vector
    "grouped": ((30, 4, 40, 1), (30, 4, 1, 7)),  # both vary along the groups
    "depthwise": ((9, 50, 16), (9, 1, 16)),  # both vary along the channels
    "dense-batch1": ((300, 1, 1), (300, 1, 70)),
    "elementwise": ((33, 500), (33, 500)),
}


@pytest.fixture
def tiles_ran(monkeypatch) -> list[int]:
    """Counts the compiled tile runs."""
    return count_compiled_runs(monkeypatch)


def _compiled_cases(order_names: list[str]) -> list:
    """(dt_name, order) pairs that run compiled code: the exact order is compiled for float32
    operands only (float64 products are not exact in float64; that order stays the NumPy
    engine's, checked against exact rationals in test_orders), so a float64 case would run
    the same code twice."""
    return [
        pytest.param(dt_name, order, id=f"{order}-{dt_name}")
        for order in order_names
        for dt_name in ("float32", "float64")
        if not (order == "exact" and dt_name == "float64")
    ]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("dt_name", "order"),
    _compiled_cases(
        [
            "sequential",
            "reverse",
            "pairwise",
            "blocked:7",
            "eigen",
            "float64",
            "kahan",
            "kahan/nofma",
            "exact",
            "sequential/nofma",
        ]
    ),
)
def test_compiled_chains_give_the_numpy_engines_bits(
    layout, dt_name, order, rng, monkeypatch, tiles_ran
):
    """The compiled path against the NumPy engine on layouts with every broadcast pattern,
    including results in the subnormal range (scaled operands)."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    dt = np.dtype(dt_name)
    name, _, nofma = order.partition("/")
    parsed = parse_order(name, fma=not nofma)
    (sa, sb) = LAYOUTS[layout]
    # float32 operands near 2**-64 give results in the subnormal range. In float64 (operands
    # near 2**-540) every such step takes fma64's exact-rational path, one element at a time:
    # a few scattered tiny operands cover it (the exact references in test_orders cover the
    # subnormal results).
    for scale in (0, -64 if dt == np.float32 else -540):
        a = rng.standard_normal(sa) * 2.0 ** (scale * _tiny(rng, sa, dt))
        b = rng.standard_normal(sb) * 2.0 ** (scale * _tiny(rng, sb, dt))
        a, b = a.astype(dt), b.astype(dt)
        compiled = reduce_terms(a, b, parsed, dt)
        assert tiles_ran, "no compiled chain ran"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CONVDIFF_NUMBA", "0")
            plain = reduce_terms(a, b, parsed, dt)
        assert compiled.dtype == plain.dtype
        np.testing.assert_array_equal(
            compiled.view(f"u{dt.itemsize}"), plain.view(f"u{dt.itemsize}")
        )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_arranged_layouts_are_tiled_as_they_are(layout, rng):
    """Every layout orders._arrange makes has an operand varying along the positions only and
    one that does not vary along them: the tiles read it without a copy (the copy that
    fma_chain falls back to is for other callers)."""
    a, b = (rng.standard_normal(shape).astype(np.float32) for shape in LAYOUTS[layout])
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    arranged = orders._arrange(a, b, shape)
    assert accel._tiling(arranged.a, arranged.b, arranged.dims, range(a.shape[0])) is not None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("dt_name", "order"),
    _compiled_cases(
        ["sequential", "reverse", "pairwise", "kahan", "kahan/nofma", "exact", "sequential/nofma"]
    ),
)
def test_tiles_split_between_threads_give_the_same_bits(
    layout, dt_name, order, rng, monkeypatch, tiles_ran
):
    """Outputs split between threads (by positions, or by groups where the positions are few):
    each output's chain is still one thread's, in order."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1")
    monkeypatch.setattr(accel, "_PARALLEL_STEPS", 0)
    monkeypatch.setattr(accel, "_threads", lambda: 3)
    dt = np.dtype(dt_name)
    name, _, nofma = order.partition("/")
    parsed = parse_order(name, fma=not nofma)
    a, b = (rng.standard_normal(shape).astype(dt) for shape in LAYOUTS[layout])
    threaded = reduce_terms(a, b, parsed, dt)
    assert tiles_ran, "no compiled chain ran"
    monkeypatch.setenv("CONVDIFF_NUMBA", "0")
    plain = reduce_terms(a, b, parsed, dt)
    np.testing.assert_array_equal(threaded.view(f"u{dt.itemsize}"), plain.view(f"u{dt.itemsize}"))


def _tiny(rng: np.random.Generator, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    """Where operands get the small scale: all of them in float32, 5% in float64."""
    return np.ones(shape) if dt == np.float32 else (rng.random(shape) < 0.05).astype(float)


def test_other_dtypes_are_left_to_the_numpy_engine():
    a = np.ones((4, 1, 1, 3), np.float64)
    assert accel.operands(a, a, np.dtype(np.float32)) is None  # wider operands
    f32 = a.astype(np.float32)
    assert accel.operands(f32, f32, np.dtype(np.float64)) is None  # narrower: exact products
    assert accel.operands(a.astype(np.float16), a.astype(np.float16), np.float16) is None


def test_float32_and_float64_chains_are_compiled():
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    for dt in (np.float32, np.float64):
        a = np.ones((4, 1, 1, 3), dt)
        assert accel.operands(a, a, np.dtype(dt)) is not None


def test_compiled_code_is_kept_in_the_user_cache_and_loaded_without_numba(tmp_path):
    """The entries' machine code goes to convdiff's user cache directory (a cache inside the
    installed package survives a reinstall and shadowed an editable install). A second
    process loads it without importing numba and gets the same bits; a torn object file is
    not loaded but compiled again."""
    import subprocess
    import sys
    from pathlib import Path

    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    code = (
        "import sys, numpy as np; from convdiff import accel, metrics\n"
        "rng = np.random.default_rng(5)\n"
        "a = rng.standard_normal((40, 1, 1, 24)).astype(np.float32)\n"
        "b = rng.standard_normal((40, 1, 1, 24)).astype(np.float32)\n"
        "acc = np.zeros((1, 1, 24))\n"
        "accel.fma_chain(*accel.operands(a, b, np.dtype(np.float32)), acc, range(40), True)\n"
        "got = acc.astype(np.float32)\n"
        "print(got.view(np.int32).tobytes().hex(), metrics.max_ulp_distance(got, got + 1))\n"
        "print('numba' in sys.modules, accel.__file__)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    env |= {"CONVDIFF_CACHE_DIR": str(tmp_path), "CONVDIFF_NUMBA": "1"}

    def run() -> list[str]:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    started = __import__("time").time()
    first = run()
    kept = sorted((tmp_path / "numba").glob("convdiff-*.o"))
    assert [p.name.split("-")[1] for p in kept] == ["max_ulp", "tiled_chain"], kept
    assert first[2] == "True"  # compiled: numba ran
    second = run()
    assert second[:2] == first[:2]
    assert second[2] == "False", "the kept machine code was not loaded without numba"
    kept[0].write_bytes(kept[0].read_bytes()[:-100])  # torn: compiled and written again
    third = run()
    assert third[:3] == first[:3]
    package = Path(first[3]).parent
    beside = [p for p in package.rglob("*") if p.suffix in (".o", ".nbi", ".nbc")]
    assert not [p for p in beside if p.stat().st_mtime >= started], beside


@pytest.mark.parametrize("fused", [True, False])
def test_operands_of_any_other_layout_are_copied_into_one_the_tiles_read(fused, rng, monkeypatch):
    """An operand that varies along the rows and the positions at once (no layout of
    orders._arrange, but fma_chain takes any broadcasting operands): the same bits as the
    NumPy engine's steps, with a reversed range of terms."""
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    a = rng.standard_normal((20, 2, 3, 17)).astype(np.float32)
    b = rng.standard_normal((20, 1, 3, 1)).astype(np.float32)
    assert accel._tiling(a, b, (2, 3, 17), range(20)) is None
    terms = range(19, -1, -1)
    compiled = np.zeros((2, 3, 17))
    accel.fma_chain(*accel.operands(a, b, np.dtype(np.float32)), compiled, terms, fused)
    monkeypatch.setenv("CONVDIFF_NUMBA", "0")
    engine = orders._Engine(a, b, np.dtype(np.float32), fused)
    plain = np.zeros((2, 3, 17))
    engine.chain(plain, terms)
    np.testing.assert_array_equal(compiled, plain)


def test_a_kept_object_is_loaded_only_whole_and_with_every_symbol_it_names(monkeypatch):
    """native._load takes the object numba made (its address runs the entry), and refuses a
    file whose object is not the one its header hashed, or whose object names a symbol that
    neither the process nor convdiff's helpers define (LLVM would stop the process on it):
    that entry then runs numba's own copy."""
    import json

    from convdiff import native

    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    data = native._object_file(native._compile("max_ulp", ("float64",)))
    assert data is not None
    head, _, code = data.partition(b"\n")
    header = json.loads(head)
    assert header["symbol"] and all(native._resolvable(n) for n in header["externals"])

    def with_header(**changes) -> bytes:
        return json.dumps({**header, **changes}).encode() + b"\n" + code

    assert native._load(with_header(sha256="0" * 64)) is None
    assert native._load(with_header(externals=3)) is None
    assert native._load(b"not a header\n" + code) is None
    assert native._load(b"[1, 2]\n" + code) is None
    assert native._load(with_header(externals=[*header["externals"], "no_such_symbol"])) is None
    monkeypatch.setattr(native, "_process", lambda: None)  # a platform that lists nothing
    assert native._load(data) is None
    monkeypatch.undo()
    assert isinstance(native._load(data), int)


def test_numbas_switches_and_a_broken_numba_are_plain(monkeypatch):
    """NUMBA_DISABLE_JIT=1 (numba compiles nothing) takes the NumPy engine, as
    CONVDIFF_NUMBA=0 does; a numba that is installed but fails to import is a one-line
    error that names the way out, not a traceback."""
    import sys

    from convdiff import native
    from convdiff.errors import ConvdiffError

    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    assert not accel.enabled()
    monkeypatch.delenv("NUMBA_DISABLE_JIT")
    monkeypatch.setitem(sys.modules, "convdiff._entries", None)  # import fails
    with pytest.raises(ConvdiffError, match="CONVDIFF_NUMBA=0"):
        native._compile("max_ulp", ("float64",))


def test_an_entrys_arguments_keep_the_arrays_they_point_to():
    """_Args passes arrays as addresses: a scratch array made for the call (differences'
    one float64, rounded_max_ulp's one element) must stay alive until the entry returns,
    though the caller keeps no reference to it."""
    import gc
    import weakref

    from convdiff import native

    args = native._Args()
    scratch, matrix = np.empty(3), np.empty((2, 2))
    refs = [weakref.ref(scratch), weakref.ref(matrix)]
    args.arrays(scratch).matrix(matrix)
    del scratch, matrix
    gc.collect()
    assert all(ref() is not None for ref in refs)
