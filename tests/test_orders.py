"""``orders.reduce_terms`` bit for bit against plain scalar reference loops.

The references below work on exact rationals (:class:`fractions.Fraction`) and round with
:func:`_round`, an integer-arithmetic round-to-nearest-even written for this test, so they share
no rounding code with NumPy or with :mod:`convdiff.orders`: a fused multiply-add is
``_round(acc + a*b)`` (one rounding of the exact value), an unfused step is
``_round(acc + _round(a*b))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from support import count_compiled_runs

from convdiff import accel, orders
from convdiff.errors import OptionError
from convdiff.orders import Order, parse_order, reduce_terms

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F64 = np.dtype(np.float64)
DTYPES = {"float32": F32, "float16": F16, "bfloat16": BF16}
# float64 layers: their fused steps are emulated with an exact product (floats.fma64)
ALL_DTYPES = {**DTYPES, "float64": F64}

# --------------------------------------------------------------------------- exact rounding


def _round(q: Fraction, dtype: np.dtype) -> Fraction:
    """``q`` rounded to the nearest value of ``dtype``, ties to even (subnormals included)."""
    if q == 0:
        return Fraction(0)
    info = ml_dtypes.finfo(dtype)
    precision, emin = int(info.nmant) + 1, int(info.minexp)
    mag = abs(q)
    # 2**(e-1) < mag < 2**(e+1) from the bit lengths; one comparison settles e = floor(log2).
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if mag < Fraction(2) ** e:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - precision + 1)  # spacing at mag (fixed if subnormal)
    rounded = round(mag / quantum) * quantum  # Fraction.__round__ rounds half to even
    assert rounded <= Fraction(float(info.max)), "test data must not overflow"
    return rounded if q > 0 else -rounded


def _to_array(values: list[Fraction], dtype: np.dtype) -> np.ndarray:
    # Every value is representable in dtype and in float64, so both conversions are exact.
    return np.array([float(v) for v in values]).astype(dtype)


def _fractions(x: np.ndarray) -> list[list[Fraction]]:
    """A (K, n) array as K lists of exact rationals."""
    return [[Fraction(float(v)) for v in row] for row in np.asarray(x, np.float64)]


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit for bit, except that +0 and -0 are the same value (the references do not track the
    sign of a zero)."""
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), strict=True)


# --------------------------------------------------------------------------- scalar references

Terms = list[tuple[Fraction, Fraction | None]]


def _step(acc: Fraction, a: Fraction, b: Fraction | None, fma: bool, dt: np.dtype) -> Fraction:
    if b is None:
        return _round(acc + _round(a, dt), dt)
    if fma:
        return _round(acc + a * b, dt)
    return _round(acc + _round(a * b, dt), dt)


