"""How much memory a run needs, estimated before it starts, against the memory available.

A run holds, at any moment, the activations that later layers still read (the runner frees a
tensor as soon as its last reader has run, see :meth:`convdiff.graph.Graph.consumers`), plus
the working memory of the layer being compared. :func:`estimate` walks the graph in execution
order and takes, over all layers, the largest sum of:

- **held activations**: every tensor produced so far that a later layer (or the model's
  output) still reads. The model's inputs are held once (both sides read the same arrays);
  every other tensor twice, Keras's value and the NumPy side's.
- **the layer's outputs**: three copies (the backend's tensor, its NumPy copy where the
  backend makes one, the kernel's output).
- **what Keras's thread made ahead**: Keras's layers run in a thread of their own, up to
  ``KERAS_AHEAD`` layers ahead of the comparison (:mod:`convdiff.runner`); the outputs of the
  layers queued and of the one being called, twice each (tensor and array), and the copies
  of their weights the thread read for the comparison.
- **the layer's working memory**, with ``P`` the elements of its patch (im2col) buffer
  (``out_positions * prod(kernel_size) * in_channels`` for a convolution; ``out_elements *
  prod(pool_size)`` for an average pooling; none for a max pooling, which reduces its
  windows in place; the input for a Dense) and ``in``/``out`` its input and output elements:

  - the Bounded pass's float64 copies: ``8 * (3 P + 11 (in + out))`` bytes (patch values,
    their error bounds and their magnitudes; the tracked inputs and the elementwise steps
    after the reduction), plus ``32`` bytes per weight (the weights, their bounds and
    magnitudes in float64). A layer whose two outputs agree to the bit computes the float64
    values alone and takes less (:class:`~convdiff.numerics.ValueOnly`); which layers agree
    is known only once they ran, so the estimate takes every layer's whole pass;
  - the Rounded pass and TensorFlow: ``itemsize * (P + in + out)`` (the rounded patch buffer,
    TensorFlow's own im2col workspace and temporaries);
  - the ``exact`` order holds the float64 products of a block of outputs before adding:
    ``8 * min(n * out, max(n, 2**22))`` bytes, ``n`` the reduction length; compiled (float32
    operands, with numba) only its double-double state, ``24`` bytes per output of a block
    (``prod(kernel_size) * in_channels / groups`` for a convolution, the input features for a
    Dense); :mod:`convdiff.orders` cuts its blocks at about 2**22 terms.

The constants were measured with ``tracemalloc`` on the NumPy side of Conv1D/2D,
DepthwiseConv2D, SeparableConv2D, Conv2DTranspose, Dense, pooling, BatchNormalization,
LayerNormalization, Softmax and ReLU, in both modes (propagated mode patches and multiplies
the inputs' errors too), and rounded up: the estimate comes to 1.05 to 5.5 times each layer's
measured peak (closest: LayerNormalization in propagated mode, whose peak is some 22 times
``8 in``; farthest: BatchNormalization in isolated mode). tests/test_memory.py keeps it
between 1 and 6 times a layer's measured peak in either mode and 1 and 3 times a small
ResNet's run. It is an
upper bound on the arrays convdiff allocates, not on TensorFlow's own runtime (already loaded
when the estimate is checked, so already outside ``MemAvailable``).

The memory available is ``MemAvailable`` of ``/proc/meminfo``, or the environment variable
``CONVDIFF_MEMORY_LIMIT`` (bytes) when it is set.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convdiff import accel
from convdiff.errors import OptionError, ResourceError
from convdiff.orders import EXACT_BLOCK_TERMS

ENV_LIMIT = "CONVDIFF_MEMORY_LIMIT"
_MEMINFO = Path("/proc/meminfo")

# Bytes per element, from the measurements in the module docstring (rounded up).
BOUNDED_PATCH = 8 * 3
BOUNDED_ELEMENTWISE = 8 * 11
BOUNDED_WEIGHT = 8 * 4
# Orders that hold float64 products of a block of outputs, and bytes per product; the block
# holds orders.EXACT_BLOCK_TERMS terms.
PRODUCT_ORDERS = {"exact": 8}


# --------------------------------------------------------------------------- available memory


def available_bytes() -> int | None:
    """Memory this process may still use: ``CONVDIFF_MEMORY_LIMIT`` when set, else the kernel's
    ``MemAvailable`` estimate; None where neither is known (then nothing is refused).

    Raises:
        OptionError: ``CONVDIFF_MEMORY_LIMIT`` is not a whole number of bytes.
    """
    limit = os.environ.get(ENV_LIMIT)
    if limit is not None and limit.strip():
        try:
            value = int(limit.strip())
        except ValueError:
            value = -1
        if value < 0:
            raise OptionError(
                f"{ENV_LIMIT} must be a whole number of bytes; received {limit!r}"
            ) from None
        return value
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


# Whether pause_collector() disabled Python's cycle collector (and resume_collector() has not
# yet turned it back on)
_COLLECTOR_PAUSED = False


def pause_collector() -> None:
    """Turn Python's cycle collector off for a run's start-up, until :func:`resume_collector`.

    Importing Keras and TensorFlow and loading a model make some million Python objects, and
    every few hundred thousand of them the collector walks all the objects made so far (a
    "generation 2" collection) looking for unreachable cycles: measured on a 2-core machine
    slow at Python, about 0.8 to 1 s of a run went to collections, nearly all of them during
    start-up, which frees next to nothing (modules, classes and the model live to the end).
    Meant for the command line's console entry, a process that ends with the run; a library
    caller's process, or one that goes on after the command (:func:`convdiff.cli.invoke`),
    is left as it is.
    """
    global _COLLECTOR_PAUSED
    if gc.isenabled():
        gc.disable()
        _COLLECTOR_PAUSED = True


def resume_collector() -> None:
    """Turn a collector :func:`pause_collector` paused back on, with every object alive now set
    aside (``gc.freeze``): later collections walk only what the comparison makes. Nothing
    where the collector was not paused here (a library caller's process).

    The start-up's unreachable cycles stay in memory (some 15 to 20 MB for ResNet50); so
    does what the frozen objects hold, as it would anyway.
    """
    global _COLLECTOR_PAUSED
    if _COLLECTOR_PAUSED:
        _COLLECTOR_PAUSED = False
        gc.freeze()
        gc.enable()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory(limit_bytes: int = KEEP_FREED_BYTES) -> bool:
    """Ask glibc's malloc to reuse freed blocks of up to ``limit_bytes`` instead of handing
    them back to the kernel; returns whether it could (False off glibc).

    A layer's statistics and bounds make a few dozen temporary arrays of its output's size,
    one after another. By default glibc maps each large block afresh and unmaps it on free,
    so every temporary pays a page fault per 4 KiB page (the kernel also zeroes each page):
    measured on a 2-core VM, ``metrics.compare`` of an 800k-element layer took 97 ms that
    way and 46 ms with freed blocks kept. Kept blocks are reused by the next temporaries, so
    peak resident memory stays near the peak in use. Meant for the command line (a process
    of its own); a library caller's process is left as it is.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    if mallopt is None:
        return False
    # blocks below the mmap threshold come from the heap; the heap's top is only trimmed
    # (returned to the kernel) when more than the trim threshold is free there
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, limit_bytes)
    )


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _source() -> str:
    return f" (limit set by {ENV_LIMIT})" if os.environ.get(ENV_LIMIT, "").strip() else ""


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse one array larger than the memory available (e.g. an input file's header that
    declares a huge shape), before it is allocated.

    Raises:
        ResourceError: ``nbytes`` exceeds :func:`available_bytes`.
    """
    available = available_bytes()
    if available is not None and nbytes > available:
        raise ResourceError(
            f"{what} needs {format_bytes(nbytes)} of memory but {format_bytes(available)} is "
            f"available{_source()}"
        )


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak of a run's memory and where it happens.

    Attributes:
        total: bytes at the peak.
        layer: the layer being compared at the peak (None for a model without layers).
        held: bytes of activations held at the peak.
        working: bytes of that layer's outputs and working memory.
        batch: the inputs' batch size (None when the inputs have no axes).
    """

    total: int
    layer: str | None = None
    held: int = 0
    working: int = 0
    batch: int | None = None


