"""The HTML report's pictures, drawn with matplotlib (the optional ``report`` extra) and
returned as PNG bytes.

Colour scales are readable with the common colour-vision deficiencies: the maps use viridis
(perceptually uniform, monotonic in lightness), the verdicts the Okabe-Ito palette, each
verdict also with its own marker shape. The difference / bound maps share one fixed
logarithmic scale, 1e-4 to 1e4 with the bound (1) in the middle, so that layers can be
compared with each other at a glance; bitwise-equal cells are grey.

A large model has hundreds of layers, so the pictures are made cheaply:

- a map is two pictures the page lays over each other: its **frame** (axes, ticks, labels and
  the colour bar), drawn once for every geometry (shape, unit), and its **cells**, one pixel per
  cell in the colour map's exact colours (``matplotlib.image.imsave``), which the browser
  enlarges without smoothing;
- the channel profile and the histogram are drawn on figures whose static parts (axes, ticks,
  labels) are drawn once per geometry and kept as a background; each layer draws only its data
  over it (matplotlib's blitting);
- identical pictures are drawn once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from convdiff.errors import OptionError
from convdiff.spatial import UNIT_BOUND, Spatial

MISSING = "--html needs matplotlib: pip install 'convdiff[report]'"

RATIO_FLOOR, RATIO_CEILING = 1e-4, 1e4  # colour scale of difference / bound
COLOUR_MAP = "viridis"
EQUAL_COLOUR = "#d9d9d9"  # cells where every element is bitwise equal
BOUND_COLOUR = "#D55E00"  # the line at the bound (Okabe-Ito vermillion)
STATUS_COLOURS = {  # Okabe-Ito
    "identical": "#009E73",
    "rounding": "#0072B2",
    "divergent": "#D55E00",
    "skipped": "#E69F00",
    "error": "#CC79A7",
}
STATUS_MARKERS = {"identical": "o", "rounding": "s", "divergent": "X", "skipped": "^", "error": "D"}
DPI = 96
SIZE = (3.3, 2.7)  # inches, every per-layer picture: three side by side in 1000 pixels
MAP_AXES = (0.16, 0.16, 0.5, 0.79)  # the cells' place in the frame (left, bottom, width, height)
PLOT_AXES = (0.21, 0.16, 0.74, 0.79)  # the profile's and the histogram's axes
HISTOGRAM_BUCKETS = 33  # float32 ULP distances need buckets 0 .. 32


def require_matplotlib() -> None:
    """Raise an :class:`OptionError` naming the extra when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise OptionError(MISSING)


