"""Dense kernel against real Keras layers: 2-D and 3-D inputs, bias, activation, float16 and
mixed_float16 compute dtypes, every summation order, and checks that a wrong kernel fails."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from support import assert_matches_keras, sequential_is_exact

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import Unsupported, find_kernel
from convdiff.metrics import compare, within_bound
from convdiff.numerics import Rounded
from convdiff.orders import ORDER_NAMES, Order

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

# (constructor kwargs, input shape with batch)
DENSE_CASES = [
    (dict(units=8), (4, 16)),
    (dict(units=8, activation="relu"), (4, 16)),
    (dict(units=8, use_bias=False), (4, 16)),
    (dict(units=5, use_bias=False, activation="relu"), (3, 33)),
    (dict(units=8), (2, 5, 16)),
    (dict(units=8, activation="relu"), (2, 3, 4, 16)),
    (dict(units=8, use_bias=False), (2, 5, 16)),
    (dict(units=1), (6, 200)),
    (dict(units=8, dtype="float16"), (4, 16)),
    (dict(units=8, dtype="float16", activation="relu"), (2, 5, 16)),
    (dict(units=8, dtype="mixed_float16"), (4, 64)),
    (dict(units=8, dtype="mixed_float16", use_bias=False), (2, 5, 64)),
    (dict(units=8, dtype="mixed_bfloat16"), (4, 64)),
]


def _case_id(case) -> str:
    kwargs, shape = case
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) + "@" + "x".join(map(str, shape))


def _build(kwargs, shape, rng: np.random.Generator):
    """A built Dense layer with seeded random weights (bias too) and an input in its dtype."""
    layer = keras.layers.Dense(**kwargs)
    layer.build(shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.weights])
    x = rng.standard_normal(shape).astype(layer.compute_dtype)
    return layer, x


@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
def test_matches_keras(case, rng):
    layer, x = _build(*case, rng)
    check = assert_matches_keras(layer, x)
    assert check.keras_output.dtype == np.dtype(layer.compute_dtype)


def _orders() -> list[Order]:
    fma_orders = ("sequential", "reverse", "pairwise", "kahan", "blocked")
    return [
        Order(name=name, fma=fma, block=4 if name == "blocked" else 0)
        for name in ORDER_NAMES
        for fma in ((True, False) if name in fma_orders else (True,))
    ]


@pytest.mark.parametrize("order", _orders(), ids=lambda o: o.label)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_order_within_bound(order, dtype, rng):
    layer, x = _build(dict(units=6, dtype=dtype, activation="relu"), (3, 40), rng)
    assert_matches_keras(layer, x, order)


@pytest.mark.parametrize(
    "accumulate",
    ["float16", "bfloat16", "float32", "float64"],
)
def test_accumulator_dtypes_within_bound(accumulate, rng):
    """A narrower or wider accumulator on the NumPy side is covered by its own gamma_n."""
    layer, x = _build(dict(units=6), (3, 40), rng)
    assert_matches_keras(layer, x, Order(accumulate=accumulate))


EXACT_CASES = [
    (dict(units=8), (4, 16), Order()),
    (dict(units=8, activation="relu"), (2, 5, 16), Order()),
    (dict(units=5, use_bias=False), (3, 33), Order()),
    # Half-precision MatMul on TF's CPU accumulates in float32 and rounds once.
    (dict(units=8, dtype="float16"), (4, 16), Order(accumulate="float32")),
    (dict(units=16, dtype="mixed_float16"), (16, 256), Order(accumulate="float32")),
    (dict(units=16, dtype="mixed_bfloat16"), (16, 256), Order(accumulate="float32")),
]


@pytest.mark.parametrize(
    ("kwargs", "shape", "order"),
    EXACT_CASES,
    ids=[_case_id(c[:2]) + f"-{c[2].label}" for c in EXACT_CASES],
)
def test_bit_exact_on_reference_cpu(kwargs, shape, order, rng):
    """Where it was measured (AVX-512, oneDNN on; docs/orders.md), the order reproduces Keras
    exactly; elsewhere it must still be within the bound. (Dense(units=1) is a GEMV in TF and uses
    another, unidentified order.)"""
    layer, x = _build(kwargs, shape, rng)
    check = assert_matches_keras(layer, x, order)
    if sequential_is_exact():
        assert check.comparison.max_ulp == 0, check.comparison


def _wrong(layer, x, **changes) -> bool:
    """Whether the kernel run on an altered spec still passes as rounding (it must not)."""
    keras_out = keras.ops.convert_to_numpy(layer(x))
    spec = layer_spec(layer)
    weights = dict(spec.weights)
    for name, fn in changes.items():
        weights[name] = fn(weights[name])
    kernel = find_kernel(type(layer), vars(keras.layers))
    run = run_kernel(kernel, dataclasses.replace(spec, weights=weights), [x])
    return within_bound(compare(keras_out, run.output, run.bound))


def test_transposed_kernel_is_caught(rng):
    """Reading the kernel as (units, features) instead of (features, units) is caught."""
    layer, x = _build(dict(units=16), (4, 16), rng)
    assert not _wrong(layer, x, kernel=lambda w: np.ascontiguousarray(w.T))


def test_dropped_bias_is_caught(rng):
    layer, x = _build(dict(units=8), (2, 5, 16), rng)
    assert not _wrong(layer, x, bias=np.zeros_like)


def test_one_dropped_term_is_caught(rng):
    """A single missing product among 16 is far above the rounding bound."""
    layer, x = _build(dict(units=8), (4, 16), rng)

    def drop_first_row(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[0] = 0
        return w

    assert not _wrong(layer, x, kernel=drop_first_row)


def test_lora_is_unsupported(rng):
    """A LoRA-enabled Dense multiplies by kernel + A @ B, not by the stored kernel."""
    layer, x = _build(dict(units=8), (4, 16), rng)
    layer.enable_lora(2)
    kernel = find_kernel(type(layer), vars(keras.layers))
    with pytest.raises(Unsupported, match="lora"):
        kernel(layer_spec(layer), [x], Rounded("float32"))


def test_quantized_is_unsupported(rng):
    layer, x = _build(dict(units=8), (4, 16), rng)
    layer.quantize("int8")
    kernel = find_kernel(type(layer), vars(keras.layers))
    with pytest.raises(Unsupported, match="quantized"):
        kernel(layer_spec(layer), [x], Rounded("float32"))