def estimate(
    model: Any, inputs: Sequence[np.ndarray], order: Any = None, mode: str = "isolated"
) -> MemoryEstimate:
    """The memory a run of ``model`` on ``inputs`` needs at its peak (see the module docstring).

    Args:
        model: a Keras model or its :class:`~convdiff.graph.Graph`.
        inputs: the fitted input arrays, in model input order.
        order: an :class:`~convdiff.orders.Order` or an order name (``float64`` and ``exact``
            need more).
        mode: ``isolated`` or ``propagated`` (the same figure: both sides' values are held).
    """
    from convdiff.graph import as_graph
    from convdiff.runner import KERAS_AHEAD

    del mode  # both modes keep Keras's and the NumPy side's value of every live tensor
    graph = as_graph(model)
    sizes = _tensor_sizes(graph.model, graph, inputs)
    order_name = getattr(order, "name", order) or "sequential"
    remaining = graph.consumers()
    live = {k: sizes[k][0] * sizes[k][1] for k in graph.inputs}
    peak = MemoryEstimate(total=sum(live.values()), batch=_batch(inputs))
    # per layer, what Keras's thread holds for it while it waits in the queue
    ahead_bytes = [
        2 * sum(sizes[k][0] * sizes[k][1] for k in node.outputs) + _weight_bytes(node.layer)
        for node in graph.nodes
    ]
    for index, node in enumerate(graph.nodes):
        ins = [sizes[k] for k in node.inputs]
        outs = [sizes[k] for k in node.outputs]
        working = 3 * sum(n * b for n, b in outs) + _working(node.layer, ins, outs, order_name)
        # what Keras's thread holds early: the layers queued and the one it is calling
        ahead = sum(ahead_bytes[index + 1 : index + 2 + KERAS_AHEAD])
        held = sum(live.values()) + ahead
        if held + working > peak.total:
            peak = MemoryEstimate(held + working, node.name, held, working, peak.batch)
        for key in node.inputs:
            remaining[key] -= 1
            if remaining[key] <= 0:
                live.pop(key, None)
        for key, (n, b) in zip(node.outputs, outs, strict=True):
            if remaining[key] > 0:
                live[key] = 2 * n * b
    return peak


