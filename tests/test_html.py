"""--html: one self-contained page that a real browser (headless Chromium) renders without
errors, with every compared layer's pictures, and whose pictures tell the truth on real saved
models: edge padding lights the border ring, a flipped kernel the whole map, a correct model
nothing above the bound."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convdiff.api import compare
from convdiff.cli import cli
from convdiff.figures import COLOUR_MAP, EQUAL_COLOUR, RATIO_CEILING, RATIO_FLOOR
from convdiff.page import to_html

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)"
)


def forward_edge(inp, kernel, bias):
    """A 'same' convolution padded with the edge values (np.pad mode='edge') instead of
    zeros: only outputs whose window reaches over the border differ from Keras."""
    n, h, w, c = inp.shape
    kh, kw, _, filters = kernel.shape
    padded = np.pad(inp, ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)), mode="edge")
    taps = [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    cols = np.stack(taps, axis=3).reshape(n * h * w, kh * kw * c)
    out = cols @ kernel.reshape(kh * kw * c, filters) + bias
    return out.reshape(n, h, w, filters).astype(np.float32)


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny real models saved as .keras and .h5, and their inputs."""
    import keras

    directory = tmp_path_factory.mktemp("html_models")
    keras.utils.set_random_seed(19)
    conv = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="conv"),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_b"),
        ],
        name="conv_model",
    )
    ranks = keras.Sequential(
        [
            keras.Input((6, 6, 6, 2)),
            keras.layers.Conv3D(3, 3, padding="same", name="conv3d"),
            keras.layers.Reshape((36, 18), name="to_sequence"),
            keras.layers.Conv1D(4, 3, padding="same", name="conv1d"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(5, name="dense"),
        ],
        name="ranks_model",
    )
    paths = {}
    for name, model in (("conv", conv), ("ranks", ranks)):
        for ext in ("keras", "h5"):
            paths[f"{name}.{ext}"] = directory / f"{name}.{ext}"
            model.save(paths[f"{name}.{ext}"])
    rng = np.random.default_rng(19)
    paths["conv_x"] = directory / "conv_x.npy"
    np.save(paths["conv_x"], rng.standard_normal((2, 16, 16, 3)).astype("float32"))
    paths["ranks_x"] = directory / "ranks_x.npy"
    np.save(paths["ranks_x"], rng.standard_normal((2, 6, 6, 6, 2)).astype("float32"))
    return paths


def run_cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


# ----------------------------------------------------------------------- reading the page


class _Page(HTMLParser):
    """The page's layer sections, their figures' data attributes and images, its links."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.sources: list[str] = []
        self.scripts = 0
        self.layers: dict[str, dict] = {}
        self._layer: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "div" and "layer" in (a.get("class") or "").split():
            self._layer = a["id"]
            self.layers[a["id"]] = {"images": {}, "data": None}
        if tag == "div" and a.get("class") == "figures" and self._layer:
            self.layers[self._layer]["data"] = {k: v for k, v in a.items() if k.startswith("data-")}
        if tag == "img":
            self.sources.append(a["src"])
            if self._layer and a.get("class"):
                self.layers[self._layer]["images"][a["class"]] = a["src"]


def read_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def png_of(source: str) -> bytes:
    assert source.startswith("data:image/png;base64,")
    return base64.b64decode(source.split(",", 1)[1])


def shown_bins(png: bytes) -> np.ndarray:
    """What the map's cells picture shows, one pixel per cell: the index of the colour scale's
    colour (0..255 on the log scale from RATIO_FLOOR to RATIO_CEILING), -1 for the grey of
    bitwise-equal cells. Every pixel must be exactly one of those colours."""
    import matplotlib
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)
    scale = matplotlib.colormaps[COLOUR_MAP].with_extremes(bad=EQUAL_COLOUR)
    colours = scale(np.arange(256), bytes=True)[:, :3]
    grey = scale(np.ma.masked_all(1), bytes=True)[:, :3]
    palette = np.vstack([colours, grey]).astype(np.int64)
    distance = ((image[:, :, None, :] - palette) ** 2).sum(axis=-1)
    assert (distance.min(axis=-1) == 0).all(), "a cell in a colour that is not on the scale"
    index = distance.argmin(axis=-1)
    return np.where(index == 256, -1, index)


def expected_bins(values: np.ndarray) -> np.ndarray:
    """The colour index a value gets (matplotlib's: the normalised value times 256, clipped),
    -1 for zero."""
    values = np.asarray(values, dtype=np.float64)
    low, high = math.log10(RATIO_FLOOR), math.log10(RATIO_CEILING)
    with np.errstate(divide="ignore"):
        x = (np.log10(np.where(values > 0, values, 1.0)) - low) / (high - low)
    return np.where(values > 0, np.clip(np.floor(x * 256), 0, 255), -1).astype(np.int64)


BOUND_BIN = int(expected_bins(np.array(1.0)))  # the colour of exactly the bound, 128


def assert_picture_shows(png: bytes, json_map: list[list[float]]) -> np.ndarray:
    """The map's cells show the JSON map's numbers: grey where 0, else the colour of the
    value (within one of 256 colours: the JSON rounds up to 3 digits); returns the colour
    indices shown."""
    expected = expected_bins(np.asarray(json_map))
    shown = shown_bins(png)
    assert shown.shape == expected.shape
    assert ((shown == -1) == (expected == -1)).all()
    assert (np.abs(shown - expected) <= 1).all()
    return shown


# ------------------------------------------------------------------- pictures tell the truth


@pytest.mark.parametrize("ext", ["keras", "h5"])
def test_edge_padding_lights_the_one_pixel_border_ring(saved, ext):
    report = compare(
        saved[f"conv.{ext}"], saved["conv_x"], impls={"conv": forward_edge}, spatial=True
    )
    conv = report.layers[0]
    assert conv.name == "conv" and conv.status == "divergent"
    summary = conv.to_dict()["spatial"]
    assert summary["source_shape"] == [16, 16] and summary["block"] == [1, 1]
    assert summary["reduced_by_max"] == ["batch", "channels"]
    cells = np.asarray(summary["map"])
    ring = np.ones(cells.shape, bool)
    ring[1:-1, 1:-1] = False
    assert (cells[ring] > 1).all(), cells
    assert (cells[~ring] <= 1).all(), cells
    # every element above the bound is on the border
    assert 0 < summary["over_bound"] <= 2 * 60 * 8
    page = read_page(to_html(report).decode())
    section = page.layers["layer-0"]
    shown = assert_picture_shows(png_of(section["images"]["map"]), summary["map"])
    assert (shown[ring] > BOUND_BIN).all() and (shown[~ring] <= BOUND_BIN).all()
    assert int(section["data"]["data-over-bound"]) == summary["over_bound"]
    assert float(section["data"]["data-peak"]) == max(max(row) for row in summary["map"])


def test_flipped_kernel_lights_the_whole_map(examples, tmp_path):
    out, data = tmp_path / "report.html", tmp_path / "report.json"
    result = run_cli(
        examples / "one_layer.h5",
        examples / "one_layer_input.npy",
        "--impl",
        f"conv2d={examples / 'my_conv2d.py'}:forward_flipped",
        "--html",
        out,
        "--json",
        data,
    )
    assert result.exit_code == 1, result.output
    summary = json.loads(data.read_text())["layers"][0]["spatial"]
    assert summary["source_shape"] == [64, 64] and summary["block"] == [2, 2]
    cells = np.asarray(summary["map"])
    assert cells.shape == (32, 32) and (cells > 1).all()
    page = read_page(out.read_text())
    section = page.layers["layer-0"]
    shown = assert_picture_shows(png_of(section["images"]["map"]), summary["map"])
    assert (shown == 255).all()  # far beyond the scale's end: the brightest colour
    assert int(section["data"]["data-over-bound"]) == summary["over_bound"] > 0
    assert "first divergent" in out.read_text()


@pytest.mark.parametrize("mode", ["isolated", "propagated"])
@pytest.mark.parametrize("model", ["conv.keras", "ranks.h5"])
def test_correct_model_shows_nothing_above_the_bound(saved, model, mode):
    x = saved["conv_x" if model.startswith("conv") else "ranks_x"]
    report = compare(saved[model], x, mode=mode, spatial=True)
    assert report.passed
    page = read_page(to_html(report).decode())
    for r in report.layers:
        summary = r.to_dict()["spatial"]
        assert summary["over_bound"] == 0, r.name
        assert max(max(row) for row in summary["map"]) <= 1, r.name
        assert max(summary["channel_profile"]) <= 1, r.name
        shown = assert_picture_shows(
            png_of(page.layers[f"layer-{r.index}"]["images"]["map"]), summary["map"]
        )
        assert (shown <= BOUND_BIN).all(), r.name  # no cell above the bound's colour


def test_natural_reduction_of_1d_3d_and_dense_outputs(saved):
    report = compare(saved["ranks.keras"], saved["ranks_x"], spatial=True)
    by_name = {r.name: r.to_dict()["spatial"] for r in report.layers}
    assert by_name["conv3d"]["reduced_by_max"] == ["batch", "depth", "channels"]
    assert by_name["conv3d"]["source_shape"] == [6, 6] and by_name["conv3d"]["channels"] == 3
    assert (by_name["conv1d"]["rows"], by_name["conv1d"]["columns"]) == ("position", "channel")
    assert by_name["conv1d"]["source_shape"] == [36, 4]
    assert (by_name["dense"]["rows"], by_name["dense"]["columns"]) == ("sample", "feature")
    assert by_name["dense"]["source_shape"] == [2, 5] and by_name["dense"]["reduced_by_max"] == []
    text = to_html(report).decode()
    assert "max over batch, depth and channels" in text


# --------------------------------------------------------------------------- in the browser

PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const layers = Array.from(document.querySelectorAll('div.layer')).map(d => ({
    id: d.id,
    pictures: Array.from(d.querySelectorAll('img'))
      .filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0)
      .map(i => i.className),
  }));
  const inside = (a, b) => a.width > 0 && a.left >= b.left - 1 && a.right <= b.right + 1 &&
    a.top >= b.top - 1 && a.bottom <= b.bottom + 1;
  const misplaced = Array.from(document.querySelectorAll('.mapbox'))
    .filter(box => !inside(box.querySelector('img.map').getBoundingClientRect(),
                           box.querySelector('img.frame').getBoundingClientRect()))
    .map(box => box.closest('div.layer').id);
  const links = Array.from(document.querySelectorAll('a[href^="#"]'))
    .filter(a => !document.getElementById(a.getAttribute('href').slice(1)))
    .map(a => a.getAttribute('href'));
  const out = document.createElement('pre');
  out.id = 'convdiff-probe';
  out.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    layers: layers, dangling: links, misplaced: misplaced,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  });
  document.body.appendChild(out);
});
</script>"""


def open_in_chromium(page: Path, tmp_path: Path, width: int = 1200) -> dict:
    """Load a copy of the page with a probe script appended in headless Chromium; returns
    what the probe found (images decoded, pictures per layer, dangling links, horizontal
    overflow) and the browser's console lines."""
    probed = tmp_path / f"probed-{width}.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={width},900",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=20000",
        "--dump-dom",
        probed.as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="convdiff-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe result; stderr: {done.stderr[-2000:]}"
    import html

    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return result


def assert_self_contained(text: str) -> None:
    """No scripts, and nothing fetched from outside the page: every image is inline."""
    page = read_page(text)
    assert page.scripts == 0
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)
    assert all(link.startswith("#") for link in page.links)
    assert not re.search(r"(?i)(@import|url\(|https?://|<link\b|<iframe\b)", text)


@needs_chromium
def test_page_renders_in_chromium_with_every_layer_pictured(saved, tmp_path):
    out, data = tmp_path / "ranks.html", tmp_path / "ranks.json"
    result = run_cli(saved["ranks.keras"], saved["ranks_x"], "--html", out, "--json", data)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert_self_contained(text)
    layers = json.loads(data.read_text())["layers"]
    assert len(layers) == 5 and all(layer["spatial"] is not None for layer in layers)
    found = open_in_chromium(out, tmp_path)
    assert found["console"] == []
    assert found["broken"] == [] and found["dangling"] == [] and found["misplaced"] == []
    pictured = {layer["id"]: sorted(layer["pictures"]) for layer in found["layers"]}
    assert pictured == {
        f"layer-{layer['index']}": ["frame", "histogram", "map", "profile"] for layer in layers
    }
    assert found["images"] == 4 * len(layers) + 1  # and the depth overview
    assert found["overflow"] <= 0


@needs_chromium
def test_page_fits_a_narrow_screen(examples, tmp_path):
    out = tmp_path / "deep.html"
    args = [examples / "deep8.keras", examples / "deep8_input.npy", "--mode", "propagated"]
    assert run_cli(*args, "--no-fma", "--html", out).exit_code == 0
    found = open_in_chromium(out, tmp_path, width=390)
    assert found["console"] == [] and found["broken"] == []
    assert found["overflow"] <= 0  # wide tables scroll inside their own box
    assert found["misplaced"] == []
    assert all(len(layer["pictures"]) == 4 for layer in found["layers"])


@needs_chromium
def test_many_inputs_give_one_page_with_a_section_per_input(saved, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    x = np.load(saved["conv_x"])
    np.save(inputs / "a.npy", x)
    np.save(inputs / "b.npy", x[::-1].copy())
    out = tmp_path / "many.html"
    result = run_cli(saved["conv.keras"], inputs, "--html", out)
    assert result.exit_code == 0, result.output
    page = read_page(out.read_text())
    assert {"run0-top", "run1-top", "run0-layer-0", "run1-layer-1"} <= page.ids
    assert "a.npy" in out.read_text() and "b.npy" in out.read_text()
    found = open_in_chromium(out, tmp_path)
    assert found["console"] == [] and found["broken"] == [] and found["dangling"] == []
    assert len(found["layers"]) == 4 and all(len(lay["pictures"]) == 4 for lay in found["layers"])


# ------------------------------------------------------------------ every kind of run


def test_propagated_page_shows_growth_and_amplification(examples, tmp_path):
    out = tmp_path / "deep.html"
    args = [examples / "deep8.keras", examples / "deep8_input.npy", "--mode", "propagated"]
    assert run_cli(*args, "--no-fma", "--html", out).exit_code == 0
    text = out.read_text()
    assert "amplification of the difference each layer received" in text
    assert text.count("Amplification of the incoming difference: x") == 7  # all but the first
    assert "Growth over depth" in text
    page = read_page(text)
    assert len(page.layers) == 8
    assert all(
        set(s["images"]) == {"frame", "map", "profile", "histogram"} for s in page.layers.values()
    )


def test_reference_run_shows_where_the_recording_differs(saved, tmp_path):
    recorded = tmp_path / "run.npz"
    args = [saved["conv.keras"], saved["conv_x"]]
    assert run_cli(*args, "--save-outputs", recorded).exit_code == 0
    members = dict(np.load(recorded, allow_pickle=False))
    members["layer/conv"] = members["layer/conv"].copy()
    members["layer/conv"][1, 5, 9, 2] += 0.5  # one element of the recording off
    changed = tmp_path / "changed.npz"
    np.savez(changed, **members)
    out, data = tmp_path / "ref.html", tmp_path / "ref.json"
    result = run_cli(saved["conv.keras"], "--reference", changed, "--html", out, "--json", data)
    assert result.exit_code == 1, result.output
    summary = json.loads(data.read_text())["layers"][0]["spatial"]
    assert np.argwhere(np.asarray(summary["map"]) > 1).tolist() == [[5, 9]]
    assert summary["worst"][0]["index"] == [1, 5, 9, 2]
    text = out.read_text()
    assert "compared with the recording" in text and "<th>recorded</th>" in text
    page = read_page(text)
    shown = assert_picture_shows(png_of(page.layers["layer-0"]["images"]["map"]), summary["map"])
    assert np.argwhere(shown > BOUND_BIN).tolist() == [[5, 9]]


def test_compare_runs_without_a_model_draws_ulps(saved, tmp_path):
    recorded = tmp_path / "run.npz"
    assert run_cli(saved["conv.keras"], saved["conv_x"], "--save-outputs", recorded).exit_code == 0
    members = dict(np.load(recorded, allow_pickle=False))
    members["layer/conv_b"] = members["layer/conv_b"].copy()
    members["layer/conv_b"][0, 3, 4, 1] = np.nextafter(
        members["layer/conv_b"][0, 3, 4, 1], np.float32(np.inf)
    )
    changed = tmp_path / "changed.npz"
    np.savez(changed, **members)
    out, data = tmp_path / "runs.html", tmp_path / "runs.json"
    result = CliRunner().invoke(
        cli,
        ["compare-runs", str(recorded), str(changed), "--html", str(out), "--json", str(data)],
    )
    layers = {r["name"]: r["spatial"] for r in json.loads(data.read_text())["layers"]}
    assert layers["conv"]["over_bound"] is None and layers["conv"]["unit"] == "ULP distance"
    assert np.argwhere(np.asarray(layers["conv_b"]["map"]) > 0).tolist() == [[3, 4]]
    assert layers["conv_b"]["map"][3][4] == 1.0 and result.exit_code == 0
    assert "ULP distance" in out.read_text()


def test_json_has_the_spatial_summary_only_with_html(examples):
    result = run_cli(examples / "one_layer.keras", examples / "one_layer_input.npy", "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layers"][0]["spatial"] is None


def test_html_without_matplotlib_is_one_error_line_before_any_work(tmp_path, monkeypatch):
    """The check runs first: even a missing model file is not reached."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "report.html"
    result = run_cli(tmp_path / "missing.keras", "--random-input", "--html", out)
    assert result.exit_code == 2
    assert result.output == "Error: --html needs matplotlib: pip install 'convdiff[report]'\n"
    assert not out.exists()


def test_html_path_that_cannot_be_written(examples, tmp_path):
    result = run_cli(
        examples / "one_layer.keras", "--random-input", "--html", tmp_path / "no" / "r.html"
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot write") and "does not exist" in result.output
