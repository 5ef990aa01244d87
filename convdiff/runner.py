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

import contextlib
import contextvars
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from convdiff.autoorder import find_order
from convdiff.budget import Budget
from convdiff.errors import BackendError
from convdiff.evaluate import KernelRun, run_kernel
from convdiff.explain import likely_cause
from convdiff.floats import is_float, round_to
from convdiff.graph import Graph, GraphNode, as_graph, layer_matches
from convdiff.impl import ImplFailure, UserImpl, find_impl
from convdiff.kernels import LayerSpec, Unsupported, find_kernel
from convdiff.memory import resume_collector
from convdiff.metrics import (
    Comparison,
    compare_outputs,
    describe_nonfinite,
    identical,
    is_identical,
    max_ulp_from_reference,
    mismatches,
    scaled_ulp,
    ulp_histogram,
    within_bound,
    worst_elements,
)
from convdiff.orders import Order
from convdiff.recording import Recording
from convdiff.runtime import thread_scope
from convdiff.spatial import Spatial, summarize
from convdiff.timing import detach, phase

MODES = ("isolated", "propagated")
# How many layers' outputs Keras's thread may hold ready beyond the one being compared (and
# the one it is calling): enough to keep it busy past a layer it computes faster than the
# comparison, few enough that the outputs held early stay small (memory.estimate counts them).
KERAS_AHEAD = 2
STATUSES = ("identical", "rounding", "divergent", "skipped", "error")


@dataclass(frozen=True)
class Settings:
    """How a run compares.

    Attributes:
        order: the NumPy side's summation order.
        mode: ``isolated`` or ``propagated``.
        budget: limits (max ULP, atol/rtol, quantile) a compared layer must meet even when
            its difference is rounding.
        impls: the user's implementations standing in for kernels.
        repeat: Keras runs per layer (to see whether Keras changes run to run).
        layers: glob patterns on layer names or classes; only matching layers are compared.
        stop_at_first: stop after the first divergent layer.
        reference: a recording whose outputs take the NumPy side's place (``--reference``).
        histogram: record each compared layer's ULP distribution.
        show_worst: record the K worst elements of each compared layer.
        tried_orders: ``--order all``: orders tried on every layer, the best one compared.
        spatial: record where in each compared layer's output the differences sit
            (:mod:`convdiff.spatial`; ``--html``).
    """

    order: Order = field(default_factory=Order)
    mode: str = "isolated"
    budget: Budget = field(default_factory=Budget)
    impls: tuple[UserImpl, ...] = ()
    repeat: int = 1
    layers: tuple[str, ...] = ()
    stop_at_first: bool = False
    reference: Recording | None = None
    histogram: bool = False
    show_worst: int = 0
    tried_orders: tuple[Order, ...] = ()
    spatial: bool = False
    cache: bool = True

    @property
    def reveals(self) -> bool:
        """Whether layers' orders are revealed (``auto``, alone or among the tried orders)."""
        return self.order.name == "auto" or any(o.name == "auto" for o in self.tried_orders)

    def selects(self, name: str, class_name: str) -> bool:
        """Whether ``--layers`` lets this layer be compared."""
        return not self.layers or any(layer_matches(p, name, class_name) for p in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.order.to_dict(),
            "order_label": "all (best per layer)" if self.tried_orders else self.order.label,
            "mode": self.mode,
            "max_ulp": self.budget.global_max_ulp,
            "budget": self.budget.to_dict(),
            "impls": {i.key: i.source for i in self.impls},
            "repeat": self.repeat,
            "layers": list(self.layers),
            "stop_at_first": self.stop_at_first,
            "reference": self.reference.path if self.reference else None,
            "histogram": self.histogram,
            "orders_tried": [o.label for o in self.tried_orders],
            "show_worst": self.show_worst,
            "spatial": self.spatial,
            "cache": self.cache,
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
    budget_violations: list[str] = field(default_factory=list)
    impl: str | None = None
    traceback: str | None = None
    keras_vs_exact_ulp: int | None = None
    numpy_vs_exact_ulp: int | None = None
    repeat_max_ulp: int | None = None
    likely_cause: str | None = None
    amplification: float | None = None
    own_ulp_scaled: float | None = None
    histogram: list[tuple[str, int]] | None = None
    worst_elements: list[dict[str, Any]] | None = None
    orders: list[dict[str, Any]] | None = None
    resumed_after: str | None = None
    side: str = "NumPy"
    seconds: float = 0.0
    spatial: Spatial | None = None
    order_found: dict[str, Any] | None = None

    @property
    def over_budget(self) -> bool:
        return bool(self.budget_violations)

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
            "budget_violations": self.budget_violations,
            "worst": c.get("worst"),
            "keras_vs_exact_ulp": self.keras_vs_exact_ulp,
            "numpy_vs_exact_ulp": self.numpy_vs_exact_ulp,
            "impl": self.impl,
            "traceback": self.traceback,
            "repeat_max_ulp": self.repeat_max_ulp,
            "max_ulp_scaled": c.get("max_ulp_scaled"),
            "likely_cause": self.likely_cause,
            "amplification": self.amplification,
            "own_ulp_scaled": self.own_ulp_scaled,
            "histogram": None if self.histogram is None else [list(b) for b in self.histogram],
            "worst_elements": self.worst_elements,
            "orders": self.orders,
            "resumed_after": self.resumed_after,
            "compared_with": self.side,
            "seconds": self.seconds,
            "spatial": self.spatial.to_dict() if self.spatial is not None else None,
            "order_found": self.order_found,
        }


