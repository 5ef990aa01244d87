"""Reveal the summation tree a backend uses for a reduction, by numerical probing (FPRev).

The method is that of Xie, Gao and Xue (Microsoft Research, 2024, "Revealing the Order of
Floating-Point Summation by Numerical Testing"): give every term the value 1 except term ``i``,
``+M``, and term ``j``, ``-M``, with ``M`` a power of two so large that a 1 added to a partial
sum holding ``±M`` is lost. The two meet at their lowest common ancestor, where ``M - M`` is 0
exactly, and every 1 below that node was lost on the way; every other 1 is added exactly. So
the result is ``K - |subtree(i, j)|``: each probe tells the size of the smallest subtree that
holds both terms. One sweep (a fixed ``i`` against every ``j``) gives the sizes of the subtrees
along ``i``'s path to the root; the terms of each size form the subtree that joins that path
there, and is revealed the same way (FPRev's recursion: about ``K`` times the depth in probes,
where all pairs would be ``K^2/2``).

Backends answer many probes per call: each output column (a convolution's output channel,
whose weights the probe sets) carries its own pair, and every output position (pixel, batch
row) answers for its own tree. Positions whose answers differ from the tree found at one
position get a tree of their own. A second kind of probe tells, for each chain of the tree,
whether its steps are fused multiply-adds: values whose product is inexact, added to a number
that cancels it, give different results with one rounding or with two.

This module holds the backend-independent algorithm (:func:`reveal`, driven by a
:class:`TermBackend`) and never imports TensorFlow; :mod:`convdiff.autoorder` adapts Keras
layers to it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np

from convdiff.trees import (
    Add,
    Chain,
    Join,
    Node,
    ReductionTree,
    canonical,
    chains,
    from_binary,
    post_order,
    restrict,
    signature,
    to_binary,
    to_runs,
    with_fusion,
)


class TermBackend(Protocol):
    """A reduction ``out[r, c] = sum_k a[k, r] * w[k, c]`` computed by the backend under test.

    ``a`` is the backend's first operand (the layer input as each output position ``r`` sees
    it): the probe sets every input element to one value, ``fill``, so ``a[k, r]`` is
    ``fill`` where position ``r`` reads an input element and 0 where it reads padding. ``w``
    (the weights) is free per column ``c``.

    Attributes:
        terms: ``K``.
        rows: output positions.
        columns: output columns one call can set independently.
        dtype: the dtype of the operands and of the result.
    """

    @property
    def terms(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def columns(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    def present(self) -> np.ndarray:
        """``(terms, rows)`` booleans: where ``a[k, r]`` reads an input element (not padding)."""
        ...

    def run(
        self, fill: float, weights: np.ndarray, columns: np.ndarray | None = None
    ) -> np.ndarray:
        """The backend's ``(rows, n)`` result for input ``fill`` everywhere and ``weights``
        of shape ``(terms, n)`` in output columns ``columns`` (``n`` distinct column
        numbers; default the first ``n``), every other column weighing 0."""
        ...


class NotATree(Exception):
    """The backend's answers fit no summation tree (or the trees vary too much by position)."""


# --------------------------------------------------------------------------- probing


def swamping_value(dtype: np.dtype, terms: int) -> float:
    """``M = 2**e``: a sum of up to ``terms`` ones added to ``±M`` is lost (it stays below half
    of ``M``'s last place), and ``M`` is far from overflow."""
    precision = np.finfo(dtype).nmant + 1
    return 2.0 ** (precision + math.ceil(math.log2(terms + 1)) + 2)


# A probe's answer at each row: a subtree's size in terms (at most K, far below 2**31), or -1
# (padding) or -2 (no count). Answers are (probes x rows) arrays, rows up to N*H*W.
_ANSWER = np.int32


