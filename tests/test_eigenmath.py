"""convdiff/eigenmath.py: TensorFlow's float32 logistic followed step for step in NumPy.

The expectation is TensorFlow's own result on the machine the test runs on, never a stored
one: the model must give its bits on random values, on the extremes of its algorithm
(subnormals, the cut-offs at 16.6355324 and -104, infinities, NaN), in Eigen's packets and in
every position of the scalar tail that follows them.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from convdiff import autoorder, eigenmath

pytestmark = [
    pytest.mark.onednn,
    pytest.mark.skipif(not eigenmath.available(), reason="no C library expf to call here"),
]

F32 = np.finfo(np.float32)
EXTREMES = np.array(
    [
        *(0.0, -0.0, 1e-40, -1e-40, F32.tiny, F32.smallest_subnormal, 16.6355324, 16.63554),
        *(17.0, 1e30, np.inf, -np.inf, -104.0, -104.0001, -103.99, -87.0, -87.5, -88.0, -90.0),
        *(-1e30, F32.max, -F32.max, np.nan, -9.0, 9.0, 1e-8, -1e-8),
    ],
    np.float32,
)


def _tf_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.sigmoid(x)))


def _assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    bad = got[~nan].view(np.uint32) != want[~nan].view(np.uint32)
    assert not bad.any(), (x[~nan][bad][:5], got[~nan][bad][:5], want[~nan][bad][:5])


def test_logistic_packets_match_tensorflow_bit_for_bit():
    rng = np.random.default_rng(11)
    x = np.concatenate(
        [
            rng.standard_normal(1 << 18) * 6,
            rng.uniform(-120, 40, 1 << 18),
            # every float32 in [1, 2) and [-2, -1) step 2**-12: dense where the result is steep
            np.arange(1, 2, 2.0**-12),
            -np.arange(1, 2, 2.0**-12),
            np.tile(EXTREMES, 8),
        ]
    ).astype(np.float32)
    x = x[: x.size - x.size % eigenmath.PACKET]  # packets only
    _assert_same_bits(eigenmath.logistic(x), _tf_sigmoid(x), x)


@pytest.mark.parametrize("tail", range(1, eigenmath.PACKET))
def test_logistic_scalar_tail_matches_tensorflow_bit_for_bit(tail):
    """A tensor of ``8 k + tail`` elements: its last ``tail`` take Eigen's scalar path (the C
    library's expf), which differs from the packets in about half of the values."""
    rng = np.random.default_rng(tail)
    values = np.concatenate([EXTREMES, rng.standard_normal(64 * tail).astype(np.float32) * 6])
    for start in range(0, values.size - tail + 1, tail):
        x = np.concatenate([rng.standard_normal(16), values[start : start + tail]])
        x = x.astype(np.float32)
        _assert_same_bits(eigenmath.logistic(x), _tf_sigmoid(x), x)


def test_the_two_paths_differ_so_the_tail_test_can_fail():
    x = np.random.default_rng(3).standard_normal(4096).astype(np.float32) * 4
    differ = eigenmath.logistic_packet(x) != eigenmath.logistic_scalar(x)
    assert differ.mean() > 0.1


def test_auto_uses_only_models_it_checked_here():
    assert autoorder.modelled_functions() == ("sigmoid",)