def _encode(canvas: Any, smooth: bool = False) -> bytes:
    """What the canvas holds as an 8-bit palette PNG (a third of the RGB size: the pictures
    have few colours). ``smooth``: the careful palette (median cut) a colour bar's gradient
    needs; the quick one (octree) is enough for lines, bars and text."""
    from PIL import Image

    width, height = canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    # no dithering: it would speckle flat areas (and cost bytes)
    method = Image.Quantize.MEDIANCUT if smooth else Image.Quantize.FASTOCTREE
    image = image.convert("RGB").quantize(colors=256, method=method, dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _png(figure: Any) -> bytes:
    """The whole figure, drawn, as a PNG (drawn once per geometry or report: the careful
    palette)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return _encode(canvas, smooth=True)


def _scale(unit: str, peak: float) -> tuple[float, float]:
    """The colour scale's ends: difference / bound from 1e-4 to 1e4 on every layer; ULPs
    from 1 to the decade above the largest."""
    if unit == UNIT_BOUND:
        return RATIO_FLOOR, RATIO_CEILING
    return 1.0, 10.0 ** max(1, math.ceil(math.log10(max(peak, 1.0))))


class _Blitted:
    """A figure whose static parts (axes, ticks, labels, legend) are drawn once per geometry
    and kept as a background; each picture draws only its data artists over it."""

    def __init__(self, figure: Any, data: Sequence[Any], top: Sequence[Any] = ()) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.figure, self.data, self.top = figure, list(data), list(top)
        self.canvas = FigureCanvasAgg(figure)
        self.backgrounds: dict[Hashable, Any] = {}
        self.geometry: Hashable = None

    def png(self, geometry: Hashable, set_geometry: Callable[[], None], set_data) -> bytes:
        if geometry != self.geometry:
            set_geometry()  # limits and ticks: the data artists are placed by them
            self.geometry = geometry
        if geometry not in self.backgrounds:
            for artist in self.data:
                artist.set_visible(False)
            self.canvas.draw()
            self.backgrounds[geometry] = self.canvas.copy_from_bbox(self.figure.bbox)
            for artist in self.data:
                artist.set_visible(True)
        else:
            self.canvas.restore_region(self.backgrounds[geometry])
        set_data()
        for artist in self.data + self.top:
            if artist.get_visible():
                artist.axes.draw_artist(artist)
        return _encode(self.canvas)


class Painter:
    """Draws each layer's pictures (map frame and cells, channel profile, ULP histogram)
    and the depth overview."""

    def __init__(self) -> None:
        from matplotlib.figure import Figure

        self._figure = Figure
        self._profile: dict[str, Any] | None = None
        self._histogram: dict[str, Any] | None = None
        self._cache: dict[bytes, bytes] = {}

    def _cached(self, key: Sequence[Any], draw: Callable[[], bytes]) -> bytes:
        digest = hashlib.sha1(repr(tuple(key)).encode()).digest()
        if digest not in self._cache:
            self._cache[digest] = draw()
        return self._cache[digest]

    # ----------------------------------------------------------------------------- map

    def map_frame(self, s: Spatial) -> bytes:
        """The map's axes (in output positions), labels and colour bar, without the cells."""
        low, high = _scale(s.unit, _finite_peak(s.map))
        rows, cols = (n * b for n, b in zip(s.map.shape, s.block, strict=True))
        key = ("frame", s.unit, low, high, rows, cols, s.layout.names)
        return self._cached(key, lambda: self._draw_frame(s.unit, (low, high), (rows, cols), s))

    def _draw_frame(self, unit: str, scale, extent: tuple[int, int], s: Spatial) -> bytes:
        import matplotlib
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import LogNorm
        from matplotlib.ticker import MaxNLocator

        figure = self._figure(figsize=SIZE, dpi=DPI)
        axes = figure.add_axes(MAP_AXES)
        cax = figure.add_axes((MAP_AXES[0] + MAP_AXES[2] + 0.03, MAP_AXES[1], 0.04, MAP_AXES[3]))
        rows, cols = extent
        axes.set_xlim(0, cols)
        axes.set_ylim(rows, 0)
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_locator(MaxNLocator(4, integer=True))
        axes.set_xlabel(s.layout.names[1])
        axes.set_ylabel(s.layout.names[0])
        axes.tick_params(labelsize=8)
        colours = ScalarMappable(LogNorm(*scale), matplotlib.colormaps[COLOUR_MAP])
        bar = figure.colorbar(colours, cax=cax, extend="both")
        bar.set_label(unit)
        bar.ax.tick_params(labelsize=8)
        if unit == UNIT_BOUND:
            ticks = [1e-4, 1e-2, 1, 1e2, 1e4]
            bar.set_ticks(ticks, labels=["1e-4", "0.01", "1 bound", "100", "1e4"])
        bar.ax.minorticks_off()
        return _png(figure)

    def map_cells(self, s: Spatial) -> bytes:
        """The map's cells, one pixel each, in the colour scale's colours (grey: zero)."""
        from matplotlib.image import imsave

        low, high = _scale(s.unit, _finite_peak(s.map))
        with np.errstate(divide="ignore"):
            logs = np.log10(s.map)  # the log scale, laid out linearly; inf stays inf (over)
        masked = np.ma.masked_where(s.map <= 0, logs)  # zero has no logarithm: "bad", grey
        out = io.BytesIO()
        colours = _colours().with_extremes(bad=EQUAL_COLOUR)
        imsave(out, masked, cmap=colours, vmin=math.log10(low), vmax=math.log10(high), format="png")
        return out.getvalue()

    # ------------------------------------------------------------------------- profile

    def profile(self, s: Spatial) -> bytes:
        """The largest difference per channel (or block of channels), on the map's scale:
        values beyond it are drawn at its ends."""
        key = ("profile", s.unit, s.profile.tobytes(), s.channels, s.channel_block)
        return self._cached(key, lambda: self._draw_profile(s))

    def _draw_profile(self, s: Spatial) -> bytes:
        parts = self._profile = self._profile or self._build_profile()
        bound = s.unit == UNIT_BOUND
        low, high = _scale(s.unit, _finite_peak(s.profile))
        low = low if bound else 0.5
        name = "feature" if s.layout.names[1] == "feature" else "channel"
        blocks = f" (max over blocks of {s.channel_block})" if s.channel_block > 1 else ""

        def geometry() -> None:
            axes = parts["axes"]
            axes.set_xlim(0, max(s.channels, 1))
            axes.set_ylim(low / 2, high * 2)  # a value clipped to an end stays visible
            axes.set_xlabel(f"{name}{blocks}")
            axes.set_ylabel("difference / bound" if bound else "ULP distance")
            parts["bound"].set_visible(bound)

        def data() -> None:
            values = np.clip(np.where(np.isinf(s.profile), high, s.profile), low, high)
            edges = np.minimum(np.arange(values.size + 1) * s.channel_block, s.channels)
            parts["steps"].set_data(values, edges)

        geometry_key = (s.unit, s.channels, s.channel_block, low, high, name)
        return parts["blit"].png(geometry_key, geometry, data)

    def _build_profile(self) -> dict[str, Any]:
        from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

        figure = self._figure(figsize=SIZE, dpi=DPI)
        axes = figure.add_axes(PLOT_AXES)
        steps = axes.stairs(np.ones(1), np.arange(2), color="#333333", linewidth=1.2)
        bound = axes.axhline(1.0, color=BOUND_COLOUR, linestyle="--", linewidth=1, label="bound")
        axes.legend(loc="upper right", fontsize=8, frameon=False)
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(numticks=5))
        axes.yaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        axes.tick_params(labelsize=8)
        blit = _Blitted(figure, [steps], [bound])
        return {"axes": axes, "steps": steps, "bound": bound, "blit": blit}

    # ----------------------------------------------------------------------- histogram

    def histogram(self, s: Spatial) -> bytes:
        """ULP distances in power-of-two buckets, counts on a log scale."""
        key = ("histogram", tuple(s.histogram), s.size)
        return self._cached(key, lambda: self._draw_histogram(s))

    def _draw_histogram(self, s: Spatial) -> bytes:
        parts = self._histogram = self._histogram or self._build_histogram()
        finite = [count for label, count in s.histogram if label != "nan/inf"]
        nonfinite = sum(count for label, count in s.histogram if label == "nan/inf")
        buckets = max(HISTOGRAM_BUCKETS, len(finite))  # float64 distances need more

        def geometry() -> None:
            axes = parts["axes"]
            axes.set_xlim(-0.5, buckets + 0.5)
            axes.set_ylim(0.5, max(2.0 * s.size, 10.0))
            ticks, labels = _bucket_ticks(buckets)
            axes.set_xticks([*ticks, buckets], labels=[*labels, "nan/inf"])

        def data() -> None:
            counts = np.maximum(np.asarray(finite, np.float64), 0.5)
            parts["bars"].set_data(counts, np.arange(counts.size + 1) - 0.5)
            parts["nonfinite"].set_data([max(nonfinite, 0.5)], [buckets - 0.5, buckets + 0.5])
            parts["nonfinite"].set_visible(bool(nonfinite))

        return parts["blit"].png((buckets, s.size), geometry, data)

    def _build_histogram(self) -> dict[str, Any]:
        from matplotlib.ticker import LogLocator, NullLocator

        figure = self._figure(figsize=SIZE, dpi=DPI)
        axes = figure.add_axes(PLOT_AXES)
        bars = axes.stairs(np.ones(1), np.arange(2), fill=True, color="#0072B2", baseline=0.5)
        nonfinite = axes.stairs(
            np.ones(1), np.arange(2), fill=True, color=BOUND_COLOUR, baseline=0.5
        )
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(numticks=5))
        axes.yaxis.set_minor_locator(NullLocator())
        axes.set_xlabel("ULP distance (power-of-two buckets)")
        axes.set_ylabel("elements")
        axes.tick_params(labelsize=8)
        blit = _Blitted(figure, [bars, nonfinite])
        return {"axes": axes, "bars": bars, "nonfinite": nonfinite, "blit": blit}

    # --------------------------------------------------------------------------- depth

    def depth(self, layers: Sequence[Any], propagated: bool) -> bytes:
        """Per layer, in execution order: the largest difference over its bound (with the
        verdict as colour and marker), the worst difference in ULPs of the terms' scale,
        and in propagated mode the amplification of the incoming difference."""
        from matplotlib.ticker import MaxNLocator

        rows = 3 if propagated else 2
        figure = self._figure(figsize=(9.6, 1.2 + 1.55 * rows), dpi=DPI)
        axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        figure.subplots_adjust(left=0.12, right=0.82, top=0.96, bottom=0.1, hspace=0.12)
        index = np.asarray([r.index for r in layers], np.float64)
        _verdicts(axes[0], layers, index)
        _series(
            axes[1],
            index,
            [r.comparison.max_ulp_scaled if r.comparison else None for r in layers],
            "worst ULP of\nterms' scale",
            None,
        )
        if propagated:
            _series(axes[2], index, [r.amplification for r in layers], "amplification", 1.0)
        axes[-1].set_xlabel("layer (execution order, # in the table)")
        axes[-1].xaxis.set_major_locator(MaxNLocator(10, integer=True, min_n_ticks=1))
        axes[-1].set_xlim(index.min(initial=0) - 0.5, index.max(initial=0) + 0.5)
        return _png(figure)


