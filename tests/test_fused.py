"""The bounded pass's elementwise steps compiled in one pass (convdiff.fused,
convdiff._compiled_bounds) against the NumPy formulas of Bounded.add/sub/mul, bit for bit:
values, bounds and magnitudes, NaN bits included, on operands full of special values, in every
broadcast layout the kernels make, split between threads, and through a real model."""

from __future__ import annotations

import numpy as np
import pytest
from support import batch_statistics, report_figures, residual_block

from convdiff import accel, fused
from convdiff.numerics import Bounded, Tracked, _zeros

SPECIAL = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, -1e-310, 1.0]

# (x's shape, y's shape): the output's shape with a bias, a BatchNormalization factor, a
# squeeze-and-excite factor, a per-position factor, a scalar, a Dense layer's bias
LAYOUTS = {
    "same": ((2, 9, 9, 64), (2, 9, 9, 64)),
    "bias": ((2, 9, 9, 64), (64,)),
    "channel": ((2, 9, 9, 64), (1, 1, 1, 64)),
    "excite": ((2, 9, 9, 64), (2, 1, 1, 64)),
    "position": ((2, 9, 9, 64), (2, 9, 9, 1)),
    "scalar first": ((), (5000,)),
    "dense": ((300, 40), (40,)),
}


@pytest.fixture(autouse=True)
def compiled_available():
    if not accel.enabled():
        pytest.skip("numba is not installed (the 'fast' extra)")


def _values(rng, shape, kind: str) -> np.ndarray:
    """float64 values (``kind``: value, err or mag), a tenth of them special: NaN of either
    sign, infinities, signed zeros, the ends of the range, subnormals; errors and magnitudes
    also a tenth zeros."""
    values = np.asarray(rng.standard_normal(shape), np.float64)
    if kind != "value":
        values = np.abs(values) * (1e-6 if kind == "err" else 10.0)
    if values.ndim:
        hit = rng.random(shape) < 0.1
        values[hit] = rng.choice(np.array(SPECIAL), int(hit.sum()))
        if kind != "value":
            values[rng.random(shape) < 0.1] = 0.0
    return values


def _tracked(rng, shape, err: str, scale: bool) -> Tracked:
    """A Tracked operand: errors everywhere, or known to be zero (as track() makes them)."""
    value = _values(rng, shape, "value")
    errors = _values(rng, shape, "err") if err == "full" else _zeros(np.shape(value))
    return Tracked(value, errors, _values(rng, shape, "mag") if scale else None)


def _bits(x: np.ndarray) -> np.ndarray:
    """The bit patterns, every NaN as one pattern: IEEE leaves a NaN's sign and payload open
    (the hardware's NaN + NaN keeps either operand's, and a compiler may swap the operands of
    a sum), and no figure reads them."""
    x = np.where(np.isnan(x), np.nan, x)
    return np.ascontiguousarray(x).view(np.uint64)


def _operand(x: Tracked) -> fused.Operand:
    return fused.Operand(x.value, x.err, x.scale)


def _assert_same(compiled: Tracked, plain: Tracked) -> None:
    for field in ("value", "err", "magnitude"):
        a, b = getattr(compiled, field), getattr(plain, field)
        assert a.shape == b.shape, field
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=field)


def _both(monkeypatch, name: str, x, y) -> tuple[Tracked, Tracked]:
    """Bounded(float32)'s ``name`` step compiled (checked to be), then by the NumPy formulas."""
    bounded = Bounded(np.float32)
    step = fused.rounded_step(
        name, [_operand(x), _operand(y)], (bounded.u_sum, bounded.eta_sum), cross=True
    )
    assert step is not None, "the compiled step did not run"
    compiled = getattr(bounded, name)(x, y)
    monkeypatch.setattr(fused, "_SMALL", np.inf)
    with np.errstate(all="ignore"):  # as run_kernel runs the bounded pass: NaN and inf are data
        plain = getattr(bounded, name)(x, y)
    monkeypatch.undo()
    return compiled, plain


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["add", "sub", "mul"])
@pytest.mark.parametrize("errors", ["full full", "full zero", "zero full", "zero zero"])
@pytest.mark.parametrize("scales", ["both", "x", "y", "neither"])
def test_compiled_steps_give_the_numpy_formulas_bits(
    layout, name, errors, scales, rng, monkeypatch
):
    """Every combination of errors known to be zero (the product's e_x e_y term then left
    out, even where it would be NaN) and of magnitudes kept or taken as |value|."""
    (sx, sy), (ex, ey) = LAYOUTS[layout], errors.split()
    for swap in (False, True):
        x = _tracked(rng, sx, ex, scales in ("both", "x"))
        y = _tracked(rng, sy, ey, scales in ("both", "y"))
        x, y = (y, x) if swap else (x, y)
        _assert_same(*_both(monkeypatch, name, x, y))


