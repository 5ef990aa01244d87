"""Results -> a report object, rich renderables and JSON. Never prints by itself."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.text import Text

from convdiff import __version__
from convdiff.layout import HEADINGS, NARROW, SHORTEN, Column, FittedTable
from convdiff.metrics import Comparison, describe_nonfinite
from convdiff.outputs import json_safe
from convdiff.runner import LayerResult

STATUS_STYLE = {
    "identical": "green",
    "rounding": "cyan",
    "divergent": "bold red",
    "skipped": "yellow",
    "error": "bold magenta",
}


@dataclass
class Report:
    """Everything a run found: the data behind the table, the JSON and the exit status.

    ``layers_not_compared`` names the selected layers a ``stop_at_first`` run never reached.
    """

    model: str
    inputs: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers_not_compared: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> LayerResult | None:
        return next((r for r in self.layers if r.status == "divergent"), None)

    @property
    def over_budget(self) -> list[LayerResult]:
        return [r for r in self.layers if r.over_budget]

    @property
    def passed(self) -> bool:
        return not any(r.status in ("divergent", "error") or r.over_budget for r in self.layers)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def counts(self) -> Counter[str]:
        return Counter(r.status for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergent
        return {
            "convdiff_version": __version__,
            "model": self.model,
            "inputs": self.inputs,
            "passed": self.passed,
            "first_divergent": first.name if first else None,
            "over_budget": [r.name for r in self.over_budget],
            "counts": dict(self.counts()),
            "stopped_early": bool(self.layers_not_compared),
            "layers_not_compared": self.layers_not_compared,
            "settings": self.settings,
            "environment": self.environment,
            "notes": self.notes,
            "layers": [r.to_dict() for r in self.layers],
        }


# --------------------------------------------------------------------------- terminal


def _fmt_int(value: int | None) -> str:
    """Thousands separators; beyond ten million, three significant digits."""
    if value is None:
        return "-"
    return f"{value:,}" if value < 10_000_000 else f"{value:.3g}"


def _fmt_float(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def _fmt_max_ulp(c: Comparison | None) -> str:
    """The max ULP cell; a NaN or inf against a number has no ULP distance: say which."""
    if c is None:
        return "-"
    if c.nan_mismatch:
        return "NaN"
    return "inf" if c.inf_mismatch else _fmt_int(c.max_ulp)


def _fmt_ratio(value: float | None) -> str:
    """A bound ratio to two significant digits, with more where two would put it on the other
    side of 1, the threshold of the verdict: 0.99999 shows as 0.99999, never as 1."""
    if value is None or not math.isfinite(value):
        return _fmt_float(value)
    for digits in range(2, 18):
        text = format(value, f".{digits}g")
        if (float(text) < 1) == (value < 1) and (float(text) > 1) == (value > 1):
            return text
    return repr(value)


# What the layer table gives up at narrow widths, first to go first (README, "Narrow
# terminals"): the index (the name says which layer), the 99th percentile (max ULP and /bound
# carry the verdict), the class, the largest absolute difference, the shape; then long layer
# names are shortened in the middle, to 16 cells at least; then the share of differing elements,
# max ULP and /bound. The layer name and the status always stay; no figure is ever cut.
TABLE_STEPS = ("#", "p99 ULP", "class", "max abs", "shape", SHORTEN, "differ", "max ULP", "/bound")


TABLE_HEADERS: tuple[str, ...] = ("#", "layer", "class", "shape", "status", "max ULP", "p99 ULP")
TABLE_HEADERS += ("max abs", "differ", "/bound")


def render_table(report: Report) -> FittedTable:
    """One row per layer call: index, name, class, shape, status and the error figures, laid
    out for the width it is printed at (:data:`TABLE_STEPS`)."""
    rows = [_layer_cells(r) for r in report.layers]
    columns = [
        Column(
            header,
            [row[i] for row in rows],
            justify="left" if header in ("layer", "class", "shape", "status") else "right",
            names=header == "layer",
        )
        for i, header in enumerate(TABLE_HEADERS)
    ]
    title = f"convdiff: {report.model}  ({comparison_label(report)})"
    return FittedTable(columns, TABLE_STEPS, title=title)


def table_row(r: LayerResult) -> list[str]:
    """A layer's cells of the table as plain text, one per :data:`TABLE_HEADERS` (the HTML
    page's table); `` !`` after the status marks a layer over budget."""
    return [c.plain if isinstance(c, Text) else c for c in _layer_cells(r)]