def run_layers(
    model: Any,
    inputs: Sequence[np.ndarray],
    settings: Settings,
    *,
    keras_recording: Recording | None = None,
    on_output: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[LayerResult]:
    """Yield a :class:`LayerResult` for every (selected) layer call of ``model`` on ``inputs``.

    Args:
        model: the Keras model.
        inputs: arrays in model input order.
        settings: how to compare.
        keras_recording: take the Keras side's outputs from this recording instead of running
            the layers (``compare-runs``); layers it lacks are run.
        on_output: called with each layer call's name and Keras output (``--save-outputs``).
    """
    import keras

    resume_collector()  # start-up is over (where the command line paused the collector)
    graph = as_graph(model)
    public = vars(keras.layers)
    keras_values: dict[int, np.ndarray] = dict(zip(graph.inputs, inputs, strict=True))
    numpy_values = dict(zip(graph.inputs, _numpy_inputs(graph, inputs, settings), strict=True))
    # The magnitude of the terms behind each tensor (|x| for model inputs), for growth figures.
    scale_values: dict[int, np.ndarray | None] = {k: None for k in graph.inputs}
    remaining = graph.consumers()
    propagated = not _isolated(settings)
    # Propagated mode: the divergent layer upstream of each tensor whose Keras output the NumPy
    # side resumed from (a divergent output is no rounding of Keras's: carrying it on would
    # make every later layer's figures the divergence's, not the layer's own).
    resumed: dict[int, str | None] = {k: None for k in graph.inputs}

    def spec_of(node: GraphNode) -> LayerSpec | None:
        if not settings.selects(node.name, node.class_name):
            return None
        try:
            return node.spec()
        except Exception:  # raised again where the comparison asks for it, as it always was
            return None

    # Keras's side runs in a thread of its own, a few layers ahead of the comparison; it also
    # reads each compared layer's config and weights (TensorFlow reads of its variables)
    with _KerasAhead(graph, keras_values, keras_recording, spec_of) as keras_side:
        for index, node in enumerate(graph.nodes):
            started = time.perf_counter()
            keras_in = [keras_values[k] for k in node.inputs]
            keras_out, tensors_in, spec = keras_side.next()
            if on_output is not None:
                on_output(node.name, keras_out[0])
            numpy_in = [numpy_values[k] for k in node.inputs] if propagated else keras_in
            scale = None
            if settings.selects(node.name, node.class_name):
                in_scales = [scale_values.get(k) for k in node.inputs]
                sides = (keras_in, numpy_in, in_scales)
                result, numpy_out, scale = _compare_node(
                    index, node, spec, sides, keras_out, settings, public
                )
                result.repeat_max_ulp = _repeat_ulp(node, tensors_in, keras_out, settings.repeat)
            else:
                result, numpy_out = None, keras_out
            after = next((resumed[k] for k in node.inputs if resumed.get(k)), None)
            if result is not None and settings.mode == "propagated":
                result.resumed_after = after
                if result.status == "divergent" and settings.reference is None:
                    numpy_out, after = keras_out, node.name
            for key, k_val, n_val in zip(node.outputs, keras_out, numpy_out, strict=True):
                keras_values[key], numpy_values[key], scale_values[key] = k_val, n_val, scale
                resumed[key] = after
            stores = (keras_values, numpy_values, scale_values, resumed)
            _release(node, graph, remaining, *stores)
            if result is not None:
                result.seconds = time.perf_counter() - started
                yield result
                if settings.stop_at_first and result.status == "divergent":
                    return


class _KerasAhead:
    """Keras's side of a run: the graph's layers called in order in a thread of their own, at
    most :data:`KERAS_AHEAD` layers ahead of the comparison, which takes each layer's outputs
    (and what ``prepare`` made of the layer: its :class:`LayerSpec`) with :meth:`next`.

    The comparison of a layer (NumPy kernels, the bound, statistics) and Keras's call of the
    next ones overlap: TensorFlow's kernels and most of NumPy's work release the GIL. Each
    layer's outputs are the same tensors a call in the caller's thread makes: the thread runs
    under the caller's device and TF32 settings (:func:`~convdiff.runtime.thread_scope`), and
    op determinism is the process's. The layers read Keras's own output tensors (an array
    would be copied into a new tensor by every call that reads it).
    """

    def __init__(
        self,
        graph: Graph,
        inputs: dict[int, Any],
        recording: Recording | None,
        prepare: Callable[[GraphNode], Any],
    ):
        self._graph, self._recording, self._prepare = graph, recording, prepare
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=KERAS_AHEAD)
        self._stop = threading.Event()
        run = contextvars.copy_context().run
        self._thread = threading.Thread(
            target=run,
            args=(self._produce, dict(inputs)),
            name="convdiff-keras",
            daemon=True,
        )

    def __enter__(self) -> _KerasAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the thread after the layer it is calling (the comparison may end early: the
        first divergence, an error) and wait for it, taking what it queues meanwhile (a full
        queue would keep it waiting)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(timeout=0.01)

    def next(self) -> tuple[list[np.ndarray], list[Any], Any]:
        """The next layer's outputs as arrays, the tensors its call read (for ``--repeat``)
        and what ``prepare`` returned; raises what the call (or ``prepare``) raised."""
        with phase("keras"):  # the time the comparison waits for Keras
            item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _produce(self, tensors: dict[int, Any]) -> None:
        """The thread: each layer's call (``tensors``: its own, from the model's inputs on),
        what ``prepare`` makes of it, into the queue."""
        graph, recording, prepare = self._graph, self._recording, self._prepare
        detach()
        remaining = graph.consumers()
        try:
            with thread_scope():
                for node in graph.nodes:
                    if self._stop.is_set():
                        return
                    inputs = [tensors[k] for k in node.inputs]
                    # compare-runs: the recording's output stands in for the call
                    recorded = recording.layers.get(node.name) if recording else None
                    arrays, outputs = (
                        _run_keras(node, inputs) if recorded is None else ([recorded], [recorded])
                    )
                    tensors.update(zip(node.outputs, outputs, strict=True))
                    _release(node, graph, remaining, tensors)
                    self._queue.put((arrays, inputs, prepare(node)))
        except BaseException as exc:  # the caller's to raise, at the layer that raised it
            self._queue.put(exc)


