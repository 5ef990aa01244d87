"""Merging kernels against the real Keras layers, called on lists of inputs."""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from support import assert_matches_keras

from convdiff.evaluate import run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel
from convdiff.metrics import compare, within_bound

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

L = keras.layers

# (id, layer factory, input shapes). Elementwise merges are chains of correctly rounded IEEE
# operations in input order, so the kernels must reproduce Keras bit for bit.
ELEMENTWISE = [
    ("add2", L.Add, [(2, 3, 4)] * 2),
    ("add3", L.Add, [(2, 3, 4)] * 3),
    ("add5", L.Add, [(4, 16)] * 5),
    ("add_broadcast", L.Add, [(2, 3, 4), (2, 1, 4)]),
    ("add_ranks", L.Add, [(2, 3, 4), (2, 4)]),
    ("subtract", L.Subtract, [(2, 3, 4)] * 2),
    ("multiply3", L.Multiply, [(2, 3, 4)] * 3),
    ("multiply_ranks", L.Multiply, [(2, 2, 3, 4), (2, 4)]),
    ("average2", L.Average, [(2, 3, 4)] * 2),
    ("average3", L.Average, [(8, 16)] * 3),
    ("average7", L.Average, [(8, 16)] * 7),
    ("maximum3", L.Maximum, [(2, 3, 4)] * 3),
    ("minimum3", L.Minimum, [(2, 3, 4)] * 3),
    ("maximum_broadcast", L.Maximum, [(2, 3, 1), (2, 3, 4)]),
]


def _inputs(rng, shapes):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize(
    ("make", "shapes"), [e[1:] for e in ELEMENTWISE], ids=[e[0] for e in ELEMENTWISE]
)
def test_elementwise_merges_are_bit_exact(make, shapes, rng):
    check = assert_matches_keras(make(), _inputs(rng, shapes))
    assert check.comparison.max_ulp == 0


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16), ("mixed_float16", np.float16)],
)
@pytest.mark.parametrize("make", [L.Add, L.Multiply, L.Average, L.Maximum])
def test_reduced_precision_is_bit_exact(make, dtype, np_dtype, rng):
    """Half-precision ops are computed in float32 by TF and rounded once: still correctly
    rounded, so still bit-exact."""
    xs = [x.astype(np_dtype) for x in _inputs(rng, [(8, 16)] * 3)]
    check = assert_matches_keras(make(dtype=dtype), xs)
    assert check.comparison.max_ulp == 0


CONCATENATE = [
    ("last", -1, [(2, 3, 4), (2, 3, 2), (2, 3, 1)]),
    ("axis1", 1, [(2, 3, 4), (2, 1, 4)]),
    ("axis2_of_4d", 2, [(1, 2, 3, 2), (1, 2, 1, 2)]),
    ("neg2", -2, [(2, 3, 4), (2, 5, 4)]),
]


@pytest.mark.parametrize(
    ("axis", "shapes"), [c[1:] for c in CONCATENATE], ids=[c[0] for c in CONCATENATE]
)
def test_concatenate(axis, shapes, rng):
    check = assert_matches_keras(L.Concatenate(axis=axis), _inputs(rng, shapes))
    assert check.comparison.max_ulp == 0


# Keras's batch_dot cases: both 2-D, 2-D with 3-D, contracted axes moved, ranks 4 and 2.
DOT = [
    ("vectors", -1, False, [(4, 5), (4, 5)]),
    ("vectors_normalized", 1, True, [(4, 5), (4, 5)]),
    ("matmul", (2, 1), False, [(2, 3, 5), (2, 5, 4)]),
    ("same_axis", 1, False, [(2, 5, 3), (2, 5, 4)]),
    ("vec_mat", (1, 2), False, [(2, 5), (2, 3, 5)]),
    ("mat_vec", (1, 1), False, [(2, 5, 3), (2, 5)]),
    ("rank4", (3, 1), False, [(2, 3, 2, 6), (2, 6, 3)]),
    ("normalized_3d", (2, 2), True, [(2, 3, 5), (2, 4, 5)]),
]


@pytest.mark.parametrize(
    ("axes", "normalize", "shapes"), [d[1:] for d in DOT], ids=[d[0] for d in DOT]
)
def test_dot(axes, normalize, shapes, rng):
    assert_matches_keras(L.Dot(axes=axes, normalize=normalize), _inputs(rng, shapes))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dot_reduced_precision(dtype, rng):
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    xs = [x.astype(np_dtype) for x in _inputs(rng, [(4, 3, 6), (4, 5, 6)])]
    assert_matches_keras(L.Dot(axes=2, normalize=True, dtype=dtype), xs)


def test_average_divides_rather_than_multiplying_by_the_reciprocal(rng):
    """Keras's ``output / len(inputs)``: multiplying by float32(1/3) instead is rounding (inside
    the bound) but not bit-exact."""
    xs = _inputs(rng, [(64, 64)] * 3)
    out = keras.ops.convert_to_numpy(L.Average()(xs))
    total = (xs[0] + xs[1]) + xs[2]
    by_reciprocal = total * np.float32(1 / 3)
    assert np.count_nonzero(by_reciprocal != out) > 0
    assert np.count_nonzero(total / np.float32(3) != out) == 0


def _kernel_vs_keras(keras_layer, kernel_layer, xs):
    keras_out = keras.ops.convert_to_numpy(keras_layer(xs))
    kernel_layer(xs)
    kernel = find_kernel(type(kernel_layer), vars(keras.layers))
    run = run_kernel(kernel, layer_spec(kernel_layer), xs)
    return compare(keras_out, run.output, run.bound)


@pytest.mark.parametrize(
    ("truth", "wrong", "shapes"),
    [
        (L.Add(), L.Average(), [(2, 8)] * 2),
        (L.Maximum(), L.Minimum(), [(2, 8)] * 2),
        (L.Dot(axes=1), L.Dot(axes=1, normalize=True), [(2, 6), (2, 6)]),
        (L.Dot(axes=(2, 1)), L.Dot(axes=(1, 2)), [(2, 4, 4), (2, 4, 4)]),
    ],
    ids=["add_vs_average", "max_vs_min", "dot_normalize", "dot_transposed"],
)
def test_a_wrong_config_is_detected(truth, wrong, shapes, rng):
    xs = _inputs(rng, shapes)
    assert not within_bound(_kernel_vs_keras(truth, wrong, xs))


@pytest.mark.parametrize("make", [L.Subtract, L.Concatenate], ids=["subtract", "concatenate"])
def test_input_order_matters(make, rng):
    a, b = _inputs(rng, [(3, 5)] * 2)
    layer = make()
    keras_out = keras.ops.convert_to_numpy(layer([a, b]))
    kernel = find_kernel(make, vars(keras.layers))
    run = run_kernel(kernel, layer_spec(layer), [b, a])
    assert not within_bound(compare(keras_out, run.output, run.bound))