@pytest.mark.parametrize("name", ["add", "sub", "mul"])
def test_operands_read_through_strides_and_gathered(name, rng, monkeypatch):
    """Operands that are views: every other element of a row (gathered), a transposed array
    (axes that do not merge), a Python number."""
    wide = _tracked(rng, (6, 40, 128), "full", True)
    strided = Tracked(wide.value[..., ::2], wide.err[..., ::2], wide.scale[..., ::2])
    turned = _tracked(rng, (64, 40, 6), "full", False)
    turned = Tracked(turned.value.transpose(2, 1, 0), turned.err.transpose(2, 1, 0))
    _assert_same(*_both(monkeypatch, name, strided, turned))
    bounded = Bounded(np.float32)
    _assert_same(*_both(monkeypatch, name, strided, bounded.track(3.0)))


def test_layouts_the_kernel_does_not_read_are_left_to_numpy(rng):
    """More than three axes after merging, negative strides, another dtype, an error larger
    than its value: None (the NumPy formulas run), never a wrong result."""
    units = (2.0**-23, 2.0**-149)
    big = _tracked(rng, (3, 5, 7, 11, 13), "full", True)
    odd = _tracked(rng, (5, 1, 11, 1), "full", True)
    with np.errstate(over="ignore"):  # float64 values beyond float32's range become inf
        narrow = big.value.astype(np.float32)
    cases = [
        (big, odd),
        (Tracked(big.value[::-1], big.err, big.scale), big),
        (Tracked(narrow, big.err, big.scale), big),
        (Tracked(np.ones(5000), np.ones((2, 5000))), Tracked(np.ones(5000), _zeros((5000,)))),
    ]
    for x, y in cases:
        step = fused.rounded_step("add", [_operand(x), _operand(y)], units, cross=True)
        assert step is None


@pytest.mark.parametrize("layout", ["same", "bias", "excite", "scalar first"])
@pytest.mark.parametrize("name", ["add", "sub", "mul"])
def test_steps_split_between_threads_give_the_same_bits(layout, name, rng, monkeypatch):
    """Parts of rows, or of the columns of a single row (a flat array), on three threads."""
    monkeypatch.setattr(fused, "_PARALLEL_ELEMENTS", 1000)
    monkeypatch.setattr(accel, "_threads", lambda: 3)
    sx, sy = LAYOUTS[layout]
    x, y = _tracked(rng, sx, "full", True), _tracked(rng, sy, "full", False)
    assert len(fused._parts(*_rows_cols(x, y))) == 3
    compiled, plain = _both(monkeypatch, name, x, y)
    _assert_same(compiled, plain)


# (x, y, z) shapes of mul_add: a normalization's input with its per-channel scale and shift,
# a bias-shaped pair, a Rescaling's scalars, operands of the output's shape, a per-image scale
MUL_ADD_LAYOUTS = {
    "channel": ((2, 9, 9, 64), (1, 1, 1, 64), (1, 1, 1, 64)),
    "bias": ((2, 9, 9, 64), (64,), (64,)),
    "scalar": ((2, 9, 9, 64), (), ()),
    "same": ((2, 9, 9, 64), (2, 9, 9, 64), (2, 9, 9, 64)),
    "excite": ((2, 9, 9, 64), (2, 1, 1, 64), (1, 1, 1, 64)),
}


