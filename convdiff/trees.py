"""Summation trees: the order in which a backend adds the terms of one reduction.

A reduction ``sum_k a[k] * b[k]`` of ``K`` terms, added by some backend, is a binary tree of
rounded additions whose leaves are the products. :mod:`convdiff.reveal` finds that tree by
probing the backend; this module holds it in a compact form, says it in words, stores it as
JSON and evaluates it on NumPy operands (through the engine of :mod:`convdiff.orders`, so with
the same exact FMA emulation and compiled chains as the named orders).

Two kinds of node cover every binary tree:

- :class:`Chain`: an accumulator that starts at zero (or at the value of another tree, its
  ``start``) and takes one term after another, ``acc = round(acc + a[k] * b[k])``: one
  rounding per step with ``fused`` (a fused multiply-add), else the product rounded first.
  A caterpillar of additions (each adding one product to the sum so far) is a chain.
- :class:`Join`: partial sums added left to right, ``((p0 + p1) + p2) + ...``, each sum
  rounded.

A sequential order is one chain; ``blocked:K`` is a join of chains from zero; NumPy's pairwise
sum is a tree of joins over chains of every 8th term. A backend may use different trees for
different output positions (a last position computed by another kernel, a thread's share):
:class:`ReductionTree` holds the tree most positions use and the exceptions, by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Runs = tuple[tuple[int, int, int], ...]


def to_runs(terms: Iterable[int]) -> Runs:
    """Terms as maximal arithmetic runs ``(start, stop, step)``, in order (``range`` args)."""
    out: list[list[int]] = []
    for k in terms:
        if out:
            start, stop, step = out[-1]
            count = len(range(start, stop, step))
            if count == 1 and k != start:  # a second term fixes the step
                out[-1] = [start, k + (k - start), k - start]
                continue
            if count > 1 and k == stop:  # the next term of the progression
                out[-1][1] = stop + step
                continue
        out.append([k, k + 1, 1])
    return tuple((a, b, c) for a, b, c in out)


def from_runs(runs: Runs) -> list[int]:
    """The terms of :func:`to_runs`' runs, in order."""
    return [k for run in runs for k in range(*run)]


@dataclass(frozen=True)
class Chain:
    """``acc = start`` (or +0), then ``acc = round(acc + a[k] * b[k])`` for each term in order.

    Attributes:
        runs: the terms, in the order they are added, as :func:`to_runs` runs.
        fused: one rounding per step (FMA); False: the product is rounded, then added.
        start: the tree whose value the accumulator starts from, or None for zero.
    """

    runs: Runs
    fused: bool = True
    start: Node | None = None

    @property
    def terms(self) -> list[int]:
        return from_runs(self.runs)

    @property
    def size(self) -> int:
        return sum(len(range(*r)) for r in self.runs) + (
            0 if self.start is None else self.start.size
        )