def estimate_bytes(model: Any, inputs: Sequence[np.ndarray], order: Any = None) -> int:
    """:func:`estimate`'s peak in bytes."""
    return estimate(model, inputs, order).total


def check_memory(needed: int | MemoryEstimate, available: int | None = None) -> None:
    """Stop before the run when it needs more memory than is available.

    Args:
        needed: bytes, or the :class:`MemoryEstimate` (its message then names the layer).
        available: bytes available; by default :func:`available_bytes`.

    Raises:
        ResourceError: with a message suggesting a smaller batch or ``--layers``.
    """
    peak = needed if isinstance(needed, MemoryEstimate) else MemoryEstimate(int(needed))
    available = available_bytes() if available is None else available
    if available is None or peak.total <= available:
        return
    where = (
        f" at layer {peak.layer!r} ({format_bytes(peak.held)} of activations held, "
        f"{format_bytes(peak.working)} for the layer itself)"
        if peak.layer
        else ""
    )
    batch = f" (the input's batch is {peak.batch})" if peak.batch else ""
    raise ResourceError(
        f"the comparison needs about {format_bytes(peak.total)} of memory{where} but "
        f"{format_bytes(available)} is available{_source()}; use a smaller batch{batch} "
        "or compare fewer layers with --layers"
    )