def _run_keras(node: GraphNode, inputs: list[Any]) -> tuple[list[np.ndarray], list[Any]]:
    """The layer call's outputs from Keras, as arrays and as the backend's tensors.

    ``inputs`` are arrays or the backend's tensors. TensorFlow's tensors on the CPU are
    viewed as arrays, not copied (a tensor never changes; the view is read-only).

    Raises:
        BackendError: when Keras's backend cannot run the layer here (no kernel for its
            configuration on this device).
    """
    import keras

    try:
        with phase("keras"):
            tensors = node.call(inputs)
            return [_as_array(t, keras.ops.convert_to_numpy) for t in tensors], tensors
    except Exception as exc:  # the backend's own error types: TensorFlow, JAX, torch
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
        if "only supports the NHWC" in text or "only supports NHWC" in text:
            raise BackendError(
                f"Keras cannot run layer {node.name!r} ({node.class_name}, channels_first) on "
                "this CPU: TensorFlow runs it only through oneDNN, which is off here; run with "
                "--onednn (or TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported)"
            ) from None
        raise BackendError(
            f"Keras cannot run layer {node.name!r} ({node.class_name}) here: "
            f"{type(exc).__name__}: {text[:300]}"
        ) from None


def _as_array(tensor: Any, convert: Callable[[Any], np.ndarray]) -> np.ndarray:
    """A read-only array of ``tensor``'s values: a view of a TensorFlow tensor's memory on
    the CPU (``np.asarray``), else the backend's copy (``convert``)."""
    on_cpu = type(tensor).__name__ == "EagerTensor" and "CPU" in getattr(tensor, "device", "")
    array = np.asarray(tensor) if on_cpu else np.asarray(convert(tensor))
    view = array.view()
    view.flags.writeable = False
    return view


