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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convdiff.evaluate import KernelRun, run_kernel
from convdiff.graph import Graph, GraphNode, build_graph, layer_spec
from convdiff.impl import ImplFailure, UserImpl, find_impl
from convdiff.kernels import Unsupported, find_kernel
from convdiff.metrics import Comparison, compare, is_identical, within_bound
from convdiff.orders import Order, round_to

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
    impls: tuple[UserImpl, ...] = ()
    repeat: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.order.to_dict(),
            "order_label": self.order.label,
            "mode": self.mode,
            "max_ulp": self.max_ulp,
            "impls": {i.key: i.source for i in self.impls},
            "repeat": self.repeat,
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
    impl: str | None = None
    traceback: str | None = None
    keras_vs_exact_ulp: int | None = None
    numpy_vs_exact_ulp: int | None = None
    repeat_max_ulp: int | None = None

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
            "keras_vs_exact_ulp": self.keras_vs_exact_ulp,
            "numpy_vs_exact_ulp": self.numpy_vs_exact_ulp,
            "impl": self.impl,
            "traceback": self.traceback,
            "repeat_max_ulp": self.repeat_max_ulp,
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
        repeat_ulp = _repeat_ulp(node, keras_in, keras_out, settings.repeat)
        numpy_in = (
            keras_in if settings.mode == "isolated" else [numpy_values[k] for k in node.inputs]
        )
        result, numpy_out = _compare_node(
            index, node, keras_in, numpy_in, keras_out, settings, public
        )
        result.repeat_max_ulp = repeat_ulp
        for key, k_val, n_val in zip(node.outputs, keras_out, numpy_out, strict=True):
            keras_values[key] = k_val
            numpy_values[key] = n_val
        _release(node, graph, remaining, keras_values, numpy_values)
        yield result


def _repeat_ulp(
    node: GraphNode, keras_in: list[np.ndarray], first: list[np.ndarray], repeat: int
) -> int | None:
    """Max ULP between the first Keras run of the layer and ``repeat - 1`` more runs: whether
    Keras itself changes from run to run (GPU atomics, thread scheduling)."""
    if repeat < 2:
        return None
    import keras

    worst = 0
    for _ in range(repeat - 1):
        again = [keras.ops.convert_to_numpy(t) for t in node.call(keras_in)]
        for a, b in zip(first, again, strict=True):
            if a.dtype.kind == "f":
                worst = max(worst, compare(a, b).max_ulp)
            elif not np.array_equal(a, b):
                worst = max(worst, 1)
    return worst


def _compare_node(
    index: int,
    node: GraphNode,
    keras_in: list[np.ndarray],
    numpy_in: list[np.ndarray],
    keras_out: list[np.ndarray],
    settings: Settings,
    public: dict[str, Any],
) -> tuple[LayerResult, list[np.ndarray]]:
    """Run the node's kernel (or the user's implementation) and judge it; return the result and
    the NumPy side's outputs (Keras's own where the layer was not computed)."""
    first = keras_out[0]
    result = LayerResult(
        index, node.name, node.class_name, tuple(first.shape), str(first.dtype), "skipped"
    )
    kernel = find_kernel(type(node.layer), public)
    impl = find_impl(settings.impls, node.name, node.class_name)
    if kernel is None and impl is None:
        result.reason = f"no NumPy kernel for {node.class_name}"
        return result, keras_out
    if len(keras_out) != 1:
        count = len(keras_out)
        result.reason = f"{node.class_name} has {count} outputs; only single outputs are compared"
        return result, keras_out
    spec = layer_spec(node.layer)
    result.impl = impl.source if impl else None
    try:
        run = run_kernel(
            kernel,
            spec,
            numpy_in,
            settings.order,
            reference_inputs=keras_in if settings.mode == "propagated" else None,
            candidate=_candidate(impl, spec) if impl else None,
        )
    except Unsupported as exc:
        result.reason = f"no NumPy kernel for {node.class_name} with {exc}"
        return result, keras_out
    except ImplFailure as exc:
        result.status, result.reason, result.traceback = "error", str(exc), exc.traceback
        return result, keras_out
    output, notes = _conform(run.output, first, impl)
    if output is None:
        result.status, result.reason = ("error" if impl else "divergent"), notes
        return result, keras_out
    result.reason = notes
    _judge(result, first, output, run, settings)
    return result, [output]


def _candidate(impl: UserImpl, spec) -> Callable[[list[np.ndarray]], np.ndarray]:
    weights = list(spec.weights.values())
    return lambda inputs: impl(inputs, weights, spec.config)


def _conform(
    output: np.ndarray, keras_out: np.ndarray, impl: UserImpl | None
) -> tuple[np.ndarray | None, str | None]:
    """Check the NumPy side's shape, round another dtype to Keras's (with a note)."""
    who = f"your implementation {impl.source}" if impl else "the NumPy kernel"
    if output.shape != keras_out.shape:
        return None, (
            f"{who} returned shape {tuple(output.shape)}; Keras's output has shape "
            f"{tuple(keras_out.shape)}"
        )
    if output.dtype != keras_out.dtype:
        if output.dtype.kind not in "biuf":
            return None, f"{who} returned dtype {output.dtype}; expected {keras_out.dtype}"
        note = f"{who} returned {output.dtype}; rounded to {keras_out.dtype} for the comparison"
        return round_to(output.astype(np.float64), keras_out.dtype), note
    return output, None


def _judge(result: LayerResult, keras_out, output, run: KernelRun, settings: Settings) -> None:
    """Figures, status and budget of a compared layer (and the three-way figures)."""
    floating = keras_out.dtype.kind == "f"
    bound = run.bound if floating else None
    result.comparison = (
        compare(keras_out, output, bound)
        if floating
        else compare(keras_out.astype(np.float64), output.astype(np.float64), None)
    )
    c = result.comparison
    if is_identical(c):
        result.status = "identical"
    elif bound is None:
        result.status = "skipped"
        result.reason = _join(
            result.reason,
            "no convdiff kernel to bound the rounding of "
            f"{result.class_name}: figures shown, no verdict",
        )
    else:
        result.status = "rounding" if within_bound(c) else "divergent"
    if floating and run.reference is not None:
        exact = round_to(run.reference, keras_out.dtype)
        result.keras_vs_exact_ulp = compare(exact, keras_out).max_ulp
        result.numpy_vs_exact_ulp = compare(exact, output).max_ulp
    result.over_budget = settings.max_ulp is not None and c.max_ulp > settings.max_ulp


def _join(*parts: str | None) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


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