def _colours() -> Any:
    import matplotlib

    return matplotlib.colormaps[COLOUR_MAP]


def _bucket_ticks(buckets: int) -> tuple[list[int], list[str]]:
    """Tick positions and labels for ``buckets`` power-of-two buckets: 0, then every tenth
    power of two by its smallest distance (bucket b holds 2^(b-1) .. 2^b - 1), leaving room
    for the "nan/inf" slot after the last bucket."""
    step = 10 if buckets <= 40 else 20
    powers = [b for b in range(1 + step, buckets, step) if buckets - b >= 3]
    return [0, *powers], ["0", *(f"2^{b - 1}" for b in powers)]


def _finite_peak(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def _verdicts(axes: Any, layers: Sequence[Any], index: np.ndarray) -> None:
    """Each layer's largest difference / bound, as its verdict's marker and colour."""
    ratios = [r.comparison.bound_ratio if r.comparison is not None else None for r in layers]
    finite = [v for v in ratios if v is not None and math.isfinite(v)]
    top = max(RATIO_CEILING, 10 * max(finite, default=1.0))
    values = np.asarray(
        [RATIO_FLOOR if v is None else (top if math.isinf(v) else v) for v in ratios]
    )
    values = np.clip(values, RATIO_FLOOR, top)
    statuses = [r.status for r in layers]
    for status, colour in STATUS_COLOURS.items():
        chosen = np.asarray([s == status for s in statuses])
        if chosen.any():
            axes.scatter(
                index[chosen],
                values[chosen],
                s=28,
                c=colour,
                marker=STATUS_MARKERS[status],
                label=f"{status} ({int(chosen.sum())})",
                zorder=3,
            )
    axes.axhline(1.0, color=BOUND_COLOUR, linestyle="--", linewidth=1)
    axes.set_yscale("log")
    axes.set_ylim(RATIO_FLOOR / 2, top * 2)
    axes.set_ylabel("difference /\nbound")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes.tick_params(labelsize=8)


def _series(
    axes: Any, index: np.ndarray, values: Sequence[float | None], label: str, line: float | None
) -> None:
    """One figure per layer on a log scale (missing ones left out)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    kept = [(i, v) for i, v in zip(index, values, strict=True) if v is not None and v > 0]
    if kept:
        x, y = zip(*kept, strict=True)
        axes.plot(x, y, color="#333333", marker="o", markersize=3, linewidth=1)
        axes.set_yscale("log")
        low, high = min(*y, line or min(y)) / 1.5, max(*y, line or max(y)) * 1.5
        axes.set_ylim(low, high)
        if high < 100 * low:
            # a range of a decade or two: ticks at 1, 2, 5, 10, ... as plain numbers
            axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.yaxis.set_minor_locator(NullLocator())
            axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if line is not None:
        axes.axhline(line, color=BOUND_COLOUR, linestyle="--", linewidth=1)
    axes.set_ylabel(label)
    axes.tick_params(labelsize=8)
