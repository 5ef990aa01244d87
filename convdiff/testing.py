"""A pytest helper for users' own test suites.

    from convdiff.testing import assert_layers_match

    def test_my_model_matches_numpy(my_model, x):
        assert_layers_match(my_model, x, max_ulp=4)

The AssertionError names the first failing layer in execution order (divergent, error or over
budget) with its figures, so a failing test says where the model went wrong.
"""

from __future__ import annotations

import math
from typing import Any

from convdiff.orders import Order
from convdiff.report import Report, compared_side, comparison_label, plural
from convdiff.runner import LayerResult

__all__ = ["assert_layers_match", "failing_layers"]


def assert_layers_match(
    model: Any,
    x: Any,
    max_ulp: int | None = None,
    order: str | Order | None = None,
    mode: str = "isolated",
    **compare_kwargs: Any,
) -> Report:
    """Assert that every layer of ``model`` on ``x`` matches convdiff's NumPy kernels.

    A layer fails when it is divergent (a difference no rounding explains), ``error`` (the
    comparison could not be made) or over budget (above ``max_ulp``). Skipped layers (no
    kernel) do not fail; they are listed in the returned report.

    Args:
        model: a Keras model object or a path to a .keras/.h5 file.
        x: the input: an array, a list of arrays, a dict by input name, or a .npy/.npz path.
        max_ulp: fail a layer whose largest ULP difference exceeds this; None: no budget.
        order: the NumPy side's summation order (see :mod:`convdiff.orders`); None: the
            default, ``auto`` (:func:`convdiff.api.compare`).
        mode: ``isolated`` or ``propagated``.
        **compare_kwargs: passed on to :func:`convdiff.api.compare` (``fma``, ``impls``...).

    Returns:
        The :class:`~convdiff.report.Report`, when no layer fails.

    Raises:
        AssertionError: naming the first failing layer, its status, max ULP, bound ratio and
            reason, and how many other layers failed.
        ConvdiffError: when the run cannot be made (model, input or option unusable).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this helper's
    from convdiff.api import compare

    report = compare(model, x, order=order, mode=mode, max_ulp=max_ulp, **compare_kwargs)
    failing = failing_layers(report)
    if failing:
        raise AssertionError(_message(report, failing))
    return report


def failing_layers(report: Report) -> list[LayerResult]:
    """The layers that fail a report, in execution order: divergent, error or over budget."""
    return [r for r in report.layers if r.status in ("divergent", "error") or r.over_budget]


def _message(report: Report, failing: list[LayerResult]) -> str:
    first = failing[0]
    lines = [
        f"convdiff: layer {first.index} {first.name!r} ({first.class_name}) "
        f"{_verdict(first)}: {_figures(first, report)}"
    ]
    if first.reason:
        lines.append(f"  reason: {first.reason}")
    if first.traceback:
        lines += ["  " + line for line in first.traceback.splitlines()]
    worst = first.comparison.worst if first.comparison is not None else None
    if worst is not None:
        lines.append(
            f"  worst element {worst.index}: Keras {worst.reference!r}, "
            f"{compared_side(report, first)} {worst.candidate!r} ({worst.ulp:,} ULP)"
        )
    others = failing[1:]
    if others:
        names = ", ".join(f"{r.name}: {_verdict(r)}" for r in others[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        lines.append(f"  {plural(len(others), 'later layer')} failed too: {names}{more}")
    lines.append(f"  {comparison_label(report)}, model {report.model}")
    return "\n".join(lines)


def _verdict(r: LayerResult) -> str:
    if r.status in ("divergent", "error"):
        return r.status + (", over budget" if r.over_budget else "")
    return f"over budget ({r.status})"


def _figures(r: LayerResult, report: Report) -> str:
    c = r.comparison
    if c is None:
        return "not compared"
    parts = [f"max {c.max_ulp:,} ULP"]
    parts += r.budget_violations
    if c.bound_ratio is not None:
        ratio = "inf" if math.isinf(c.bound_ratio) else f"{c.bound_ratio:.3g}"
        parts.append(f"{ratio}x the rounding bound")
    parts.append(f"max abs {c.max_abs:.3g}, {100 * c.mismatch_fraction:.1f}% of elements differ")
    if c.nan_mismatch or c.inf_mismatch:
        parts.append(f"{c.nan_mismatch} NaN and {c.inf_mismatch} inf mismatches")
    return "; ".join(parts)
