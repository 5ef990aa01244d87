"""The library's front door: ``compare(model, inputs, ...) -> Report``.

The CLI is a thin layer over :func:`compare`; notebooks and tests call it directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from convdiff.device import (
    Runtime,
    apply_runtime,
    device_scope,
    runtime_environment,
    select_backend,
)
from convdiff.errors import OptionError
from convdiff.graph import build_graph
from convdiff.impl import check_impls_match, parse_impls
from convdiff.loading import (
    Inputs,
    configure_tensorflow,
    environment,
    fit_inputs,
    input_specs,
    load_inputs,
    load_model,
    random_inputs,
)
from convdiff.orders import Order, parse_order
from convdiff.report import Report
from convdiff.runner import MODES, LayerResult, Settings, run_layers


def compare(
    model: Any,
    inputs: str
    | os.PathLike
    | np.ndarray
    | Sequence[np.ndarray]
    | Mapping[str, np.ndarray]
    | None = None,
    *,
    order: str | Order = "sequential",
    fma: bool = True,
    accumulate: str | None = None,
    tap_order: str | None = None,
    mode: str = "isolated",
    max_ulp: int | None = None,
    seed: int | None = None,
    unsafe: bool = False,
    custom_objects: dict[str, Any] | None = None,
    impls: Sequence[str] | Mapping[str, Any] = (),
    backend: str | None = None,
    device: str = "cpu",
    tf32: bool = False,
    deterministic: bool = False,
    threads: int | None = None,
    repeat: int = 1,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> Report:
    """Compare every layer of ``model`` between Keras and convdiff's NumPy kernels.

    Args:
        model: a path to a .keras/.h5 file, or a Keras model object.
        inputs: a path to .npy/.npz, an array (one-input model), a list of arrays in model
            input order, or a dict by input name; None draws a standard-normal input from
            ``seed`` (default 0).
        order: summation order name (see :mod:`convdiff.orders`) or an :class:`Order`.
        fma, accumulate, tap_order: refine a named order.
        mode: ``isolated`` (each layer fed Keras's input) or ``propagated``.
        max_ulp: budget; a compared layer above it fails the report.
        unsafe: allow Lambda layers (runs code stored in the file).
        custom_objects: custom classes for loading.
        impls: your own implementations in place of convdiff's kernels:
            ``["conv2d=my_conv.py:forward"]`` or ``{"Conv2D": forward}``; keys are layer names
            or classes (globs allowed). Called as ``forward(x, *weights[, config=...])``.
        backend: Keras backend for the Keras side: ``tensorflow`` (default, or KERAS_BACKEND),
            ``jax`` or ``torch``; must be chosen before Keras is first imported.
        device: run the Keras side on ``cpu`` or ``gpu``.
        tf32: allow TensorFloat-32 on GPU (off by default, as Keras's own tests run).
        deterministic: TensorFlow op determinism.
        threads: TensorFlow intra-op threads (set before the runtime starts).
        repeat: run the Keras side this many times per layer and report whether it changes.
        on_layer: called with each :class:`LayerResult` as soon as it is ready.

    Raises:
        ConvdiffError: for a model, input or option that cannot be used.
    """
    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}; valid choices are {', '.join(MODES)}")
    if repeat < 1:
        raise OptionError(f"--repeat must be at least 1; received {repeat}")
    settings = Settings(
        order=order if isinstance(order, Order) else parse_order(order, fma, accumulate, tap_order),
        mode=mode,
        max_ulp=max_ulp,
        impls=tuple(parse_impls(impls)),
        repeat=repeat,
    )
    runtime = Runtime(device=device, tf32=tf32, deterministic=deterministic, threads=threads)
    select_backend(backend)
    configure_tensorflow()
    apply_runtime(runtime)
    model_label = (
        str(model) if isinstance(model, str | os.PathLike) else getattr(model, "name", "model")
    )
    if isinstance(model, str | os.PathLike):
        model = load_model(model, unsafe=unsafe, custom_objects=custom_objects)
    check_impls_match(settings.impls, [(n.name, n.class_name) for n in build_graph(model).nodes])
    fitted, input_label = _inputs(model, inputs, seed)
    report = Report(
        model_label,
        input_label,
        settings.to_dict(),
        {**environment(), **runtime_environment(runtime)},
        notes=fitted.notes,
    )
    with device_scope(runtime):
        for result in run_layers(model, fitted.arrays, settings):
            report.layers.append(result)
            if on_layer is not None:
                on_layer(result)
    return report


def _inputs(model: Any, inputs: Any, seed: int | None) -> tuple[Inputs, str]:
    specs = input_specs(model)
    if inputs is None:
        return random_inputs(specs, 0 if seed is None else seed), "random"
    if isinstance(inputs, str | os.PathLike):
        return load_inputs(inputs, specs), str(inputs)
    if isinstance(inputs, Mapping):
        arrays = [np.asarray(inputs[s.name]) for s in specs]
    elif isinstance(inputs, np.ndarray):
        arrays = [inputs]
    else:
        arrays = [np.asarray(a) for a in inputs]
    return fit_inputs(arrays, specs, "the given arrays"), "arrays"