@dataclass
class _Prober:
    """Packs lowest-common-ancestor probes into backend calls, one pair per column."""

    backend: TermBackend
    max_calls: int | None = None
    # trees found so far (for any row or class of columns): each a hypothesis for the next
    # row to reveal (:func:`_hinted`); shared with the probers of the classes of columns
    hints: list[_Hint] = field(default_factory=list)
    present: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    calls: int = 0

    def __post_init__(self) -> None:
        self.present = np.asarray(self.backend.present(), bool)
        self.counts = self.present.sum(axis=0)
        self.big = swamping_value(self.backend.dtype, self.backend.terms)
        self._answers: dict[tuple[int, int], np.ndarray] = {}
        self._columns: list[np.ndarray] | None = None

    def sizes(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """``(len(pairs), rows)``: the size of the smallest subtree holding each pair (counted
        in terms present at that row) as each row answers; -1 where a term of the pair is
        padding at that row, -2 where the answer is no count of ones. A pair probed before
        is not probed again."""
        new = list(dict.fromkeys(p for p in pairs if p not in self._answers))
        if new:
            probed = self._probe(new)
            for pair, answer in zip(new, probed, strict=True):
                self._answers[pair] = answer
            if new == pairs:  # all new and distinct: the answers as probed, in order
                return probed
        if not pairs:
            return np.empty((0, self.backend.rows), _ANSWER)
        return np.stack([self._answers[p] for p in pairs])

    @functools.cached_property
    def row_patterns(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`patterns` of every row: the distinct padding patterns, each row's number (the
        backend's own where it keeps them, found once for every prober of its columns)."""
        kept = getattr(self.backend, "row_patterns", None)
        return kept if kept is not None else patterns(self.present)

    def remember(self, node: Node) -> _Hint:
        """Keep ``node`` (its additions, fusion aside) as a hint for the rows still to reveal;
        its hint (the one kept before, where the same tree was found)."""
        binary = to_binary(node)
        mine = signature(canonical(binary))
        for hint in self.hints:
            if hint.signature == mine:
                return hint
        terms = frozenset(y for y in post_order(binary) if isinstance(y, int))
        self.hints.append(_Hint(binary, terms, mine))
        return self.hints[-1]

    def column_classes(self) -> list[np.ndarray]:
        if self._columns is None:
            self._columns = _column_classes(self)
        return self._columns

    def _probe(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty((len(pairs), self.backend.rows), _ANSWER)
        step = self.backend.columns
        for lo in range(0, len(pairs), step):
            chunk = pairs[lo : lo + step]
            weights = np.ones((self.backend.terms, len(chunk)), self.backend.dtype)
            cols = np.arange(len(chunk))
            first = np.array([i for i, _ in chunk])
            second = np.array([j for _, j in chunk])
            weights[first, cols] = self.big
            weights[second, cols] = -self.big
            y = np.ascontiguousarray(np.asarray(self.run(1.0, weights)).T)  # (n, rows)
            with np.errstate(invalid="ignore"):
                # a count of ones is a whole number from 0 to K (exact in the dtype: K is
                # far below 2**24): anything else (NaN, inf, a fraction) is no answer
                counted = (y >= 0) & (y <= self.backend.terms) & (np.floor(y) == y)
            block = out[lo : lo + len(chunk)]
            np.subtract(self.counts[None, :], y, out=block, where=counted, casting="unsafe")
            block[~counted] = -2
            block[~(self.present[first] & self.present[second])] = -1  # padding: no answer
        return out

    def run(
        self, fill: float, weights: np.ndarray, columns: np.ndarray | None = None
    ) -> np.ndarray:
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise OutOfCalls(f"no tree found within {self.max_calls} backend calls")
        self.calls += 1
        return self.backend.run(fill, weights, columns)


@dataclass
class _Hint:
    """A tree found (its binary tree of additions, its terms, its :func:`signature`), and
    the sweeps it answers (:func:`_sweep`, by first term) once computed."""

    binary: Add | int
    terms: frozenset[int]
    signature: tuple[int, ...]
    sweeps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def sweep(self, first: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_sweep` of the whole tree from ``first`` (computed once)."""
        if first not in self.sweeps:
            self.sweeps[first] = _sweep(self.binary, first)
        return self.sweeps[first]


# --------------------------------------------------------------------------- reconstruction


class _Task:
    """A set of terms known to form one subtree, to be revealed by a sweep from its first."""

    def __init__(self, terms: list[int]) -> None:
        self.terms = terms
        self.tree: _Sum | int | None = None


class _Sum:
    """A revealed addition; its children may still be tasks."""

    def __init__(self, left: _Sum | _Task | int, right: _Sum | _Task | int) -> None:
        self.left, self.right = left, right


@dataclass
class _Reconstruction:
    """One row's tree and what every row answered to the probes that revealed it.

    The lowest common ancestor of each probed pair is, in the tree found, a subtree made of
    the first ``lengths[q]`` terms of ``orders[q]`` (a sweep's terms sorted by the size of
    the subtree they join): what lets every other row's answers be predicted.
    """

    node: Node
    terms: list[int]
    answers: np.ndarray
    orders: list[np.ndarray]
    lengths: list[np.ndarray]


def _reconstruct(
    prober: _Prober, row: int, terms: list[int], sampled: bool = False
) -> _Reconstruction:
    """FPRev at one row: sweeps from each subtree's first term, all pending sweeps of a
    level packed into the same backend calls.

    ``sampled``: each sweep first probes a sample of its terms and, where the answers fit
    consecutive groups (as :func:`_guess` reads them), takes those groups without probing
    the rest; the groups are then revealed the same way (FPRev with guessed sweeps: far fewer
    probes, the result a hypothesis to check)."""
    root = _Task(sorted(terms))
    queue, answers, orders, lengths = [root], [], [], []
    while queue:
        big = [t for t in queue if len(t.terms) > 2]
        guessed = _sampled_sweeps(prober, row, big) if sampled else {}
        pairs = [(t.terms[0], j) for t in big if id(t) not in guessed for j in t.terms[1:]]
        got = prober.sizes(pairs)
        at, following = 0, []
        for task in queue:
            if len(task.terms) <= 2:
                task.tree = task.terms[0] if len(task.terms) == 1 else _Sum(*task.terms)
                continue
            if id(task) in guessed:
                sizes, probed = guessed[id(task)]
            else:
                probed = got[at : at + len(task.terms) - 1]
                sizes = probed[:, row]
                at += len(task.terms) - 1
            answers.append(probed)
            probed_sizes = probed[:, row]
            task.tree, subtasks = _resolve(task.terms, sizes)
            others = np.asarray(task.terms[1:])[np.argsort(sizes, kind="stable")]
            orders.append(np.concatenate([[task.terms[0]], others]))
            lengths.append(probed_sizes)
            following += subtasks
        queue = following
    node = from_binary(_finish(root))
    answered = np.concatenate(answers) if answers else np.empty((0, prober.backend.rows), _ANSWER)
    return _Reconstruction(node, sorted(terms), answered, orders, lengths)


def _sampled_sweeps(
    prober: _Prober, row: int, tasks: list[_Task]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For the tasks whose sampled sweep fits consecutive groups: (by task id) every term's
    subtree size as those groups give it, and the answers to the probes made (one row per
    probe, in the order :func:`_reconstruct` records them)."""
    quota = max(8, prober.backend.columns // max(1, len(tasks)))
    wanted = {id(t): _sample(len(t.terms), quota) for t in tasks}
    unchunked: set[int] = set()  # tasks whose answers fit no chunked family
    known: dict[int, dict[int, int]] = {id(t): {} for t in tasks}
    probed: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {id(t): [] for t in tasks}
    for _ in range(_GUESS_ROUNDS):
        live = [t for t in tasks if id(t) not in unchunked and wanted[id(t)].size]
        if not live:
            break
        got = prober.sizes([(t.terms[0], t.terms[i]) for t in live for i in wanted[id(t)]])
        at = 0
        for t in live:
            positions = wanted[id(t)]
            block = got[at : at + len(positions)]
            at += len(positions)
            probed[id(t)].append((positions, block))
            known[id(t)].update(zip(positions.tolist(), block[:, row].tolist(), strict=True))
            following = _unplaced(known[id(t)], len(t.terms))
            if following is None:
                unchunked.add(id(t))
            else:
                wanted[id(t)] = following
    out = {}
    for t in tasks:
        if id(t) in unchunked or wanted[id(t)].size:
            continue  # not a chunked sweep (or not placed in time): FPRev's full sweep
        ends = _chunk_ends(known[id(t)], len(t.terms))
        sizes = np.arange(2, len(t.terms) + 1)  # positions 1.. inside the first chunk
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            if start:
                sizes[start - 1 : end - 1] = end
        answers = np.concatenate([b for _, b in probed[id(t)]])
        order = np.concatenate([p for p, _ in probed[id(t)]])
        # the records must follow the fabricated sizes' order: probes sorted by position
        answers = answers[np.argsort(order, kind="stable")]
        out[id(t)] = (sizes, answers)
    return out


def _resolve(terms: list[int], sizes: np.ndarray) -> tuple[_Sum, list[_Task]]:
    """The path from ``terms[0]`` to the root of their subtree, from one sweep's sizes: the
    terms of each size form the subtree added at that step.

    Returns:
        The subtree and the new tasks (the groups of more than one term).

    Raises:
        NotATree: the sizes do not grow by the number of terms that have them.
    """
    pivot, others = terms[0], np.asarray(terms[1:])
    if (sizes < 2).any():
        raise NotATree("a probe gave no count (the backend is not a tree of rounded additions)")
    node: _Sum | int = pivot
    seen = 1
    tasks = []
    for level in np.unique(sizes):
        group = [int(j) for j in others[sizes == level]]
        seen += len(group)
        if level != seen:
            raise NotATree(f"subtree of size {level} holds {seen} terms")
        if len(group) == 1:
            child: _Sum | _Task | int = group[0]
        else:
            child = _Task(group)
            tasks.append(child)
        node = _Sum(node, child)
    return node, tasks  # type: ignore[return-value]


def _finish(task: _Task) -> Add | int:
    """The task's tree as :class:`Add` nodes; iterative (a chain of ``K`` terms is ``K``
    deep)."""

    def resolved(x: _Sum | _Task | int) -> _Sum | int:
        while isinstance(x, _Task):
            if x.tree is None:  # every task is revealed before the tree is finished
                raise NotATree("a subtree left unrevealed")
            x = x.tree
        return x

    made: dict[int, Add | int] = {}
    root = resolved(task)
    stack: list[tuple[_Sum | int, bool]] = [(root, False)]
    while stack:
        x, expanded = stack.pop()
        if isinstance(x, int) or id(x) in made:
            continue
        left, right = resolved(x.left), resolved(x.right)
        if expanded:
            made[id(x)] = Add(_made(left, made), _made(right, made))
        else:
            stack += [(x, True), (left, False), (right, False)]
    return _made(root, made)


def _made(x: _Sum | int, made: dict[int, Add | int]) -> Add | int:
    return x if isinstance(x, int) else made[id(x)]


# --------------------------------------------------------------------------- a first guess

# Probe rounds a guess may take to place every chunk boundary before giving way to FPRev.
_GUESS_ROUNDS = 3

# Probes of a hint's sweep at the least: more than a narrow class of columns answers in one
# call (a tail of 8 columns then takes 8 calls, not hundreds).
HINT_PROBES = 64


def _guess(prober: _Prober, row: int, terms: list[int]) -> _Reconstruction | None:
    """The tree at ``row`` if it is consecutive chunks added in order, each one chain in
    index order (the common shape: one chain, or a reduction cut into blocks) or each two
    interleaved chains, of its even and of its odd terms, added together (the shape of a
    vector kernel's leftover rows or columns that takes two terms a step), from far fewer
    probes than FPRev: a sweep from the first term to a sample of the others, then to the
    terms around each chunk boundary not yet placed. None where the answers leave that family.

    The probe ``(first, j)`` answers the end of ``j``'s chunk outside the first chunk; inside
    it, ``j + 1`` (counted in position among ``terms``) for one chain, and for two
    interleaved chains ``j / 2 + 1`` at even ``j`` and the first chunk's length at odd ``j``.
    Chunks after the first are taken to be of the first one's kind (the sweep cannot see
    inside them): a hypothesis, like the whole guess, that the check decides.
    """
    n = len(terms)
    if n <= 2:
        return None
    wanted = _first_sweep(prober, n)
    known: dict[int, int] = {}
    blocks = []
    width = 0  # the first chunk's length where it is two interleaved chains
    for _ in range(_GUESS_ROUNDS):
        got = prober.sizes([(terms[0], terms[i]) for i in wanted])
        blocks.append((wanted, got))
        known.update(zip(wanted.tolist(), got[:, row].tolist(), strict=True))
        if not width and known.get(1, 2) > 2 and known.get(2) == 2:
            width = known[1]  # (first, 1) meets at the first chunk, (first, 2) at once
        placed = _as_one_chain(known, width) if width else known
        following = None if placed is None else _unplaced(placed, n)
        if placed is None or following is None:
            return None
        if not following.size:
            break
        wanted = following
    else:
        return None
    ends = _chunk_ends(placed, n)
    starts = [0, *ends[:-1]]
    if width:
        pairs = [_two_chains(terms[a:b]) for a, b in zip(starts, ends, strict=True)]
        node: Node = from_binary(to_binary(pairs[0] if len(pairs) == 1 else Join(tuple(pairs))))
        # a sweep meets the first chunk's even terms one by one, then its odd ones at once
        order = np.asarray([*terms[0 : ends[0] : 2], *terms[1 : ends[0] : 2], *terms[ends[0] :]])
    else:
        chunks = tuple(Chain(to_runs(terms[a:b])) for a, b in zip(starts, ends, strict=True))
        node = chunks[0] if len(chunks) == 1 else Join(chunks)
        order = np.asarray(terms)
    answers = np.concatenate([g for _, g in blocks])
    lengths = [g[:, row] for _, g in blocks]
    return _Reconstruction(node, list(terms), answers, [order] * len(blocks), lengths)


def _two_chains(terms: list[int]) -> Node:
    """A chunk added as two chains, of its even and of its odd terms, then their sums (one
    chain where it holds a single term)."""
    if len(terms) < 2:
        return Chain(to_runs(terms))
    return Join((Chain(to_runs(terms[0::2])), Chain(to_runs(terms[1::2]))))


def _as_one_chain(known: dict[int, int], width: int) -> dict[int, int] | None:
    """A sweep's answers for a first chunk of ``width`` terms added as two interleaved chains,
    rewritten as the answers of one chain over that chunk (what :func:`_unplaced` and
    :func:`_chunk_ends` read); None where an answer inside it fits neither chain."""
    placed = {p: p + 1 for p in range(1, width)}
    for p, size in known.items():
        if p >= width:
            placed[p] = size
        elif size != (p // 2 + 1 if p % 2 == 0 else width):
            return None
    return placed


def _hinted(prober: _Prober, row: int, terms: list[int]) -> _Reconstruction | None:
    """The first of the trees found so far (:attr:`_Prober.hints`) that, over the terms
    ``row`` reads, answers a sweep from the first term as the backend does at ``row``; None
    where none does.

    A backend's few trees recur: a tail of output columns takes the kernel that the last
    positions of the other columns take (ResNet50's Dense layer on AMD AVX2: columns 992-999
    and batch rows 6-7 add in one tree of 28 chains, which FPRev takes hundreds of calls to
    reveal through 8 columns). The sweep's probes are :func:`_guess`'s first (answered from
    the prober's record where it made them), and a hint is a hypothesis like a guess: the
    check on random data decides.
    """
    n = len(terms)
    if not prober.hints or n <= 2:
        return None
    wanted = _first_sweep(prober, n)
    got = prober.sizes([(terms[0], terms[i]) for i in wanted])
    observed = got[:, row]
    kept = frozenset(terms)
    probed = np.asarray(terms)[wanted]
    for hint in prober.hints:
        if not kept <= hint.terms or isinstance(hint.binary, int):
            continue  # the hint reads fewer terms than this row: no tree of its
        # Over the terms this row reads, a pair meets where it meets in the whole tree: the
        # answer is the count of this row's terms in that subtree (no restricted tree needed)
        order, sizes = hint.sweep(terms[0])
        inside = np.isin(order, terms)
        counted = np.cumsum(inside)
        where = np.empty(int(order.max()) + 1, np.int64)
        where[order] = np.arange(len(order))
        if np.array_equal(counted[sizes[where[probed]] - 1], observed):
            binary = hint.binary if kept == hint.terms else restrict(hint.binary, kept)
            if binary is None:  # not reached: the row's terms are the hint's
                continue
            return _Reconstruction(
                from_binary(binary), list(terms), got, [order[inside]], [observed]
            )
    return None


def _sweep(tree: Add | int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """What a sweep from term ``first`` answers in ``tree``: the terms in the order the path
    from ``first`` to the root meets them (``first``, then each sibling subtree's terms), and
    for each the size of the smallest subtree that holds it and ``first`` (1 for ``first``).

    Two passes, no recursion (a chain of ``K`` terms is ``K`` deep): the subtree sizes and
    the path from ``first`` up, then each term takes the size of the last node of that path
    above it."""
    nodes = post_order(tree)
    size: dict[int, int] = {}
    on_path: set[int] = set()
    for x in nodes:
        if isinstance(x, int):
            continue
        sides = (x.left, x.right)
        size[id(x)] = sum(1 if isinstance(y, int) else size[id(y)] for y in sides)
        if any((y == first) if isinstance(y, int) else id(y) in on_path for y in sides):
            on_path.add(id(x))
    met: list[tuple[int, int]] = []  # (size where the term meets first's path, term)
    stack: list[tuple[Add | int, int]] = [(tree, size.get(id(tree), 1))]
    while stack:
        x, meets = stack.pop()
        if isinstance(x, int):
            met.append((1 if x == first else meets, x))
            continue
        for y in (x.right, x.left):  # left first off the stack: terms in tree order
            inside = (y == first) if isinstance(y, int) else id(y) in on_path
            stack.append((y, size[id(y)] if inside and not isinstance(y, int) else meets))
    met.sort(key=lambda m: m[0])  # stable: tree order among the terms of one subtree
    return np.array([t for _, t in met], np.int64), np.array([m for m, _ in met], np.int64)


def _first_sweep(prober: _Prober, n: int) -> np.ndarray:
    """The positions (among ``n`` terms) a guess's or a hint's first sweep probes: as many as
    a call answers, and at least :data:`HINT_PROBES` where hints are tried (their probes are
    then the guess's, made once, and leave fewer positions between samples to probe)."""
    count = prober.backend.columns
    return _sample(n, max(count, HINT_PROBES) if prober.hints else count)


def _sample(n: int, count: int) -> np.ndarray:
    """About ``count`` of the positions ``1 .. n-1`` to probe first: the first eight (so that
    terms interleaved over a few accumulators show), then evenly spread."""
    if n - 1 <= count:
        return np.arange(1, n)
    spread = np.linspace(1, n - 1, max(count - 8, 2)).round().astype(np.int64)
    return np.unique(np.concatenate([np.arange(1, min(9, n)), spread]))


def _unplaced(known: dict[int, int], n: int) -> np.ndarray | None:
    """Positions to probe next so that every chunk boundary is placed (empty: all are), or
    None where the answers fit no chunked family."""
    items = sorted(known.items())
    wanted: list[int] = []
    first_chunk = True
    last_end = 0
    prev = 0
    for i, size in items:
        if first_chunk and size == i + 1:
            prev = i
            continue
        if size < i + 1 or size > n or size < last_end:
            return None
        if size != last_end:
            # a new chunk ends at `size` and starts somewhere in (boundary of the one
            # before, i]: every position in that gap not yet probed must be
            low = prev + 1 if first_chunk else last_end
            wanted += [j for j in range(low, i) if j not in known]
            last_end = size
        first_chunk = False
        prev = i
    if last_end and last_end < n:  # chunks after the last sample
        wanted += [j for j in range(last_end, n) if j not in known]
    return np.array(sorted(set(wanted)), np.int64)


def _chunk_ends(known: dict[int, int], n: int) -> list[int]:
    """Chunk ends (exclusive, positions in ``terms``) once every boundary is placed."""
    items = sorted(known.items())
    ends: list[int] = []
    for i, size in items:
        if not ends and size == i + 1:
            continue
        if not ends:
            ends.append(i)  # the first chunk ends just before the first position outside it
        if size != ends[-1]:
            ends.append(size)
    if not ends:
        return [n]
    return ends if ends[-1] == n else [*ends, n]


# --------------------------------------------------------------------------- positions


def _consistent_rows(prober: _Prober, rec: _Reconstruction, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` answered every probe as ``rec``'s tree predicts (counting only the
    terms present at each row), read no term outside it, and saw every sweep that concerns
    them: a row that reads some of a sweep's terms but not its first (padding there) answers
    none of that sweep's probes, so they cannot tell its tree from another (oneDNN's last
    output columns of a row take another kernel, and on the top row of a padded convolution
    the first term is padding)."""
    # Presence is a row's padding pattern's: checked once per pattern, not per row.
    distinct, every = prober.row_patterns
    inverse = every[rows]
    covered = np.zeros(prober.backend.terms, bool)
    covered[rec.terms] = True
    ok = np.asarray(~(distinct & ~covered[:, None]).any(axis=0))
    for order in rec.orders:
        ok &= distinct[order[0]] | ~distinct[order].any(axis=0)
    if not rec.orders:
        return ok[inverse]
    predicted = np.concatenate(
        [
            np.cumsum(distinct[order], axis=0, dtype=np.int64)[lengths - 1]
            for order, lengths in zip(rec.orders, rec.lengths, strict=True)
        ]
    )  # (probes, patterns)
    agree = np.empty(len(rows), bool)
    step = max(1, (1 << 20) // max(1, len(predicted)))  # rows at a time: bounded temporaries
    for lo in range(0, len(rows), step):
        part = slice(lo, lo + step)
        seen = rec.answers[:, rows[part]]
        agree[part] = ((seen == -1) | (seen == predicted[:, inverse[part]])).all(axis=0)
    return ok[inverse] & agree


def patterns(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct columns of ``present`` (terms x rows) and each row's pattern number (the
    columns packed to bytes and compared as one value each: np.unique's axis mode sorts
    element-wise and is far slower)."""
    packed = np.ascontiguousarray(np.packbits(present, axis=0).T)
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return present[:, first], inverse.reshape(-1)


# --------------------------------------------------------------------------- fusion


def _round_exact(q: Fraction, dtype: np.dtype) -> Fraction:
    """``q`` rounded to the nearest ``dtype`` value, ties to even (normal range only)."""
    if q == 0:
        return q
    precision = np.finfo(dtype).nmant + 1
    mag = abs(q)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if mag < Fraction(2) ** e:
        e -= 1
    quantum = Fraction(2) ** (e - precision + 1)
    rounded = round(mag / quantum) * quantum
    return rounded if q > 0 else -rounded


@dataclass(frozen=True)
class _Witness:
    """Input ``fill = x``; weight ``w0`` on a term whose product ``x * w0`` is exact, then a
    step adding ``x * x`` (inexact): ``fused`` with one rounding, ``unfused`` with two."""

    x: float
    w0: float
    fused: float
    unfused: float


def fusion_witness(dtype: np.dtype) -> _Witness:
    """Values that tell a fused multiply-add step from a rounded product and a rounded sum."""
    precision = np.finfo(dtype).nmant + 1
    half = precision // 2
    for h in range(half - 1, half + 3):
        x = Fraction(1) + Fraction(1, 2**h)
        for t in range(h - 2, h + 2):
            w0 = -(Fraction(1) + Fraction(1, 2**t))
            if _round_exact(x * w0, dtype) != x * w0:
                continue
            fused = _round_exact(x * w0 + x * x, dtype)
            unfused = _round_exact(x * w0 + _round_exact(x * x, dtype), dtype)
            if fused != unfused:
                return _Witness(float(x), float(w0), float(fused), float(unfused))
    raise NotATree(f"no fusion witness for {dtype}")  # not reached for IEEE formats


def _fusion(
    prober: _Prober, classes: list[tuple[int, np.ndarray, Node]]
) -> list[tuple[np.ndarray, Node]]:
    """Each class of positions (representative row, rows, tree) with every chain's fusion as
    the backend shows it; a class whose rows disagree is split by their answers.

    A chain's first fused step is probed: the term before it (the last term of its start, or
    its own first term) carries ``x * w0``, the step's term ``x * x``, every other term 0.
    A chain from zero is probed again with its first two terms swapped (swamping cannot tell
    which of the bottom two terms comes first; a fused step shows it).
    """
    witness = fusion_witness(prober.backend.dtype)
    jobs = []  # (class, chain index, term carrying w0, probed term, swapped)
    for t, (_, _, node) in enumerate(classes):
        for c, chain in enumerate(chains(node)):
            terms = chain.terms
            if chain.start is not None:
                jobs.append((t, c, _last_leaf(chain.start), terms[0], False))
            elif len(terms) >= 2:
                jobs.append((t, c, terms[0], terms[1], False))
                jobs.append((t, c, terms[1], terms[0], True))
    fused, seen = _run_fusion(prober, witness, jobs)
    out = []
    for t, (row, rows, node) in enumerate(classes):
        mine = [q for q, job in enumerate(jobs) if job[0] == t]
        if not mine:
            out.append((rows, node))
            continue
        # a row that cannot show a probe (padding at its terms) follows the representative
        answers = np.where(seen[mine][:, rows], fused[mine][:, rows], fused[mine][:, [row]])
        patterns_found, inverse = np.unique(answers, axis=1, return_inverse=True)
        for p in range(patterns_found.shape[1]):
            flags = {
                (jobs[q][1], jobs[q][4]): bool(f)
                for q, f in zip(mine, patterns_found[:, p], strict=True)
            }
            out.append((rows[inverse.reshape(-1) == p], _fused_node(node, flags)))
    return out


def _fused_node(node: Node, flags: dict[tuple[int, bool], bool]) -> Node:
    """``node`` with each chain's fusion from the probes ``{(chain, swapped): fused}``: a
    chain whose swapped probe alone is fused has its first two terms the other way round."""
    fused = {c: f for (c, swapped), f in flags.items() if not swapped}
    swapped = {c for (c, s), f in flags.items() if s and f and not fused.get(c, False)}
    for c in swapped:
        fused[c] = True
    return with_fusion(node, fused, swapped)


def _last_leaf(node: Node) -> int:
    if isinstance(node, Chain):
        return node.terms[-1]
    return _last_leaf(node.parts[-1])


def _run_fusion(prober: _Prober, witness: _Witness, jobs) -> tuple[np.ndarray, np.ndarray]:
    """``(jobs, rows)`` booleans from the witness probes, one column each: whether the step
    was fused, and whether the row reads both probed terms (else it shows nothing)."""
    rows = prober.backend.rows
    fused = np.zeros((len(jobs), rows), bool)
    step = prober.backend.columns
    for lo in range(0, len(jobs), step):
        chunk = jobs[lo : lo + step]
        weights = np.zeros((prober.backend.terms, len(chunk)), prober.backend.dtype)
        for col, (_, _, base, probed, _) in enumerate(chunk):
            weights[base, col] = witness.w0
            weights[probed, col] = witness.x
        y = np.asarray(prober.run(witness.x, weights), np.float64)
        fused[lo : lo + len(chunk)] = (y == witness.fused).T
    base = np.array([j[2] for j in jobs], np.int64).reshape(-1)
    probed = np.array([j[3] for j in jobs], np.int64).reshape(-1)
    seen = prober.present[base] & prober.present[probed] if jobs else fused
    return fused, seen


# --------------------------------------------------------------------------- the whole reveal


class OutOfCalls(NotATree):
    """Probing used up its backend calls."""


@dataclass(frozen=True)
class Mismatch:
    """What a check of a tree found: how many outputs differ, at which positions and in which
    columns."""

    count: int
    rows: np.ndarray
    columns: np.ndarray


@dataclass
class Revealed:
    """What probing found: the reduction's trees, how many backend calls it took, and how
    many outputs the check found different (None: not checked)."""

    tree: ReductionTree
    calls: int
    mismatches: int | None = None


Check = Callable[[ReductionTree], Mismatch]
_PASS = Mismatch(0, np.empty(0, np.int64), np.empty(0, np.int64))


def reveal(
    backend: TermBackend,
    max_trees: int = 16,
    exhaustive: bool = False,
    check: Check | None = None,
    max_calls: int | None = None,
) -> Revealed:
    """The summation trees of every output position of ``backend``'s reduction, with fusion.

    The tree of the position that reads the most terms is revealed first; every position that
    answered all its probes as that tree predicts shares it; the next unexplained position
    gets its own reveal, and so on. Each position's tree is first guessed from a few probes
    (consecutive chunks, each a chain: see :func:`_guess`), and revealed by FPRev's full
    recursion where the answers leave that family or ``exhaustive`` is set.

    A guess is a hypothesis that fits the probes made; ``check`` (the outputs that differ
    from the backend on random data) decides. Where it finds differences, the positions that
    differ are revealed again by FPRev's full recursion; where only some columns differ, or
    the answers fit no tree, the output columns may not share one tree (a tail of channels
    narrower than the backend's vectors): columns are then grouped by their answers to the
    same probes, and each group revealed apart. The tree with the fewest differences is kept.

    Probing stops after ``max_calls`` backend calls (None: no limit), or that many for each
    class of columns where they are revealed apart; the best tree found by then is kept. (A
    count, not a time: what is found must not depend on the machine's load.)

    Raises:
        NotATree: the answers fit no tree, more than ``max_trees`` trees would be needed, or
            none was found within ``max_calls``.
    """
    prober = _Prober(backend, max_calls)
    best: tuple[ReductionTree, Mismatch] | None = None
    failure: NotATree | None = None
    tried: set[tuple[_Deep, bool]] = set()
    plans: list[tuple[_Deep, bool]] = [(_Deep(2 if exhaustive else 0), False)]
    while plans:
        deep, split = plans.pop(0)
        if (deep, split) in tried:
            continue
        tried.add((deep, split))
        try:
            if split:
                column_classes = prober.column_classes()
                if max_calls is not None:
                    # each class of columns is revealed through its own columns, a few
                    # probes per call where the class is narrow: a budget of its own
                    prober.max_calls = max_calls * len(column_classes)
                tree, classes = _reveal_columns(prober, column_classes, max_trees, deep)
            else:
                tree, classes = _reveal(prober, max_trees, deep)
        except OutOfCalls as exc:
            failure = exc
            break
        except NotATree as exc:
            failure, last, classes = exc, None, []
        else:
            last = _PASS if check is None else check(tree)
            if best is None or last.count < best[1].count:
                best = (tree, last)
            if not last.count:
                break
        plans += _next_plans(backend, deep, split, last, classes)
    if best is None:
        raise failure  # type: ignore[misc]
    return Revealed(best[0], prober.calls, None if check is None else best[1].count)


@dataclass(frozen=True)
class _Deep:
    """How each position's tree is revealed: 0 guessed (:func:`_guess`, else as 1), 1 FPRev
    with guessed sweeps, 2 FPRev's full recursion; ``default`` for all but the
    representative rows listed in ``rows`` (row, level)."""

    default: int = 0
    rows: frozenset[tuple[int, int]] = frozenset()

    def level(self, row: int) -> int:
        return max([self.default, *(lv for r, lv in self.rows if r == row)])

    def raised(self, reps: set[int]) -> _Deep:
        """The rows ``reps`` one level deeper."""
        kept = {(r, lv) for r, lv in self.rows if r not in reps}
        return _Deep(self.default, frozenset(kept | {(r, min(2, self.level(r) + 1)) for r in reps}))


def _next_plans(
    backend: TermBackend,
    deep: _Deep,
    split: bool,
    last: Mismatch | None,
    classes: list[tuple[int, np.ndarray]],
) -> list[tuple[_Deep, bool]]:
    """What to try after a plan failed (see :func:`reveal`).

    Differences at a few positions: those positions' trees were guessed wrong, and are
    revealed one level deeper. Differences in some columns only, at many positions, or
    answers that fit no tree: columns apart. Then FPRev everywhere."""
    plans = []
    # A tail of columns differs at every position; a few positions' wrong tree may differ
    # in only some columns by chance.
    columns_apart = last is not None and len(last.columns) < backend.columns and len(last.rows) > 8
    if last is not None and not columns_apart:
        bad = set(last.rows.tolist())
        reps = {rep for rep, rows in classes if bad & set(rows.tolist()) and deep.level(rep) < 2}
        if reps:
            plans.append((deep.raised(reps), split))
    if not split:
        plans.append((deep, True))
    if deep.default < 2:
        plans.append((_Deep(2), split))
    return plans


def _reveal(
    prober: _Prober, max_trees: int, deep: _Deep
) -> tuple[ReductionTree, list[tuple[int, np.ndarray]]]:
    """The trees of every position (guessed, or FPRev where ``deep`` says), and each class of
    positions as (representative row, rows)."""
    backend = prober.backend
    unresolved = np.arange(backend.rows)
    found: list[tuple[int, np.ndarray, Node]] = []
    kinds: list[_Hint] = []  # each found tree's hint (its additions, for _same_tree)
    reps: list[tuple[int, np.ndarray]] = []  # each reveal's row and the rows it placed
    while unresolved.size:
        row = int(unresolved[np.argmax(prober.counts[unresolved])])
        terms = [int(k) for k in np.flatnonzero(prober.present[:, row])]
        if not terms:  # positions that read only padding: every tree gives 0
            found.append((row, unresolved, Chain(((0, 1, 1),))))
            reps.append((row, unresolved))
            break
        level = deep.level(row)
        rec = (_hinted(prober, row, terms) or _guess(prober, row, terms)) if level == 0 else None
        rec = rec or _reconstruct(prober, row, terms, sampled=level < 2)
        hint = prober.remember(rec.node)
        ok = _consistent_rows(prober, rec, unresolved)
        ok[unresolved == row] = True
        reps.append((row, unresolved[ok]))
        same = _same_tree(kinds, hint)
        if same is not None:  # a known tree, seen through padding
            rep, rows, node = found[same]
            found[same] = (rep, np.concatenate([rows, unresolved[ok]]), node)
        elif len(found) == max_trees:
            raise NotATree(f"more than {max_trees} different trees across output positions")
        else:
            found.append((row, unresolved[ok], rec.node))
            kinds.append(hint)
        unresolved = unresolved[~ok]
    classes = sorted(_fusion(prober, found), key=lambda c: -len(c[0]))
    main = classes[0][1]
    exceptions = tuple((to_runs(np.sort(rows).tolist()), node) for rows, node in classes[1:])
    return ReductionTree(main, exceptions), reps


def _same_tree(found: list[_Hint], tree: _Hint) -> int | None:
    """The index of the first tree in ``found`` that, over ``tree``'s terms only, is ``tree``
    (a position that reads the others as padding then adds in that tree: its zeros are
    exact), or None."""
    for i, other in enumerate(found):
        if other is tree:  # the same additions (hints are kept once per tree)
            return i
        if tree.terms < other.terms:
            seen = restrict(other.binary, tree.terms)
            if seen is not None and signature(canonical(seen)) == tree.signature:
                return i
    return None


# --------------------------------------------------------------------------- columns


class _Columns:
    """A backend seen through some of its output columns only (the others get zero weights)."""

    def __init__(self, prober: _Prober, cols: np.ndarray) -> None:
        self.parent, self.cols = prober, cols
        backend = prober.backend
        self.terms, self.rows, self.dtype = backend.terms, backend.rows, backend.dtype
        self.columns = len(cols)

    def present(self) -> np.ndarray:
        return self.parent.present

    @property
    def row_patterns(self) -> tuple[np.ndarray, np.ndarray]:
        return self.parent.row_patterns

    def run(
        self, fill: float, weights: np.ndarray, columns: np.ndarray | None = None
    ) -> np.ndarray:
        used = self.cols[: weights.shape[1]] if columns is None else self.cols[columns]
        return self.parent.run(fill, weights, used)


def _column_classes(prober: _Prober) -> list[np.ndarray]:
    """Output columns grouped by their answers when every column carries the same probe:
    from the first term to others at a spread of distances (one backend call each)."""
    backend = prober.backend
    row = int(np.argmax(prober.counts))
    terms = np.flatnonzero(prober.present[:, row])
    n = len(terms)
    if n < 2 or backend.columns < 2:
        return [np.arange(backend.columns)]
    picks = {1, 2, 3, n // 3, n // 2, 2 * n // 3, n - 1} | {2**e for e in range(n.bit_length())}
    answers = []
    for i in sorted(p for p in picks if 1 <= p < n):
        weights = np.ones((backend.terms, backend.columns), backend.dtype)
        weights[terms[0]] = prober.big
        weights[terms[i]] = -prober.big
        answers.append(np.asarray(prober.run(1.0, weights), np.float64))
    # columns compared on a sample of positions (a column's tree shows at every position)
    sample = np.unique(np.linspace(0, backend.rows - 1, min(backend.rows, 64)).astype(int))
    signature = np.ascontiguousarray(
        np.stack([a[sample] for a in answers]).reshape(-1, backend.columns).T
    )
    keys = signature.view(np.dtype((np.void, signature.shape[1] * 8))).reshape(-1)
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == c) for c in np.unique(inverse)]


def _reveal_columns(
    prober: _Prober, classes: list[np.ndarray], max_trees: int, deep: _Deep
) -> tuple[ReductionTree, list[tuple[int, np.ndarray]]]:
    """Each class of columns revealed through its own columns; the largest class's trees
    are the reduction's, the others column exceptions."""
    if len(classes) == 1:
        return _reveal(prober, max_trees, deep)
    found = [
        _reveal(_Prober(_Columns(prober, cols), hints=prober.hints), max_trees, deep)[0]
        for cols in classes
    ]  # the view's calls go through ``prober``: its limit holds
    biggest = max(range(len(classes)), key=lambda i: len(classes[i]))
    others = tuple(
        (to_runs(classes[i].tolist()), found[i]) for i in range(len(classes)) if i != biggest
    )
    return ReductionTree(found[biggest].main, found[biggest].exceptions, others), []
