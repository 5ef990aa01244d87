"""Walk the model's graph, run every layer through Keras and through its NumPy kernel, and yield
one :class:`LayerResult` per layer call, in execution order.

Modes:
- ``isolated``: each kernel gets Keras's own input for that layer, so a row measures that layer
  alone.
- ``propagated``: the NumPy side feeds its own outputs forward; the bound then also carries the
  difference between the two sides' inputs through the layer, so a row says whether the layer
  is still explained by rounding given what it received.

A layer without a kernel is ``skipped`` and Keras's output stands in for it downstream, in both
modes. Tensors are dropped as soon as no later layer (or model output) reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convdiff.evaluate import run_kernel
from convdiff.graph import Graph, GraphNode, build_graph, layer_spec
from convdiff.kernels import Unsupported, find_kernel
from convdiff.metrics import Comparison, compare, is_identical, within_bound
from convdiff.orders import Order

MODES = ("isolated", "propagated")
STATUSES = ("identical", "rounding", "divergent", "skipped", "error")


@dataclass(frozen=True)
class Settings:
    """How a run compares.

    Attributes:
        order: the NumPy side's summation order.
        mode: ``isolated`` or ``propagated``.
        max_ulp: budget: a compared layer above it fails the run even when it is rounding.
    """

    order: Order = field(default_factory=Order)
    mode: str = "isolated"
    max_ulp: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.order.to_dict(),
            "order_label": self.order.label,
            "mode": self.mode,
            "max_ulp": self.max_ulp,
        }


@dataclass
class LayerResult:
    """One layer call's verdict and figures."""

    index: int
    name: str
    class_name: str
    output_shape: tuple[int, ...]
    dtype: str
    status: str
    reason: str | None = None
    comparison: Comparison | None = None
    over_budget: bool = False

    @property
    def compared(self) -> bool:
        return self.comparison is not None

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison.to_dict() if self.comparison else {}
        return {
            "index": self.index,
            "name": self.name,
            "class": self.class_name,
            "output_shape": list(self.output_shape),
            "dtype": self.dtype,
            "status": self.status,
            "reason": self.reason,
            "max_ulp": c.get("max_ulp"),
            "mean_ulp": c.get("mean_ulp"),
            "median_ulp": c.get("median_ulp"),
            "p99_ulp": c.get("p99_ulp"),
            "max_abs": c.get("max_abs"),
            "max_rel": c.get("max_rel"),
            "mismatch_count": c.get("mismatch_count"),
            "mismatch_fraction": c.get("mismatch_fraction"),
            "nan_mismatch": c.get("nan_mismatch"),
            "inf_mismatch": c.get("inf_mismatch"),
            "bound_ratio": c.get("bound_ratio"),
            "over_budget": self.over_budget,
            "worst": c.get("worst"),
        }


def run_layers(
    model: Any, inputs: Sequence[np.ndarray], settings: Settings
) -> Iterator[LayerResult]:
    """Yield a :class:`LayerResult` for every layer call of ``model`` on ``inputs``."""
    import keras

    graph = build_graph(model)
    public = vars(keras.layers)
    keras_values: dict[int, np.ndarray] = dict(zip(graph.inputs, inputs, strict=True))
    numpy_values: dict[int, np.ndarray] = dict(keras_values)
    remaining = graph.consumers()
    for index, node in enumerate(graph.nodes):
        keras_in = [keras_values[k] for k in node.inputs]
        keras_out = [keras.ops.convert_to_numpy(t) for t in node.call(keras_in)]
        numpy_in = (
            keras_in if settings.mode == "isolated" else [numpy_values[k] for k in node.inputs]
        )
        result, numpy_out = _compare_node(
            index, node, keras_in, numpy_in, keras_out, settings, public
        )
        for key, k_val, n_val in zip(node.outputs, keras_out, numpy_out, strict=True):
            keras_values[key] = k_val
            numpy_values[key] = n_val
        _release(node, graph, remaining, keras_values, numpy_values)
        yield result


def _compare_node(
    index: int,
    node: GraphNode,
    keras_in: list[np.ndarray],
    numpy_in: list[np.ndarray],
    keras_out: list[np.ndarray],
    settings: Settings,
    public: dict[str, Any],
) -> tuple[LayerResult, list[np.ndarray]]:
    """Run the node's kernel and judge it; return the result and the NumPy side's outputs."""
    first = keras_out[0]
    result = LayerResult(
        index, node.name, node.class_name, tuple(first.shape), str(first.dtype), "skipped"
    )
    kernel = find_kernel(type(node.layer), public)
    if kernel is None:
        result.reason = f"no NumPy kernel for {node.class_name}"
        return result, keras_out
    if len(keras_out) != 1:
        result.reason = (
            f"{node.class_name} has {len(keras_out)} outputs; "
            "only single-output layers are compared"
        )
        return result, keras_out
    try:
        spec = layer_spec(node.layer)
        propagated = settings.mode == "propagated"
        run = run_kernel(
            kernel,
            spec,
            numpy_in,
            settings.order,
            reference_inputs=keras_in if propagated else None,
        )
    except Unsupported as exc:
        result.reason = f"no NumPy kernel for {node.class_name} with {exc}"
        return result, keras_out
    output = run.output
    if output.shape != first.shape:
        result.status = "divergent"
        result.reason = f"NumPy output shape {output.shape}, Keras {first.shape}"
        return result, keras_out
    if output.dtype != first.dtype:
        result.reason = f"NumPy output rounded from {output.dtype} to Keras's {first.dtype}"
        output = output.astype(first.dtype)
    result.comparison = (
        compare(first, output, run.bound)
        if first.dtype.kind == "f"
        else (compare(first.astype(np.float64), output.astype(np.float64), None))
    )
    result.status = _status(result.comparison)
    result.over_budget = (
        settings.max_ulp is not None and result.comparison.max_ulp > settings.max_ulp
    )
    return result, [output]


def _status(c: Comparison) -> str:
    if is_identical(c):
        return "identical"
    return "rounding" if within_bound(c) else "divergent"


def _release(node: GraphNode, graph: Graph, remaining, *stores: dict[int, np.ndarray]) -> None:
    """Drop tensors that no later layer (or model output) reads."""
    for key in node.inputs:
        remaining[key] -= 1
        if remaining[key] <= 0:
            for store in stores:
                store.pop(key, None)
    for key in node.outputs:
        if remaining[key] <= 0:
            for store in stores:
                store.pop(key, None)
