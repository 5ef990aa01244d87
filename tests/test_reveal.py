"""The probe (``convdiff.reveal``) recovers known summation trees from synthetic backends.

Each backend here is a plain Python/NumPy summation written for this test: NumPy's own
pairwise ``sum``, a blocked order, a chain with and without FMA, per-position trees. The fused
steps are computed from exact rationals (``fractions.Fraction``) and rounded by an integer
round-to-nearest-even written here, so the backends share no rounding code with convdiff. A
revealed tree must then reproduce the backend bit for bit on random data through
``orders.reduce_terms`` (the compiled chains and the NumPy engine alike).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest

from convdiff import accel
from convdiff.orders import Order, reduce_positions, reduce_terms
from convdiff.reveal import Mismatch, NotATree, fusion_witness, reveal, swamping_value
from convdiff.trees import (
    Chain,
    Join,
    ReductionTree,
    canonical,
    describe,
    from_binary,
    from_runs,
    node_from_dict,
    node_to_dict,
    restrict,
    signature,
    to_binary,
    to_runs,
)

F32 = np.dtype(np.float32)


def _round32(q: Fraction) -> Fraction:
    """``q`` rounded to the nearest float32, ties to even (normal range)."""
    if q == 0:
        return q
    mag = abs(q)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if mag < Fraction(2) ** e:
        e -= 1
    quantum = Fraction(2) ** (e - 23)
    rounded = round(mag / quantum) * quantum
    return rounded if q > 0 else -rounded


Reduce = Callable[[np.ndarray, np.ndarray], np.ndarray]


def chain(fused: bool, order: list[int] | None = None) -> Reduce:
    """A scalar loop: ``acc = round(acc + a*w)`` (one rounding) or ``round(acc + round(a*w))``,
    over the terms in ``order`` (index order by default), for each column."""

    def reduce(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        terms = range(len(a)) if order is None else order
        out = []
        for c in range(w.shape[1]):
            acc = Fraction(0)
            for k in terms:
                product = Fraction(float(a[k])) * Fraction(float(w[k, c]))
                acc = _round32(acc + (product if fused else _round32(product)))
            out.append(float(acc))
        return np.array(out, F32)

    return reduce


def blocked(size: int, fused: bool = True) -> Reduce:
    """Chunks of ``size`` consecutive terms, each a chain from zero, added in order."""

    def reduce(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        total = np.zeros(w.shape[1], F32)
        for start in range(0, len(a), size):
            total = total + chain(fused)(a[start : start + size], w[start : start + size])
        return total

    return reduce


def numpy_sum(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy's pairwise ``sum`` of the float32 products, one contiguous row per column."""
    products = np.ascontiguousarray((a[:, None].astype(F32) * w.astype(F32)).T)
    return np.sum(products, axis=-1)


