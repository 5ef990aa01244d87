"""Test helpers: run one real Keras layer and convdiff's kernel for it on the same input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from convdiff.evaluate import KernelRun, run_kernel
from convdiff.graph import layer_spec
from convdiff.kernels import find_kernel
from convdiff.metrics import Comparison, compare, within_bound
from convdiff.orders import Order


@dataclass
class LayerCheck:
    keras_output: np.ndarray
    run: KernelRun
    comparison: Comparison


def check_layer(
    layer, inputs: np.ndarray | Sequence[np.ndarray], order: Order | None = None
) -> LayerCheck:
    """Call the real Keras ``layer`` on ``inputs`` (inference mode) and convdiff's kernel on the
    same inputs; compare with the kernel's bound."""
    import keras

    xs = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
    arg = xs if isinstance(inputs, list | tuple) else xs[0]
    keras_out = keras.ops.convert_to_numpy(layer(arg, training=False))
    kernel = find_kernel(type(layer), vars(keras.layers))
    assert kernel is not None, f"no kernel registered for {type(layer).__name__}"
    run = run_kernel(kernel, layer_spec(layer), xs, order)
    assert run.output.shape == keras_out.shape, (run.output.shape, keras_out.shape)
    assert run.output.dtype == keras_out.dtype, (run.output.dtype, keras_out.dtype)
    return LayerCheck(keras_out, run, compare(keras_out, run.output, run.bound))


def assert_matches_keras(
    layer, inputs: np.ndarray | Sequence[np.ndarray], order: Order | None = None
) -> LayerCheck:
    """The kernel agrees with Keras within its rigorous rounding bound (identical or rounding)."""
    check = check_layer(layer, inputs, order)
    c = check.comparison
    assert within_bound(c), (
        f"{layer.name}: max_ulp={c.max_ulp} bound_ratio={c.bound_ratio} "
        f"nan_mismatch={c.nan_mismatch} inf_mismatch={c.inf_mismatch} worst={c.worst}"
    )
    return check
