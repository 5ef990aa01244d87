"""``--order auto``: reveal each layer's summation trees on this machine's TensorFlow.

For a layer whose NumPy kernel reduces (Conv1D/2D/3D, DepthwiseConv, SeparableConv, the
transposed convolutions, Dense), this module asks TensorFlow, through the same Keras op the
layer calls (``ops.conv``, ``ops.depthwise_conv``, ``ops.matmul``...) on the layer's exact
problem (input shape and batch, kernel shape, strides, padding, dilation, data format, dtype,
in this process and so with its thread count and oneDNN setting), how it adds the terms of
each output, with the probes of :mod:`convdiff.reveal`; then checks the trees found bit for bit
on random data against that op. The trees are used only to order the NumPy kernel's own
additions: every value compared stays computed by convdiff.

Which term of the reduction is which, and which output element, is read off convdiff's own
kernel: it runs once on marker values (each kernel weight its own index, an input of ones,
each reduction output its own index) with an arithmetic that records its reduction operands
instead of adding them. So every kernel's own tap order and layout are used as they are.

TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from convdiff import eigenmath
from convdiff.kernels import LayerSpec, Unsupported
from convdiff.numerics import Rounded
from convdiff.orders import Order, reduce_positions
from convdiff.reveal import Mismatch, NotATree, Revealed, patterns, reveal
from convdiff.timing import phase
from convdiff.trees import ReductionTree, from_runs

# Layer classes whose reduction is revealed, and the Keras op each one's call makes.
REVEALED_CLASSES = (
    "SeparableConv1D",
    "SeparableConv2D",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
)


class _Recorder(Rounded):
    """Records each reduction's operands (as :func:`reduce_terms` receives them) and returns
    marker values in place of its result: each output element its own number, distinct
    across the reductions of one kernel run.

    For a check (``check=True``: only the operands are read) the first operand keeps its
    terms on its first ``len(axes)`` axes (:attr:`term_axes`): a convolution's windows stay a
    strided view of the input, which merging would copy whole, for
    :func:`reduce_positions` to merge at the positions it takes; and the result is zeros
    that no page is written for, not markers."""

    def __init__(self, dtype: Any, check: bool = False) -> None:
        super().__init__(dtype, Order())
        self.dots: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.term_axes: list[int] = []
        self.check = check
        self._next = 1

    def dot(self, a, b=None, axes="k"):
        n = len(axes) if self.check else 1
        if not self.check:
            a, b = self._nest(a, b, axes)
        elif b is not None:  # Order() permutes no taps: the weights' terms merge in order
            b = b.reshape((math.prod(b.shape[:n]), *b.shape[n:]))
        self.dots.append((a, b))
        self.term_axes.append(n)
        shape = np.broadcast_shapes(a.shape[n:], () if b is None else b.shape[1:])
        if self.check:
            return np.zeros(shape)
        size = math.prod(shape)
        first, self._next = self._next, self._next + size
        return np.arange(first, first + size, dtype=np.float64).reshape(shape)


# Probing one reduction stops after PROBE_CALLS backend calls, or more for small problems:
# as many as PROBE_FLOPS of multiply-adds allow (the best tree found by then is kept). A
# tree far from the common shapes, seen through few output columns, can take thousands; the
# common shapes take 3 to 6. A count from the problem's size, not a time: what is found must
# not depend on the machine's load.
PROBE_CALLS = 128
PROBE_FLOPS = 2e10


def _max_calls(reduction: Reduction) -> int:
    terms, rows, columns = reduction.weight_index.shape[0], *reduction.output_index.shape
    flops = 2.0 * terms * rows * columns
    return int(min(4096, max(PROBE_CALLS, PROBE_FLOPS // max(flops, 1.0))))


# The float weights a reduction multiplies by (the bias is added after it).
KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")


@dataclass
class Reduction:
    """One reduction of a layer call, as the probe sees it.

    Attributes:
        key: ``(terms, output shape)``, what :meth:`Order.tree_for` looks a tree up by.
        present: ``(terms, rows)``: where each position reads an input element.
        weight_index: ``(terms, columns)``: each term's weight, as a flat index into the
            layer's kernels laid end to end (in :data:`KERNELS` order).
        output_index: ``(rows, columns)``: the element (flat) of the layer's raw output that
            holds each reduction output (for a first stage: where the next stage, set to pass
            it through, shows it).
        axes: the reduction output's axes, positions first, then columns.
    """

    key: tuple[int, tuple[int, ...]]
    present: np.ndarray
    weight_index: np.ndarray
    output_index: np.ndarray
    axes: tuple[int, ...]


def _bare_spec(spec: LayerSpec) -> LayerSpec:
    """The layer without bias and activation: its kernel's output is the reduction alone."""
    config = {**spec.config, "use_bias": False, "activation": "linear"}
    weights = {k: v for k, v in spec.weights.items() if k != "bias"}
    return replace(spec, config=config, weights=weights)