def _layer_cells(r: LayerResult) -> list[str | Text]:
    c = r.comparison
    return [
        str(r.index),
        r.name,
        r.class_name,
        "x".join(str(n) for n in r.output_shape),
        Text(r.status + (" !" if r.over_budget else ""), style=STATUS_STYLE[r.status]),
        _fmt_max_ulp(c),
        _fmt_float(c.p99_ulp if c else None, ".3g"),
        _fmt_float(c.max_abs if c else None, ".2e"),
        "-" if c is None else f"{100 * c.mismatch_fraction:.1f}%",
        _fmt_ratio(c.bound_ratio if c else None),
    ]


def comparison_label(report: Report) -> str:
    """The title's account of what Keras was compared with, and the mode: the NumPy order only
    where convdiff's kernels computed a layer, never for a user's implementation."""
    settings = report.settings
    mode = f"mode {settings.get('mode')}"
    if settings.get("reference"):
        return f"compared with recording {settings['reference']}, {mode}"
    order = f"order {settings.get('order_label')}"
    yours = [r.name for r in report.layers if r.impl]
    if not yours:
        return f"{order}, {mode}"
    named = ", ".join(yours) if len(yours) <= 2 else f"{len(yours)} layers"
    kernels = any(r.impl is None and r.status != "skipped" for r in report.layers)
    mine = f"your implementation for {named}"
    return f"{mine}, {order} elsewhere, {mode}" if kernels else f"{mine}, {mode}"


def render_summary(report: Report) -> Text:
    """The verdict: first divergent layer (or none), budget failures, skipped layers."""
    lines = Text()
    _headline(report, lines)
    for r in report.over_budget:
        lines.append(f"Over budget: {r.name}: {'; '.join(r.budget_violations)}\n", style="red")
    for r in report.layers:
        _layer_notes(r, lines)
    _orders_found(report.layers, lines)
    repeat = report.settings.get("repeat", 1)
    if repeat > 1:
        changed = [r for r in report.layers if r.repeat_max_ulp]
        if changed:
            worst = max(changed, key=lambda r: r.repeat_max_ulp or 0)
            lines.append(
                f"Keras changed between its {repeat} runs in {plural(len(changed), 'layer')} "
                f"(worst {worst.name}: {worst.repeat_max_ulp:,} ULP)\n",
                style="yellow",
            )
        else:
            lines.append(f"Keras gave bit-identical outputs in all {repeat} runs.\n")
    lines.append(summary_line(report))
    return lines


def _headline(report: Report, lines: Text) -> None:
    """The first line of the verdict: the first divergent layer, or why none is named."""
    first = report.first_divergent
    errors = [r.name for r in report.layers if r.status == "error"]
    if first is not None:
        c = first.comparison
        detail = (
            first.reason or ""
            if c is None
            else describe_nonfinite(c, first.side)
            or f"max {c.max_ulp:,} ULP, {_fmt_float(c.bound_ratio, '.3g')}x the rounding bound"
        )
        lines.append("First divergent layer: ", style="bold")
        lines.append(f"{first.name} ({first.class_name})", style="bold red")
        lines.append(f" - {detail}\n")
        if report.settings.get("mode") == "propagated" and first is not report.layers[-1]:
            lines.append(
                f"Later layers are fed from Keras's output of {first.name} on the NumPy side "
                "(its own output is no rounding of Keras's), so each is judged on what it adds.\n"
            )
    elif errors:
        lines.append("No compared layer diverged", style="bold")
        lines.append(f", but {plural(len(errors), 'layer')} could not be compared: ")
        lines.append(", ".join(errors), style="bold magenta")
        lines.append(" (see below).\n")
    elif not any(r.compared for r in report.layers):
        lines.append("No layer was compared.\n", style="bold yellow")
    else:
        lines.append("No layer diverged", style="bold green")
        lines.append(": every compared difference is within its rounding bound.\n")


