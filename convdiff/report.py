"""Results -> a report object, rich renderables and JSON. Never prints by itself."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from convdiff import __version__
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
    """Everything a run found: the data behind the table, the JSON and the exit status."""

    model: str
    inputs: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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


def render_table(report: Report) -> Table:
    """One row per layer call: index, name, class, shape, status and the error figures."""
    table = Table(
        title=f"convdiff: {report.model}  (order {report.settings.get('order_label')}, "
        f"mode {report.settings.get('mode')})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for header, justify in (
        ("#", "right"),
        ("layer", "left"),
        ("class", "left"),
        ("shape", "left"),
        ("status", "left"),
        ("max ULP", "right"),
        ("p99 ULP", "right"),
        ("max abs", "right"),
        ("differ", "right"),
        ("/bound", "right"),
    ):
        table.add_column(header, justify=justify, overflow="fold", no_wrap=header != "layer")
    for r in report.layers:
        c = r.comparison
        status = Text(r.status + (" !" if r.over_budget else ""), style=STATUS_STYLE[r.status])
        table.add_row(
            str(r.index),
            r.name,
            r.class_name,
            "x".join(str(n) for n in r.output_shape),
            status,
            _fmt_max_ulp(c),
            _fmt_float(c.p99_ulp if c else None, ".3g"),
            _fmt_float(c.max_abs if c else None, ".2e"),
            "-" if c is None else f"{100 * c.mismatch_fraction:.1f}%",
            _fmt_ratio(c.bound_ratio if c else None),
        )
    return table


def render_summary(report: Report) -> Text:
    """The verdict: first divergent layer (or none), budget failures, skipped layers."""
    lines = Text()
    _headline(report, lines)
    for r in report.over_budget:
        lines.append(f"Over budget: {r.name}: {'; '.join(r.budget_violations)}\n", style="red")
    for r in report.layers:
        _layer_notes(r, lines)
    repeat = report.settings.get("repeat", 1)
    if repeat > 1:
        changed = [r for r in report.layers if r.repeat_max_ulp]
        if changed:
            worst = max(changed, key=lambda r: r.repeat_max_ulp)
            lines.append(
                f"Keras changed between its {repeat} runs in {len(changed)} layers "
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
        lines.append(f", but {_count(len(errors), 'layer')} could not be compared: ")
        lines.append(", ".join(errors), style="bold magenta")
        lines.append(" (see below).\n")
    elif not any(r.compared for r in report.layers):
        lines.append("No layer was compared.\n", style="bold yellow")
    else:
        lines.append("No layer diverged", style="bold green")
        lines.append(": every compared difference is within its rounding bound.\n")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def summary_line(report: Report) -> Text:
    """One line: layer count, statuses, PASS or FAIL (all ``--quiet`` prints)."""
    counts = report.counts()
    tally = ", ".join(f"{counts[s]} {s}" for s in STATUS_STYLE if counts[s]) or "none compared"
    line = Text(f"{len(report.layers)} layers: {tally}. ")
    if report.over_budget:
        line.append(f"{len(report.over_budget)} over budget. ")
    line.append(
        "PASS" if report.passed else "FAIL", style="bold green" if report.passed else "bold red"
    )
    return line


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
    scaled = [r.comparison.max_ulp_scaled or 0.0 for r in rows]
    text = Text("Growth over depth (max ULP of the terms' scale per layer): ")
    text.append(sparkline(scaled), style="cyan")
    text.append(f" {scaled[0]:.3g} -> {scaled[-1]:.3g}\n")
    amplified = [r for r in rows if r.amplification is not None]
    if amplified:
        worst = max(amplified, key=lambda r: r.amplification)
        text.append(
            f"Largest amplification: {worst.name} x{worst.amplification:.3g} of its incoming "
            f"difference (own contribution {worst.own_ulp_scaled or 0:.3g} ULP of its scale)\n"
        )
    return text


def render_histograms(report: Report) -> Table | None:
    """``--histogram``: each compared layer's ULP distribution as counts and bars."""
    rows = [r for r in report.layers if r.histogram]
    if not rows:
        return None
    table = Table(title="ULP distribution", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("layer", "ULP", "count", ""):
        table.add_column(header, justify="right" if header == "count" else "left")
    for r in rows:
        total = max(sum(count for _, count in r.histogram), 1)
        for i, (bucket, count) in enumerate(r.histogram):
            bar = "█" * max(int(40 * count / total + 0.5), 1 if count else 0)
            table.add_row(r.name if i == 0 else "", bucket, f"{count:,}", bar)
    return table


def render_worst(report: Report) -> Table | None:
    """``--show-worst K``: the worst elements with both values, the exact value and bound."""
    rows = [r for r in report.layers if r.worst_elements]
    if not rows:
        return None
    table = Table(title="Worst elements", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("layer", "index", "Keras", "NumPy", "exact", "ULP", "bound"):
        table.add_column(header, justify="left" if header in ("layer", "index") else "right")
    for r in rows:
        for i, w in enumerate(r.worst_elements):
            table.add_row(
                r.name if i == 0 else "",
                str(tuple(w["index"])),
                _fmt_float(w["reference"], ".9g"),
                _fmt_float(w["candidate"], ".9g"),
                _fmt_float(w.get("exact"), ".9g"),
                _fmt_int(w.get("ulp")),
                _fmt_float(w.get("bound"), ".3g"),
            )
    return table


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