def _kernels(spec: LayerSpec) -> dict[str, np.ndarray]:
    return {k: spec.weights[k] for k in KERNELS if k in spec.weights}


def _layout(a: np.ndarray, b: np.ndarray):
    """The output shape, position axes, column axes, and ``a``, ``b`` with one axis per
    output axis."""
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    d = len(shape)
    a = a.reshape((a.shape[0], *([1] * (d + 1 - a.ndim)), *a.shape[1:]))
    b = b.reshape((b.shape[0], *([1] * (d + 1 - b.ndim)), *b.shape[1:]))
    rows = [i for i in range(d) if b.shape[1 + i] == 1]
    cols = [i for i in range(d) if i not in rows]
    if rows[:1] != [0]:
        raise NotATree("the batch axis is not the reduction's leading position axis")
    return tuple(shape), rows, cols, a, b


def _reduction(a: np.ndarray, b: np.ndarray, raw_of: np.ndarray) -> Reduction:
    """A reduction's map from its operands (``a`` from an input of ones, ``b`` holding
    1 + each weight's flat index) and ``raw_of``: for each of its outputs (flat), the raw
    output element that holds it."""
    shape, rows, cols, a, b = _layout(a, b)
    d = len(shape)
    perm = [0, *(1 + i for i in rows), *(1 + i for i in cols)]
    n_rows = math.prod(shape[i] for i in rows)
    n_cols = math.prod(shape[i] for i in cols)
    a = np.broadcast_to(
        a, (a.shape[0], *[shape[i] if i in rows else a.shape[1 + i] for i in range(d)])
    )
    present = a.transpose(perm).reshape(a.shape[0], n_rows, -1)[:, :, 0] != 0
    b = np.broadcast_to(b, (b.shape[0], *[1 if i in rows else shape[i] for i in range(d)]))
    weight_index = b.transpose(perm).reshape(b.shape[0], n_cols).astype(np.int64) - 1
    output_index = raw_of.reshape(shape).transpose([*rows, *cols]).reshape(n_rows, n_cols)
    return Reduction((a.shape[0], shape), present, weight_index, output_index, (*rows, *cols))


def map_reductions(
    kernel: Callable, spec: LayerSpec, input_shape: tuple[int, ...]
) -> list[Reduction]:
    """Which term, weight and output element is which in each of the layer's reductions (one,
    or a separable convolution's two stages).

    The kernel runs once on one sample (batch 1): weights replaced by their own flat index
    (plus 1, the kernels laid end to end), an input of ones, each reduction's outputs by
    marker numbers. The batch axis leads both the positions and the raw output, so the other
    samples repeat the first one's map.
    """
    bare = _bare_spec(spec)
    kernels = _kernels(bare)
    offset, marked = 1, {}
    for name, w in kernels.items():
        marked[name] = np.arange(offset, offset + w.size, dtype=np.float64).reshape(w.shape)
        offset += w.size
    recorder = _Recorder(np.float64)
    one = (1, *input_shape[1:])
    out = (
        np.asarray(
            kernel(
                replace(bare, weights={**bare.weights, **marked}, dtype="float64"),
                [np.ones(one)],
                recorder,
            )
        )
        .reshape(-1)
        .astype(np.int64)
    )
    dots = [(a, b) for a, b in recorder.dots if b is not None]
    if len(dots) < len(recorder.dots):  # no weights to probe a plain sum through
        raise NotATree("a sum without weights")
    *inner, (a_last, b_last) = dots
    if len(inner) > 1:
        raise NotATree(f"{len(dots)} reductions in one layer")
    first_last = out.min()  # the last reduction's markers start here
    raw_of = np.empty(out.size, np.int64)
    raw_of[out - first_last] = np.arange(out.size)
    last = _reduction(a_last, b_last, raw_of)
    found = [last]
    if inner:
        found = [_first_stage(inner[0], last), _second_stage(inner[0], last)]
    return [_batched(r, input_shape[0], out.size) for r in found]


def _first_stage(dot: tuple[np.ndarray, np.ndarray], last: Reduction) -> Reduction:
    """A separable convolution's depthwise stage, seen through the pointwise stage set to
    pass depthwise channel ``c`` to output channel ``c`` (as many as there are outputs)."""
    a, b = dot
    stage = _reduction(
        a, b, np.zeros(math.prod(np.broadcast_shapes(a.shape[1:], b.shape[1:])), np.int64)
    )
    shown = min(stage.weight_index.shape[1], last.output_index.shape[1])
    return replace(
        stage,
        weight_index=stage.weight_index[:, :shown],
        output_index=last.output_index[:, :shown],
    )