def _numpy_inputs(graph: Graph, inputs: Sequence[np.ndarray], settings: Settings):
    """The NumPy side's model inputs: the recording's where one stands in for it."""
    if settings.reference is None:
        return list(inputs)
    recorded = settings.reference.inputs
    return [recorded.get(n, x) for n, x in zip(graph.input_names, inputs, strict=True)]


def _repeat_ulp(
    node: GraphNode, keras_in: list[Any], first: list[np.ndarray], repeat: int
) -> int | None:
    """Max ULP between the first Keras run of the layer and ``repeat - 1`` more runs: whether
    Keras itself changes from run to run (GPU atomics, thread scheduling)."""
    if repeat < 2:
        return None

    worst = 0
    for _ in range(repeat - 1):
        again, _ = _run_keras(node, keras_in)
        for a, b in zip(first, again, strict=True):
            c = compare_outputs(a, b)
            # any change counts at least 1 (a NaN that moved, an integer output that changed)
            changed = 0 if is_identical(c) else max(c.max_ulp if is_float(a.dtype) else 1, 1)
            worst = max(worst, changed)
    return worst


def _compare_node(
    index: int,
    node: GraphNode,
    spec: LayerSpec | None,
    inputs: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]],
    keras_out: list[np.ndarray],
    settings: Settings,
    public: dict[str, Any],
) -> tuple[LayerResult, list[np.ndarray], np.ndarray | None]:
    """Run the node's kernel (or the user's implementation) and judge it.

    Args:
        spec: the layer's config and weights as Keras's thread read them (None: read here).
        inputs: Keras's inputs, the NumPy side's inputs, and the terms' scale of each input.

    Returns:
        The result, the NumPy side's outputs (Keras's own where the layer was not computed),
        and the output's terms' scale (None where unknown).
    """
    keras_in, numpy_in, in_scales = inputs
    first = keras_out[0]
    result = LayerResult(
        index, node.name, node.class_name, tuple(first.shape), str(first.dtype), "skipped"
    )
    kernel = find_kernel(type(node.layer), public)
    impl: UserImpl | _RecordedOutput | None = find_impl(settings.impls, node.name, node.class_name)
    if settings.reference is not None:
        recorded = settings.reference.layers.get(node.name)
        if recorded is None:
            result.reason = f"not in the recording {settings.reference.path}"
            return result, keras_out, None
        impl = _RecordedOutput(recorded, settings.reference.path)
    if kernel is None and impl is None:
        result.reason = f"no NumPy kernel for {node.class_name}"
        return result, keras_out, None
    if len(keras_out) != 1:
        count = len(keras_out)
        result.reason = f"{node.class_name} has {count} outputs; only single outputs are compared"
        return result, keras_out, None
    spec = spec if spec is not None else node.spec()
    result.impl = impl.source if isinstance(impl, UserImpl) else None
    if impl is not None:
        result.side = result.impl or "the recording"
    order, tried = settings.order, settings.tried_orders
    returned: list[str] = []  # what the user's function returned, when not an array
    try:
        if settings.reveals and kernel is not None and impl is None:
            order, tried = _reveal(result, node, kernel, spec, numpy_in, settings)
        if tried and kernel is not None and impl is None:
            result.orders = _rank_orders(kernel, spec, numpy_in, first, tried)
            order = next(o for o in tried if o.label == result.orders[0]["order"])
        run = run_kernel(
            kernel,
            spec,
            numpy_in,
            order,
            reference_inputs=keras_in,
            implementation=_implementation(impl, spec, returned) if impl else None,
            # isolated, no maps: a bound or magnitude is read only where the outputs differ
            keras_output=first if _isolated(settings) and not settings.spatial else None,
        )
    except Unsupported as exc:
        result.reason = f"no NumPy kernel for {node.class_name} with {exc}"
        return result, keras_out, None
    except ImplFailure as exc:
        result.status, result.reason, result.traceback = "error", str(exc), exc.traceback
        return result, keras_out, None
    output, notes = _conform(run.output, first, impl, returned)
    if output is None:
        result.status, result.reason = ("error" if impl else "divergent"), notes
        result.likely_cause = _explain(kernel, spec, numpy_in, run.output, impl, settings)
        return result, keras_out, None
    result.reason = notes
    with phase("statistics"):
        _judge(result, first, output, run, settings)
        if settings.spatial:
            # while both outputs and the bound exist: they are freed after this layer
            first_axis = spec.config.get("data_format") == "channels_first"
            result.spatial = summarize(first, output, run.bound, channels_first=first_axis)
    if result.status == "divergent":
        result.likely_cause = _explain(kernel, spec, numpy_in, run.output, impl, settings)
    if settings.mode == "propagated" and settings.reference is None and kernel is not None:
        sides = (keras_in, numpy_in, in_scales)
        _growth(result, kernel, spec, sides, first, output, run, impl, settings)
    return result, [output], run.scale


