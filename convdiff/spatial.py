"""Where in a layer's output the differences sit: a compact per-layer summary computed while
Keras's and the NumPy side's outputs (and the bound) still exist, small enough to keep for
every layer of a large model and to put in the JSON report.

Each element's difference is measured in units of its rounding bound (``|keras - numpy| /
bound``: at most 1 is rounding, above 1 no summation order explains it), or in ULPs where no
bound exists. The summary holds:

- a map over the output's two spatial axes (height x width for 2-D feature maps), each cell
  the **maximum** over the axes that are reduced (batch, channels, depth) and over a block of
  positions when the map is larger than :data:`MAP_CELLS` per side, so a single bad element
  is never averaged away;
- a per-channel profile (the maximum over everything but the channel axis, in blocks of
  channels beyond :data:`PROFILE_BINS`);
- the ULP distances' histogram in power-of-two buckets, the count of elements above the
  bound, and the few worst elements with both values.

Pure NumPy; it never imports TensorFlow or Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from convdiff.metrics import is_float, ulp_buckets, ulp_distance

__all__ = ["MAP_CELLS", "PROFILE_BINS", "Spatial", "summarize"]

MAP_CELLS = 32  # the map has at most this many rows and columns
PROFILE_BINS = 128  # the channel profile has at most this many entries
WORST_COUNT = 5  # worst elements kept per layer

UNIT_BOUND = "difference / rounding bound"
UNIT_ULP = "ULP distance"


@dataclass(frozen=True)
class Layout:
    """Which axes of an output the map shows and which it reduces.

    Attributes:
        rows: the axis shown as the map's rows, or None (a single row).
        columns: the axis shown as the map's columns, or None (a single column).
        channel: the axis of the per-channel profile, or None (a scalar output).
        names: what the rows and the columns are (``("height", "width")``).
        reduced: names of the axes reduced by the maximum, in axis order.
    """

    rows: int | None
    columns: int | None
    channel: int | None
    names: tuple[str, str]
    reduced: tuple[str, ...]


def layout(shape: tuple[int, ...], channels_first: bool = False) -> Layout:
    """The natural picture of an output of ``shape`` (batch axis first).

    - rank 4 (images), rank 5 (volumes) and more: the last two spatial axes (height x width),
      the maximum over batch, channels and any other spatial axis (depth);
    - rank 3 (sequences): positions x channels, the maximum over the batch;
    - rank 2 (features): samples x features, nothing reduced;
    - rank 1: one row of features; rank 0: one cell.

    ``channels_first`` puts the channel axis at 1 instead of last (rank >= 3).
    """
    rank = len(shape)
    if rank == 0:
        return Layout(None, None, None, ("", ""), ())
    if rank == 1:
        return Layout(None, 0, 0, ("", "feature"), ())
    if rank == 2:
        return Layout(0, 1, 1, ("sample", "feature"), ())
    channel = 1 if channels_first else rank - 1
    spatial = [a for a in range(1, rank) if a != channel]
    if rank == 3:
        return Layout(spatial[0], channel, channel, ("position", "channel"), ("batch",))
    rows, columns = spatial[-2], spatial[-1]
    names = {0: "batch", channel: "channels"}
    if rank == 5:
        names[spatial[0]] = "depth"
    reduced = tuple(names.get(a, f"axis {a}") for a in range(rank) if a not in (rows, columns))
    return Layout(rows, columns, channel, ("height", "width"), reduced)


@dataclass(frozen=True)
class Spatial:
    """A layer's differences by position and channel (see the module docstring).

    Attributes:
        unit: what the map and the profile measure: :data:`UNIT_BOUND` or :data:`UNIT_ULP`.
        layout: which axes the map shows and which it reduces.
        source_shape: the map's rows and columns before downsampling.
        block: rows and columns of output positions behind one map cell (1, 1: none).
        map: float64 ``(rows, columns)`` array, each cell the maximum over its block and the
            reduced axes (inf where a NaN or inf is on one side only).
        channels: the length of the channel axis (1 without one).
        channel_block: channels behind one profile entry.
        profile: float64, the maximum per (block of) channel(s).
        size: elements compared.
        differing: elements that differ (NaN on both sides is a match, as are +0 and -0).
        over_bound: elements above their bound (NaN/inf on one side only included); None
            without a bound.
        histogram: ULP distances in power-of-two buckets (as :func:`metrics.ulp_histogram`).
        worst: the worst elements by :attr:`unit`, worst first: index, both values (Keras's
            as ``reference``), ULP and absolute difference (None for a NaN/inf mismatch),
            bound and ``bound_ratio`` (None without a bound).
    """

    unit: str
    layout: Layout
    source_shape: tuple[int, int]
    block: tuple[int, int]
    map: np.ndarray
    channels: int
    channel_block: int
    profile: np.ndarray
    size: int
    differing: int
    over_bound: int | None
    histogram: list[tuple[str, int]]
    worst: list[dict[str, Any]]

    @property
    def peak(self) -> float:
        """The largest value of the map (that of the whole output)."""
        return float(self.map.max()) if self.map.size else 0.0

    def describe(self) -> str:
        """What one map cell is, in words: "max over batch and channels; 4x4 blocks"."""
        parts = []
        if self.layout.reduced:
            parts.append("max over " + _words(self.layout.reduced))
        if self.block != (1, 1):
            rows, cols = self.source_shape
            parts.append(
                f"downsampled from {rows}x{cols} by the max over "
                f"{self.block[0]}x{self.block[1]} blocks"
            )
        return "; ".join(parts) or "every element shown"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, every figure rounded up to 3 significant digits (never below the
        exact value, so a cell above 1 stays above 1)."""
        return {
            "unit": self.unit,
            "rows": self.layout.names[0] or None,
            "columns": self.layout.names[1] or None,
            "reduced_by_max": list(self.layout.reduced),
            "source_shape": list(self.source_shape),
            "block": list(self.block),
            "map": [[round_up(v) for v in row] for row in self.map.tolist()],
            "channels": self.channels,
            "channel_block": self.channel_block,
            "channel_profile": [round_up(v) for v in self.profile.tolist()],
            "size": self.size,
            "differing": self.differing,
            "over_bound": self.over_bound,
            "ulp_histogram": [list(b) for b in self.histogram],
            "worst": self.worst,
        }