def _second_stage(dot: tuple[np.ndarray, np.ndarray], last: Reduction) -> Reduction:
    """A separable convolution's pointwise stage, its input passed through the depthwise stage
    by one tap of weight 1 (the tap that reads padding least): the positions that tap reads
    from padding see zeros."""
    first = _reduction(
        *dot,
        np.zeros(1, np.int64).repeat(
            math.prod(np.broadcast_shapes(dot[0].shape[1:], dot[1].shape[1:]))
        ),
    )
    tap = int(np.argmax(first.present.sum(axis=1)))
    present = np.broadcast_to(first.present[tap], last.present.shape).copy()
    return replace(last, present=present)


def _batched(r: Reduction, batch: int, per_sample: int) -> Reduction:
    """A batch-1 map repeated for every sample."""
    rows = r.present.shape[1]
    offsets = (np.arange(batch) * per_sample)[:, None, None]
    output_index = (r.output_index[None] + offsets).reshape(batch * rows, -1)
    terms, shape = r.key
    return replace(
        r,
        key=(terms, (batch, *shape[1:])),
        present=np.tile(r.present, (1, batch)),
        output_index=output_index,
    )


def raw_op(layer: Any, class_name: str) -> Callable[..., np.ndarray]:
    """The Keras op the layer's ``call`` makes for its reduction (no bias, no activation):
    a function of the input and the kernels (in :data:`KERNELS` order)."""
    import keras

    ops = keras.ops
    common = (
        {"dilation_rate": layer.dilation_rate, "data_format": layer.data_format}
        if (class_name != "Dense")
        else {}
    )

    def numpy(y) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(y))

    if class_name == "Dense":
        return lambda x, k: numpy(ops.matmul(x, k))
    if class_name.startswith("Depthwise"):
        return lambda x, k: numpy(
            ops.depthwise_conv(x, k, strides=layer.strides, padding=layer.padding, **common)
        )
    if class_name.startswith("Separable"):
        return lambda x, dk, pk: numpy(
            ops.separable_conv(x, dk, pk, strides=layer.strides, padding=layer.padding, **common)
        )
    if class_name.endswith("Transpose"):
        return lambda x, k: numpy(
            ops.conv_transpose(
                x,
                k,
                strides=list(layer.strides),
                padding=layer.padding,
                output_padding=layer.output_padding,
                **common,
            )
        )

    def conv(x, k):
        padding = layer.padding
        if padding == "causal":  # as Conv1D.call: pad the input, then a 'valid' convolution
            width = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            pads = [[0, 0], [width, 0], [0, 0]]
            if layer.data_format == "channels_first":
                pads = [[0, 0], [0, 0], [width, 0]]
            x, padding = ops.pad(x, pads), "valid"
        return numpy(ops.conv(x, k, strides=list(layer.strides), padding=padding, **common))

    return conv