def plural(count: int, noun: str) -> str:
    """``1 layer``, ``2 layers``, ``1,024 layers``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def summary_line(report: Report) -> Text:
    """One line: layer count, statuses, PASS or FAIL (all ``--quiet`` prints)."""
    counts = report.counts()
    tally = ", ".join(f"{counts[s]} {s}" for s in STATUS_STYLE if counts[s]) or "none compared"
    line = Text(f"{plural(len(report.layers), 'layer')}: {tally}. ")
    skipped = len(report.layers_not_compared)
    if skipped:
        total = skipped + len(report.layers)
        line.append(
            f"Stopped after the first divergent layer: {skipped} of {total} layers not compared. "
        )
    if report.over_budget:
        line.append(f"{len(report.over_budget)} over budget. ")
    line.append(
        "PASS" if report.passed else "FAIL", style="bold green" if report.passed else "bold red"
    )
    return line


def _orders_found(results: list[LayerResult], lines: Text) -> None:
    """``--order auto``: what was found for each layer, one line per distinct finding (a deep
    model repeats a few problems: MobileNetV2's 52 BatchNormalization layers share one line),
    in the order the layers come; every layer's own finding is in the JSON (``order_found``,
    with its backend calls and whether it came from the cache: a run's cost, not its
    result, so the terminal leaves them out and shows the same lines on every run)."""
    groups: dict[tuple[str, str], list[LayerResult]] = {}
    for r in results:
        if r.order_found and r.status not in ("skipped", "error"):
            key = (r.order_found["description"], r.order_found["status"])
            groups.setdefault(key, []).append(r)
    for (description, status), members in groups.items():
        lines.append(f"Order: {_names(members)}: {description} [{status}]\n")


def _names(members: list[LayerResult], shown: int = 3) -> str:
    """``conv1``, ``conv1, conv2``, or ``conv1, conv2, conv3 and 49 more (52 layers)``."""
    names = [r.name for r in members]
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more ({len(names)} layers)"


def _layer_notes(r: LayerResult, lines: Text) -> None:
    """Per-layer lines under the table: skips, errors with the user's traceback, notes, and
    for a user's implementation whose side is closer to the correctly rounded result."""
    if r.status == "skipped":
        lines.append(f"Skipped: {r.name}: {r.reason}\n", style="yellow")
        return
    if r.status == "error":
        lines.append(f"Error in {r.name}: {r.reason}\n", style="bold magenta")
        if r.likely_cause:
            lines.append(f"Likely cause: {r.name}: {r.likely_cause}\n", style="bold")
        if r.traceback:
            lines.append("    " + r.traceback.replace("\n", "\n    ") + "\n", style="magenta")
        return
    if r.reason:
        lines.append(f"Note: {r.name}: {r.reason}\n")
    if r.likely_cause:
        lines.append(f"Likely cause: {r.name}: {r.likely_cause}\n", style="bold")
    if r.orders:
        exact = [o["order"] for o in r.orders if o["bit_exact"]]
        rest = ", ".join(f"{o['order']} {o['max_ulp']:,}" for o in r.orders if not o["bit_exact"])
        head = f"bit-exact: {', '.join(exact)}" if exact else "no order is bit-exact"
        lines.append(f"Orders: {r.name}: {head}; max ULP of the others: {rest}\n")
    if r.impl and r.keras_vs_exact_ulp is not None:
        c = r.comparison
        finite = " (at the positions where both are finite)" if c and c.first_nonfinite else ""
        lines.append(
            f"Three-way: {r.name}: Keras max {r.keras_vs_exact_ulp:,} ULP from the correctly "
            f"rounded result; {r.impl}: {r.numpy_vs_exact_ulp:,} ULP{finite}\n"
        )


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character per value, on a log scale (errors grow by orders of magnitude)."""
    logs = [math.log10(1 + v) for v in values]
    top = max(logs, default=0.0) or 1.0
    return "".join(
        SPARKS[min(len(SPARKS) - 1, int(x / top * (len(SPARKS) - 1) + 0.5))] for x in logs
    )


def render_growth(report: Report) -> Text | None:
    """Propagated mode: how the difference grows over depth, and where it is amplified."""
    rows = [r for r in report.layers if r.comparison is not None]
    if report.settings.get("mode") != "propagated" or not rows:
        return None
    scaled = [c.max_ulp_scaled or 0.0 for r in rows if (c := r.comparison) is not None]
    text = Text("Growth over depth (max ULP of the terms' scale per layer): ")
    text.append(sparkline(scaled), style="cyan")
    text.append(f" {scaled[0]:.3g} -> {scaled[-1]:.3g}\n")
    amplified = [r for r in rows if r.amplification is not None]
    if amplified:
        worst = max(amplified, key=lambda r: r.amplification or 0.0)
        text.append(
            f"Largest amplification: {worst.name} x{worst.amplification:.3g} of its incoming "
            f"difference (own contribution {worst.own_ulp_scaled or 0:.3g} ULP of its scale)\n"
        )
    return text


# --histogram gives up, first to go first: bar length (down to 10 cells), the length of long
# layer names (to 16 cells), then the layer column (each name heads its layer's rows instead).
HISTOGRAM_STEPS = (NARROW, SHORTEN, HEADINGS)


def render_histograms(report: Report) -> FittedTable | None:
    """``--histogram``: each compared layer's ULP distribution as counts and bars."""
    layers = [r for r in report.layers if r.histogram]
    if not layers:
        return None
    names: list[str | Text | None] = []
    buckets: list[str | Text | None] = []
    counts: list[str | Text | None] = []
    bars: list[float] = []
    for r in layers:
        histogram = r.histogram or []
        total = max(sum(count for _, count in histogram), 1)
        for i, (bucket, count) in enumerate(histogram):
            names.append(r.name if i == 0 else None)
            buckets.append(bucket)
            counts.append(f"{count:,}")
            bars.append(count / total)
    columns = [
        Column("layer", names, names=True),
        Column("ULP", buckets),
        Column("count", counts, justify="right"),
        Column("", bars=bars),
    ]
    return FittedTable(columns, HISTOGRAM_STEPS, title="ULP distribution")


