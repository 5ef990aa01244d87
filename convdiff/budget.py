"""Budgets: how far a layer's NumPy output may be from Keras's before a run fails.

A budget is independent of the rounding verdict: a difference can be pure rounding (within the
rigorous bound) and still exceed what a team accepts in CI, e.g. more than 8 ULP anywhere.

Limits, each optional, each with per-layer overrides written ``PATTERN=VALUE``:

- ``max_ulp``: the largest ULP distance (or, with ``quantile``, the Q-quantile of the ULP
  distances) may not exceed N.
- ``atol`` / ``rtol``: elementwise, like ``numpy.isclose``: ``|c - r| <= atol + rtol * |r|``,
  with ``r`` the reference (Keras) and ``c`` the candidate (NumPy) output; a missing one of the
  two counts as 0. With ``quantile``, at least a fraction Q of the elements must satisfy it.

Overrides match a layer's name (full, e.g. ``outer/conv#2``, or bare, ``conv``) or its class
name with a case-sensitive shell-style glob (``conv2d_3``, ``block*``, ``Conv2D``), as ``--impl``
keys do; the last matching override wins, else the global value applies. The value ``off``
removes that limit for the matching layers.

Only positions where both sides are finite are budgeted: NaN and inf disagreements are findings
of their own (counted by :func:`convdiff.metrics.compare`), not a tolerance question.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from convdiff.errors import OptionError
from convdiff.floats import is_float
from convdiff.graph import layer_matches
from convdiff.metrics import scaled_ulp, ulp_distance

__all__ = ["Budget", "LayerLimits", "Rule", "parse_budget", "ulp_quantile"]

# A rule's value: None means "off" (no limit for the layers it matches).
Value = float | int | None


@dataclass(frozen=True)
class Rule:
    """One ``--max-ulp``/``--atol``/``--rtol`` value: global (``pattern`` None) or an override.

    Attributes:
        pattern: glob on the layer name or class name; None for the global value.
        value: the limit, or None for ``off``.
    """

    pattern: str | None
    value: Value

    def matches(self, name: str, class_name: str) -> bool:
        return self.pattern is None or layer_matches(self.pattern, name, class_name)

    def label(self, option: str) -> str:
        """How the user wrote it, e.g. ``--max-ulp conv2d_3=8``."""
        shown = "off" if self.value is None else _fmt(self.value)
        return f"{option} {shown if self.pattern is None else f'{self.pattern}={shown}'}"


@dataclass(frozen=True)
class LayerLimits:
    """The limits that apply to one layer after resolving overrides (None: no limit)."""

    max_ulp: int | None
    atol: float | None
    rtol: float | None

    @property
    def tolerance(self) -> bool:
        """True if an atol/rtol check applies (the missing one of the two counts as 0)."""
        return self.atol is not None or self.rtol is not None


@dataclass(frozen=True)
class Budget:
    """Per-layer limits on the difference between the reference and the candidate output.

    Build it with :func:`parse_budget`. Each rule tuple holds the global value (if given) first,
    then the overrides in the order given; the last rule that matches a layer decides.

    Attributes:
        max_ulp: rules for the ULP limit.
        atol: rules for the absolute tolerance.
        rtol: rules for the relative tolerance.
        quantile: Q in (0, 1]: budget the Q-quantile instead of the maximum; None means the max.
        metric: ``raw`` ULPs of the output, or ``scaled``: ULPs of the magnitude of the terms
            each output was summed from (see :func:`convdiff.metrics.scaled_ulp`).
    """

    max_ulp: tuple[Rule, ...] = ()
    atol: tuple[Rule, ...] = ()
    rtol: tuple[Rule, ...] = ()
    quantile: float | None = None
    metric: str = "raw"

    @property
    def active(self) -> bool:
        """True if any limit was given."""
        return bool(self.max_ulp or self.atol or self.rtol)

    @property
    def global_max_ulp(self) -> int | None:
        """The global ULP limit, or None (for reports that show one number)."""
        value = next((r.value for r in self.max_ulp if r.pattern is None), None)
        return None if value is None else int(value)

    def limits_for(self, name: str, class_name: str) -> LayerLimits:
        """Resolve the rules for one layer: the last matching rule of each kind wins."""
        ulp = _value(_resolve(self.max_ulp, name, class_name))
        return LayerLimits(
            max_ulp=None if ulp is None else int(ulp),
            atol=_value(_resolve(self.atol, name, class_name)),
            rtol=_value(_resolve(self.rtol, name, class_name)),
        )

    def check(
        self,
        name: str,
        class_name: str,
        reference: np.ndarray,
        candidate: np.ndarray,
        scale: np.ndarray | None = None,
    ) -> list[str]:
        """The limits this layer's output violates, as sentences (empty: within budget).

        Args:
            name: the layer's name (as in the report, e.g. ``outer/conv`` or ``conv#2``).
            class_name: its Keras class name.
            reference: Keras's output.
            candidate: the NumPy side's output, same shape and dtype (integer outputs are
                compared as float64, like the runner does).
            scale: per-element magnitude of the summed terms, for the ``scaled`` metric (the
                raw metric is used where it is None).

        Returns:
            One human-readable string per violated limit, e.g. ``"max ULP 12 > 8 (--max-ulp
            conv2d_3=8)"``.
        """
        ref, cand = _as_float(reference, candidate)
        ulp_rule = _resolve(self.max_ulp, name, class_name)
        atol_rule = _resolve(self.atol, name, class_name)
        rtol_rule = _resolve(self.rtol, name, class_name)
        if not any(_value(rule) is not None for rule in (ulp_rule, atol_rule, rtol_rule)):
            return []  # no limit for this layer: nothing to measure
        finite = np.isfinite(ref) & np.isfinite(cand)
        violations = []
        if ulp_rule is not None and ulp_rule.value is not None:
            limit = int(ulp_rule.value)
            if self.metric == "scaled" and scale is not None and is_float(reference.dtype):
                scaled = scaled_ulp(reference, candidate, scale, reference.dtype)[finite]
                violations += self._check_scaled(scaled, limit, ulp_rule)
            else:
                violations += self._check_ulp(ref, cand, finite, limit, ulp_rule)
        if _value(atol_rule) is not None or _value(rtol_rule) is not None:
            violations += self._check_tolerance(ref, cand, finite, atol_rule, rtol_rule)
        return violations

    def _check_ulp(
        self, ref: np.ndarray, cand: np.ndarray, finite: np.ndarray, max_ulp: int, rule: Rule
    ) -> list[str]:
        ulp = ulp_distance(ref, cand)[finite]
        q = 1.0 if self.quantile is None else self.quantile
        measured = _quantile_of(ulp, q)
        if measured <= max_ulp:
            return []
        what = "max ULP" if q >= 1.0 else f"{_fmt_q(q)} ULP quantile"
        return [f"{what} {measured:,} > {max_ulp:,} ({rule.label('--max-ulp')})"]

    def _check_scaled(self, scaled: np.ndarray, max_ulp: int, rule: Rule) -> list[str]:
        q = 1.0 if self.quantile is None else self.quantile
        measured = _quantile_of(scaled, q, exact=False)
        if measured <= max_ulp:
            return []
        what = "max scaled ULP" if q >= 1.0 else f"{_fmt_q(q)} scaled ULP quantile"
        return [f"{what} {measured:.3g} > {max_ulp:,} ({rule.label('--max-ulp')})"]

    def _check_tolerance(
        self,
        ref: np.ndarray,
        cand: np.ndarray,
        finite: np.ndarray,
        atol_rule: Rule | None,
        rtol_rule: Rule | None,
    ) -> list[str]:
        atol, rtol = _value(atol_rule) or 0.0, _value(rtol_rule) or 0.0
        r64, c64 = ref[finite].astype(np.float64), cand[finite].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            # float64 holds every value of the <= 32-bit dtypes exactly; the difference of two
            # float64 outputs can overflow to inf, which correctly fails any finite tolerance.
            diff = np.abs(c64 - r64)
            allowed = atol + rtol * np.abs(r64)
        outside = diff > allowed
        count = int(np.count_nonzero(outside))
        permitted = _permitted_outside(int(diff.size), self.quantile)
        if count <= permitted:
            return []
        worst = int(np.argmax(np.where(outside, diff - allowed, -np.inf)))
        given = ((atol_rule, "--atol"), (rtol_rule, "--rtol"))
        rules = ", ".join(rule.label(option) for rule, option in given if rule is not None)
        allowance = ""
        if self.quantile is not None:
            allowance = f"; quantile {_fmt_q(self.quantile)} allows {permitted:,}"
        return [
            f"{count:,} of {diff.size:,} elements outside atol {_fmt(atol)} + rtol {_fmt(rtol)}"
            f" x |ref| (worst |diff| {diff[worst]:.3g} where {allowed[worst]:.3g} is allowed"
            f"{allowance}) ({rules})"
        ]

    def unmatched_patterns(self, layers: Iterable[tuple[str, str]]) -> list[str]:
        """Overrides that match none of ``layers`` (name, class_name): likely typos to report."""
        layers = list(layers)
        options = (("--max-ulp", self.max_ulp), ("--atol", self.atol), ("--rtol", self.rtol))
        return [
            rule.label(option)
            for option, rules in options
            for rule in rules
            if _matches_none(rule, layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, for the report's settings."""

        def rules(items: tuple[Rule, ...]) -> list[dict[str, Any]]:
            return [{"pattern": r.pattern, "value": r.value} for r in items]

        return {
            "max_ulp": rules(self.max_ulp),
            "atol": rules(self.atol),
            "rtol": rules(self.rtol),
            "quantile": self.quantile,
            "ulp_metric": self.metric,
        }