@dataclass
class LayerBackend:
    """One reduction of a layer as a :class:`~convdiff.reveal.TermBackend`: its weights set
    from the probe's, the layer's other kernels (a separable convolution's other stage) set
    to pass values through unchanged."""

    reduction: Reduction
    op: Callable[..., np.ndarray]
    input_shape: tuple[int, ...]
    kernel_shapes: dict[str, tuple[int, ...]]
    dtype: np.dtype
    passing: dict[str, np.ndarray] = field(default_factory=dict)
    calls: int = 0
    _inputs: dict[float, Any] = field(default_factory=dict, repr=False)

    @property
    def terms(self) -> int:
        return self.reduction.present.shape[0]

    @property
    def rows(self) -> int:
        return self.reduction.present.shape[1]

    @property
    def columns(self) -> int:
        return self.reduction.weight_index.shape[1]

    def present(self) -> np.ndarray:
        return self.reduction.present

    @functools.cached_property
    def row_patterns(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~convdiff.reveal.patterns` of the reduction's rows: found once for the
        reveal's probers and the check (a pass over every term of every row)."""
        return patterns(self.reduction.present)

    @functools.cached_property
    def _in_rows(self) -> bool:
        """Whether term ``k``'s weight for column ``c`` is element ``k * columns + c`` of the
        kernels laid end to end, for every term and column (a Conv2D or Dense kernel)."""
        index = self.reduction.weight_index
        terms, columns = index.shape
        return bool(np.array_equal(index, np.arange(terms * columns).reshape(terms, columns)))

    def run(
        self, fill: float, weights: np.ndarray, columns: np.ndarray | None = None
    ) -> np.ndarray:
        n = weights.shape[1]
        cols = slice(0, n) if columns is None else np.asarray(columns)
        flat = self._flat
        if self._in_rows:
            # one strided copy, where a scatter through the index costs several times more
            # (a Dense layer's 2048 x 1000 weights, once per probe call)
            where = flat[: weights.shape[0] * self.columns].reshape(-1, self.columns)
            index: Any = (slice(None), cols)
            values = weights
        else:
            indices = self.reduction.weight_index[:, cols]
            valid = indices >= 0
            where, index, values = flat, indices[valid], weights[valid]
        where[index] = values
        try:
            raw = self.call(self._filled(fill), self._split(flat)).reshape(-1)
        finally:
            where[index] = 0  # the kernels weigh 0 again: the next probe writes its own
        return raw[self.reduction.output_index[:, cols]]

    @functools.cached_property
    def _flat(self) -> np.ndarray:
        """The kernels laid end to end, all zero between probe calls: each call writes its
        weights in and takes them out again, where a fresh array per call would clear (and
        the backend read) the whole kernel every time (8 MB for ResNet50's Dense layer)."""
        return np.zeros(sum(math.prod(s) for s in self.kernel_shapes.values()), self.dtype)

    def _filled(self, fill: float) -> Any:
        """An input of ``fill`` everywhere, made (and handed to the backend) once per value."""
        if fill not in self._inputs:
            import keras

            x = np.full(self.input_shape, fill, self.dtype)
            self._inputs[fill] = keras.ops.convert_to_tensor(x)
        return self._inputs[fill]

    def call(self, x: np.ndarray, kernels: dict[str, np.ndarray]) -> np.ndarray:
        """The raw op on ``x`` with ``kernels``, the passing stage's in place of its own."""
        return self.raw(x, {**kernels, **self.passing})

    def raw(self, x: np.ndarray, kernels: dict[str, np.ndarray]) -> np.ndarray:
        """The raw op on ``x`` with ``kernels`` (by name)."""
        self.calls += 1
        return self.op(x, *(kernels[k] for k in self.kernel_shapes))

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for name, shape in self.kernel_shapes.items():
            size = math.prod(shape)
            out[name] = flat[at : at + size].reshape(shape)
            at += size
        return out


def _pass_through(
    spec: LayerSpec, stage: int, reductions: list[Reduction]
) -> dict[str, np.ndarray]:
    """A separable convolution's other stage, set to pass values through: for the depthwise
    stage, the pointwise kernel maps depthwise channel ``c`` to output ``c``; for the pointwise
    stage, the depthwise kernel has weight 1 at the tap that reads padding least."""
    depth = spec.weights["depthwise_kernel"]
    point = spec.weights["pointwise_kernel"]
    dtype = np.dtype(spec.dtype)
    if stage == 0:
        k = np.zeros(point.shape, dtype)
        shown = reductions[0].weight_index.shape[1]
        k[..., np.arange(shown), np.arange(shown)] = 1
        return {"pointwise_kernel": k}
    tap = int(np.argmax(reductions[0].present.sum(axis=1)))
    k = np.zeros(depth.shape, dtype)
    k.reshape(-1, *depth.shape[-2:])[tap] = 1
    return {"depthwise_kernel": k}


def verify(
    kernel: Callable,
    spec: LayerSpec,
    backends: list[LayerBackend],
    trees: list[ReductionTree],
    seed: int = 0,
) -> Mismatch:
    """Which outputs of the layer's raw op, on random input and the layer's own weights,
    differ from the NumPy kernel's reduction in the trees found (none: reproduced bit for bit).
    One reduction is checked at a sample of positions that holds every tree's positions and
    every padding pattern; a separable convolution is checked whole."""
    first = backends[0]
    dtype = first.dtype
    x, rng = _random_input(first.input_shape, dtype, seed)
    bare = _bare_spec(spec)
    raw = first.raw(x, {k: v.astype(dtype) for k, v in _kernels(bare).items()})
    order = Order(
        name="auto", trees=tuple((b.reduction.key, t) for b, t in zip(backends, trees, strict=True))
    )
    if len(backends) > 1:
        got = np.asarray(kernel(bare, [x], Rounded(dtype, order)))
        return Mismatch(int(_differences(got, raw).sum()), np.empty(0, int), np.empty(0, int))
    rec = _Recorder(dtype, check=True)
    kernel(bare, [x], rec)
    a, b = rec.dots[0]
    return _check_rows(first, trees[0], (a, b, rec.term_axes[0]), raw, rng)


def verify_stage(
    kernel: Callable,
    spec: LayerSpec,
    backend: LayerBackend,
    stage: int,
    tree: ReductionTree,
    seed: int = 0,
) -> Mismatch:
    """One stage of a separable convolution checked alone, as :func:`verify` checks one
    reduction: the other stage set to pass values through (as the probes set it), so that
    the raw op's output is this stage's reduction exactly. A check of both stages together
    cannot tell which stage, position or column differs; this one can, and so lets the
    reveal find a tail of output columns or a position that takes another kernel."""
    dtype = backend.dtype
    x, rng = _random_input(backend.input_shape, dtype, seed)
    bare = _bare_spec(spec)
    kernels = {**{k: v.astype(dtype) for k, v in _kernels(bare).items()}, **backend.passing}
    raw = backend.raw(x, kernels)
    try:
        kernel(
            replace(bare, weights={**bare.weights, **kernels}), [x], _StageOperands(dtype, stage)
        )
    except _Operands as found:
        return _check_rows(backend, tree, (found.a, found.b, 1), raw, rng)
    raise NotATree(f"the kernel made no reduction {stage}")  # not reached: two stages


# The last random input the checks drew: (shape, dtype, seed), the input (read-only) and the
# generator's state after the draw. One slot, replaced whole (a reader sees an old entry or a
# new one, never half of one).
_LAST_INPUT: list[tuple[tuple, np.ndarray, Any] | None] = [None]


def _random_input(shape, dtype: Any, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """A standard-normal input of ``shape`` drawn from ``seed``, and the generator as the draw
    left it (the check samples its rows from it).

    The last input drawn is kept, read-only, and handed out again with that generator state:
    the same numbers and the same rows as a new draw. Layers in a row often take inputs of
    one shape (a ResNet stage's convolutions, a guessed tree checked again), and at a batch
    of 8 drawing a layer's input costs about as much as the raw op's call on it. One input is
    held at a time, never more than one layer's input."""
    key = (tuple(shape), np.dtype(dtype).str, seed)
    rng = np.random.default_rng(seed)
    last = _LAST_INPUT[0]
    if last is not None and last[0] == key:
        rng.bit_generator.state = last[2]
        return last[1], rng
    _LAST_INPUT[0] = None  # the old input is freed before the new one is drawn
    x = rng.standard_normal(shape, dtype=dtype)
    x.setflags(write=False)
    _LAST_INPUT[0] = (key, x, rng.bit_generator.state)
    return x, rng


def _check_rows(
    backend: LayerBackend,
    tree: ReductionTree,
    operands: tuple[np.ndarray, np.ndarray | None, int],
    raw: np.ndarray,
    rng: np.random.Generator,
) -> Mismatch:
    """The reduction of ``operands`` (``a``, ``b``, and the axes ``a`` holds its terms on)
    in ``tree`` against the raw op's output, at a sample of positions
    (:func:`_sample_rows`), in the columns the reduction shows."""
    a, b, term_axes = operands
    reduction = backend.reduction
    rows = _sample_rows(tree, backend, rng)
    order = Order(name="auto", trees=((reduction.key, tree),))
    want = raw.reshape(-1)[reduction.output_index[rows]]
    got = reduce_positions(a, b, order, backend.dtype, rows, term_axes)
    got = got.reshape(len(rows), -1)
    differ = _differences(got[:, : want.shape[1]], want)
    return Mismatch(int(differ.sum()), rows[differ.any(axis=1)], np.flatnonzero(differ.any(axis=0)))


class _Operands(Exception):
    """The operands of the reduction :class:`_StageOperands` was looking for."""

    def __init__(self, a: np.ndarray, b: np.ndarray | None) -> None:
        super().__init__("operands")
        self.a, self.b = a, b


class _StageOperands(Rounded):
    """Runs a separable kernel whose other stage passes values through, up to reduction
    ``stage``, and raises :class:`_Operands` with that reduction's operands. A stage that
    passes values through has one nonzero term per output: its float64 sum is exact."""

    def __init__(self, dtype: Any, stage: int) -> None:
        super().__init__(dtype, Order())
        self.stage, self._seen = stage, 0

    def dot(self, a, b=None, axes="k"):
        a, b = self._nest(a, b, axes)
        if self._seen == self.stage:
            raise _Operands(a, b)
        self._seen += 1
        product = a.astype(np.float64) if b is None else a.astype(np.float64) * b
        return product.sum(axis=0).astype(self.dtype)


def _differences(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return ~((got == want) | (np.isnan(got) & np.isnan(want)))


# Positions of each tree checked on random data (all of a tree's that has fewer), beside one
# of each padding pattern.
VERIFY_ROWS = 48


def _sample_rows(
    tree: ReductionTree, backend: LayerBackend, rng: np.random.Generator
) -> np.ndarray:
    rows = backend.rows
    mine = np.zeros(rows, bool)
    picked: list[np.ndarray] = []
    for runs, _ in tree.exceptions:
        members = np.array(from_runs(runs), np.int64)
        mine[members] = True
        picked.append(_some(members, rng))
    picked.append(_some(np.flatnonzero(~mine), rng))
    _, inverse = backend.row_patterns
    _, first = np.unique(inverse, return_index=True)
    picked.append(first[:256])
    return np.unique(np.concatenate(picked))


def _some(members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if members.size <= VERIFY_ROWS:
        return members
    return rng.choice(members, VERIFY_ROWS, replace=False)


def _stage_check(
    kernel: Callable, spec: LayerSpec, backend: LayerBackend, stage: int
) -> Callable[[ReductionTree], Mismatch]:
    return lambda tree: verify_stage(kernel, spec, backend, stage, tree)


def reveal_layer(
    layer: Any, kernel: Callable, spec: LayerSpec, input_shape
) -> tuple[list[tuple[tuple[int, tuple[int, ...]], Revealed]], int]:
    """Reveal and verify the trees of one layer call (no cache): each reduction's key and
    what was found, and how many outputs the verification found different. Guessed trees
    that fail the check are revealed again by FPRev's full recursion."""
    input_shape = tuple(input_shape)
    reductions = map_reductions(kernel, spec, input_shape)
    op = raw_op(layer, spec.class_name)
    shapes = {k: tuple(v.shape) for k, v in _kernels(spec).items()}
    backends = [
        LayerBackend(
            r,
            op,
            input_shape,
            shapes,
            np.dtype(spec.dtype),
            _pass_through(spec, i, reductions) if len(reductions) > 1 else {},
        )
        for i, r in enumerate(reductions)
    ]
    if len(backends) == 1:
        check = lambda t: verify(kernel, spec, backends, [t])  # noqa: E731
        found = [reveal(backends[0], check=check, max_calls=_max_calls(reductions[0]))]
        bad = found[0].mismatches or 0
    else:  # a separable convolution: each stage checked alone, then both as the op runs them
        found = [
            reveal(
                b,
                check=_stage_check(kernel, spec, b, i),
                max_calls=_max_calls(b.reduction),
            )
            for i, b in enumerate(backends)
        ]
        bad = verify(kernel, spec, backends, [f.tree for f in found]).count
    calls = sum(b.calls for b in backends)
    return [
        (b.reduction.key, Revealed(f.tree, calls)) for b, f in zip(backends, found, strict=True)
    ], bad


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """What ``auto`` found for one layer call.

    Attributes:
        status: ``reproduced`` (the trees matched TensorFlow bit for bit on random data),
            ``not reproduced`` (trees found, but the check found differences), ``not a tree``
            (the backend's answers fit no summation tree, or the layer's arithmetic is not
            one), or ``not revealed`` (a reduction ``auto`` does not probe: the sequential order).
        text: the order in words.
        trees: ``(key, tree)`` pairs for :class:`~convdiff.orders.Order`.
        calls: backend calls the reveal and its check made (0 from the cache).
        cached: read from the on-disk cache.
        mismatches: outputs the check found different.
        functions: library functions of the layer computed by a model of TensorFlow's own
            algorithm (checked bit for bit on this machine), not rounded from their exact value.
    """

    status: str
    text: str
    trees: tuple[tuple[tuple[int, tuple[int, ...]], ReductionTree], ...] = ()
    calls: int = 0
    cached: bool = False
    mismatches: int = 0
    functions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "description": self.text,
            "trees": [
                {"terms": key[0], "output_shape": list(key[1]), **tree.to_dict()}
                for key, tree in self.trees
            ],
            "probe_calls": self.calls,
            "cached": self.cached,
            "mismatches": self.mismatches,
            "functions_modelled": list(self.functions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        trees = tuple(
            (
                (int(t["terms"]), tuple(int(n) for n in t["output_shape"])),
                ReductionTree.from_dict(t),
            )
            for t in data["trees"]
        )
        functions = tuple(str(f) for f in data.get("functions_modelled", []))
        return cls(
            data["status"], data["description"], trees, 0, True, int(data["mismatches"]), functions
        )


def find_order(
    layer: Any,
    kernel: Callable,
    spec: LayerSpec,
    input_shapes: list[tuple[int, ...]],
    cache: bool = True,
) -> Finding | None:
    """The summation order of one layer call on this machine: from the cache, or revealed,
    checked and stored. None where the layer has nothing ``auto`` concerns (no reduction, no
    library function)."""
    if spec.class_name not in REVEALED_CLASSES:
        return _unrevealed(kernel, spec, input_shapes)
    from convdiff import treecache

    weights = {k: tuple(v.shape) for k, v in spec.weights.items()}
    key = treecache.full_key(
        treecache.layer_key(spec.class_name, spec.config, input_shapes, weights, spec.dtype)
    )
    if cache:
        stored = treecache.load(key)
        if stored is not None:
            try:
                return Finding.from_dict(stored["finding"])
            except (KeyError, TypeError, ValueError):
                pass  # an entry of another shape: revealed again and overwritten
    with phase("reveal"):
        finding = _reveal_finding(layer, kernel, spec, input_shapes[0])
    with contextlib.suppress(Unsupported):  # else the finding says why it was not probed
        finding = _with_functions(
            finding, _census(kernel, spec, input_shapes).functions, spec.dtype
        )
    if cache:
        treecache.store(key, {"finding": finding.to_dict()})
    return finding


def _reveal_finding(layer: Any, kernel: Callable, spec: LayerSpec, input_shape) -> Finding:
    if np.dtype(spec.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return Finding(
            "not revealed",
            f"{spec.dtype} layers are not probed (their swamping values overflow); "
            "the sequential order is used",
        )
    try:
        found, bad = reveal_layer(layer, kernel, spec, input_shape)
    except NotATree as exc:
        return Finding("not a tree", f"{exc}; the sequential order is used")
    status = "not reproduced" if bad else "reproduced"
    texts = [r.tree.describe() for _, r in found]
    text = texts[0] if len(texts) == 1 else f"depthwise: {texts[0]}; pointwise: {texts[1]}"
    if bad:
        text += f" (differs from TensorFlow on {bad} checked outputs)"
    trees = tuple((key, r.tree) for key, r in found)
    return Finding(status, text, trees, found[0][1].calls, False, bad)


class _Census(_Recorder):
    """Counts a kernel's reductions and library functions, computing only what is cheap."""

    def __init__(self, dtype: Any) -> None:
        super().__init__(dtype)
        self.sums = 0
        self.functions: list[str] = []

    def sum(self, x, axis, keepdims=False):
        self.sums += 1
        axes = tuple(axis) if isinstance(axis, (list, tuple)) else axis  # kernels pass lists
        return np.sum(np.asarray(x, np.float64), axis=axes, keepdims=keepdims).astype(self.dtype)

    def widened(self, dtype: Any, keras_accumulator: Any = None) -> _Census:
        return self  # counting only

    def accumulating_in(self, dtype: Any) -> _Census:
        return self

    def apply(self, name: str, x):
        if name not in self.functions:
            self.functions.append(name)
        return super().apply(name, x)


@dataclass(frozen=True)
class _Counted:
    """What a census found: the kernel's reductions, and its library functions in call order."""

    reductions: int
    functions: tuple[str, ...]


# Censuses of this process by layer problem: a model repeats a few dozen problems over its
# layers (ResNet50: 122 layers auto does not probe, 26 problems). Cleared when it grows large.
_COUNTED: dict[tuple[Callable, str], _Counted] = {}
_COUNTED_MOST = 4096


def _census(kernel: Callable, spec: LayerSpec, input_shapes) -> _Counted:
    """The kernel's reductions and library functions, counted on a zero input of batch 1
    (raises :class:`Unsupported` where the kernel does); once per kernel and layer problem
    (class, config but for names and initial values, shapes past the batch, weight shapes,
    dtype: what the kernel's steps depend on)."""
    from convdiff import treecache

    weights = {k: tuple(np.shape(v)) for k, v in spec.weights.items()}
    shapes = [tuple(s[1:]) for s in input_shapes]
    problem = treecache.layer_key(spec.class_name, spec.config, shapes, weights, spec.dtype)
    # repr for what JSON cannot write: an object without a repr of its own differs by address
    key = (kernel, json.dumps(problem, sort_keys=True, default=repr))
    counted = _COUNTED.get(key)
    if counted is None:
        census = _Census(spec.dtype)
        inputs = [np.zeros((1, *s), spec.dtype) for s in shapes]
        with np.errstate(all="ignore"):
            kernel(spec, inputs, census)
        counted = _Counted(len(census.dots) + census.sums, tuple(census.functions))
        if len(_COUNTED) >= _COUNTED_MOST:
            _COUNTED.clear()
        _COUNTED[key] = counted
    return counted


def _unrevealed(kernel: Callable, spec: LayerSpec, input_shapes) -> Finding | None:
    """What ``auto`` says of a layer it does not probe: its reductions take the sequential order;
    a layer without any, whose library functions (rsqrt, exp, tanh...) are TensorFlow's own
    approximations, is no summation tree at all (those it models are computed as TensorFlow
    computes them)."""
    try:
        census = _census(kernel, spec, input_shapes)
    except Unsupported:
        return None
    reductions = census.reductions
    if reductions:
        return _with_functions(
            Finding(
                "not revealed",
                f"{reductions} reduction{'s' if reductions > 1 else ''} not probed by auto "
                "(only convolutions and Dense are): the sequential order, with FMA",
            ),
            census.functions,
            spec.dtype,
        )
    if census.functions:
        modelled = _modelled(census.functions, spec.dtype)
        others = [f for f in census.functions if f not in modelled]
        texts = [_MODELLED_TEXT.format(name=f) for f in modelled]
        if others:
            texts.append(_UNMODELLED_TEXT.format(names=", ".join(others)))
        return Finding("not a tree", "no summation: " + "; ".join(texts), functions=modelled)
    return None


_MODELLED_TEXT = "{name} is TensorFlow's own float32 algorithm (Eigen's), modelled bit for bit"
_UNMODELLED_TEXT = (
    "{names} is TensorFlow's own approximation on this CPU, which convdiff does not model "
    "(it rounds the exact value)"
)


def _with_functions(finding: Finding, functions: Sequence[str], dtype: Any) -> Finding:
    """``finding`` with the layer's library functions said (a reproduced sum followed by an
    activation TensorFlow approximates still differs in the last bits) and, where modelled,
    used."""
    if not functions:
        return finding
    modelled = _modelled(functions, dtype)
    others = [f for f in functions if f not in modelled]
    text = finding.text
    if modelled:
        text += "; then " + "; ".join(_MODELLED_TEXT.format(name=f) for f in modelled)
    if others:
        text += "; then " + _UNMODELLED_TEXT.format(names=", ".join(others))
        if finding.status == "reproduced":
            text += ": the sum is reproduced, the activation may differ in the last bits"
    return replace(finding, text=text, functions=modelled)


def _modelled(functions: Sequence[str], dtype: Any) -> tuple[str, ...]:
    """Those of ``functions`` computed by a model that matches TensorFlow here (the models are
    only checked once a layer uses a function that has one: the check runs TensorFlow on some
    200,000 values, a quarter of a second)."""
    if np.dtype(dtype) != np.dtype(np.float32) or not set(functions) & set(eigenmath.MODELS):
        return ()
    exact = modelled_functions()
    return tuple(f for f in functions if f in exact)


@functools.lru_cache(maxsize=1)
def modelled_functions() -> tuple[str, ...]:
    """The library functions of :data:`convdiff.eigenmath.MODELS` whose model gives
    TensorFlow's float32 results bit for bit on this machine (checked once per process, on
    random values, extremes, subnormals, infinities, NaN, and tensors whose sizes leave a
    tail of each length after Eigen's packets)."""
    import keras

    if not eigenmath.available():
        return ()
    ops = {"sigmoid": keras.ops.sigmoid}
    found = []
    for name, model in eigenmath.MODELS.items():
        op = ops.get(name)
        if op is not None and all(
            _same_bits(model(x), np.asarray(keras.ops.convert_to_numpy(op(x))))
            for x in _function_probes()
        ):
            found.append(name)
    return tuple(found)


def _function_probes() -> list[np.ndarray]:
    """float32 tensors to check a function model on: random values, and extremes (subnormal,
    the algorithm's cut-offs, infinities, NaN) both in Eigen's packets and in each position of
    a scalar tail."""
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    special = [0.0, -0.0, 1e-40, -1e-40, f32.tiny, 16.6355324, 16.63554, 20.0, 1e30, np.inf]
    special += [-np.inf, -104.0, -104.0001, -103.99, -87.0, -87.5, -88.0, -90.0, -1e30]
    special += [f32.max, -f32.max, np.nan, 0.5, -0.5, 1.0, -1.0, 9.0, -9.0]
    values = np.concatenate(
        [
            rng.standard_normal(1 << 16) * 4,
            rng.uniform(-110, 20, 1 << 16),
            np.linspace(-120, 30, 30001),
            special,
        ]
    ).astype(np.float32)
    probes = [values, np.tile(np.asarray(special, np.float32), eigenmath.PACKET)]
    head = np.zeros(eigenmath.PACKET, np.float32)
    for tail in range(1, eigenmath.PACKET):
        picked = [*special, *rng.choice(values, 64 * tail)]
        probes += [
            np.concatenate([head, np.asarray(picked[i : i + tail], np.float32)])
            for i in range(0, len(picked), tail)
        ]
    return probes


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, every NaN alike."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.isnan(a)
    return bool(
        np.array_equal(nan, np.isnan(b))
        and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))
    )