def _mul_add_both(monkeypatch, x, y, z) -> tuple[Tracked, Tracked]:
    """Bounded(float32)'s mul_add compiled (checked to be), then mul and add by the NumPy
    formulas."""
    bounded = Bounded(np.float32)
    units = (bounded.u_sum, bounded.eta_sum)
    operands = [_operand(x), _operand(y), _operand(z)]
    assert fused.rounded_step("mul_add", operands, units, cross=True) is not None
    compiled = bounded.mul_add(x, y, z)
    monkeypatch.setattr(fused, "_SMALL", np.inf)
    with np.errstate(all="ignore"):
        plain = bounded.add(bounded.mul(x, y), z)
    monkeypatch.undo()
    return compiled, plain


@pytest.mark.parametrize("layout", sorted(MUL_ADD_LAYOUTS))
@pytest.mark.parametrize(
    "errors", ["full full full", "full zero full", "zero full zero", "zero zero zero"]
)
@pytest.mark.parametrize("scales", ["all", "x", "z", "none"])
def test_mul_add_gives_the_bits_of_mul_then_add(layout, errors, scales, rng, monkeypatch):
    """One pass for a product and a sum (BatchNormalization's scale and shift): value, bound
    and magnitude those of ``add(mul(x, y), z)`` by the NumPy formulas, with errors known to
    be zero or not (the product's e_x e_y term then left out) and magnitudes kept or |value|."""
    shapes, kinds = MUL_ADD_LAYOUTS[layout], errors.split()
    scaled = {"all": "xyz", "x": "x", "z": "z", "none": ""}[scales]
    x, y, z = (
        _tracked(rng, shape, kind, name in scaled)
        for shape, kind, name in zip(shapes, kinds, "xyz", strict=True)
    )
    _assert_same(*_mul_add_both(monkeypatch, x, y, z))


@pytest.mark.parametrize("layout", ["channel", "same", "scalar"])
def test_mul_add_split_between_threads_gives_the_same_bits(layout, rng, monkeypatch):
    monkeypatch.setattr(fused, "_PARALLEL_ELEMENTS", 1000)
    monkeypatch.setattr(accel, "_threads", lambda: 3)
    sx, sy, sz = MUL_ADD_LAYOUTS[layout]
    x, y, z = (_tracked(rng, s, "full", True) for s in (sx, sy, sz))
    _assert_same(*_mul_add_both(monkeypatch, x, y, z))


def _rows_cols(x: Tracked, y: Tracked) -> tuple[int, int]:
    shape = np.broadcast_shapes(x.shape, y.shape)
    arrays = [x.value, x.err, x.magnitude, y.value, y.err, y.magnitude]
    layout = fused._layout(shape, arrays)
    assert layout is not None
    dims = layout[0]
    return int(dims[0] * dims[1]), int(dims[2])


def test_a_model_reports_the_same_figures(monkeypatch, tmp_path):
    """A real model (Conv2D with bias, BatchNormalization, ReLU, Add) through api.compare in
    both modes (propagated: errors on both operands of every step): every figure of the
    report the same with the compiled steps and with the NumPy formulas."""
    import keras

    from convdiff import api, native

    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 8))
    y = residual_block(inputs, 32)
    model = keras.Model(inputs, keras.layers.Multiply(name="mul")([y, y]))
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights(batch_statistics(rng, 32))
    path = tmp_path / "model.keras"
    model.save(path)
    x = rng.standard_normal((4, 12, 12, 8)).astype(np.float32)
    for mode in ("isolated", "propagated"):
        calls: list[int] = []
        steps: list[int] = []  # mul_add: BatchNormalization's scale and shift
        monkeypatch.setattr(native, "rounded_step", _counting(native.rounded_step, calls, steps))
        compiled = report_figures(api.compare(str(path), x, mode=mode))
        assert steps, "BatchNormalization's compiled step did not run"
        # propagated: the NumPy side's inputs differ from Keras's after the first rounding,
        # so the bias, the Add and the Multiply take the bounded steps too
        assert calls or mode == "isolated", "no compiled add, sub or mul ran"
        monkeypatch.setattr(fused, "_SMALL", np.inf)
        plain = report_figures(api.compare(str(path), x, mode=mode))
        monkeypatch.undo()
        assert compiled == plain


def _counting(step, calls: list, steps: list):
    """``step`` (native.rounded_step), counting its calls: ``steps`` those of mul_add."""

    def counted(op, *args):
        (steps if op is None else calls).append(1)  # op None: mul_add
        return step(op, *args)

    return counted