# --------------------------------------------------------------------------- quantiles


def ulp_quantile(reference: np.ndarray, candidate: np.ndarray, q: float) -> int:
    """The Q-quantile of the ULP distances over the positions where both sides are finite.

    The quantile is the smallest observed distance ``d`` such that at least a fraction ``q`` of
    the finite positions lie within ``d`` ULP (numpy's ``inverted_cdf`` method): an actual
    distance, never an interpolation, so ``ulp_quantile(r, c, q) <= N`` exactly when at least
    ``q`` of the elements are within N ULP. ``q = 1`` is the maximum. ``q`` is read as the
    decimal the user wrote (0.1 of 10 elements is 1 element, not 2).

    Args:
        reference: float (or integer, compared as float64) array.
        candidate: array of the same shape and dtype.
        q: in (0, 1].

    Returns:
        The quantile as an int; 0 when no position is finite on both sides.

    Raises:
        ValueError: for q outside (0, 1] or arrays that differ in shape or dtype.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1]; received {q}")
    ref, cand = _as_float(reference, candidate)
    finite = np.isfinite(ref) & np.isfinite(cand)
    return _quantile_of(ulp_distance(ref, cand)[finite], q)


def _quantile_of(ulp: np.ndarray, q: float, exact: bool = True) -> Any:
    """Inverted-CDF quantile of a flat array: an int for ULP counts (no float rounding of
    ULPs), a float for scaled ULPs (``exact=False``)."""
    convert = int if exact else float
    n = int(ulp.size)
    if n == 0:
        return convert(0)
    if q >= 1.0:
        return convert(ulp.max())
    # The k-th smallest value (1-based) with k = ceil(q * n), computed exactly in decimal.
    k = max(1, math.ceil(Fraction(repr(q)) * n))
    return convert(np.partition(ulp, k - 1)[k - 1])


def _permitted_outside(n: int, quantile: float | None) -> int:
    """How many of n elements may break the tolerance: n - ceil(q * n)."""
    if quantile is None or quantile >= 1.0:
        return 0
    return n - math.ceil(Fraction(repr(quantile)) * n)


# --------------------------------------------------------------------------- parsing


def parse_budget(
    max_ulp: Sequence[str] = (),
    atol: Sequence[str] = (),
    rtol: Sequence[str] = (),
    quantile: float | None = None,
    metric: str = "raw",
) -> Budget:
    """Build a :class:`Budget` from CLI-style values.

    Args:
        max_ulp: each ``N`` (global, at most one) or ``PATTERN=N``, N a whole number >= 0 or
            ``off``.
        atol: each ``A`` or ``PATTERN=A``, A a finite number >= 0 or ``off``.
        rtol: each ``R`` or ``PATTERN=R``, likewise.
        quantile: Q in (0, 1], or None for the maximum.
        metric: ``raw`` or ``scaled`` ULPs for ``max_ulp``.

    Raises:
        OptionError: for a malformed value, a negative or non-finite limit, two global values
            for the same option, or a quantile outside (0, 1] or without any limit.
    """
    if quantile is not None and not (isinstance(quantile, int | float) and 0.0 < quantile <= 1.0):
        raise OptionError(
            f"--quantile must be in (0, 1], e.g. 0.999 for the 99.9th percentile; "
            f"received {quantile!r}"
        )
    if metric not in ("raw", "scaled"):
        raise OptionError(f"--ulp-metric must be raw or scaled; received {metric!r}")
    budget = Budget(
        max_ulp=_parse_rules("--max-ulp", "N", max_ulp, _whole, "a whole number >= 0"),
        atol=_parse_rules("--atol", "A", atol, _tolerance, "a finite number >= 0"),
        rtol=_parse_rules("--rtol", "R", rtol, _tolerance, "a finite number >= 0"),
        quantile=None if quantile is None else float(quantile),
        metric=metric,
    )
    if quantile is not None and not budget.active:
        raise OptionError(
            f"--quantile {quantile} has nothing to apply to; give a budget with --max-ulp, "
            "--atol or --rtol"
        )
    return budget


def _parse_rules(
    option: str, letter: str, values: Sequence[str], convert: Callable[[str], Value], kind: str
) -> tuple[Rule, ...]:
    """Parse one option's values; the global value (at most one) first, then the overrides."""
    rules: list[Rule] = []
    for raw in values:
        text = str(raw).strip()
        pattern, sep, value_text = text.rpartition("=")
        if sep and not pattern.strip():
            raise OptionError(
                f"{option} {raw!r} has an empty layer pattern; write PATTERN={value_text} "
                "(a layer name, class name or glob such as 'block*')"
            )
        try:
            value = convert(value_text.strip())
        except ValueError:
            raise OptionError(
                f"{option} expects {letter} or PATTERN={letter} with {letter} {kind} or 'off'; "
                f"received {raw!r}"
            ) from None
        rules.append(Rule(pattern.strip() if sep else None, value))
    globals_ = [r for r in rules if r.pattern is None]
    if len(globals_) > 1:
        shown = " and ".join(_fmt(r.value) if r.value is not None else "off" for r in globals_)
        raise OptionError(
            f"{option} was given {len(globals_)} global values ({shown}); give one global value "
            f"plus any PATTERN={letter} overrides"
        )
    # The global value goes first so that any override matching a layer beats it.
    return tuple(globals_ + [r for r in rules if r.pattern is not None])


def _whole(text: str) -> int | None:
    if text.lower() == "off":
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def _tolerance(text: str) -> float | None:
    if text.lower() == "off":
        return None
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


# --------------------------------------------------------------------------- helpers


def _resolve(rules: tuple[Rule, ...], name: str, class_name: str) -> Rule | None:
    """The last rule matching the layer (the global one matches every layer)."""
    return next((r for r in reversed(rules) if r.matches(name, class_name)), None)


def _value(rule: Rule | None) -> float | None:
    return None if rule is None or rule.value is None else float(rule.value)


def _matches_none(rule: Rule, layers: list[tuple[str, str]]) -> bool:
    return rule.pattern is not None and not any(rule.matches(n, c) for n, c in layers)


def _as_float(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as a float dtype ulp_distance can order (integers compare as float64)."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape or ref.dtype != cand.dtype:
        raise ValueError(
            "a budget compares equal shapes and dtypes; received reference "
            f"{ref.shape} {ref.dtype} and candidate {cand.shape} {cand.dtype}"
        )
    if ref.dtype.kind != "f" and ref.dtype.name != "bfloat16":
        return ref.astype(np.float64), cand.astype(np.float64)
    return ref, cand


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _fmt_q(q: float) -> str:
    return f"{q:g}"
