"""A report as JUnit XML, for the test-report views of CI systems (Jenkins, GitLab, GitHub
reporters such as action-junit-report).

One ``<testcase>`` per layer call, in execution order:

- ``classname``: the model file's name; ``name``: ``"<index> <layer name> (<class>)"``, unique
  even when a shared layer is called twice.
- ``<failure>`` when the layer is divergent or over budget, ``<error>`` when its status is
  ``error`` (the comparison could not be made), ``<skipped>`` when no kernel computed it.
- The run's settings and environment are ``<property>`` elements of the ``<testsuite>``; its
  ``tests``/``failures``/``errors``/``skipped`` counts are those of the test cases.

The layout follows the Ant/Surefire format that those readers share (``testsuites`` >
``testsuite`` > ``properties``, ``testcase``...).
"""

from __future__ import annotations

import json
import math
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

from convdiff.outputs import json_safe
from convdiff.report import Report, compared_side
from convdiff.runner import LayerResult

__all__ = ["to_junit"]

# Characters XML 1.0 cannot carry at all (not even escaped): C0 controls except tab, LF, CR,
# surrogates, U+FFFE/U+FFFF. A reason or traceback could contain them.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def to_junit(report: Report | Sequence[Report], *, timestamp: datetime | None = None) -> bytes:
    """The report (or several, one per input) as a UTF-8 JUnit XML document: one
    ``<testsuite>`` per report, one ``<testcase>`` per layer, timed by the layer's
    ``seconds`` (running it through Keras and comparing it).

    Args:
        report: the run's report, or the reports of a run over many inputs.
        timestamp: when the run started (default: now, UTC).

    Returns:
        The XML document, with its declaration, as bytes.
    """
    reports = [report] if isinstance(report, Report) else list(report)
    stamp = (timestamp or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S")
    suites = [_suite(r, stamp, len(reports) > 1) for r in reports]
    totals = {k: sum(int(s.attrib[k]) for s in suites) for k in ("tests", "failures", "errors")}
    total = _fmt_time(sum(float(s.attrib["time"]) for s in suites))
    # Jenkins' schema has no "skipped" on <testsuites>: only on <testsuite>.
    root = ET.Element("testsuites", {"name": "convdiff", "time": total, **_str_values(totals)})
    root.extend(suites)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'.encode()


def _suite(report: Report, stamp: str, per_input: bool) -> ET.Element:
    """One report as a ``<testsuite>``."""
    classname = PurePath(str(report.model)).name or str(report.model)
    cases = [_testcase(r, classname, report) for r in report.layers]
    counts = {
        "tests": len(cases),
        "failures": sum(c.find("failure") is not None for c in cases),
        "errors": sum(c.find("error") is not None for c in cases),
        "skipped": sum(c.find("skipped") is not None for c in cases),
    }
    name = f"convdiff {classname}" + (
        f" on {PurePath(str(report.inputs)).name}" if per_input else ""
    )
    suite = ET.Element(
        "testsuite",
        {
            "name": name,
            "timestamp": stamp,
            "hostname": _clean(socket.gethostname()) or "localhost",
            "time": _fmt_time(sum(r.seconds for r in report.layers)),
            **_str_values(counts),
        },
    )
    suite.append(_properties(report))
    suite.extend(cases)
    if report.notes:
        ET.SubElement(suite, "system-out").text = _clean("\n".join(report.notes))
    return suite


def _testcase(r: LayerResult, classname: str, report: Report) -> ET.Element:
    case = ET.Element(
        "testcase",
        classname=_clean(classname),
        name=_clean(f"{r.index} {r.name} ({r.class_name})"),
        time=_fmt_time(r.seconds),
    )
    if r.status == "error":
        error = ET.SubElement(case, "error", type="error", message=_clean(_message(r, report)))
        error.text = _clean(_details(r, report))
    elif r.status == "divergent" or r.over_budget:
        kind = "divergent" if r.status == "divergent" else "over budget"
        failure = ET.SubElement(case, "failure", type=kind, message=_clean(_message(r, report)))
        failure.text = _clean(_details(r, report))
    elif r.status == "skipped":
        ET.SubElement(case, "skipped", message=_clean(r.reason or "not compared"))
    return case


def _message(r: LayerResult, report: Report) -> str:
    """One line: the verdict, max ULP, bound ratio, budget violations, reason."""
    parts = [r.status + (", over budget" if r.over_budget else "")]
    c = r.comparison
    if c is not None:
        parts.append(f"max {c.max_ulp:,} ULP")
        if c.bound_ratio is not None:
            parts.append(f"{_fmt_float(c.bound_ratio)}x the rounding bound")
        if c.nan_mismatch or c.inf_mismatch:
            parts.append(f"{c.nan_mismatch} NaN and {c.inf_mismatch} inf mismatches")
    parts += _budget_violations(r, report)
    if r.reason:
        parts.append(r.reason)
    return "; ".join(parts)


def _details(r: LayerResult, report: Report) -> str:
    """The failure's body: every figure of the layer's row, one per line."""
    lines = [f"layer {r.index} {r.name} ({r.class_name}), output {r.output_shape} {r.dtype}"]
    lines.append(f"status: {r.status}" + (" (over budget)" if r.over_budget else ""))
    if r.comparison is not None:
        c = r.comparison.to_dict()
        worst = c.pop("worst")
        lines += [f"{key}: {_fmt_value(value)}" for key, value in c.items()]
        if worst is not None:
            lines.append(
                f"worst at {tuple(worst['index'])}: Keras {worst['reference']!r}, "
                f"{compared_side(report, r)} {worst['candidate']!r}, {worst['ulp']:,} ULP, "
                f"bound {worst['bound']!r}"
            )
    lines += [f"budget: {v}" for v in _budget_violations(r, report)]
    if r.reason:
        lines.append(f"reason: {r.reason}")
    if r.traceback:
        lines.append(r.traceback)
    return "\n".join(lines)


def _budget_violations(r: LayerResult, report: Report) -> list[str]:
    """The layer's budget violations as sentences."""
    return list(r.budget_violations)


def _properties(report: Report) -> ET.Element:
    """Settings and environment as name/value properties (values as JSON for non-strings)."""
    from convdiff import __version__

    props = ET.Element("properties")
    items: list[tuple[str, Any]] = [
        ("convdiff.version", __version__),
        ("model", report.model),
        ("inputs", report.inputs),
    ]
    items += [(f"settings.{k}", v) for k, v in report.settings.items()]
    items += [(f"environment.{k}", v) for k, v in report.environment.items()]
    for name, value in items:
        text = value if isinstance(value, str) else json.dumps(json_safe(value), sort_keys=True)
        ET.SubElement(props, "property", name=_clean(name), value=_clean(text))
    return props


def _str_values(counts: dict[str, int]) -> dict[str, str]:
    return {k: str(v) for k, v in counts.items()}


def _clean(text: str) -> str:
    """Drop characters XML 1.0 cannot represent, so the document always parses."""
    return _INVALID_XML.sub("\ufffd", str(text))


def _fmt_time(seconds: float) -> str:
    return f"{max(0.0, float(seconds)):.3f}"


def _fmt_float(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return _fmt_float(value) if not math.isnan(value) else "nan"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