# --show-worst gives up, first to go first: the bound, the correctly rounded value, the length
# of long layer names (to 16 cells), the layer column (each name heads its layer's rows
# instead), the ULP distance. The index and both compared values always stay.
WORST_STEPS = ("bound", "exact", SHORTEN, HEADINGS, "ULP")


def render_worst(report: Report) -> FittedTable | None:
    """``--show-worst K``: the worst elements with both values, the exact value and bound; the
    second value's column is named after the side that was compared with Keras."""
    layers = [r for r in report.layers if r.worst_elements]
    if not layers:
        return None
    side, caption = _worst_side(report, layers)
    cells: list[list[str | None]] = []
    for r in layers:
        for i, w in enumerate(r.worst_elements or ()):
            cells.append(
                [
                    r.name if i == 0 else None,
                    str(tuple(w["index"])),
                    _fmt_float(w["reference"], ".9g"),
                    _fmt_float(w["candidate"], ".9g"),
                    _fmt_float(w.get("exact"), ".9g"),
                    _fmt_int(w.get("ulp")),
                    _fmt_float(w.get("bound"), ".3g"),
                ]
            )
    headers = ("layer", "index", "Keras", side, "exact", "ULP", "bound")
    columns = [
        Column(h, [row[i] for row in cells], "left" if i < 2 else "right", names=i == 0)
        for i, h in enumerate(headers)
    ]
    return FittedTable(columns, WORST_STEPS, title="Worst elements", caption=caption)


def compared_side(report: Report, r: LayerResult) -> str:
    """Who computed the values Keras's were compared with for layer ``r``: ``recording``
    (``--reference``), ``yours`` (``--impl``) or ``NumPy`` (convdiff's kernel)."""
    if report.settings.get("reference"):
        return "recording"
    return "yours" if r.impl else "NumPy"


def _worst_side(report: Report, layers: list[LayerResult]) -> tuple[str, str | None]:
    """The header of the compared side's values (and a caption when layers differ in it)."""
    sides = {compared_side(report, r) for r in layers}
    if len(sides) == 1:
        return sides.pop(), None
    yours = ", ".join(r.name for r in layers if r.impl)
    return "yours/NumPy", (
        f"yours/NumPy: your implementation's values for {yours}; convdiff's NumPy kernel's "
        "for the other layers"
    )


def render(report: Report) -> Group:
    """Table, optional views (histograms, worst elements, growth) and summary."""
    parts = [
        render_table(report),
        render_histograms(report),
        render_worst(report),
        render_growth(report),
        render_summary(report),
    ]
    return Group(*(p for p in parts if p is not None))


def to_json(report: Report) -> str:
    """The report as JSON (non-finite figures as strings "inf"/"nan", so it stays valid JSON)."""
    return json.dumps(json_safe(report.to_dict()), indent=2) + "\n"