def _ref_sequential(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    acc = Fraction(0)
    for a, b in terms:
        acc = _step(acc, a, b, fma, dt)
    return acc


def _ref_reverse(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    return _ref_sequential(terms[::-1], fma, dt)


def _ref_pairwise(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    """NumPy's ``pairwise_sum`` (numpy/_core/src/umath/loops_utils.h.src), term by term."""
    n = len(terms)
    if n < 8:
        return _ref_sequential(terms, fma, dt)
    if n <= 128:
        r = [_step(Fraction(0), *terms[j], fma, dt) for j in range(8)]
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] = _step(r[j], *terms[i + j], fma, dt)
            i += 8

        def add(x: Fraction, y: Fraction) -> Fraction:
            return _round(x + y, dt)

        res = add(add(add(r[0], r[1]), add(r[2], r[3])), add(add(r[4], r[5]), add(r[6], r[7])))
        for a, b in terms[i:]:
            res = _step(res, a, b, fma, dt)
        return res
    half = n // 2
    half -= half % 8
    return _round(_ref_pairwise(terms[:half], fma, dt) + _ref_pairwise(terms[half:], fma, dt), dt)


def _ref_kahan(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    """Kahan summation; with FMA the term is ``fma(a, b, -comp)``, rounded once."""
    total, comp = Fraction(0), Fraction(0)
    for a, b in terms:
        if b is None:
            y = _round(_round(a, dt) - comp, dt)
        elif fma:
            y = _round(a * b - comp, dt)
        else:
            y = _round(_round(a * b, dt) - comp, dt)
        t = _round(total + y, dt)
        comp = _round(_round(t - total, dt) - y, dt)
        total = t
    return total


def _ref_blocked(block: int) -> Callable[[Terms, bool, np.dtype], Fraction]:
    def blocked(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
        total = Fraction(0)
        for start in range(0, len(terms), block):
            part = _ref_sequential(terms[start : start + block], fma, dt)
            total = _round(total + part, dt)
        return total

    return blocked


# TensorFlow's Eigen slices (terms per slice) for reduction lengths, worked out by hand from
# eigen_contraction_kernel.h: ceil(K / 320) slices of floor(K / slices) terms rounded up to 8.
EIGEN_SLICES = {
    1: 1,
    147: 147,
    300: 300,
    320: 320,
    321: 160,
    576: 288,
    700: 240,
    1024: 256,
    2048: 296,
    2304: 288,
    4608: 312,
}


def _ref_eigen_gemm(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    """Eigen's matrix-product path: slices summed from zero with FMA, each added to the output
    (one slice up to 320 terms)."""
    n = len(terms)
    return _ref_blocked(EIGEN_SLICES[n] if n > 320 else max(n, 1))(terms, True, dt)


def _ref_eigen_elementwise(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    """``eigen`` where both operands vary on the output (depthwise), and plain sums: index
    order, multiply and add rounded apart."""
    return _ref_sequential(terms, False, dt)


def _ref_float64(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    """Accumulate in float64 in index order, each step ``acc + a*b`` rounded once (products of
    float32 and narrower are exact in float64; float64 operands take a fused step), then round
    once to ``dt``."""
    acc = Fraction(0)
    for a, b in terms:
        acc = _round(acc + (a if b is None else a * b), F64)
    return _round(acc, dt)


def _ref_exact(terms: Terms, fma: bool, dt: np.dtype) -> Fraction:
    return _round(sum((a if b is None else a * b for a, b in terms), Fraction(0)), dt)


REFERENCES = {
    "sequential": _ref_sequential,
    "reverse": _ref_reverse,
    "pairwise": _ref_pairwise,
    "kahan": _ref_kahan,
    "blocked": _ref_blocked(4),
    "float64": _ref_float64,
    "exact": _ref_exact,
    # the (K, n) operands of these tests vary on the same axis: the depthwise case
    "eigen": _ref_eigen_elementwise,
}
FMA_ORDERS = ("sequential", "reverse", "pairwise", "kahan", "blocked")


def _reference(a: np.ndarray, b: np.ndarray | None, name: str, fma: bool, dt) -> np.ndarray:
    """``REFERENCES[name]`` on each column of the ``(K, n)`` operands, as an array of ``dt``."""
    return _reference_with(REFERENCES[name], a, b, dt, fma=fma, label=name)


# The exact references take most of this file's time, and a case that runs on both engines
# checks them against the same operands (the seeded rng): each is computed once per session.
_REFERENCES_COMPUTED: dict[tuple, np.ndarray] = {}


def _reference_with(
    ref: Callable[[Terms, bool, np.dtype], Fraction],
    a: np.ndarray,
    b: np.ndarray | None,
    dt,
    *,
    fma: bool = True,
    label: str,
) -> np.ndarray:
    """``ref`` (named ``label``) on each column of the ``(K, n)`` operands, as an array of
    ``dt``; computed once for the same operands."""
    key = (label, fma, np.dtype(dt).name, _operand_key(a), None if b is None else _operand_key(b))
    if key not in _REFERENCES_COMPUTED:
        fa = _fractions(a)
        fb = None if b is None else _fractions(b)
        out = []
        for j in range(a.shape[1]):
            terms = [(fa[k][j], None if fb is None else fb[k][j]) for k in range(a.shape[0])]
            out.append(ref(terms, fma, dt))
        _REFERENCES_COMPUTED[key] = _to_array(out, dt)
    return _REFERENCES_COMPUTED[key].copy()


def _operand_key(x: np.ndarray) -> tuple:
    return x.dtype.name, x.shape, x.tobytes()


# --------------------------------------------------------------------------- data


def _operands(rng: np.random.Generator, k: int, n: int, dt: np.dtype, scale: int = 0):
    """Normals with spread exponents (so partial sums round and cancel), in ``dt``."""
    spread = 3 if dt == F16 else 8
    x = rng.standard_normal((k, n)) * 2.0 ** rng.integers(-spread, spread + 1, (k, n))
    return (x * 2.0**scale).astype(dt)


SIZES = (1, 2, 7, 8, 9, 17, 64, 131, 300)  # pairwise: tail only, one leaf, leaves + tails, split


# --------------------------------------------------------------------------- the two engines

# reduce_terms runs its chains of steps (acc = round(acc + a*b)) compiled when numba is
# installed (convdiff.accel), in a float32 or float64 accumulator with operands of that dtype,
# for these orders' programs, Kahan's compensated steps included; the float64 order compiled
# over float32 or float64 operands (widened: exact products), the exact order's double-double
# sum over float32 operands. BLAS and every half-precision accumulator take the NumPy engine
# either way: those tests run on the NumPy engine only (running them "compiled" would run the
# same code twice). tests/test_accel.py checks the two engines' bits against each other.
_CHAINED = {"sequential", "reverse", "pairwise", "blocked", "eigen", "kahan"}
ENGINES = ("numpy", "compiled")


def compiled_reaches(name: str, dt_name: str) -> bool:
    """Whether reduce_terms runs ``name``'s chains compiled for a ``dt_name`` accumulator
    (operands of the same dtype)."""
    if name == "exact":
        return dt_name == "float32"
    return (name in _CHAINED or name == "float64") and dt_name in ("float32", "float64")


def engines_for(name: str, dt_name: str) -> tuple[str, ...]:
    return ENGINES if compiled_reaches(name, dt_name) else ("numpy",)


@pytest.fixture(autouse=True)
def engine(request, monkeypatch):
    """The engine a test runs on: the NumPy engine unless a test is parametrized with
    ``engine="compiled"`` (numba's chains), which it must then reach: a compiled run that
    never calls a compiled chain fails, so the selection above cannot drift silently."""
    name = getattr(request, "param", "numpy")
    if name == "compiled" and not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")
    monkeypatch.setenv("CONVDIFF_NUMBA", "1" if name == "compiled" else "0")
    chains = count_compiled_runs(monkeypatch) if name == "compiled" else []
    yield name
    assert name == "numpy" or chains, "no compiled chain ran: this case is the NumPy engine's"


BOTH_ENGINES = pytest.mark.parametrize("engine", ENGINES, indirect=True)


def _cases():
    for name in REFERENCES:
        for fma in (True, False) if name in FMA_ORDERS else (True,):
            for dt_name in ALL_DTYPES:
                for with_b in (True, False):
                    if not (with_b or fma):  # without products fma changes nothing
                        continue
                    for engine in engines_for(name, dt_name):
                        case_id = f"{engine}-{_id(name, fma, dt_name, with_b)}"
                        yield pytest.param(name, fma, dt_name, with_b, engine, id=case_id)


def _id(name, fma, dt_name, with_b) -> str:
    return f"{name}{'+fma' if fma else '-fma'}-{dt_name}-{'dot' if with_b else 'sum'}"


@pytest.mark.parametrize(
    ("name", "fma", "dt_name", "with_b", "engine"), list(_cases()), indirect=["engine"]
)
def test_reduce_terms_matches_scalar_loop(name, fma, dt_name, with_b, engine, rng):
    dt = ALL_DTYPES[dt_name]
    order = Order(name=name, fma=fma, block=4 if name == "blocked" else 0, accumulate=dt_name)
    for k in SIZES:
        a = _operands(rng, k, 3, dt)
        b = _operands(rng, k, 3, dt) if with_b else None
        got = reduce_terms(a, b, order, dt)
        want = _reference(a, b, name, fma, dt)
        _assert_same(got, want)


@pytest.mark.parametrize(
    ("name", "dt_name", "fma", "engine"),
    [
        pytest.param(name, dt_name, fma, engine, id=f"{engine}-{name}-{dt_name}-{fma}")
        for name in ("sequential", "kahan", "exact")
        for dt_name in ("float32", "float16", "bfloat16", "float64")
        for fma in (True, False)
        for engine in engines_for(name, dt_name)
    ],
    indirect=["engine"],
)
def test_subnormal_range(name, fma, dt_name, engine, rng):
    """Products and sums below the smallest normal number (gradual underflow)."""
    dt = ALL_DTYPES[dt_name]
    # products near 2**-16 (float16), 2**-136 (float32, bfloat16) or 2**-1076 (float64)
    scale = {F16: -8, F64: -538}.get(dt, -68)
    order = Order(name=name, fma=fma, accumulate=dt_name)
    for k in (3, 20):
        a, b = _operands(rng, k, 8, dt, scale), _operands(rng, k, 8, dt, scale)
        got = reduce_terms(a, b, order, dt)
        want = _reference(a, b, name, fma and name != "exact", dt)
        _assert_same(got, want)


@pytest.mark.parametrize(
    ("name", "dt_name", "engine"),
    [
        pytest.param(name, dt_name, engine, id=f"{engine}-{name}-{dt_name}")
        for name in ("sequential", "pairwise", "kahan")
        for dt_name in DTYPES
        for engine in engines_for(name, dt_name)
    ],
    indirect=["engine"],
)
def test_accumulate_option_rounds_result_to_layer_dtype(name, dt_name, engine, rng):
    """``accumulate=`` runs the same loop in that dtype; float32 holds the result exactly."""
    dt = DTYPES[dt_name]
    a, b = _operands(rng, 40, 5, dt), _operands(rng, 40, 5, dt)
    got = reduce_terms(a, b, Order(name=name, accumulate=dt_name), F32)
    want = _reference(a, b, name, True, dt).astype(F32)
    np.testing.assert_array_equal(got, want)


def test_reference_rounding_agrees_with_numpy_casts(rng):
    """The test's own rounding is right: NumPy's float64 -> narrower casts round to nearest
    even (double rounding from float64 is harmless for these formats and values)."""
    for dt in DTYPES.values():
        info = ml_dtypes.finfo(dt)
        x = rng.standard_normal(2000) * 2.0 ** rng.integers(-5, 6, 2000)
        tiny = rng.standard_normal(500) * float(info.smallest_normal)  # subnormal results
        ties = (rng.integers(1, 2 ** (int(info.nmant) + 1), 500) * 2 + 1) * 2.0 ** (
            -int(info.nmant) - 2
        )  # exact midpoints between neighbours of dt
        for v in np.concatenate([x, tiny, ties, -ties]):
            assert float(_round(Fraction(float(v)), dt)) == float(np.array(v).astype(dt)), (dt, v)


@pytest.mark.parametrize("dt_name", ["float32", "float16", "bfloat16"])
def test_exact_on_ties_and_cancellation(dt_name):
    """``exact`` rounds the rational sum: a float64 sum that lands on a tie must not decide."""
    dt = DTYPES[dt_name]
    p = int(ml_dtypes.finfo(dt).nmant) + 1
    half_ulp = 2.0**-p  # half the spacing just above 1
    cases = [
        [1.0, half_ulp],  # exact tie: to even (1.0)
        [1.0, half_ulp, 2.0**-70],  # just above the tie: rounds up
        [1.0, half_ulp, -(2.0**-70)],  # just below: rounds down
        [1.0 + 2 * half_ulp, half_ulp],  # tie from an odd neighbour: rounds up to even
        [2.0**20, 1.0, -(2.0**20), 2.0**-60],  # catastrophic cancellation
    ]
    for values in cases:
        # every value is representable in dt except the tiny nudges, which enter as products
        a = np.array([[v] for v in values], np.float64)
        if dt == F16:
            a = np.clip(a, -(2.0**15), 2.0**15)
        tiny = np.abs(a) < 2.0**-30
        scale = np.where(tiny, 2.0**-35, 1.0)
        a32 = np.where(tiny, a / scale, a).astype(np.float32)  # tiny = a32 * scale, both exact
        b32 = scale.astype(np.float32)
        got = reduce_terms(a32, b32, Order(name="exact"), dt)
        want = _reference(a32, b32, "exact", True, dt)
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


@BOTH_ENGINES
def test_pairwise_is_numpys_sum(rng):
    """The ``pairwise`` order of a plain float32 sum reproduces ``np.sum`` bit for bit."""
    for k in (5, 8, 100, 128, 129, 1000, 5000):
        x = (rng.standard_normal(k) * 2.0 ** rng.integers(-10, 10, k)).astype(np.float32)
        assert reduce_terms(x[:, None], None, Order(name="pairwise"), F32)[0] == np.sum(x)


@pytest.mark.parametrize("dt_name", list(DTYPES))
def test_blas_within_gamma_bound(dt_name, rng):
    """BLAS's order is unspecified; its result is still within gamma_K * sum |a b| of exact."""
    dt = DTYPES[dt_name]
    a, b = _operands(rng, 50, 6, dt), _operands(rng, 50, 6, dt)
    got = reduce_terms(a, b, Order(name="blas"), dt).astype(np.float64)
    exact = np.einsum("kn,kn->n", a.astype(np.float64), b.astype(np.float64))
    mag = np.einsum("kn,kn->n", np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    u = 2.0 ** -(int(ml_dtypes.finfo(dt).nmant) + 1)
    k = a.shape[0] + 1
    assert np.all(np.abs(got - exact) <= k * u / (1 - k * u) * mag + u * np.abs(exact))


def test_empty_reduction_is_zero():
    out = reduce_terms(np.zeros((0, 3), F32), np.zeros((0, 3), F32), Order(), F32)
    np.testing.assert_array_equal(out, np.zeros(3, F32))


@BOTH_ENGINES
def test_broadcast_operands():
    """``a`` and ``b`` broadcast on the output axes, as the conv kernels use them."""
    a = np.arange(6, dtype=F32).reshape(3, 2, 1)
    b = np.arange(9, dtype=F32).reshape(3, 1, 3)
    out = reduce_terms(a, b, Order(), F32)
    np.testing.assert_array_equal(out, np.einsum("kij,kij->ij", *np.broadcast_arrays(a, b)))


# --------------------------------------------------------------------------- fixed bugs


@BOTH_ENGINES
def test_fma_subnormal_double_rounding():
    """acc + a*b just below a float32 subnormal midpoint must round down.

    float64(acc + a*b) is one float64 step below the midpoint between acc and its upper
    neighbour (exact sum below it too). ``_round_fma`` flags every result below the smallest
    normal and moves it one float64 step towards the exact value, which lands exactly on the
    midpoint; the cast then ties to even (upwards). Round-to-odd (nudge only when the float64
    sum is even) would be correct.
    """
    acc = np.array([2.0**-127 + 2.0**-149], F32)  # odd multiple of the subnormal step
    a = np.array([1.6322707 * 2.0**-75], F32)
    b = np.array([0.6126435 * 2.0**-75], F32)
    exact = Fraction(float(acc[0])) + Fraction(float(a[0])) * Fraction(float(b[0]))
    midpoint = Fraction(float(acc[0])) + Fraction(1, 2**150)
    assert exact < midpoint and float(exact) == float(midpoint) - 2.0**-179
    out = reduce_terms(np.stack([acc, a]), np.stack([np.ones(1, F32), b]), Order(), F32)
    assert float(out[0]) == float(_round(exact, F32)) == float(acc[0])


def test_float64_accumulator_with_fma(rng):
    a, b = _operands(rng, 10, 3, F32), _operands(rng, 10, 3, F32)
    got = reduce_terms(a, b, Order(accumulate="float64"), F32)
    np.testing.assert_array_equal(got, _reference(a, b, "float64", True, F32))


def test_exact_with_scalar_result():
    x = np.array([1.0, 2.0**-24, 2.0**-60], F32)
    assert reduce_terms(x, None, Order(name="exact"), F32) == np.float32(1.0 + 2.0**-23)


@pytest.mark.parametrize("name", ["sequential", "reverse", "pairwise", "blocked"])
def test_unfused_product_of_wider_operands_rounds_once(name, rng):
    """float32 operands, float16 accumulator: the product is rounded to float16 once, as in
    the FMA orders and in kahan (``_term``), not after rounding each operand to float16."""
    a, b = _operands(rng, 1, 200, F32), _operands(rng, 1, 200, F32)
    order = Order(name=name, fma=False, block=4, accumulate="float16")
    want = _reference(a, b, name, False, F16).astype(F32)
    np.testing.assert_array_equal(reduce_terms(a, b, order, F32), want)


@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
def test_half_precision_layers_accumulate_in_float32_by_default(dt_name, rng):
    """TensorFlow accumulates half-precision matmuls and convolutions in float32 and rounds
    once; the default order does the same, an explicit accumulator overrides it."""
    dt = DTYPES[dt_name]
    a, b = _operands(rng, 64, 5, dt), _operands(rng, 64, 5, dt)
    default = reduce_terms(a, b, Order(), dt)
    _assert_same(default, reduce_terms(a, b, Order(accumulate="float32"), dt))
    _assert_same(default, _reference(a, b, "sequential", True, F32).astype(dt))


def test_exact_ignores_the_accumulator(rng):
    """``exact`` is the correctly rounded result in the output dtype, whatever --accumulate says
    (rounding to a narrower accumulator first would double-round)."""
    a, b = _operands(rng, 40, 5, F32), _operands(rng, 40, 5, F32)
    want = reduce_terms(a, b, Order(name="exact"), F32)
    _assert_same(reduce_terms(a, b, Order(name="exact", accumulate="float16"), F32), want)


def test_round_to_bfloat16_is_correctly_rounded():
    """ml_dtypes' float64 -> bfloat16 cast double-rounds through float32; round_to must not."""
    from convdiff.floats import round_to

    x = np.array([1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-8 - 2.0**-40, -(1 + 2.0**-8 + 2.0**-40)])
    want = [_round(Fraction(float(v)), BF16) for v in x]
    assert [Fraction(float(v)) for v in round_to(x, BF16)] == want


# --------------------------------------------------------------------------- layouts and blocks

# (a's trailing shape, b's trailing shape): the operand layouts the kernels pass. Conv-like
# (positions x channels), depthwise-like (channels on both, multiplier on b), b varying on the
# leading axis, elementwise, a scalar b per term, and an operand with fewer axes.
BROADCASTS = [
    ((2, 5, 1), (1, 1, 4)),
    ((3, 1, 4, 1), (1, 2, 4, 3)),
    ((1, 7), (5, 1)),
    ((6,), (6,)),
    ((4, 1), ()),
    ((3, 2), (2,)),
]


def _flatten(a: np.ndarray, b: np.ndarray):
    """Broadcasting operands as ``(K, outputs)`` pairs, and the output shape."""
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    k = a.shape[0]

    def full(x):
        x = x.reshape(k, *((1,) * (len(shape) + 1 - x.ndim)), *x.shape[1:])
        return np.broadcast_to(x, (k, *shape)).reshape(k, -1)

    return full(a), full(b), shape


def _flat_reference(a, b, name, fma, dt):
    """Scalar reference per output element of broadcasting operands, in the output's shape."""
    a_full, b_full, shape = _flatten(a, b)
    return _reference(a_full, b_full, name, fma, dt).reshape(shape)


def _layout_cases(names=tuple(REFERENCES)):
    for name in names:
        for fma in (True, False) if name in FMA_ORDERS else (True,):
            yield pytest.param(name, fma, id=f"{name}{'+fma' if fma else '-fma'}")


@pytest.mark.parametrize(
    ("name", "fma", "engine"),
    [
        pytest.param(*case.values, engine, id=f"{engine}-{case.id}")
        for case in _layout_cases([n for n in REFERENCES if n != "eigen"])
        for engine in engines_for(case.values[0], "float32")
    ],
    indirect=["engine"],
)
@pytest.mark.parametrize(("a_tail", "b_tail"), BROADCASTS)
def test_broadcast_layouts_in_many_blocks(a_tail, b_tail, name, fma, engine, rng, monkeypatch):
    """Operands that broadcast, computed in many small output blocks (the block size shrunk
    so that every layout is cut several ways), still match the scalar loop element by
    element."""
    monkeypatch.setattr(orders, "_BLOCK_ELEMENTS", 4)
    monkeypatch.setattr(orders, "_MIN_INNER", 2)
    for k in (3, 19):
        a = _operands(rng, k, math.prod(a_tail), F32).reshape(k, *a_tail)
        b = _operands(rng, k, math.prod(b_tail), F32).reshape(k, *b_tail)
        order = Order(name=name, fma=fma, block=4)
        _assert_same(reduce_terms(a, b, order, F32), _flat_reference(a, b, name, fma, F32))


def test_blocks_split_evenly():
    """Output blocks cover the output once, without a sliver of a remainder."""
    blocks = list(orders._blocks((2, 30, 5000)))
    assert {(g0, g1) for g0, g1, _, _ in blocks} == {(0, 1), (1, 2)}
    widths = {l1 - l0 for _, _, l0, l1 in blocks}
    assert max(widths) - min(widths) <= 1
    assert sum(l1 - l0 for _, _, l0, l1 in blocks) == 2 * 5000


def test_exact_zero_products_take_the_fast_path(rng):
    """ReLU zeros make exact-zero sums, which need no round-to-odd correction (they used to be
    flagged as below the smallest normal number); tiny nonzero operands still are checked."""
    a = np.maximum(_operands(rng, 8, 6, F32), 0)
    eng = orders._Engine(a, _operands(rng, 8, 6, F32), F32, fma=True)
    eng._prepare()
    assert eng._fast and not eng._tiny
    tiny = np.full((8, 6), 2.0**-70, F32)
    eng = orders._Engine(tiny, tiny, F32, fma=True)
    eng._prepare()
    assert eng._tiny


# --------------------------------------------------------------------------- TensorFlow's Eigen


@pytest.mark.parametrize(("terms", "size"), sorted(EIGEN_SLICES.items()))
def test_eigen_slice_sizes(terms, size):
    assert orders.eigen_slice(terms) == size


@BOTH_ENGINES
@pytest.mark.parametrize(
    ("rows", "lone"),
    [(1, False), (2, False), (25, True), (26, False), (49, True), (50, False), (121, False)],
)
def test_eigen_lone_position_is_a_matrix_vector_product(rows, lone, rng):
    """``eigen`` adds 320-term-or-less slices (partials from zero), except for an output
    position that is a column block of its own: TensorFlow runs it as a matrix-vector product
    that accumulates through every slice (sequential). 49 positions (ResNet50's 7x7 stage)
    were measured; the others follow the block rule (half the positions, rounded up to 4 and
    then 24). A single position is not a lone block of a larger product."""
    k, channels = 700, 2
    a = _operands(rng, k, rows, F32)[:, :, None]
    b = _operands(rng, k, channels, F32)[:, None, :]
    got = reduce_terms(a, b, Order(name="eigen"), F32)
    assert orders._eigen_lone_row(rows) == lone
    if rows == 1:
        return  # a matrix-vector product: test_eigen_layouts
    for p in range(rows) if rows < 30 else (0, rows - 2, rows - 1):
        a_p = np.repeat(a[:, p], channels, axis=1)
        if lone and p == rows - 1:
            want = _reference(a_p, b[:, 0], "sequential", True, F32)
        else:
            want = _reference_with(_ref_eigen_gemm, a_p, b[:, 0], F32, label="eigen-gemm")
        _assert_same(got[p], want)


# (a's trailing shape, b's trailing shape, K, what eigen does there)
EIGEN_LAYOUTS = [
    ((2, 5, 1), (1, 1, 4), 400, "gemm"),  # positions x channels: 200-term slices, FMA
    ((3, 1, 4, 1), (1, 2, 4, 3), 40, "elementwise"),  # depthwise-like: no FMA
    ((6,), (6,), 40, "elementwise"),
    ((1, 1), (1, 5), 40, "gemv"),  # one position: Eigen's GEMV, 16-term blocks, no FMA
]


@BOTH_ENGINES
@pytest.mark.parametrize(("a_tail", "b_tail", "k", "kind"), EIGEN_LAYOUTS)
def test_eigen_layouts(a_tail, b_tail, k, kind, rng):
    """What ``eigen`` does depends on how the operands broadcast (which TensorFlow kernel)."""
    a = _operands(rng, k, math.prod(a_tail), F32).reshape(k, *a_tail)
    b = _operands(rng, k, math.prod(b_tail), F32).reshape(k, *b_tail)
    a_full, b_full, shape = _flatten(a, b)
    if kind == "gemm":
        want = _reference_with(_ref_blocked(200), a_full, b_full, F32, label="blocked:200")
    elif kind == "gemv":
        want = _reference_with(_ref_blocked(16), a_full, b_full, F32, fma=False, label="blocked:16")
    else:
        want = _reference(a_full, b_full, "sequential", False, F32)
    _assert_same(reduce_terms(a, b, Order(name="eigen"), F32), want.reshape(shape))


@BOTH_ENGINES
def test_eigen_differs_from_sequential(rng):
    """The slices matter: on long reductions ``eigen`` and ``sequential`` disagree somewhere
    (so the tests above can tell them apart)."""
    a = _operands(rng, 700, 30, F32)[:, :, None]
    b = _operands(rng, 700, 4, F32)[:, None, :]
    eigen = reduce_terms(a, b, Order(name="eigen"), F32)
    assert np.any(eigen != reduce_terms(a, b, Order(), F32))


def test_parse_order_names():
    assert parse_order("eigen") == Order(name="eigen")
    assert parse_order("blocked:688").block == 688
    assert Order(name="eigen").label == "eigen"
    with pytest.raises(OptionError, match="takes no argument"):
        parse_order("eigen:4")
    with pytest.raises(OptionError, match="positive block size"):
        parse_order("blocked:0")


@pytest.mark.parametrize(("name", "fma"), list(_layout_cases()))
def test_plain_sums_in_many_blocks(name, fma, rng, monkeypatch):
    """Sums (no second operand) over a multi-axis output, cut into small blocks."""
    monkeypatch.setattr(orders, "_BLOCK_ELEMENTS", 4)
    monkeypatch.setattr(orders, "_MIN_INNER", 2)
    a = _operands(rng, 21, 24, F16).reshape(21, 2, 3, 4)
    got = reduce_terms(a, None, Order(name=name, fma=fma, block=4, accumulate="float16"), F16)
    want = _reference(a.reshape(21, -1), None, name, fma, F16).reshape(2, 3, 4)
    _assert_same(got, want)


@pytest.mark.parametrize(
    ("kernel", "strides", "dilation", "pads"),
    [
        ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
        ((3, 2), (2, 1), (1, 2), ((0, 2), (1, 0))),
        ((1, 1), (1, 1), (1, 1), ((0, 0), (0, 0))),  # no padding: a view of the input
        ((3, 3), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ],
)
def test_windows_read_each_tap_where_the_correlation_reads_it(kernel, strides, dilation, pads):
    """Tap (i, j) of output (p, q) is padded input (p*s + i*d, q*s + j*d), zero in the
    padding. Without padding the windows view the input itself (np.pad would only copy it);
    with padding they view a padded copy, never the input."""
    from convdiff.kernels.geometry import windows

    x = np.arange(2 * 7 * 6 * 3, dtype=np.float32).reshape(2, 7, 6, 3) + 1
    got = windows(x, kernel, strides, dilation, pads)
    (top, bottom), (left, right) = pads
    padded = np.zeros((2, 7 + top + bottom, 6 + left + right, 3), np.float32)
    padded[:, top : top + 7, left : left + 6] = x
    rows = (padded.shape[1] - dilation[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    cols = (padded.shape[2] - dilation[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    assert got.shape == (*kernel, 3, 2, rows, cols)
    for i, j, p, q in np.ndindex(*kernel, rows, cols):
        tap = padded[:, p * strides[0] + i * dilation[0], q * strides[1] + j * dilation[1]]
        np.testing.assert_array_equal(got[i, j, :, :, p, q], tap.T)
    assert np.shares_memory(got, x) == (not any(lo or hi for lo, hi in pads))
    # a strided input is laid out as the padded copy would be (C order) before its windows
    strided = np.asfortranarray(x)
    np.testing.assert_array_equal(windows(strided, kernel, strides, dilation, pads), got)


def test_terms_first_merges_patches_with_each_outputs_terms_side_by_side():
    """A convolution's patches (a strided view of the input) become terms x outputs holding
    the values plain reshape gives, copied once with each output's terms adjacent in memory
    (what a matrix product packs fastest); axes that merge as they are stay a view."""
    from convdiff.kernels.geometry import windows

    x = np.arange(2 * 6 * 5 * 3, dtype=np.float64).reshape(2, 6, 5, 3)
    patches = windows(x, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))  # (3, 3, 3, 2, 6, 5)
    terms = orders.terms_first(patches, 3)
    assert terms.shape == (27, 2, 6, 5)
    np.testing.assert_array_equal(terms, patches.reshape(27, 2, 6, 5))
    assert terms.strides[0] == x.itemsize  # the terms of one output are adjacent
    assert not np.shares_memory(terms, x)

    dense = np.arange(24.0).reshape(4, 3, 2)
    merged = orders.terms_first(dense, 2)
    assert merged.shape == (12, 2) and np.shares_memory(merged, dense)
    ones = np.ones((4, 1, 3))[:, :, ::2]  # a length-1 axis with any stride still merges
    assert np.shares_memory(orders.terms_first(ones, 2), ones)


def test_blas_takes_a_large_products_patches_side_by_side_and_the_same_bits():
    """`--order blas` copies the patches of a product of at least ANY_LAYOUT_MACS multiply-adds
    with each output's terms adjacent (terms_first: the faster copy, and a layout BLAS packs
    faster); its bits are those of the terms-major copy it took before. A smaller product
    keeps the terms-major copy (BLAS may pick another kernel, summing in another order, for a
    small product in another layout)."""
    from convdiff.kernels.geometry import windows
    from convdiff.numerics import Rounded

    rng = np.random.default_rng(7)
    nx = Rounded(np.float32, Order(name="blas"))
    for side, filters in ((48, 64), (8, 16)):
        x = rng.standard_normal((1, side, side, 64)).astype(np.float32)
        w = rng.standard_normal((3, 3, 64, 1, 1, 1, filters)).astype(np.float32)
        patches = windows(x, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))[..., None]
        large = 9 * 64 * side * side * filters >= orders.ANY_LAYOUT_MACS
        a, _ = orders.gemm_terms(patches, w, 3)
        assert a.shape == (576, 1, side, side, 1)
        if large:
            assert a.strides[0] == x.itemsize  # each output's terms adjacent
        else:
            assert a.flags.c_contiguous  # the terms-major copy, as before
        before = patches.reshape(576, -1).T @ w.reshape(576, filters)  # the old layout's GEMM
        got = nx.dot(patches, w, axes="hwc")
        np.testing.assert_array_equal(got.reshape(-1, filters), before)
    assert large is False  # the second case was the small one