class SumBackend:
    """A reduction whose rows each add their terms with their own ``reduce``; ``present``
    (terms x rows) marks the terms a row reads (the others are padding: 0). ``tail``: the
    last columns, from this one on, add with ``tail_reduce`` instead (a channel tail)."""

    def __init__(
        self,
        terms: int,
        reduce: Reduce | list[Reduce],
        columns: int = 16,
        present: np.ndarray | None = None,
        tail: int | None = None,
        tail_reduce: Reduce | None = None,
    ) -> None:
        self.reducers = reduce if isinstance(reduce, list) else [reduce]
        self.terms, self.columns, self.dtype = terms, columns, F32
        self.rows = len(self.reducers)
        self._present = np.ones((terms, self.rows), bool) if present is None else present
        self.tail, self.tail_reduce = tail, tail_reduce
        self.calls = 0
        self.probes = 0  # columns used, over all calls: one probe each

    def present(self) -> np.ndarray:
        return self._present

    def run(
        self, fill: float, weights: np.ndarray, columns: np.ndarray | None = None
    ) -> np.ndarray:
        self.calls += 1
        self.probes += weights.shape[1]
        a = np.where(self._present, F32.type(fill), F32.type(0))
        if columns is None:
            return self._sums(a, weights)
        full = np.zeros((self.terms, self.columns), F32)
        full[:, columns] = weights
        return self._sums(a, full)[:, columns]

    def evaluate(self, a: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The backend on arbitrary operands: ``a`` (terms, rows), ``w`` (terms, columns)."""
        return self._sums(np.where(self._present, a, 0).astype(F32), w)

    def _sums(self, a: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.stack([f(a[:, r], w) for r, f in enumerate(self.reducers)])
        if self.tail is not None and w.shape[1] > self.tail:
            tail = np.stack(
                [self.tail_reduce(a[:, r], w[:, self.tail :]) for r in range(self.rows)]
            )
            out[:, self.tail :] = tail
        return out


def _emulate(backend: SumBackend, tree: ReductionTree, a, w) -> np.ndarray:
    """convdiff's reduction in the revealed tree: ``a`` (K, rows, 1), ``w`` (K, 1, cols)."""
    a = np.where(backend.present(), a, 0).astype(F32)[:, :, None]
    key = (backend.terms, (backend.rows, w.shape[1]))
    return reduce_terms(a, w[:, None, :], Order(name="auto", trees=((key, tree),)), F32)


def _check_reproduces(backend: SumBackend, tree: ReductionTree, rng) -> None:
    a = rng.standard_normal((backend.terms, backend.rows)).astype(F32)
    w = rng.standard_normal((backend.terms, backend.columns)).astype(F32)
    np.testing.assert_array_equal(_emulate(backend, tree, a, w), backend.evaluate(a, w))


def _differences(backend: SumBackend, seed: int = 1):
    """The check :func:`reveal` takes: outputs that differ on random data (other data than
    the test's own)."""

    def check(tree: ReductionTree) -> Mismatch:
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((backend.terms, backend.rows)).astype(F32)
        w = rng.standard_normal((backend.terms, backend.columns)).astype(F32)
        differ = _emulate(backend, tree, a, w) != backend.evaluate(a, w)
        rows, cols = differ.any(axis=1), differ.any(axis=0)
        return Mismatch(int(differ.sum()), np.flatnonzero(rows), np.flatnonzero(cols))

    return check


@pytest.fixture(params=["compiled", "numpy"])
def engine(request, monkeypatch):
    """Both the compiled chains and the pure NumPy engine evaluate the trees."""
    if request.param == "numpy":
        monkeypatch.setenv("CONVDIFF_NUMBA", "0")
    elif not accel.enabled():
        pytest.skip("numba is not installed: no compiled chains")
    return request.param


# --------------------------------------------------------------------------- known trees


@pytest.mark.parametrize("fused", [True, False])
def test_chain_with_and_without_fma(fused, engine, rng):
    backend = SumBackend(40, chain(fused))
    found = reveal(backend)
    assert found.tree == ReductionTree(Chain(((0, 40, 1),), fused))
    assert found.tree.describe() == (
        f"one chain {'with FMA' if fused else 'without FMA (products rounded)'} "
        "over all 40 terms in order"
    )
    _check_reproduces(backend, found.tree, rng)


def test_blocked_order(engine, rng):
    backend = SumBackend(40, blocked(7))
    found = reveal(backend)
    chunks = [Chain(((s, min(s + 7, 40), 1),)) for s in range(0, 40, 7)]
    assert found.tree == ReductionTree(Join(tuple(chunks)))
    assert found.tree.describe() == (
        "5 chunks of 7 terms + 1 chunk of 5 terms (consecutive, each a chain with FMA from "
        "zero), added in order"
    )
    _check_reproduces(backend, found.tree, rng)


@pytest.mark.parametrize(("terms", "leaf_chain"), [(37, (1, 33, 8)), (300, (1, 73, 8))])
def test_numpy_pairwise_sum(terms, leaf_chain, engine, rng):
    """NumPy's pairwise sum (8 interleaved accumulators in leaves of up to 128 terms): no
    chunked guess fits it, so FPRev's recursion reveals it."""
    backend = SumBackend(terms, numpy_sum, columns=64)
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    _check_reproduces(backend, found.tree, rng)
    # each chain of a leaf takes every 8th term
    assert Chain((leaf_chain,), False) in _all_chains(found.tree.main)
    # FPRev: about K times the tree's depth in probes, against K^2/2 pairs
    assert backend.probes < terms * (terms - 1) / 2 / 4


def test_reversed_chain_has_its_first_two_terms_in_order(engine, rng):
    """Swamping cannot tell which of a chain's bottom two terms comes first; the fusion probe
    does (a fused step adds the second one's exact product)."""
    order = list(range(19, -1, -1))
    backend = SumBackend(20, chain(True, order))
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    assert found.tree.main == Chain(to_runs(order), True)
    _check_reproduces(backend, found.tree, rng)


def test_positions_with_their_own_tree(engine, rng):
    """Like TensorFlow's last output position taking a matrix-vector kernel: one row sums
    sequentially while the others add blocks."""
    backend = SumBackend(48, [blocked(16)] * 3 + [chain(True)] + [blocked(16)] * 2)
    found = reveal(backend)
    assert found.tree.main == Join(tuple(Chain(((s, s + 16, 1),)) for s in (0, 16, 32)))
    assert found.tree.exceptions == ((((3, 4, 1),), Chain(((0, 48, 1),))),)
    assert "position 3: one chain with FMA over all 48 terms in order" in found.tree.describe()
    _check_reproduces(backend, found.tree, rng)


def test_padded_positions_share_the_tree(engine, rng):
    """Positions that read padding (zeros) for some terms add the rest in the same tree."""
    present = np.ones((30, 4), bool)
    present[:6, 1] = False
    present[24:, 2] = False
    present[::2, 3] = False
    backend = SumBackend(30, [blocked(10)] * 4, present=present)
    found = reveal(backend)
    assert not found.tree.exceptions
    _check_reproduces(backend, found.tree, rng)


def interleaved(fused: bool = False) -> Reduce:
    """Two accumulators, one over the even terms and one over the odd ones, added at the end
    (like oneDNN's AVX2 kernel for the last output columns of a row)."""

    def reduce(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        evens = chain(fused, list(range(0, len(a), 2)))(a, w)
        odds = chain(fused, list(range(1, len(a), 2)))(a, w)
        return evens + odds  # one float32 rounding

    return reduce


def test_positions_whose_first_term_is_padding_get_their_own_tree(engine, rng):
    """The probes of a sweep from term 0 show nothing at a position that reads term 0 as
    padding (the top row of a padded convolution): such a position must not be taken for one
    of the sweep's tree, but revealed apart (oneDNN's last columns on the top row)."""
    present = np.ones((27, 4), bool)
    present[:9, 2:] = False  # rows 2 and 3 read the first kernel row as padding
    backend = SumBackend(
        27, [chain(True), interleaved(), chain(True), interleaved()], present=present
    )
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    pair = Join((Chain(to_runs(range(0, 27, 2)), False), Chain(to_runs(range(1, 27, 2)), False)))
    assert found.tree == ReductionTree(Chain(((0, 27, 1),)), ((to_runs([1, 3]), pair),))
    _check_reproduces(backend, found.tree, rng)


def interleaved_chunks(size: int) -> Reduce:
    """Chunks of ``size`` consecutive terms added in order, each two chains without FMA (its
    even and its odd terms, from zero) added together: a vector kernel's leftover path."""

    def reduce(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        total = None
        for start in range(0, len(a), size):
            halves = []
            for first in (start, start + 1):
                acc = np.zeros(w.shape[1], F32)
                for k in range(first, min(start + size, len(a)), 2):
                    acc = acc + F32.type(a[k]) * w[k].astype(F32)
                halves.append(acc)
            chunk = halves[0] + halves[1]
            total = chunk if total is None else total + chunk
        return total

    return reduce


@pytest.mark.parametrize(("terms", "size"), [(96, 40), (64, 64), (200, 48)])
def test_chunks_of_two_interleaved_chains_are_guessed(terms, size, engine, rng):
    """The guess reads two interleaved chains per chunk off one sweep (the first chunk's odd
    terms meet the first term at the chunk's end, its even ones one by one): the tree FPRev's
    full recursion finds, in a few calls."""
    backend = SumBackend(terms, interleaved_chunks(size), columns=16)
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    full = reveal(SumBackend(terms, interleaved_chunks(size), columns=16), exhaustive=True)
    assert found.tree == full.tree
    assert found.calls * 2 < full.calls, (found.calls, full.calls)
    _check_reproduces(backend, found.tree, rng)


@pytest.mark.parametrize(("terms", "size"), [(41, 8), (17, 16), (3, 2)])
def test_interleaved_chunks_with_a_last_chunk_of_one_term(terms, size, engine, rng):
    """A last chunk of one term is one chain, not two: the tree FPRev's full recursion finds."""
    backend = SumBackend(terms, interleaved_chunks(size), columns=16)
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    full = reveal(SumBackend(terms, interleaved_chunks(size), columns=16), exhaustive=True)
    assert found.tree == full.tree
    _check_reproduces(backend, found.tree, rng)


def test_a_tree_found_before_is_tried_first_where_it_recurs(rng, monkeypatch):
    """A tail of 4 output columns adds in the tree the last row of the other columns adds in
    (as Eigen's tails do): the tail's trees are taken from that row's (a hint) after one
    sweep, where FPRev through 4 columns takes many more calls; the trees are the same."""
    from convdiff import reveal as module

    def unfused(a: np.ndarray, w: np.ndarray) -> np.ndarray:  # chain(False), in float32
        acc = np.zeros(w.shape[1], F32)
        for k in range(len(a)):
            acc = acc + F32.type(a[k]) * w[k].astype(F32)
        return acc

    rows = [unfused] * 3 + [numpy_sum]  # the last row: 8 interleaved chains, no chunks

    def revealed():
        backend = SumBackend(96, rows, columns=20, tail=16, tail_reduce=numpy_sum)
        found = reveal(backend, check=_differences(backend))
        assert found.mismatches == 0
        return found

    hinted = revealed()
    monkeypatch.setattr(module, "_hinted", lambda prober, row, terms: None)
    unhinted = revealed()
    assert hinted.tree == unhinted.tree
    assert [c for c, _ in hinted.tree.columns] == [((16, 20, 1),)]
    assert hinted.calls * 2 < unhinted.calls, (hinted.calls, unhinted.calls)


def test_a_tail_of_columns_with_its_own_tree(engine, rng):
    """Like a vector kernel's tail: the last 4 of 20 output columns add two halves, the
    others one chain. Probes packed one pair per column mix the two trees; columns apart
    each show theirs."""
    backend = SumBackend(24, chain(True), columns=20, tail=16, tail_reduce=blocked(12))
    found = reveal(backend, check=_differences(backend))
    assert found.mismatches == 0
    halves = Join((Chain(((0, 12, 1),)), Chain(((12, 24, 1),))))
    assert found.tree == ReductionTree(
        Chain(((0, 24, 1),)), (), ((((16, 20, 1),), ReductionTree(halves)),)
    )
    assert "output columns 16-19: [2 chunks of 12 terms" in found.tree.describe()
    a = rng.standard_normal((24, 1)).astype(F32)
    w = rng.standard_normal((24, 20)).astype(F32)
    np.testing.assert_array_equal(_emulate(backend, found.tree, a, w), backend.evaluate(a, w))


def test_reduce_positions_renumbers_column_classes_positions(rng):
    """A column class with a position of its own: evaluated at some positions only (as the
    check does), each keeps its tree."""
    a = rng.standard_normal((24, 4)).astype(F32)
    w = rng.standard_normal((24, 6)).astype(F32)
    halves = Join((Chain(((0, 12, 1),)), Chain(((12, 24, 1),))))
    tail = ReductionTree(halves, ((((3, 4, 1),), Chain(((0, 24, 1),), False)),))
    tree = ReductionTree(Chain(((0, 24, 1),)), (), ((((4, 6, 1),), tail),))
    order = Order(name="auto", trees=(((24, (4, 6)), tree),))
    full = reduce_terms(a[:, :, None], w[:, None, :], order, F32)
    rows = np.array([3, 0])
    got = reduce_positions(a[:, :, None], w[:, None, :], order, F32, rows)
    np.testing.assert_array_equal(got, full[rows])

    def alone(node):  # every output in one tree
        one = Order(name="auto", trees=(((24, (4, 6)), ReductionTree(node)),))
        return reduce_terms(a[:, :, None], w[:, None, :], one, F32)

    np.testing.assert_array_equal(got[0, 4:], alone(Chain(((0, 24, 1),), False))[3, 4:])
    np.testing.assert_array_equal(got[1, 4:], alone(halves)[0, 4:])
    np.testing.assert_array_equal(got[:, :4], alone(Chain(((0, 24, 1),)))[rows, :4])


def test_reduce_positions_merges_a_window_views_terms_at_the_positions_it_takes(rng):
    """Operands whose terms lie on three axes of a strided view (a 3x3 convolution's windows,
    as auto's check records them): the same bits as the merged copy, each position in its own
    tree."""
    x = rng.standard_normal((2, 9, 9, 5)).astype(F32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
    view = windows.transpose(4, 5, 3, 0, 1, 2)[..., None]  # (3, 3, C, N, 7, 7, 1): terms first
    merged = view.reshape(45, 2, 7, 7, 1)  # a copy: the view's axes do not merge
    w = rng.standard_normal((45, 1, 1, 1, 6)).astype(F32)
    key = (45, (2, 7, 7, 6))
    halves = Join((Chain(((0, 20, 1),)), Chain(((20, 45, 1),))))
    corner = ReductionTree(Chain(((0, 45, 1),)), ((((0, 1, 1), (60, 62, 1)), halves),))
    order = Order(name="auto", trees=((key, corner),))
    rows = np.array([61, 0, 97, 60, 5])
    want = reduce_positions(merged, w, order, F32, rows)
    got = reduce_positions(view, w, order, F32, rows, term_axes=3)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    full = reduce_terms(merged, w, order, F32).reshape(98, 6)
    np.testing.assert_array_equal(got.view(np.uint32), full[rows].view(np.uint32))


def test_not_a_tree():
    """A float64 accumulator loses no 1 against +-M: every probe answers 2, which no tree of
    float32 additions gives."""

    def wide(a, w):
        return (a[:, None].astype(np.float64) * w).sum(axis=0).astype(F32)

    with pytest.raises(NotATree):
        reveal(SumBackend(12, wide))


def test_probe_calls_stay_far_below_one_per_pair():
    backend = SumBackend(2000, blocked(250), columns=256)
    backend.reducers = [_fast_blocked(250)]
    found = reveal(backend)
    assert found.tree.main == Join(tuple(Chain(((s, s + 250, 1),)) for s in range(0, 2000, 250)))
    # a sweep sample, one round around the chunk boundaries, one fusion probe
    assert found.calls <= 4


def _fast_blocked(size: int) -> Reduce:
    """A blocked order with FMA for the probe values only (products and sums exact in float64
    before the float32 rounding: no double rounding for swamping or witness values)."""

    def reduce(a, w):
        total = np.zeros(w.shape[1], F32)
        for start in range(0, len(a), size):
            acc = np.zeros(w.shape[1], F32)
            for k in range(start, min(start + size, len(a))):
                acc = (acc.astype(np.float64) + np.float64(a[k]) * w[k].astype(np.float64)).astype(
                    F32
                )
            total = total + acc
        return total

    return reduce


def _all_chains(node):
    if isinstance(node, Chain):
        return [node, *([] if node.start is None else _all_chains(node.start))]
    return [c for p in node.parts for c in _all_chains(p)]


# --------------------------------------------------------------------------- representation


def test_runs_round_trip(rng):
    for _ in range(200):
        terms = [int(t) for t in rng.permutation(40)[: rng.integers(1, 40)]]
        assert from_runs(to_runs(terms)) == terms
    assert to_runs([0, 8, 16, 1, 9, 17]) == ((0, 24, 8), (1, 25, 8))
    assert to_runs([5, 4, 3]) == ((5, 2, -1),)


def test_restricted_trees():
    """The tree a position sees through padding: the other terms dropped, and trees equal up
    to the sides of an addition compared as one."""
    node = Join((Chain(((0, 4, 1),)), Chain(((4, 8, 1),))))
    seen = restrict(to_binary(node), {2, 3, 4, 5, 6, 7})
    assert from_binary(seen) == Join((Chain(((2, 4, 1),)), Chain(((4, 8, 1),))))
    assert restrict(to_binary(node), {9}) is None
    assert restrict(to_binary(node), {5}) == 5
    swapped = Join((Chain(((4, 8, 1),)), Chain(((0, 4, 1),))))
    assert signature(canonical(to_binary(swapped))) == signature(canonical(to_binary(node)))
    assert signature(to_binary(swapped)) != signature(to_binary(node))
    deep = Chain(((0, 5000, 1),))  # far deeper than Python's recursion limit
    assert signature(canonical(restrict(to_binary(deep), set(range(1, 5000))))) == signature(
        to_binary(Chain(((1, 5000, 1),)))
    )


def test_tree_json_round_trip():
    node = Join(
        (
            Chain(((0, 4, 1),), True),
            Chain(((4, 6, 1),), False, Chain(((6, 8, 1),))),
        )
    )
    tree = ReductionTree(node, ((((2, 3, 1),), Chain(((0, 8, 1),), False)),))
    assert ReductionTree.from_dict(tree.to_dict()) == tree
    assert node_from_dict(node_to_dict(node)) == node
    assert describe(Chain(((0, 9, 1),), False)) == (
        "one chain without FMA (products rounded) over all 9 terms in order"
    )


def test_reduce_positions_takes_each_positions_tree(rng):
    backend = SumBackend(24, [blocked(8), chain(True), blocked(8), chain(False)])
    found = reveal(backend)
    a = rng.standard_normal((24, 4)).astype(F32)
    w = rng.standard_normal((24, 5)).astype(F32)
    key = (24, (4, 5))
    order = Order(name="auto", trees=((key, found.tree),))
    rows = np.array([3, 1, 0])
    got = reduce_positions(a[:, :, None], w[:, None, :], order, F32, rows)
    np.testing.assert_array_equal(got, backend.evaluate(a, w)[rows])


def test_swamping_and_witness_values():
    assert swamping_value(F32, 1000) == 2.0**36
    for dtype in (F32, np.dtype(np.float64)):
        w = fusion_witness(dtype)
        assert w.fused != w.unfused