# --------------------------------------------------------------------------- shapes


def _batch(inputs: Sequence[np.ndarray]) -> int | None:
    shapes = [np.shape(x) for x in inputs]
    return int(shapes[0][0]) if shapes and shapes[0] else None


def _tensor_sizes(model: Any, graph: Any, inputs: Sequence[np.ndarray]) -> dict[int, tuple]:
    """``key -> (elements, itemsize)`` for every tensor of the graph, from Keras's symbolic
    shapes with the batch axis filled in; any other free axis is found by tracing the model
    on the inputs' shapes (no computation)."""
    sizes: dict[int, tuple[int, int]] = {
        k: (int(np.size(x)), np.asarray(x).dtype.itemsize)
        for k, x in zip(graph.inputs, inputs, strict=True)
    }
    batch = _batch(inputs) or 1
    symbolic = _symbolic_tensors(model)
    unknown = False
    for node in graph.nodes:
        for key in node.outputs:
            shape = _concrete(getattr(symbolic.get(key), "shape", None), batch)
            if shape is None:
                unknown = True
                break
            sizes[key] = (math.prod(shape), _itemsize(symbolic[key]))
    if unknown:
        sizes.update(_traced_sizes(graph, inputs))
    return sizes


def _concrete(shape: Any, batch: int) -> tuple[int, ...] | None:
    if shape is None:
        return None
    dims = [batch if i == 0 and n is None else n for i, n in enumerate(shape)]
    return None if any(n is None for n in dims) else tuple(int(n) for n in dims)


def _itemsize(tensor: Any) -> int:
    try:
        return np.dtype(str(getattr(tensor, "dtype", "float32"))).itemsize
    except TypeError:
        return 4  # bfloat16 and other names numpy does not know: at most 4 here


def _functional(model: Any) -> Any:
    inner = getattr(model, "_functional", None)  # a built Sequential wraps a Functional
    return inner if inner is not None else model


def _symbolic_tensors(model: Any) -> dict[int, Any]:
    """Every Keras tensor of ``model`` and its nested models, by ``id`` (the graph's keys)."""
    found: dict[int, Any] = {}
    stack = [_functional(model)]
    while stack:
        current = stack.pop()
        for t in [*current.inputs, *current.outputs]:
            found[id(t)] = t
        for nodes in current._nodes_by_depth.values():
            for node in nodes:
                for t in [*node.input_tensors, *node.outputs]:
                    found[id(t)] = t
                inner = _functional(node.operation)
                if inner is not current and hasattr(inner, "_nodes_by_depth"):
                    stack.append(inner)
    return found


def _traced_sizes(graph: Any, inputs: Sequence[np.ndarray]) -> dict[int, tuple[int, int]]:
    """Output sizes of every node, from one symbolic pass of the graph on the inputs' shapes
    (Keras's ``compute_output_spec``: TensorFlow builds the graph, computes nothing)."""
    import keras
    from keras.src import backend

    def walk(*values: Any) -> dict[int, Any]:
        known = dict(zip(graph.inputs, values, strict=True))
        for node in graph.nodes:
            outs = node.call([known[k] for k in node.inputs])
            known.update(zip(node.outputs, outs, strict=True))
        return known

    specs = [keras.KerasTensor(np.shape(x), str(np.asarray(x).dtype)) for x in inputs]
    traced = backend.compute_output_spec(walk, *specs)
    return {
        k: (math.prod(int(n) for n in t.shape), _itemsize(t))
        for k, t in traced.items()
        if hasattr(t, "shape") and all(n is not None for n in t.shape)
    }


# --------------------------------------------------------------------------- working memory