def _reveal(result: LayerResult, node, kernel, spec, inputs, settings: Settings):
    """``auto``: the layer's revealed trees put into the order (and into the ``auto`` order
    ``--order all`` tries); the finding recorded on the result."""
    finding = find_order(node.layer, kernel, spec, [np.shape(x) for x in inputs], settings.cache)
    if finding is None:
        return settings.order, settings.tried_orders
    result.order_found = finding.to_dict()

    def laden(o: Order) -> Order:
        if o.name != "auto":
            return o
        return replace(o, trees=finding.trees, functions=finding.functions)

    return laden(settings.order), tuple(laden(o) for o in settings.tried_orders)


def _rank_orders(kernel, spec, inputs, keras_out: np.ndarray, orders) -> list[dict]:
    """``--order all``: every tried order's figures against Keras, best first (bit-exact
    ones first, then by max ULP and share of differing elements)."""
    ranked = []
    for order in orders:
        try:
            output = run_kernel(kernel, spec, inputs, order, bound=False).output
        except Unsupported:
            continue
        if output.shape != keras_out.shape:
            continue
        output = (
            output
            if output.dtype == keras_out.dtype
            else round_to(output.astype(np.float64), keras_out.dtype)
        )
        with phase("statistics"):
            max_ulp, count = mismatches(keras_out, output)
        ranked.append(
            {
                "order": order.label,
                "bit_exact": count == 0,
                "max_ulp": max_ulp,
                "mismatch_fraction": count / output.size if output.size else 0.0,
            }
        )
    return sorted(ranked, key=lambda r: (not r["bit_exact"], r["max_ulp"], r["mismatch_fraction"]))


def _explain(kernel, spec, inputs, output, impl, settings: Settings) -> str | None:
    """For a user's implementation that diverges, the usual mistake that explains it."""
    if kernel is None or not isinstance(impl, UserImpl):
        return None
    return likely_cause(kernel, spec, inputs, output, settings.order)


def _growth(
    result: LayerResult,
    kernel,
    spec,
    sides,
    keras_out,
    output,
    run: KernelRun,
    impl,
    settings: Settings,
) -> None:
    """Propagated mode: the layer's own contribution (its NumPy side fed Keras's input) and
    the amplification of the incoming difference, each in units of the terms' scale (the
    scale of the terms each input was itself computed from; its magnitude for model inputs)."""
    keras_in, numpy_in, in_scales = sides
    alone = run_kernel(
        kernel,
        spec,
        keras_in,
        settings.order,
        bound=False,
        implementation=_implementation(impl, spec) if impl else None,
    ).output
    if alone.shape != keras_out.shape or not is_float(keras_out.dtype):
        return
    with phase("statistics"):
        alone = alone.astype(keras_out.dtype)
        # the scale of the terms the output was computed from; its magnitude when none was kept
        scale = np.abs(keras_out) if run.scale is None else run.scale
        result.own_ulp_scaled = _max_finite(scaled_ulp(keras_out, alone, scale, keras_out.dtype))
        incoming = max(
            (
                _max_finite(
                    scaled_ulp(k, n.astype(k.dtype), np.abs(k) if s is None else s, k.dtype)
                )
                for k, n, s in zip(keras_in, numpy_in, in_scales, strict=True)
                if is_float(k.dtype)
            ),
            default=0.0,
        )
        outgoing = _max_finite(scaled_ulp(keras_out, output, scale, keras_out.dtype))
    if incoming > 0:
        result.amplification = outgoing / incoming


