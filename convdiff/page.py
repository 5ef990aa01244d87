"""A run's report as one self-contained HTML page (``--html``).

The page needs nothing but itself when opened: pictures are inline PNGs (``data:`` URIs),
styles are inline, and there are no scripts, fonts or links outside the page. It holds:

1. the summary and the per-layer table as the terminal shows them, each row linking to its
   layer's section, the first divergent layer marked;
2. over depth: every layer's largest difference over its bound, coloured and shaped by its
   verdict, the worst difference in ULPs of the terms' scale and, in propagated mode, the
   amplification of the incoming difference;
3. per compared layer: where the differences sit (the map of :mod:`convdiff.spatial`), the
   per-channel profile, the ULP histogram and the worst elements with both values.

A run over many inputs is one page with a section per input. Pictures come from
:mod:`convdiff.figures` (matplotlib).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from datetime import datetime, timezone

from convdiff import __version__
from convdiff.figures import MAP_AXES, STATUS_COLOURS, Painter
from convdiff.report import TABLE_HEADERS, Report, render_growth, render_summary, table_row
from convdiff.runner import LayerResult
from convdiff.spatial import MAP_CELLS, PROFILE_BINS, UNIT_BOUND, Spatial, round_up

__all__ = ["to_html"]

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1b1b1b; background: #fff; margin: 0 auto; padding: 0 16px 48px; max-width: 1180px; }
h1 { font-size: 22px; margin: 20px 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.meta { color: #555; margin: 0 0 8px; overflow-wrap: anywhere; }
.verdict { font-weight: 700; padding: 1px 8px; border-radius: 3px; color: #fff; }
.pass { background: #007a5a; } .fail { background: #b34700; }
pre { background: #f6f6f6; padding: 8px 10px; overflow-x: auto; font-size: 12.5px;
      white-space: pre-wrap; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; text-align: right; white-space: nowrap; border-bottom: 1px solid #eee; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
td.name { white-space: normal; overflow-wrap: anywhere; min-width: 8em; }
tr.first td { background: #fde9dc; }
.status { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff;
          font-weight: 600; }
.mark { color: #b34700; font-weight: 700; }
.layer { border: 1px solid #ddd; border-radius: 4px; padding: 10px 12px; margin: 14px 0; }
.layer.first { border: 2px solid #D55E00; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 16px; margin: 6px 0; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; }
.mapbox { position: relative; display: inline-block; max-width: 100%; }
.mapbox img.map { position: absolute; image-rendering: pixelated; }
figcaption { font-size: 12.5px; color: #444; max-width: 330px; }
img.depth { max-width: 100%; height: auto; }
.note { color: #444; margin: 2px 0; overflow-wrap: anywhere; }
.toc a { margin-right: 12px; }
"""


def to_html(report: Report | Sequence[Report]) -> bytes:
    """The report (or the reports of a run over many inputs, one section each) as a
    self-contained UTF-8 HTML page."""
    reports = [report] if isinstance(report, Report) else list(report)
    painter = Painter()
    first = reports[0]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if len(reports) == 1:
        title = f"convdiff: {first.model}"
        body = _run_section(first, painter, "", heading=False)
    else:
        failed = sum(not r.passed for r in reports)
        title = f"convdiff: {first.model}, {len(reports)} inputs"
        links = " ".join(
            f'<a href="#run{k}-top">{_e(r.inputs)}</a> {_verdict(r.passed)}'
            for k, r in enumerate(reports)
        )
        body = (
            f'<p class="meta">{len(reports)} inputs: {len(reports) - failed} PASS, '
            f'{failed} FAIL</p>\n<p class="toc">{links}</p>\n'
            + "\n".join(
                _run_section(r, painter, f"run{k}-", heading=True) for k, r in enumerate(reports)
            )
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n"
        f'<p class="meta">written {stamp} by convdiff {_e(__version__)}</p>\n'
        f"{body}\n</body>\n</html>\n"
    )
    return page.encode()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _verdict(passed: bool) -> str:
    word = "PASS" if passed else "FAIL"
    return f'<span class="verdict {word.lower()}">{word}</span>'