def _words(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def round_up(value: float) -> float:
    """``value`` (>= 0) rounded up to 3 significant digits; 0, inf and NaN unchanged."""
    if value <= 0 or not math.isfinite(value):
        return value
    exponent = math.floor(math.log10(value)) - 2
    digits = math.ceil(value / 10.0**exponent)
    # the division may round up past an exact grid value: step back where that still holds
    if float(f"{digits - 1}e{exponent}") >= value:
        digits -= 1
    return float(f"{digits}e{exponent}")


def summarize(
    reference: np.ndarray,
    candidate: np.ndarray,
    bound: np.ndarray | None = None,
    *,
    channels_first: bool = False,
) -> Spatial | None:
    """The spatial summary of ``candidate`` against ``reference`` (None for non-float data).

    Args:
        reference: Keras's output.
        candidate: the NumPy side's (same shape and dtype).
        bound: per element, the largest difference rounding explains (broadcastable), or None:
            the map is then in ULPs.
        channels_first: the output's channel axis is 1 (``data_format='channels_first'``).
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if not is_float(reference.dtype) or reference.dtype != candidate.dtype:
        return None
    if reference.shape != candidate.shape:
        return None
    shape = reference.shape
    flat_ref, flat_cand = reference.reshape(-1), candidate.reshape(-1)
    with np.errstate(invalid="ignore"):
        where = np.flatnonzero(flat_ref != flat_cand)  # NaN != NaN: both-NaN pairs included
    ref, cand = flat_ref[where], flat_cand[where]
    limit = _gather(bound, shape, where)
    values, ulp = _element_values(ref, cand, limit)
    picture = layout(shape, channels_first)
    dense = _dense(values, where, shape)
    source, block, cells = _map(dense, picture)
    channels, channel_block, profile = _profile(dense, picture)
    # NaN/inf mismatches (inf here) carry ULP 0 in ``ulp``: counted apart, not as zeros
    nonfinite = int(np.count_nonzero(np.isinf(values) & (ulp == 0)))
    return Spatial(
        unit=UNIT_ULP if bound is None else UNIT_BOUND,
        layout=picture,
        source_shape=source,
        block=block,
        map=cells,
        channels=channels,
        channel_block=channel_block,
        profile=profile,
        size=int(reference.size),
        differing=int(where.size) - int(np.count_nonzero(np.isnan(ref) & np.isnan(cand))),
        over_bound=None if bound is None else int(np.count_nonzero(values > 1.0)),
        histogram=ulp_buckets(ulp, int(reference.size - where.size) - nonfinite, nonfinite),
        worst=_worst(values, ulp, (ref, cand, limit), where, shape),
    )


def _dense(values: np.ndarray, where: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The values at their positions, zeros elsewhere, so that the reductions run as NumPy's
    axis maxima. float32 rounded upwards: a value above 1 never reads as 1."""
    if not where.size:
        return np.broadcast_to(np.float32(0), shape)  # nothing differs: no memory touched
    dense = np.zeros(shape, np.float32)
    dense.reshape(-1)[where] = _float32_up(values)
    return dense


def _gather(bound: np.ndarray | None, shape: tuple[int, ...], where: np.ndarray):
    """The bound at the flat positions ``where`` as float64 (a NaN bound bounds nothing: 0,
    as in :func:`metrics.compare`), or None."""
    if bound is None:
        return None
    bound = np.asarray(bound, np.float64)
    picked = (
        bound.reshape(-1)[where]
        if bound.shape == shape
        else np.broadcast_to(bound, shape)[np.unravel_index(where, shape)]
    )
    return np.where(np.isnan(picked), 0.0, picked)


def _element_values(
    ref: np.ndarray, cand: np.ndarray, bound: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per differing element: the difference over its bound (or its ULP distance without a
    bound) and the ULP distance (0 where a side is not finite).

    A NaN or inf on one side only is infinitely far (inf); NaN on both sides is a match (0).
    """
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(ref64) & np.isfinite(cand64)
    both_nan = np.isnan(ref64) & np.isnan(cand64)
    ulp = np.where(finite, ulp_distance(ref, cand), np.uint64(0))
    if bound is None:
        values = ulp.astype(np.float64)
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            diff = np.abs(cand64 - ref64)
            values = np.where(diff == 0, 0.0, diff / bound)
        values = np.where(np.isnan(values), np.inf, values)  # inf / inf cannot be shown to hold
    values = np.where(finite, values, np.where(both_nan, 0.0, np.inf))
    return values, ulp


def _float32_up(values: np.ndarray) -> np.ndarray:
    """``values`` as float32, rounded upwards (never below the float64 value)."""
    low = values.astype(np.float32)
    return np.where(low < values, np.nextafter(low, np.float32(np.inf)), low)


def _map(dense: np.ndarray, picture: Layout):
    """The map's source shape, block and cells (float64, at most MAP_CELLS per side)."""
    keep = [a for a in (picture.rows, picture.columns) if a is not None]
    reduced = tuple(a for a in range(dense.ndim) if a not in keep)
    plane = dense.max(axis=reduced) if reduced else dense
    if picture.rows is not None and picture.columns is not None and picture.rows > picture.columns:
        plane = plane.T
    plane = np.asarray(plane, np.float64).reshape(
        1 if picture.rows is None else dense.shape[picture.rows],
        1 if picture.columns is None else dense.shape[picture.columns],
    )
    source = (int(plane.shape[0]), int(plane.shape[1]))
    block = (_block(source[0], MAP_CELLS), _block(source[1], MAP_CELLS))
    return source, block, _block_max(plane, block)


def _profile(dense: np.ndarray, picture: Layout) -> tuple[int, int, np.ndarray]:
    """Channels, channels per entry, and the per-channel maximum (at most PROFILE_BINS)."""
    if picture.channel is None:
        return 1, 1, np.asarray([float(dense.max())]) if dense.size else np.zeros(1)
    others = tuple(a for a in range(dense.ndim) if a != picture.channel)
    per_channel = np.asarray(dense.max(axis=others) if others else dense, np.float64)
    channels = int(per_channel.size)
    step = _block(channels, PROFILE_BINS)
    return channels, step, _block_max(per_channel[None, :], (1, step))[0]


def _block(length: int, limit: int) -> int:
    """The smallest block that fits ``length`` positions into at most ``limit`` cells."""
    return max(1, -(-length // limit))


def _block_max(plane: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """The maximum over ``block``-sized tiles of a 2-D array (the last tiles may be partial:
    padded with zeros, neutral for values >= 0)."""
    rows, cols = plane.shape
    if block == (1, 1) or plane.size == 0:
        return plane.copy()
    out_rows, out_cols = -(-rows // block[0]), -(-cols // block[1])
    padded = np.zeros((out_rows * block[0], out_cols * block[1]))
    padded[:rows, :cols] = plane
    return padded.reshape(out_rows, block[0], out_cols, block[1]).max(axis=(1, 3))


def _worst(
    values: np.ndarray,
    ulp: np.ndarray,
    sides: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    where: np.ndarray,
    shape: tuple[int, ...],
) -> list[dict[str, Any]]:
    """The WORST_COUNT differing elements with the largest values, worst first (C order on
    ties); ``sides``: both sides' values and the bound there (or None)."""
    ref, cand, limit = sides
    if not where.size:
        return []
    count = min(WORST_COUNT, where.size)
    top = np.argpartition(-values, count - 1)[:count] if count < where.size else np.arange(count)
    top = top[np.lexsort((where[top], -values[top]))]
    records = []
    for i in top.tolist():
        r, c = float(ref[i]), float(cand[i])
        finite = math.isfinite(r) and math.isfinite(c)
        records.append(
            {
                "index": [int(j) for j in np.unravel_index(int(where[i]), shape)],
                "reference": r,
                "candidate": c,
                "ulp": int(ulp[i]) if finite else None,
                "abs_err": abs(c - r) if finite else None,
                "bound": None if limit is None else float(limit[i]),
                "bound_ratio": None if limit is None else float(values[i]),
            }
        )
    return records
