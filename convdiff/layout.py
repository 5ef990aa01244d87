"""Tables that fit the width they are printed at, without ever cutting a value.

Left to itself, rich squeezes a table that is wider than the terminal by cropping cells
(``1,024`` shown as ``1,02``, ``identical`` as ``identic``) and, first of all, the cells with
``overflow="fold"``: the layer names. A :class:`FittedTable` decides instead, at render time and
for the width it is given, what to leave out, taking steps in a fixed order until the table
fits:

- dropping a named column (each table states which, least useful first);
- :data:`SHORTEN`: shortening layer names in the middle (``block_16…d_relu``), to no fewer than
  :data:`NAME_MIN` cells, so both the block and the role of a layer stay readable;
- :data:`NARROW`: narrowing an elastic column (the histogram's bars) to its minimum;
- :data:`HEADINGS`: moving the layer names out of their column onto rows of their own above
  their layer's rows (for tables that show several rows per layer).

The layer name and the verdict are never dropped. Every kept cell is shown in full; only when
even the last step leaves the table too wide (a terminal under ~40 columns) do cells wrap onto
further lines, still whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.table import Table
from rich.text import Text

SHORTEN = "shorten names"
NARROW = "narrow bars"
HEADINGS = "names as headings"
NAME_MIN = 16
ELLIPSIS = "…"


def shorten_middle(name: str, width: int) -> str:
    """``name`` in at most ``width`` cells, its middle replaced by an ellipsis.

    Both ends are kept (the head a cell longer where they cannot be equal): layer names
    differ at either end
    (``block_16_expand`` vs ``block_15_expand``; ``..._BN`` vs ``..._relu``; a ``#2`` call).
    """
    if cell_len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    tail = (width - 1) // 2
    head = width - 1 - tail
    return name[:head] + ELLIPSIS + (name[-tail:] if tail else "")


@dataclass
class Column:
    """One column: header, cells, alignment.

    Attributes:
        header: the column's title; also its name in a table's drop order.
        cells: one per row; ``None`` in the layer column marks a row continuing the layer above.
        justify: ``left`` or ``right``.
        names: whether the cells are layer names (shortened in the middle, or made headings).
        bars: for an elastic bar column, each row's fraction of the full bar (0..1); the cells
            are drawn at the width the layout leaves.
        bar_cells: the bar column's widest width.
    """

    header: str
    cells: list[str | Text | None] = field(default_factory=list)
    justify: str = "left"
    names: bool = False
    bars: list[float] | None = None
    bar_cells: int = 40


@dataclass(frozen=True)
class Plan:
    """What a fitted table leaves out at one width."""

    dropped: tuple[str, ...] = ()
    name_cells: int | None = None
    bar_cells: int | None = None
    headings: bool = False
    wraps: bool = False
    taken: int = 0


@dataclass
class FittedTable:
    """A rich renderable: a table laid out for the width it is printed at.

    Attributes:
        columns: every column, in display order.
        steps: what to give up, in order, while the table is too wide: column headers, and
            :data:`SHORTEN`, :data:`NARROW`, :data:`HEADINGS`.
        title: printed above the table (wrapped at the console's width, not the table's).
        caption: printed under the table.
        bar_min: the narrowest bars (:data:`NARROW`).
    """

    columns: list[Column]
    steps: Sequence[str]
    title: str | Text | None = None
    caption: str | None = None
    bar_min: int = 10

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator:
        if isinstance(self.title, str):
            yield Text(self.title, style="table.title")
        elif self.title is not None:
            yield self.title
        yield self.table(self.plan(options.max_width))

    def plan(self, width: int, max_steps: int | None = None) -> Plan:
        """The first plan along :attr:`steps` whose table fits in ``width`` cells (taking at
        most ``max_steps`` of them; if none fits, the last one, with wrapping cells)."""
        steps = list(self.steps)[:max_steps]
        plan = Plan()
        for taken in range(len(steps) + 1):
            if taken:
                plan = self._take(steps[taken - 1], replace(plan, taken=taken), width)
            if self.width(plan) <= width:
                return self._relax(plan, width)
        return plan if max_steps is not None else replace(plan, wraps=True)

    def _relax(self, plan: Plan, width: int) -> Plan:
        """Give shortened names back the room a later step freed (a dropped column)."""
        slack = width - self.width(plan)
        if plan.name_cells is None or slack <= 0:
            return plan
        wider = replace(plan, name_cells=min(self._longest_name(), plan.name_cells + slack))
        return wider if self.width(wider) <= width else plan

    def width(self, plan: Plan) -> int:
        """Cells the table takes under ``plan``: its columns' widths, one padding cell either
        side of each inner edge plus the separator between them, and the two outer edges (the
        arithmetic of rich's SIMPLE_HEAD box without edge padding; a test holds it to rich's
        own measurement)."""
        widths = self._widths(plan)
        return sum(widths) + 3 * (len(widths) - 1) + 2 if widths else 0

    def _widths(self, plan: Plan) -> list[int]:
        kept, names = self._kept(plan)
        widths = []
        for column in kept:
            cells = column.cells
            if column.bars is not None:
                longest = _bar_length(plan.bar_cells or column.bar_cells, max(column.bars))
                cells = ["█" * longest]
            elif column.names and plan.name_cells is not None:
                cells = [shorten_middle(self._longest_name_text(), plan.name_cells)]
            widths.append(max([cell_len(column.header)] + [_cells(c) for c in cells]))
        if names is not None and widths:
            # the headings are rows of the first kept column
            widths[0] = max(widths[0], min(self._longest_name(), plan.name_cells or 10**6))
        return widths

    def _kept(self, plan: Plan) -> tuple[list[Column], Column | None]:
        """The columns shown under ``plan``, and the names column when its names are headings."""
        kept = [c for c in self.columns if c.header not in plan.dropped]
        names = next((c for c in kept if c.names), None)
        if plan.headings and names is not None:
            return [c for c in kept if c is not names], names
        return kept, None

    def _take(self, step: str, plan: Plan, width: int) -> Plan:
        """Apply one step; SHORTEN and NARROW give up only as many cells as the fit needs."""
        if step not in (SHORTEN, NARROW, HEADINGS):
            return replace(plan, dropped=(*plan.dropped, step))
        if step == HEADINGS:
            # on rows of their own the names may take the room of the column they left
            plan = replace(plan, headings=True, name_cells=None)
        excess = self.width(plan) - width
        if excess <= 0:
            return plan
        if step in (SHORTEN, HEADINGS):
            full = self._longest_name()
            return replace(plan, name_cells=max(NAME_MIN, min(full, full - excess)))
        bars = next((c.bars for c in self.columns if c.bars), None)
        if not bars:
            return plan
        # the column is as wide as its longest bar, int(cells * largest + 0.5); find the cells
        # for 100% that make that bar ``excess`` shorter
        largest = max(bars)
        longest = _bar_length(plan.bar_cells or self._bar_cells(), largest)
        cells = int((longest - excess + 0.5) / largest - 1e-9) if largest > 0 else self.bar_min
        return replace(plan, bar_cells=max(self.bar_min, min(cells, self._bar_cells())))

    def _bar_cells(self) -> int:
        return next(c.bar_cells for c in self.columns if c.bars is not None)

    def _longest_name(self) -> int:
        return max((cell_len(n) for n in self._names()), default=0)

    def _longest_name_text(self) -> str:
        return max(self._names(), key=cell_len, default="")

    def _names(self) -> list[str]:
        return [str(c) for col in self.columns if col.names for c in col.cells if c is not None]

    def table(self, plan: Plan) -> Table:
        """The rich table for ``plan`` (columns at their natural widths)."""
        kept, names = self._kept(plan)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption=self.caption)
        table.caption_justify = "left"
        for column in kept:
            table.add_column(
                column.header,
                justify=column.justify,  # type: ignore[arg-type]
                no_wrap=not plan.wraps,
                overflow="fold",
            )
        for row in self._rows(plan, kept, names):
            table.add_row(*row)
        return table

    def _rows(self, plan: Plan, kept: list[Column], names: Column | None) -> Iterator[list]:
        """Each row's cells; under a heading row of the layer's name where names are headings."""
        width = plan.name_cells or 10**6
        first = self.columns[0]
        count = len(first.bars) if first.bars is not None else len(first.cells)
        for i in range(count):
            name = names.cells[i] if names is not None else None
            if name is not None:
                heading = Text(shorten_middle(str(name), width), style="bold")
                yield [heading, *([""] * (len(kept) - 1))]
            yield [self._cell(c, i, plan) for c in kept]

    def _cell(self, column: Column, i: int, plan: Plan) -> str | Text:
        if column.bars is not None:
            return "█" * _bar_length(plan.bar_cells or column.bar_cells, column.bars[i])
        cell = column.cells[i]
        if cell is None:
            return ""
        if column.names and plan.name_cells is not None:
            return shorten_middle(str(cell), plan.name_cells)
        return cell


def _bar_length(cells: int, fraction: float) -> int:
    """A bar of ``fraction`` of ``cells``, at least one cell for any nonzero count."""
    return max(int(cells * fraction + 0.5), 1 if fraction > 0 else 0)


def _cells(cell: str | Text | None) -> int:
    """Terminal cells a one-line cell takes."""
    if cell is None:
        return 0
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)