def _status(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#555")
    return f'<span class="status" style="background:{colour}">{_e(status)}</span>'


def _img(png: bytes, alt: str, css: str = "", style: str = "") -> str:
    import io

    from PIL import Image

    width, height = Image.open(io.BytesIO(png)).size
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    placed = f' style="{style}"' if style else ""
    return (
        f'<img{cls}{placed} src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="{_e(alt)}">'
    )


def _map(name: str, s: Spatial, painter: Painter, unit: str) -> str:
    """The map: its cells (one pixel each, enlarged without smoothing) laid over its frame
    (axes, ticks, colour bar) exactly where the frame's axes are."""
    left, bottom, width, height = (100 * v for v in MAP_AXES)
    place = (
        f"left:{left:.3f}%;top:{100 - bottom - height:.3f}%;width:{width:.3f}%;height:{height:.3f}%"
    )
    frame = _img(painter.map_frame(s), f"{name}: axes and colour scale of the map", "frame")
    cells = _img(painter.map_cells(s), f"{name}: map of {unit}", "map", place)
    return f'<div class="mapbox">{frame}{cells}</div>'


def _run_section(report: Report, painter: Painter, prefix: str, heading: bool) -> str:
    """One run: header, summary, depth overview, table, one section per layer."""
    settings = report.settings
    parts = [f'<section id="{prefix}top">']
    if heading:
        parts.append(f"<h2>Input {_e(report.inputs)} {_verdict(report.passed)}</h2>")
    parts.append(
        f'<p class="meta">model {_e(report.model)} &middot; input {_e(report.inputs)} &middot; '
        f"order {_e(settings.get('order_label'))} &middot; mode {_e(settings.get('mode'))}"
        f"{_candidate_note(settings)} &middot; {_verdict(report.passed)}</p>"
    )
    parts.append(_summary(report, prefix))
    if report.layers:
        parts.append(_depth(report, painter))
        parts.append(_table(report, prefix))
        parts.append(f"<h2>Layers</h2>\n{_layers_note()}")
        first = report.first_divergent
        parts.extend(_layer(r, report, painter, prefix, r is first) for r in report.layers)
    parts.append(_details(report))
    parts.append("</section>")
    return "\n".join(parts)


def _candidate_note(settings: dict) -> str:
    if settings.get("reference"):
        return f" &middot; compared with the recording {_e(settings['reference'])}"
    impls = settings.get("impls") or {}
    if impls:
        return " &middot; your implementations: " + ", ".join(
            f"{_e(k)}={_e(v)}" for k, v in impls.items()
        )
    return ""


def _summary(report: Report, prefix: str) -> str:
    """The terminal's summary lines, the first divergent layer linked."""
    text = render_summary(report).plain
    growth = render_growth(report)
    lines = _e(text)
    first = report.first_divergent
    if first is not None:
        name = _e(f"{first.name} ({first.class_name})")
        lines = lines.replace(name, f'<a href="#{prefix}layer-{first.index}">{name}</a>', 1)
    grown = f"<pre>{_e(growth.plain.rstrip())}</pre>" if growth is not None else ""
    return f"<h2>Summary</h2>\n<pre>{lines.rstrip()}</pre>\n{grown}"


def _depth(report: Report, painter: Painter) -> str:
    # amplification is measured in propagated mode against convdiff's own kernels
    propagated = report.settings.get("mode") == "propagated" and not report.settings.get(
        "reference"
    )
    png = painter.depth(report.layers, propagated)
    what = (
        "Each layer's largest difference over its rounding bound (above the dashed line: no "
        "summation order explains it), marked by its verdict; below, the worst difference in "
        "ULPs of the magnitude of the terms it was computed from"
        + (
            ", and the amplification of the difference each layer received (above 1: the layer "
            "made it larger)."
            if propagated
            else "."
        )
        + " Layers without a figure (skipped, or no difference) sit at the bottom."
    )
    return (
        f"<h2>Over depth</h2>\n<figure>{_img(png, 'differences over depth', 'depth')}"
        f'<figcaption style="max-width:none">{what}</figcaption></figure>'
    )


_LEFT = ("layer", "class", "shape", "status")  # left-aligned columns, as in the terminal


def _table(report: Report, prefix: str) -> str:
    """The terminal's table; each row links to its layer, the first divergent is marked."""
    heads = "".join(
        f'<th class="{"l" if name in _LEFT else ""}">{_e(name)}</th>' for name in TABLE_HEADERS
    )
    first = report.first_divergent
    rows = []
    for r in report.layers:
        tds = []
        for name, cell in zip(TABLE_HEADERS, table_row(r), strict=True):
            cls = "l" if name in _LEFT else ""
            if name == "layer":
                cell_html = f'<a href="#{prefix}layer-{r.index}">{_e(cell)}</a>'
                cls += " name"
                if r is first:
                    cell_html += ' <span class="mark">&#9664; first divergent</span>'
            elif name == "status":
                cell_html = _status(r.status) + (" !" if r.over_budget else "")
            else:
                cell_html = _e(cell)
            tds.append(f'<td class="{cls.strip()}">{cell_html}</td>')
        row_class = ' class="first"' if r is first else ""
        rows.append(f"<tr{row_class}>{''.join(tds)}</tr>")
    return (
        f'<h2>Layers at a glance</h2>\n<div class="scroll"><table>\n<thead><tr>{heads}</tr>'
        f"</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>"
    )


def _layers_note() -> str:
    return (
        '<p class="note">Maps are drawn on one colour scale for every layer: the difference '
        "of each element over its rounding bound, grey where bitwise equal, the maximum over "
        "the axes not shown (batch, channels) and, for maps larger than "
        f"{MAP_CELLS}x{MAP_CELLS}, over blocks of positions (each caption says how large); "
        f"channel profiles hold at most {PROFILE_BINS} entries, each the maximum over a block "
        "of channels. A layer with no bound (no convdiff kernel) is drawn in ULPs.</p>"
    )


def _layer(r: LayerResult, report: Report, painter: Painter, prefix: str, first: bool) -> str:
    """One layer's section: verdict, notes, pictures, worst elements."""
    c = r.comparison
    figures = ""
    if c is not None:
        figures = (
            f"max ULP {c.max_ulp:,} &middot; {100 * c.mismatch_fraction:.1f}% of "
            f"{c.size:,} elements differ"
            + (
                ""
                if c.bound_ratio is None
                else f" &middot; largest difference / bound {c.bound_ratio:.3g}"
            )
        )
    mark = ' <span class="mark">first divergent</span>' if first else ""
    parts = [
        f'<div class="layer{" first" if first else ""}" id="{prefix}layer-{r.index}">',
        f"<h3>#{r.index} {_e(r.name)} ({_e(r.class_name)}) "
        f"{'x'.join(str(n) for n in r.output_shape)} {_status(r.status)}{mark}</h3>",
    ]
    if figures:
        parts.append(f'<p class="note">{figures}</p>')
    parts.extend(f'<p class="note">{_e(line)}</p>' for line in _notes(r))
    if r.traceback:
        parts.append(f"<pre>{_e(r.traceback)}</pre>")
    if r.spatial is not None:
        parts.append(_pictures(r.name, r.spatial, painter, _side(r, report)))
    elif c is not None or r.status not in ("skipped", "error"):
        parts.append('<p class="note">No pictures: the layer\'s output is not floating point.</p>')
    else:
        parts.append('<p class="note">No pictures: the layer was not compared.</p>')
    parts.append("</div>")
    return "\n".join(parts)


def _notes(r: LayerResult) -> list[str]:
    notes = []
    if r.reason:
        notes.append(("Error: " if r.status == "error" else "Note: ") + r.reason)
    if r.likely_cause:
        notes.append(f"Likely cause: {r.likely_cause}")
    notes.extend(f"Over budget: {v}" for v in r.budget_violations)
    if r.impl and r.keras_vs_exact_ulp is not None:
        notes.append(
            f"Three-way: Keras max {r.keras_vs_exact_ulp:,} ULP from the correctly rounded "
            f"result; {r.impl}: {r.numpy_vs_exact_ulp:,} ULP"
        )
    if r.amplification is not None:
        notes.append(
            f"Amplification of the incoming difference: x{r.amplification:.3g} (own "
            f"contribution {r.own_ulp_scaled or 0:.3g} ULP of the terms' scale)"
        )
    return notes


def _side(r: LayerResult, report: Report) -> str:
    """What the Keras side was compared with, for column headers."""
    if report.settings.get("reference"):
        return "recorded"
    return "yours" if r.impl else "NumPy"


def _pictures(name: str, s: Spatial, painter: Painter, side: str) -> str:
    """Map, channel profile and histogram with their captions, then the worst elements.
    The figures' ``data-`` attributes hold the summary's numbers (as in the JSON)."""
    rows, cols = s.layout.names
    shown = f"{rows} x {cols}" if rows else (cols or "the value")
    over = (
        f" {s.over_bound:,} of {s.size:,} elements ({100 * s.over_bound / max(s.size, 1):.2g}%) "
        "are above their bound."
        if s.over_bound is not None
        else ""
    )
    unit = "difference / rounding bound" if s.unit == UNIT_BOUND else "ULP distance"
    captions = (
        f"Where: {shown}; colour: {unit}, {s.describe()}.{over}",
        f"Per {'feature' if cols == 'feature' else 'channel'}: the largest {unit} of each"
        + (f" block of {s.channel_block}" if s.channel_block > 1 else "")
        + f" ({s.channels:,} in all).",
        f"ULP distances, counts on a log scale: {s.differing:,} of {s.size:,} elements differ.",
    )
    pictures = (
        _map(name, s, painter, unit),
        _img(painter.profile(s), f"{name}: per-channel profile", "profile"),
        _img(painter.histogram(s), f"{name}: histogram of ULP distances", "histogram"),
    )
    figures = "".join(
        f"<figure>{picture}<figcaption>{_e(caption)}</figcaption></figure>"
        for picture, caption in zip(pictures, captions, strict=True)
    )
    data = (
        f'data-unit="{_e(s.unit)}" data-peak="{round_up(s.peak)}" '
        f'data-differing="{s.differing}" data-over-bound="{_e(s.over_bound)}"'
    )
    return f'<div class="figures" {data}>{figures}</div>\n{_worst(s, side)}'


def _worst(s: Spatial, side: str) -> str:
    if not s.worst:
        return '<p class="note">Every element is bitwise equal.</p>'
    head = (
        f'<tr><th class="l">index</th><th>Keras</th><th>{_e(side)}</th><th>ULP</th>'
        "<th>|difference|</th><th>bound</th><th>/bound</th></tr>"
    )
    rows = "".join(
        "<tr>"
        f'<td class="l">{_e(tuple(w["index"]))}</td>'
        f"<td>{w['reference']:.9g}</td><td>{w['candidate']:.9g}</td>"
        f"<td>{'-' if w['ulp'] is None else format(w['ulp'], ',')}</td>"
        f"<td>{'-' if w['abs_err'] is None else format(w['abs_err'], '.3g')}</td>"
        f"<td>{'-' if w['bound'] is None else format(w['bound'], '.3g')}</td>"
        f"<td>{'-' if w['bound_ratio'] is None else format(w['bound_ratio'], '.3g')}</td>"
        "</tr>"
        for w in s.worst
    )
    ranked = "difference / bound" if s.worst[0]["bound"] is not None else "ULP distance"
    return (
        f'<p class="note">Worst elements by {ranked}:</p>'
        f'<div class="scroll"><table>{head}{rows}</table></div>'
    )


def _details(report: Report) -> str:
    """Settings, environment and notes, folded away."""
    shown = {
        "settings": report.settings,
        "environment": report.environment,
        "notes": report.notes,
    }
    text = json.dumps(shown, indent=2, default=str)
    return f"<details><summary>Settings and environment</summary><pre>{_e(text)}</pre></details>"