def _max_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


@dataclass(frozen=True)
class _RecordedOutput:
    """A recorded output standing in for the NumPy side (``--reference``)."""

    output: np.ndarray
    source: str

    @property
    def label(self) -> str:
        return f"the recorded output in {self.source}"

    def __call__(self, inputs, weights, config) -> np.ndarray:
        return self.output


def _implementation(
    impl: UserImpl | _RecordedOutput, spec, returned: list[str] | None = None
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """The user's function in the NumPy side's place; the type of what it returns, when that
    is not an array (a list, a scalar), is put in ``returned`` for the notes."""
    weights = list(spec.weights.values())

    def call(inputs: list[np.ndarray]) -> np.ndarray:
        out = impl(inputs, weights, spec.config)
        if returned is not None and not isinstance(out, np.ndarray):
            returned.append(type(out).__name__)
        return np.asarray(out)

    return call


def _conform(
    output: np.ndarray,
    keras_out: np.ndarray,
    impl: UserImpl | _RecordedOutput | None,
    returned: Sequence[str] = (),
) -> tuple[np.ndarray | None, str | None]:
    """Check the NumPy side's shape, round another dtype to Keras's (with a note)."""
    who = impl.label if impl else "the NumPy kernel"
    what = f"a {returned[0]} (read as {output.dtype})" if returned else str(output.dtype)
    if output.shape != keras_out.shape:
        return None, (
            f"{who} returned shape {tuple(output.shape)}; Keras's output has shape "
            f"{tuple(keras_out.shape)}"
        )
    if output.dtype != keras_out.dtype:
        if output.dtype.kind not in "biuf" and not is_float(output.dtype):
            return None, f"{who} returned {what}; expected {keras_out.dtype}"
        note = f"{who} returned {what}; rounded to {keras_out.dtype} for the comparison"
        return round_to(output.astype(np.float64), keras_out.dtype), note
    return output, None


def _isolated(settings: Settings) -> bool:
    """Whether each layer's NumPy side starts from Keras's own inputs."""
    return settings.mode == "isolated" and settings.reference is None


def _judge(result: LayerResult, keras_out, output, run: KernelRun, settings: Settings) -> None:
    """Figures, status and budget of a compared layer (and the three-way figures)."""
    floating = is_float(keras_out.dtype)
    bound = run.bound if floating else None
    c = result.comparison = (
        # bit for bit the same (run_kernel checked): every figure is 0
        identical(keras_out.size, bound is not None, run.scale is not None)
        if run.agreed
        else compare_outputs(keras_out, output, bound, scale=run.scale)
    )
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
    result.reason = _join(result.reason, describe_nonfinite(c, result.side))
    if floating and run.reference is not None:
        # the NumPy side's figure is Keras's where the two outputs are identical
        sides = [keras_out] if result.status == "identical" else [keras_out, output]
        distances = max_ulp_from_reference(run.reference, sides)
        result.keras_vs_exact_ulp, result.numpy_vs_exact_ulp = distances[0], distances[-1]
    result.budget_violations = settings.budget.check(
        result.name, result.class_name, keras_out, output, scale=run.scale
    )
    if settings.histogram:
        result.histogram = ulp_histogram(keras_out, output)
    if settings.show_worst:
        exact = None
        if floating and run.reference is not None:
            exact = round_to(run.reference, keras_out.dtype)
        result.worst_elements = worst_elements(
            keras_out, output, settings.show_worst, bound=bound, exact=exact
        )


def _join(*parts: str | None) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


def _release(node: GraphNode, graph: Graph, remaining, *stores: dict[int, Any]) -> None:
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