def _working(
    layer: Any, ins: list[tuple[int, int]], outs: list[tuple[int, int]], order: str
) -> int:
    """Bytes a layer's comparison allocates beyond the held activations and its outputs."""
    in_elements = sum(n for n, _ in ins)
    out_elements = sum(n for n, _ in outs)
    itemsize = max([b for _, b in outs] or [4])
    config = _config(layer)
    weights = [tuple(w.shape) for w in getattr(layer, "weights", [])]
    patch, reduction = _patch_and_reduction(
        type(layer).__name__, config, weights, in_elements, out_elements
    )
    working = (
        BOUNDED_PATCH * patch
        + BOUNDED_ELEMENTWISE * (in_elements + out_elements)
        + BOUNDED_WEIGHT * sum(math.prod(s) for s in weights)
        + itemsize * (patch + in_elements + out_elements)
    )
    return working + _order_bytes(order, reduction, out_elements, itemsize)


def _order_bytes(order: str, reduction: int, out_elements: int, itemsize: int) -> int:
    """What the order itself holds for a block of outputs: the NumPy engine's ``exact`` order
    its float64 products; compiled (float32 operands with numba) it holds no products, only
    its double-double state of three float64 numbers per output of the block."""
    if order not in PRODUCT_ORDERS:
        return 0
    if itemsize == 4 and accel.exact_compiles(np.float32, np.float32):
        block_outputs = max(1, EXACT_BLOCK_TERMS // max(reduction, 1))
        return 3 * 8 * min(out_elements, block_outputs)
    products = min(reduction * out_elements, max(reduction, EXACT_BLOCK_TERMS))
    return PRODUCT_ORDERS[order] * products


def _weight_bytes(layer: Any) -> int:
    """Bytes of the layer's weights (the copies :func:`convdiff.graph.layer_spec` reads)."""
    return sum(math.prod(w.shape) * _itemsize(w) for w in getattr(layer, "weights", []))


def _config(layer: Any) -> dict[str, Any]:
    try:
        config = layer.get_config()
    except Exception:  # a layer that cannot describe itself: no geometry to read
        return {}
    return config if isinstance(config, dict) else {}


def _patch_and_reduction(
    class_name: str,
    config: dict[str, Any],
    weights: list[tuple[int, ...]],
    in_elements: int,
    out_elements: int,
) -> tuple[int, int]:
    """Elements of the layer's patch buffer and the length of its reduction (1 if none)."""
    kernel = next((s for s in weights if len(s) >= 2), None)
    if "kernel_size" in config and kernel is not None:
        return _conv_patch(config, kernel, out_elements)
    if "pool_size" in config:
        # a maximum reduces its windows (strided views) in place, bound and scale included;
        # an average's sum copies them, as a convolution's patches
        copied = not class_name.startswith("MaxPooling")
        return copied * out_elements * math.prod(_ints(config["pool_size"])), 1
    if kernel is not None:  # Dense, EinsumDense: the input itself is the patch
        return in_elements, math.prod(kernel[:-1])
    return 0, 1


def _conv_patch(config: dict[str, Any], kernel: tuple[int, ...], out_elements: int):
    """Patch elements and reduction length of a convolution (plain, transposed, depthwise or
    separable): one window of ``taps`` per output position and input channel."""
    taps = math.prod(_ints(config["kernel_size"]))
    multiplier = config.get("depth_multiplier")
    if multiplier is None:
        # (*k, C/groups, F), or (*k, F, C) transposed: either way C/groups per filter
        filters = int(config.get("filters") or kernel[-1])
        per_group = math.prod(kernel) // max(taps * filters, 1)
        positions = out_elements // max(filters, 1)
        return positions * taps * per_group * int(config.get("groups") or 1), taps * per_group
    channels = kernel[-2]  # the depthwise kernel (*k, C, multiplier) comes first
    filters = int(config.get("filters") or channels * int(multiplier))
    positions = out_elements // max(filters, 1)
    depthwise = positions * taps * channels
    if "filters" not in config:
        return depthwise, taps
    pointwise = positions * channels * int(multiplier)  # SeparableConv's 1x1 stage
    return depthwise + pointwise, max(taps, channels * int(multiplier))


def _ints(value: Any) -> list[int]:
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    return [int(value)]
