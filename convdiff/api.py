"""The library's front door: ``compare(model, inputs, ...) -> Report``.

The CLI is a thin layer over :func:`compare`; notebooks and tests call it directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.budget import parse_budget
from convdiff.errors import InputError, OptionError
from convdiff.files import check_file
from convdiff.graph import Graph, build_graph, layer_matches
from convdiff.impl import check_impls_match, parse_impls
from convdiff.inputs import (
    Inputs,
    fit_inputs,
    input_specs,
    load_inputs,
    named_inputs,
    random_inputs,
)
from convdiff.kernels.geometry import reduction_axes
from convdiff.loading import load_custom_objects, load_model
from convdiff.memory import check_memory
from convdiff.memory import estimate as estimate_memory
from convdiff.modelfile import Probe
from convdiff.orders import Order, default_order_name, parse_order
from convdiff.outputs import check_writable
from convdiff.recording import (
    RecordingWriter,
    environment_changes,
    load_recording,
    match_layers,
)
from convdiff.report import Report
from convdiff.runner import MODES, LayerResult, Settings, run_layers
from convdiff.runtime import (
    Runtime,
    configure_tensorflow,
    device_scope,
    environment,
    prepare_onednn,
    prepare_runtime,
    runtime_environment,
    runtime_scope,
    select_backend,
)
from convdiff.timing import phase


def compare(
    model: Any,
    inputs: str
    | os.PathLike
    | np.ndarray
    | Sequence[np.ndarray]
    | Mapping[str, np.ndarray]
    | None = None,
    *,
    order: str | Order | None = None,
    fma: bool | None = None,
    accumulate: str | None = None,
    tap_order: str | None = None,
    mode: str = "isolated",
    max_ulp: int | str | Sequence[str] | None = None,
    atol: float | str | Sequence[str] | None = None,
    rtol: float | str | Sequence[str] | None = None,
    quantile: float | None = None,
    ulp_metric: str = "raw",
    layers: str | Sequence[str] = (),
    stop_at_first: bool = False,
    histogram: bool = False,
    show_worst: int = 0,
    reference: str | os.PathLike | None = None,
    save_outputs: str | os.PathLike | None = None,
    seed: int | None = None,
    unsafe: bool = False,
    custom_objects: dict[str, Any] | str | os.PathLike | None = None,
    impls: Sequence[str] | Mapping[str, Any] = (),
    backend: str | None = None,
    onednn: bool | None = None,
    device: str = "cpu",
    tf32: bool | None = None,
    deterministic: bool = False,
    threads: int | None = None,
    repeat: int = 1,
    spatial: bool = False,
    cache: bool = True,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> Report:
    """Compare every layer of ``model`` between Keras and convdiff's NumPy kernels.

    Args:
        model: a path to a .keras/.h5 file or a Keras 2 SavedModel directory, or a Keras
            model object.
        inputs: a path to .npy/.npz, an array (one-input model), a list of arrays in model
            input order, or a dict by input name; None draws a standard-normal input from
            ``seed`` (default 0), or takes the inputs recorded in ``reference``.
        order: summation order name (see :mod:`convdiff.orders`) or an :class:`Order`;
            ``auto`` reveals each layer's order on this machine's backend (see
            :mod:`convdiff.autoorder`), ``all`` tries every order (``auto`` included). None:
            ``auto``, or ``sequential`` where ``fma``, ``accumulate`` or ``tap_order``
            refines it (:func:`~convdiff.orders.default_order_name`).
        fma, accumulate, tap_order: refine a named order (fma: on unless False); with an
            :class:`Order`, they must agree with it.
        mode: ``isolated`` (each layer fed Keras's input) or ``propagated``.
        max_ulp, atol, rtol: budgets: a number, or ``"PATTERN=N"`` strings for per-layer
            overrides (globs on layer names or classes; the last match wins).
        quantile: budget the Q-quantile of the ULP distribution instead of the maximum.
        ulp_metric: ``raw`` ULPs of each output, or ``scaled``: ULPs of the magnitude of the
            terms it was summed from (a small difference of large terms reads as rounding).
        layers: glob patterns on layer names or classes: compare only those.
        stop_at_first: stop after the first divergent layer.
        histogram: record each compared layer's ULP distribution.
        show_worst: record the K worst elements of each compared layer.
        reference: a recording (``save_outputs`` of another run) whose outputs are compared
            with this machine's Keras outputs instead of the NumPy side.
        save_outputs: record every layer's Keras output, the inputs and the environment here.
        unsafe: allow Lambda layers (runs code stored in the file).
        custom_objects: custom classes for loading, by name, or a Python file that defines
            them (imported: it runs).
        impls: your own implementations in place of convdiff's kernels:
            ``["conv2d=my_conv.py:forward"]`` or ``{"Conv2D": forward}``; keys are layer names
            or classes (globs allowed). Called as ``forward(x, *weights[, config=...])``.
        backend: Keras backend for the Keras side: ``tensorflow`` (default, or KERAS_BACKEND),
            ``jax`` or ``torch``; must be chosen before Keras is first imported.
        onednn: TensorFlow's oneDNN path on or off (set before TensorFlow is imported); None:
            TensorFlow's default for this CPU, except that it is turned on (with a note) for
            a model with channels_first convolutions, which the CPU runs only through it.
        device: run the Keras side on ``cpu`` or ``gpu``.
        tf32: allow TensorFloat-32 on GPU, or not (the command line's default: not, as Keras's
            own tests run); None leaves TensorFlow's setting as it is.
        deterministic: TensorFlow op determinism for the run.
        threads: TensorFlow intra-op threads (set before the runtime starts, and kept: the one
            setting TensorFlow cannot take back).
        repeat: run the Keras side this many times per layer and report whether it changes.
        spatial: record where in each layer's output the differences sit (a map, a channel
            profile, the ULP histogram: ``LayerResult.spatial``; what ``--html`` draws).
        cache: read and store the orders ``auto`` reveals in the on-disk cache
            (:mod:`convdiff.treecache`); False reveals every layer afresh.
        on_layer: called with each :class:`LayerResult` as soon as it is ready.

    TF32 and op determinism are put back as they were when the run ends, and no environment
    variable is left changed: a call leaves the process as it found it, except for what
    TensorFlow reads once (threads, oneDNN) and the import of TensorFlow itself.

    Raises:
        ConvdiffError: for a model, input or option that cannot be used.
    """
    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}; valid choices are {', '.join(MODES)}")
    if repeat < 1:
        raise OptionError(f"--repeat must be at least 1; received {repeat}")
    if save_outputs is not None:
        check_writable(str(save_outputs))
    if order is None:
        order = default_order_name(fma, accumulate, tap_order)
    tried = orders_to_try(accumulate, tap_order) if order == "all" else ()
    settings = Settings(
        order=tried[0] if tried else _order(order, fma, accumulate, tap_order),
        tried_orders=tried,
        mode=mode,
        budget=parse_budget(_texts(max_ulp), _texts(atol), _texts(rtol), quantile, ulp_metric),
        impls=tuple(parse_impls(impls)),
        repeat=repeat,
        layers=tuple(_texts(layers)),
        stop_at_first=stop_at_first,
        histogram=histogram,
        show_worst=show_worst,
        reference=load_recording(reference) if reference is not None else None,
        spatial=spatial,
        cache=cache,
    )
    runtime = Runtime(device=device, tf32=tf32, deterministic=deterministic, threads=threads)
    with phase("startup"):
        prepared = (
            model
            if isinstance(model, PreparedModel)
            else prepare_model(
                model,
                runtime,
                backend=backend,
                onednn=onednn,
                unsafe=unsafe,
                custom_objects=custom_objects,
            )
        )
        if prepared is model:
            prepare_runtime(runtime)
        graph = prepared.graph
        graph_layers = [(n.name, n.class_name) for n in graph.nodes]
        _check_patterns(settings, graph_layers)
        if inputs is None and settings.reference is not None:
            inputs = dict(settings.reference.inputs)
        fitted, input_label = _inputs(graph, inputs, seed)
    check_memory(estimate_memory(graph, fitted.arrays, settings.order, settings.mode))
    with runtime_scope(runtime):
        env = {**environment(), **runtime_environment(runtime)}
        notes = prepared.notes + fitted.notes
        report = Report(prepared.label, input_label, settings.to_dict(), env, notes=notes)
        with _recorder(save_outputs, fitted, graph, env, settings) as record:
            for result in run_layers(graph, fitted.arrays, settings, on_output=record):
                report.layers.append(result)
                if on_layer is not None:
                    on_layer(result)
    report.notes += _reference_notes(settings, report, graph_layers)
    report.layers_not_compared = _not_compared(settings, graph_layers, report.layers)
    return report


@dataclass
class PreparedModel:
    """A model loaded once and walked once, which any number of runs then share.

    Attributes:
        graph: the model's layer calls in execution order (its Keras model in ``graph.model``).
        label: what reports call it (the file name it came from, or the model's name).
        notes: what convdiff chose while loading it (e.g. turning oneDNN on).
    """

    graph: Graph
    label: str
    notes: list[str] = field(default_factory=list)


def prepare_model(
    model: Any,
    runtime: Runtime | None = None,
    *,
    backend: str | None = None,
    onednn: bool | None = None,
    unsafe: bool = False,
    custom_objects: dict[str, Any] | str | os.PathLike | None = None,
) -> PreparedModel:
    """Load ``model`` (a path; a Keras model object passes through) with TensorFlow set up
    for it, and walk its graph once.

    The model file is read and checked in a child process while TensorFlow is imported here;
    the child first says whether the model needs oneDNN (channels_first convolutions on a
    CPU that leaves it off), which must be decided before that import.

    Raises:
        ConvdiffError: a model file or option that cannot be used.
    """
    runtime = runtime or Runtime()
    select_backend(backend)
    path = isinstance(model, str | os.PathLike)
    label = str(model) if path else getattr(model, "name", "model")
    probe = Probe.start(model) if path else None
    try:
        needs = (lambda: (probe.early() or {}).get("needs_onednn", [])) if probe else list
        note = prepare_onednn(onednn, runtime.device, needs)
        configure_tensorflow(backend)
        prepare_runtime(runtime)
        if probe is not None:
            if not isinstance(custom_objects, dict | None):
                custom_objects = load_custom_objects(custom_objects)
            with device_scope(runtime):  # the weights are made on the run's device
                model = load_model(model, unsafe=unsafe, custom_objects=custom_objects, probe=probe)
    finally:
        if probe is not None:
            probe.close()
    return PreparedModel(build_graph(model), label, [note] if note else [])


def _not_compared(
    settings: Settings, graph_layers: list[tuple[str, str]], compared: list
) -> list[str]:
    """The selected layers a ``stop_at_first`` run never reached (after the divergent one)."""
    if not settings.stop_at_first or not compared or compared[-1].status != "divergent":
        return []
    reached = {r.name for r in compared}
    return [n for n, c in graph_layers if settings.selects(n, c) and n not in reached]


def orders_to_try(accumulate: str | None = None, tap_order: str | None = None):
    """The orders ``--order all`` tries on every layer (``auto`` first: it wins ties)."""
    names = ["sequential", "reverse", "pairwise", "kahan"]
    orders = [parse_order("auto", True, accumulate, tap_order)]
    orders += [parse_order(n, fma, accumulate, tap_order) for n in names for fma in (True, False)]
    orders += [parse_order(f"blocked:{k}", True, accumulate, tap_order) for k in (8, 16, 64, 256)]
    orders += [
        parse_order(n, True, accumulate, tap_order) for n in ("eigen", "blas", "float64", "exact")
    ]
    return tuple(orders)


def _order(
    order: str | Order, fma: bool | None, accumulate: str | None, tap_order: str | None
) -> Order:
    """The run's order: a name refined by the other arguments, or an :class:`Order` they
    must not contradict (a silently dropped ``fma=False`` would report another order).

    Raises:
        OptionError: an unknown order, or arguments that contradict the given Order.
    """
    if not isinstance(order, Order):
        return parse_order(order, True if fma is None else fma, accumulate, tap_order)
    given = {"fma": fma, "accumulate": accumulate, "tap_order": tap_order}
    conflicts = [f"{k}={v!r}" for k, v in given.items() if v is not None and v != getattr(order, k)]
    if conflicts:
        raise OptionError(
            f"order={order.label!r} already fixes what {', '.join(conflicts)} asks otherwise; "
            "set it in the Order, or pass the order by name"
        )
    return order


def _texts(value: Any) -> list[str]:
    """A number, a string or a list of them, as CLI-style strings."""
    if value is None:
        return []
    if isinstance(value, str | int | float):
        return [str(value)]
    return [str(v) for v in value]


def _check_patterns(settings: Settings, graph_layers: list[tuple[str, str]]) -> None:
    """``--impl`` keys, ``--layers`` patterns and ``--tap-order`` must apply to some layer: a
    typo is an error."""
    check_impls_match(settings.impls, graph_layers)
    _check_tap_order(settings.order.tap_order, {c for _, c in graph_layers})
    for pattern in settings.layers:
        if not any(layer_matches(pattern, n, c) for n, c in graph_layers):
            names = ", ".join(n for n, _ in graph_layers[:12])
            raise OptionError(
                f"--layers {pattern!r} matches no layer name or class; "
                f"layers are: {names}{' ...' if len(graph_layers) > 12 else ''}"
            )


def _check_tap_order(tap_order: str | None, classes: set[str]) -> None:
    if tap_order is None:
        return
    axes = {(c, a) for c in sorted(classes) for a in reduction_axes(c)}
    if any(sorted(a) == sorted(tap_order) for _, a in axes):
        return
    found = ", ".join(f"{a} ({c})" for c, a in sorted(axes)) or "none (no convolution)"
    raise OptionError(
        f"--tap-order {tap_order!r} applies to no layer of this model; the reduction axes of "
        f"its convolutions are: {found}"
    )


@contextlib.contextmanager
def _recorder(path, fitted: Inputs, graph: Graph, env: dict, settings: Settings):
    """``--save-outputs``: a writer whose ``add`` the runner calls per layer (or nothing)."""
    if path is None:
        yield None
        return
    names = graph.input_names
    with RecordingWriter(path, fitted.arrays, names, env, settings.to_dict()) as writer:
        yield writer.add


def _reference_notes(
    settings: Settings, report: Report, graph_layers: list[tuple[str, str]]
) -> list[str]:
    """What a reference run must not hide: unmatched layers, environment changes, budget
    patterns that matched nothing."""
    notes = [
        f"budget pattern {p!r} matches no layer"
        for p in settings.budget.unmatched_patterns(graph_layers)
    ]
    if settings.reference is None:
        return notes
    _, only_recorded, only_current = match_layers(settings.reference, [n for n, _ in graph_layers])
    if only_recorded:
        notes.append(f"layers only in the recording: {', '.join(only_recorded)}")
    if only_current:
        notes.append(f"layers not in the recording: {', '.join(only_current)}")
    changes = environment_changes(settings.reference.environment, report.environment)
    if changes:
        notes.append("environment changed since the recording: " + "; ".join(changes))
    return notes


def _inputs(graph: Graph, inputs: Any, seed: int | None) -> tuple[Inputs, str]:
    specs = input_specs(graph)
    if inputs is None:
        return random_inputs(specs, 0 if seed is None else seed), "random"
    if isinstance(inputs, str | os.PathLike):
        return load_inputs(inputs, specs), str(inputs)
    if isinstance(inputs, Mapping):
        arrays = [np.asarray(a) for a in named_inputs(inputs, specs, "the given dict")]
    elif isinstance(inputs, np.ndarray):
        arrays = [inputs]
    else:
        arrays = [np.asarray(a) for a in inputs]
    return fit_inputs(arrays, specs, "the given arrays"), "arrays"


def compare_runs(
    recording_a: str | os.PathLike,
    recording_b: str | os.PathLike,
    *,
    model: Any = None,
    max_ulp: int | str | Sequence[str] | None = None,
    atol: float | str | Sequence[str] | None = None,
    rtol: float | str | Sequence[str] | None = None,
    quantile: float | None = None,
    ulp_metric: str = "raw",
    layers: str | Sequence[str] = (),
    unsafe: bool = False,
    custom_objects: dict[str, Any] | None = None,
    spatial: bool = False,
) -> Report:
    """Diff two recorded runs (``save_outputs``: CPU and GPU, oneDNN on and off, two TF
    versions) layer by layer, A as the reference side and B as the candidate.

    With ``model`` (the model both were recorded from), each layer gets convdiff's rounding
    bound, carried through from the differences of its inputs, and so a verdict; without it,
    layers that are not bitwise equal show their figures with no verdict (``skipped``), and
    budgets still apply. ``spatial``: record where the differences sit (``--html``; in ULPs
    without ``model``).
    """
    first, second = load_recording(recording_a), load_recording(recording_b)
    settings = Settings(
        mode="propagated",
        budget=parse_budget(_texts(max_ulp), _texts(atol), _texts(rtol), quantile, ulp_metric),
        layers=tuple(_texts(layers)),
        reference=second,
        spatial=spatial,
    )
    label = f"{first.path} vs {second.path}"
    report = Report(label, "recorded", settings.to_dict(), first.environment)
    if model is None:
        report.layers = _diff_recordings(first, second, settings)
    else:
        prepared = prepare_model(model, unsafe=unsafe, custom_objects=custom_objects)
        graph = prepared.graph
        arrays = [first.inputs[n] for n in graph.input_names]
        report.layers = list(run_layers(graph, arrays, settings, keras_recording=first))
        report.notes = prepared.notes
    report.notes += _recording_notes(first, second)
    return report


def _diff_recordings(first, second, settings: Settings) -> list[LayerResult]:
    """Without a model: each layer both recordings hold, compared bit for bit, no bound."""
    from convdiff.metrics import compare_outputs, is_identical
    from convdiff.spatial import summarize

    matched, _, _ = match_layers(second, list(first.layers))
    results = []
    for index, name in enumerate(n for n in matched if settings.selects(n, "")):
        a, b = first.layers[name], second.layers[name]
        result = LayerResult(index, name, "-", tuple(a.shape), str(a.dtype), "skipped")
        if a.shape != b.shape or a.dtype != b.dtype:
            result.status = "divergent"
            result.reason = f"recorded {b.shape} {b.dtype} vs {a.shape} {a.dtype}"
        else:
            result.comparison = compare_outputs(a, b)
            if is_identical(result.comparison):
                result.status = "identical"
            else:
                result.reason = "figures only: give --model to bound the rounding"
            result.budget_violations = settings.budget.check(name, "", a, b)
            result.spatial = summarize(a, b) if settings.spatial else None
        results.append(result)
    return results


def _recording_notes(first, second) -> list[str]:
    _, only_second, only_first = match_layers(second, list(first.layers))
    notes = []
    if only_first:
        notes.append(f"layers only in {first.path}: {', '.join(only_first)}")
    if only_second:
        notes.append(f"layers only in {second.path}: {', '.join(only_second)}")
    changes = environment_changes(first.environment, second.environment)
    if changes:
        notes.append("environments differ: " + "; ".join(changes))
    return notes


def expand_inputs(spec: str | os.PathLike) -> list[str]:
    """INPUT as given: a file, a directory (its .npy/.npz files, sorted) or a glob pattern;
    each file checked (it exists and can be read) before any slow work starts.

    Raises:
        InputError: a missing or unreadable file, or a directory or pattern that names no
            .npy/.npz file.
    """
    import glob

    text = str(spec)
    if os.path.isdir(text):
        found = sorted(str(p) for p in Path(text).iterdir() if p.suffix in (".npy", ".npz"))
        where = f"directory {text!r}"
    elif glob.has_magic(text):
        found = sorted(p for p in glob.glob(text) if Path(p).suffix in (".npy", ".npz"))
        where = f"pattern {text!r}"
    else:
        found = [text]
    if not found:
        raise InputError(f"{where} names no .npy or .npz input file")
    for path in found:
        check_file(Path(path), "input file", InputError)
    return found


def compare_many(model: Any, inputs: Sequence[str], **options: Any) -> list[Report]:
    """:func:`compare` over many input files, loading the model once; one report per input,
    each run's arrays freed before the next (memory stays that of one run)."""
    runtime = Runtime(
        **{k: options[k] for k in ("device", "tf32", "deterministic", "threads") if k in options}
    )
    prepared = prepare_model(
        model,
        runtime,
        backend=options.pop("backend", None),
        onednn=options.pop("onednn", None),
        unsafe=options.pop("unsafe", False),
        custom_objects=options.pop("custom_objects", None),
    )
    return [compare(prepared, path, **options) for path in inputs]