@dataclass(frozen=True)
class Join:
    """Partial sums added in order: ``((parts[0] + parts[1]) + parts[2]) + ...``."""

    parts: tuple[Node, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


Node = Chain | Join


def leaves(node: Node) -> list[int]:
    """The node's terms in evaluation order."""
    if isinstance(node, Chain):
        return ([] if node.start is None else leaves(node.start)) + node.terms
    return [k for part in node.parts for k in leaves(part)]


def chains(node: Node) -> Iterator[Chain]:
    """Every chain of the tree, children before parents."""
    if isinstance(node, Chain):
        if node.start is not None:
            yield from chains(node.start)
        yield node
    else:
        for part in node.parts:
            yield from chains(part)


# --------------------------------------------------------------------------- binary trees


@dataclass(frozen=True)
class Add:
    """One rounded addition of two subtrees (a leaf is an ``int``: the term's index)."""

    left: Add | int
    right: Add | int


def from_binary(tree: Add | int, fused: bool = True) -> Node:
    """The chain/join form of a binary tree of additions.

    An addition of one product to a subtree is a chain step (addition commutes, so it does
    not matter on which side the product stands); two products added make a chain from zero
    (the lower term first); an addition of two larger subtrees is a join. Built bottom-up
    without recursion: a chain of ``K`` terms is a tree ``K`` deep.
    """
    made: dict[int, Node] = {}
    for node in post_order(tree):
        if isinstance(node, int):
            continue
        left, right = node.left, node.right
        if isinstance(left, int) and isinstance(right, int):
            made[id(node)] = Chain(to_runs(sorted((left, right))), fused)
            continue
        if isinstance(left, int):
            left, right = right, left
        base = made.pop(id(left))
        if isinstance(right, int):
            if isinstance(base, Chain):
                # extending the runs in place keeps a long chain linear, not quadratic
                made[id(node)] = Chain(_append_run(base.runs, right), fused, base.start)
            else:
                made[id(node)] = Chain(((right, right + 1, 1),), fused, base)
            continue
        other = made.pop(id(right))
        made[id(node)] = (
            Join((*base.parts, other)) if isinstance(base, Join) else Join((base, other))
        )
    if isinstance(tree, int):
        return Chain(((tree, tree + 1, 1),), fused)
    return made[id(tree)]


def _append_run(runs: Runs, k: int) -> Runs:
    """``runs`` with term ``k`` added at the end (as :func:`to_runs` would group it)."""
    start, stop, step = runs[-1]
    count = len(range(start, stop, step))
    if count == 1 and k != start:
        return (*runs[:-1], (start, k + (k - start), k - start))
    if count > 1 and k == stop:
        return (*runs[:-1], (start, stop + step, step))
    return (*runs, (k, k + 1, 1))


def post_order(tree: Add | int) -> list[Add | int]:
    """The nodes of a binary tree, children before parents (iteratively)."""
    out: list[Add | int] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if not isinstance(node, int):
            stack += [node.left, node.right]
    return out[::-1]


def to_binary(node: Node) -> Add | int:
    """The binary tree of additions of a chain/join tree (fusion dropped): a chain from zero
    adds its first two terms, then each next one; a join adds its parts left to right.
    Iterative, like :func:`from_binary`."""
    made: dict[int, Add | int] = {}
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, expanded = stack.pop()
        children = ([] if n.start is None else [n.start]) if isinstance(n, Chain) else n.parts
        if not expanded:
            stack.append((n, True))
            stack += [(c, False) for c in children]
            continue
        parts: list[Add | int]
        if isinstance(n, Join):
            parts = [made.pop(id(p)) for p in n.parts]
        else:
            parts = [made.pop(id(n.start))] if n.start is not None else []
            parts += n.terms
        acc = parts[0]
        for part in parts[1:]:
            acc = Add(acc, part)
        made[id(n)] = acc
    return made[id(node)]


def restrict(binary: Add | int, kept: set[int] | frozenset[int]) -> Add | int | None:
    """The binary tree ``binary`` over the terms ``kept`` only (None where it holds none of
    them): the tree a probe sees at a position that reads the other terms as padding. An
    addition with one side gone is that side."""
    if isinstance(binary, int):
        return binary if binary in kept else None
    made: dict[int, Add | int | None] = {}
    for x in post_order(binary):
        if isinstance(x, int):
            continue
        left, right = (
            (y if y in kept else None) if isinstance(y, int) else made.pop(id(y))
            for y in (x.left, x.right)
        )
        made[id(x)] = left if right is None else right if left is None else Add(left, right)
    return made[id(binary)]


def canonical(tree: Add | int) -> Add | int:
    """``tree`` with the two sides of every addition ordered by their lowest term: addition
    commutes, so two trees that differ only in sides are one order of roundings."""
    made: dict[int, tuple[Add | int, int]] = {}
    for x in post_order(tree):
        if isinstance(x, int):
            continue
        sides = [(y, y) if isinstance(y, int) else made.pop(id(y)) for y in (x.left, x.right)]
        (left, low), (right, _) = sorted(sides, key=lambda side: side[1])
        made[id(x)] = (Add(left, right), low)
    return tree if isinstance(tree, int) else made[id(tree)][0]


def signature(tree: Add | int) -> tuple[int, ...]:
    """The binary tree in postfix form (terms, and -1 for each addition): equal for equal
    trees, and compared without recursion (a chain of ``K`` terms is ``K`` deep)."""
    return tuple(x if isinstance(x, int) else -1 for x in post_order(tree))


def with_fusion(
    node: Node, fused: dict[int, bool], swapped: frozenset[int] | set[int] = frozenset()
) -> Node:
    """The tree with each chain's ``fused`` set from ``fused`` (by position in
    :func:`chains`' order) and the first two terms of the chains in ``swapped`` exchanged."""
    counter = iter(range(1 << 62))

    def walk(n: Node) -> Node:
        if isinstance(n, Join):
            return Join(tuple(walk(p) for p in n.parts))
        start = None if n.start is None else walk(n.start)
        i = next(counter)
        terms = n.terms
        if i in swapped and len(terms) >= 2:
            terms = [terms[1], terms[0], *terms[2:]]
        return Chain(to_runs(terms), fused.get(i, n.fused), start)

    return walk(node)


# --------------------------------------------------------------------------- per position


@dataclass(frozen=True)
class ReductionTree:
    """The trees of one reduction: ``main`` for every output position but those listed in
    ``exceptions`` (position runs, tree), and for every output column but those listed in
    ``columns`` (column runs, the trees of those columns).

    Positions are the output elements that differ only in the first operand (``a``): pixels
    and batch rows; columns those where the second operand (the weights) differs: output
    channels. Each is numbered in C order over its axes. A backend may take another kernel
    for the last positions (a single leftover position) or the last columns (a tail of
    output channels narrower than its vector width).
    """

    main: Node
    exceptions: tuple[tuple[Runs, Node], ...] = ()
    columns: tuple[tuple[Runs, ReductionTree], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "main": node_to_dict(self.main),
            "exceptions": [
                {"positions": [list(r) for r in rows], "tree": node_to_dict(node)}
                for rows, node in self.exceptions
            ],
        }
        if self.columns:
            out["columns"] = [
                {"columns": [list(r) for r in cols], "trees": tree.to_dict()}
                for cols, tree in self.columns
            ]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReductionTree:
        return cls(
            node_from_dict(data["main"]),
            tuple(
                (tuple(tuple(r) for r in e["positions"]), node_from_dict(e["tree"]))
                for e in data.get("exceptions", [])
            ),
            tuple(
                (tuple(tuple(r) for r in e["columns"]), ReductionTree.from_dict(e["trees"]))
                for e in data.get("columns", [])
            ),
        )

    def describe(self) -> str:
        """In words, e.g. "2 chunks of 288 terms, each a chain with FMA from zero, added in
        order; position 48: one chain with FMA over all 576 terms"."""
        text = describe(self.main)
        for rows, node in self.exceptions:
            text += f"; {_positions_text(rows)}: {describe(node)}"
        for cols, tree in self.columns:
            text += f"; {_positions_text(cols, 'output column')}: [{tree.describe()}]"
        return text


def _positions_text(rows: Runs, word: str = "position") -> str:
    count = sum(len(range(*r)) for r in rows)
    listed = from_runs(rows)
    if count >= 3 and listed == list(range(listed[0], listed[-1] + 1)):
        return f"{word}s {listed[0]}-{listed[-1]}"
    if count <= 4:
        return f"{word}{'s' if count > 1 else ''} {', '.join(map(str, listed))}"
    return f"{count} {word}s ({listed[0]}..{listed[-1]})"


def node_to_dict(node: Node) -> dict[str, Any]:
    """JSON form: ``{"chain": [[start, stop, step], ...], "fused": bool, "start": ...}`` or
    ``{"join": [...]}``."""
    if isinstance(node, Join):
        return {"join": [node_to_dict(p) for p in node.parts]}
    out: dict[str, Any] = {"chain": [list(r) for r in node.runs], "fused": node.fused}
    if node.start is not None:
        out["start"] = node_to_dict(node.start)
    return out


def _run(values: Any) -> tuple[int, int, int]:
    """One stored run of a chain (see :func:`to_runs`): three integers."""
    first, second, third = (int(v) for v in values)
    return first, second, third


def node_from_dict(data: dict[str, Any]) -> Node:
    if "join" in data:
        return Join(tuple(node_from_dict(p) for p in data["join"]))
    start = data.get("start")
    return Chain(
        tuple(_run(r) for r in data["chain"]),
        bool(data["fused"]),
        None if start is None else node_from_dict(start),
    )


# --------------------------------------------------------------------------- words


def describe(node: Node) -> str:
    """The tree in words, as short as its shape allows."""
    if isinstance(node, Chain):
        return _describe_chain(node)
    parts = node.parts
    if all(isinstance(p, Chain) and p.start is None for p in parts):
        return _describe_chunks(parts)
    inner = "; ".join(f"({describe(p)})" for p in parts)
    text = f"{len(parts)} partial sums added in order: {inner}"
    if len(text) <= _LONGEST:
        return text
    found = list(chains(node))
    fused = {c.fused for c in found}
    how = _fma(fused.pop()) if len(fused) == 1 else "some with FMA, some without"
    return (
        f"{len(parts)} partial sums added in order, a tree of {len(found)} chains ({how}) "
        f"over {node.size} terms (the JSON report holds it whole)"
    )


# Words for a tree longer than this become a summary.
_LONGEST = 240


def _fma(fused: bool) -> str:
    return "with FMA" if fused else "without FMA (products rounded)"


def _terms_text(terms: Sequence[int]) -> str:
    """``terms 0-287`` for a consecutive range, else a count and the first ones."""
    if list(terms) == list(range(terms[0], terms[0] + len(terms))):
        return f"terms {terms[0]}-{terms[-1]}" if len(terms) > 1 else f"term {terms[0]}"
    runs = to_runs(terms)
    if len(runs) <= 3:
        return "terms " + ", ".join(_run_text(r) for r in runs)
    return f"{len(terms)} terms in another order ({_run_text(runs[0])}, ...)"


def _run_text(run: tuple[int, int, int]) -> str:
    start, stop, step = run
    last = stop - step
    if last == start:
        return str(start)
    return f"{start}-{last}" if step == 1 else f"{start}-{last} step {step}"


def _describe_chain(chain: Chain) -> str:
    terms = chain.terms
    if chain.start is None:
        if len(terms) == 1:
            return f"the single {_terms_text(terms)}"
        in_order = terms == sorted(terms) and terms[-1] - terms[0] == len(terms) - 1
        what = f"all {len(terms)} terms in order" if in_order else _terms_text(terms)
        return f"one chain {_fma(chain.fused)} over {what}"
    return f"{describe(chain.start)}, continued by a chain {_fma(chain.fused)} over " + (
        _terms_text(terms)
    )


def _describe_chunks(parts: Sequence[Node]) -> str:
    """A join of chains from zero: "2 chunks of 288 terms, each a chain with FMA from zero,
    added in order" (sizes run-length coded, consecutive chunks said as such)."""
    sizes = [len(p.terms) for p in parts]  # type: ignore[union-attr]
    fused = {p.fused for p in parts}  # type: ignore[union-attr]
    groups: list[list[int]] = []
    for s in sizes:
        if groups and groups[-1][0] == s:
            groups[-1][1] += 1
        else:
            groups.append([s, 1])
    counts = " + ".join(
        f"{n} chunk{'s' if n > 1 else ''} of {s} term{'s' if s > 1 else ''}" for s, n in groups
    )
    flat = [k for p in parts for k in p.terms]  # type: ignore[union-attr]
    consecutive = flat == list(range(len(flat)))
    how = _fma(fused.pop()) if len(fused) == 1 else "some with FMA, some without"
    where = "consecutive, " if consecutive else ""
    return f"{counts} ({where}each a chain {how} from zero), added in order"


# --------------------------------------------------------------------------- evaluation


def evaluate(node: Node, eng: Any) -> Any:
    """The tree's value for every output of an engine block (an ``orders._Engine``: ``zeros``,
    ``chain`` and ``add``), node by node over whole arrays."""
    if isinstance(node, Chain):
        acc = eng.zeros() if node.start is None else evaluate(node.start, eng)
        for run in node.runs:
            eng.chain(acc, range(*run), fused=node.fused)
        return acc
    acc = evaluate(node.parts[0], eng)
    for part in node.parts[1:]:
        eng.add(acc, evaluate(part, eng))
    return acc


def any_fused(tree: ReductionTree) -> bool:
    nodes = [tree.main, *(n for _, n in tree.exceptions)]
    return any(c.fused for n in nodes for c in chains(n)) or any(
        any_fused(t) for _, t in tree.columns
    )
