"""What a person sees in a terminal.

- The progress line: the command runs in a pseudo-terminal and its bytes go through a VT100
  emulator (pyte), so cursor moves and erasures count as they do on screen.
- Narrow terminals: real reports (the bundled example, a model with long layer names,
  MobileNetV2) rendered at 60, 80, 100 and 160 columns without colour: no value cut, the layer
  name and status always there, exactly the documented columns dropped, rows never wrapped.
- Golden text at 80 and 160 columns of a report built from fixed figures (the same on every
  CPU). After an intended change of the layout, regenerate them with
  ``python tests/test_terminal.py`` and review the diff.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from convdiff.layout import HEADINGS, NAME_MIN, NARROW, SHORTEN, FittedTable, shorten_middle
from convdiff.metrics import Comparison
from convdiff.report import (
    HISTOGRAM_STEPS,
    TABLE_STEPS,
    WORST_STEPS,
    Report,
    _layer_cells,
    render_growth,
    render_histograms,
    render_summary,
    render_table,
    render_worst,
)
from convdiff.runner import LayerResult

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
WIDTHS = (60, 80, 100, 160)
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


# --------------------------------------------------------------------------- the progress line


def run_in_terminal(args: list[str], columns: int, rows: int = 40, timeout_s: float = 300):
    """Run ``convdiff ARGS`` with stdout and stderr on one pseudo-terminal of the given size.

    Returns:
        The raw text written and the screen's lines after it was all shown.
    """
    import pyte

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    # as a new user runs it: convdiff keeps TensorFlow's start-up lines off the terminal itself
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [sys.executable, "-m", "convdiff", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        process.wait(timeout=60)
    raw = b"".join(chunks)
    screen = pyte.Screen(columns, rows)
    pyte.ByteStream(screen).feed(raw)
    return raw.decode("utf-8", "replace"), [line.rstrip() for line in screen.display]


@pytest.mark.parametrize("columns", [80, 100])
def test_progress_line_is_gone_before_the_table(columns):
    """The spinner is drawn while layers are compared and erased before the first line of
    output: the screen starts with the table's title, and no spinner frame is left anywhere."""
    args = ["examples/one_layer.h5", "examples/one_layer_input.npy"]
    raw, screen = run_in_terminal(args, columns=columns)
    assert "comparing layers" in raw, "the progress line was never drawn: nothing was tested"
    shown = [line for line in screen if line]
    assert shown[0].startswith("convdiff: examples/one_layer.h5"), screen
    assert not any(c in line for line in shown for c in SPINNER), screen
    assert not any("comparing layers" in line or "layer 0:" in line for line in shown), screen
    assert shown[-1].endswith("PASS"), screen


# --------------------------------------------------------------------------- rendering helpers


def text_at(width: int, *renderables) -> str:
    """What a console ``width`` columns wide prints, without colour."""
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    for renderable in renderables:
        if renderable is not None:
            console.print(renderable)
    return console.export_text()


def check_plan(fitted: FittedTable, width: int):
    """The plan at ``width`` fits and is minimal: with one step fewer the table (as rich
    measures it) is wider than ``width``; the layout's own width arithmetic agrees with rich."""
    console = Console(width=10**4, color_system=None, file=io.StringIO())

    def measured(plan):
        return console.measure(fitted.table(plan)).maximum

    plan = fitted.plan(width)
    assert fitted.width(plan) == measured(plan) <= width
    if plan.taken:
        fewer = fitted.plan(width, max_steps=plan.taken - 1)
        assert fitted.width(fewer) == measured(fewer) > width
    return plan


def table_parts(text: str) -> tuple[str, list[str]]:
    """The header line and the body lines of the (first) table in ``text``."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))
    body = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        body.append(line)
    return lines[rule - 1], body


def headers_of(header_line: str) -> list[str]:
    """Column headers (two or more spaces apart; a header holds single spaces at most)."""
    return [h for h in re.split(r"\s{2,}", header_line.strip()) if h]


def name_shown(shown: str, name: str) -> bool:
    """The layer's name in full, or shortened in the middle to no fewer than NAME_MIN cells."""
    return shown == name or (
        cell_len(shown) >= NAME_MIN and shown == shorten_middle(name, cell_len(shown))
    )


def expected_cells(r: LayerResult) -> dict[str, str]:
    """The full text of every cell of a layer's row (before any layout), with the figures that
    do not depend on the report's formatting checked against the result itself."""
    headers = ("#", "layer", "class", "shape", "status", "max ULP", "p99 ULP", "max abs")
    cells = dict(zip((*headers, "differ", "/bound"), map(str, _layer_cells(r)), strict=True))
    c = r.comparison
    assert cells["layer"] == r.name and cells["status"].split()[0] == r.status
    assert cells["shape"] == "x".join(str(n) for n in r.output_shape)
    if c is not None and not (c.nan_mismatch or c.inf_mismatch) and c.max_ulp < 10_000_000:
        assert cells["max ULP"] == f"{c.max_ulp:,}"
    return cells


def check_layer_table(report: Report, width: int) -> list[str]:
    """Every invariant of the layer table at ``width``; returns the dropped columns."""
    fitted = render_table(report)
    text = text_at(width, fitted)
    assert all(cell_len(line) <= width for line in text.splitlines()), text
    header_line, body = table_parts(text)
    shown = headers_of(header_line)
    assert "layer" in shown and "status" in shown, text
    # exactly the documented columns, first to go first, and no more than needed
    documented = [s for s in TABLE_STEPS if s != SHORTEN]
    dropped = [h for h in documented if h not in shown]
    assert dropped == documented[: len(dropped)], (dropped, text)
    assert shown == [c.header for c in fitted.columns if c.header not in dropped], text
    assert list(check_plan(fitted, width).dropped) == dropped
    # one line per layer (rows never wrap), every cell in full
    assert len(body) == len(report.layers), text
    for r, line in zip(report.layers, body, strict=True):
        cells = expected_cells(r)
        tokens = line.split()
        want = " ".join(cells[h] for h in shown).split()
        name_at = len(" ".join(cells[h] for h in shown[: shown.index("layer")]).split())
        assert name_shown(tokens[name_at], r.name), (r.name, line)
        assert tokens[:name_at] + tokens[name_at + 1 :] == want[:name_at] + want[name_at + 1 :], (
            line,
            want,
        )
    return dropped


def check_rows_whole(fitted: FittedTable, width: int, rows: list[tuple[str, list[str]]]):
    """``--show-worst``/``--histogram`` at ``width``: lines fit; each row's cells appear whole,
    in order, on one line; its layer name on that line or on the heading line above it."""
    text = text_at(width, fitted)
    lines = text.splitlines()
    assert all(cell_len(line) <= width for line in lines), text
    header_line, body = table_parts(text)
    shown = headers_of(header_line)
    documented = [s for s in fitted.steps if s in {c.header for c in fitted.columns}]
    dropped = [h for h in documented if h not in shown]
    assert dropped == documented[: len(dropped)], (dropped, text)
    assert list(check_plan(fitted, width).dropped) == dropped
    position = 0
    for name, cells in rows:
        # the layer's first row: the name, then the cells (the name may be a heading line)
        while not any(name_shown(t, name) for t in body[position].split()):
            position += 1
        line = body[position]
        if len(line.split()) == 1:  # a heading: the row follows
            position += 1
            line = body[position]
        at = 0
        for header, cell in zip([c.header for c in fitted.columns], cells, strict=True):
            if header in shown and cell:
                found = line.find(cell, at)
                assert found >= 0, (cell, line)
                at = found + len(cell)
        position += 1
    return dropped


# --------------------------------------------------------------------------- real reports


@pytest.fixture(scope="session")
def flipped_report(examples):
    """The bundled example with a flipped-kernel implementation: divergent, huge figures."""
    import convdiff

    sys.path.insert(0, str(examples))
    try:
        from my_conv2d import forward_flipped
    finally:
        sys.path.remove(str(examples))
    return convdiff.compare(
        str(examples / "one_layer.h5"),
        str(examples / "one_layer_input.npy"),
        impls={"conv2d": forward_flipped},
        show_worst=3,
        histogram=True,
    )


@pytest.fixture(scope="session")
def long_names_report(tmp_path_factory):
    """A small saved model whose layer names are long, one of them over a budget."""
    import keras

    import convdiff

    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(8, 3, padding="same", name="encoder_block_1_expand_convolution_3x3"),
            L.BatchNormalization(name="encoder_block_1_expand_batch_normalization"),
            L.ReLU(name="encoder_block_1_expand_relu6_activation"),
            L.DepthwiseConv2D(3, padding="same", name="encoder_block_1_depthwise_conv"),
            L.GlobalAveragePooling2D(name="global_average_pooling_over_space"),
            L.Dense(5, name="classification_head_dense_logits"),
        ],
        name="long_names",
    )
    rng = np.random.default_rng(3)
    for layer in model.layers:
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    bn = model.layers[1]
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, mean, np.abs(var) + 0.5])
    path = tmp_path_factory.mktemp("long_names") / "long_names.keras"
    model.save(path)
    x = rng.normal(size=(1, 12, 12, 3)).astype("float32")
    return convdiff.compare(str(path), x, order="float64", max_ulp=0, show_worst=2, histogram=True)


@pytest.fixture(scope="session")
def mobilenet_report(tmp_path_factory):
    """MobileNetV2 (96x96, random weights, built offline), saved and compared once."""
    import keras

    import convdiff

    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2_96.keras"
    model.save(path)
    x = np.random.default_rng(5).standard_normal((1, 96, 96, 3)).astype("float32")
    # Products rounded apart (sequential, no FMA): differences in every layer that sums, on
    # any CPU, for the worst-elements table to show (the default, auto, reads identical).
    return convdiff.compare(str(path), x, show_worst=1, fma=False)


REPORTS = ["flipped_report", "long_names_report", "mobilenet_report"]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", REPORTS)
def test_layer_table_at_width(which, width, request):
    report = request.getfixturevalue(which)
    dropped = check_layer_table(report, width)
    if width == 160:
        assert dropped == [] or (which == "mobilenet_report" and dropped == ["#"]), dropped


def test_mobilenet_names_are_whole_at_120_columns(mobilenet_report):
    """The issue's case: at 120 columns (the width of logs and pipes) MobileNetV2's layer
    names are shown in full (a column goes first)."""
    text = text_at(120, render_table(mobilenet_report))
    _, body = table_parts(text)
    for r, line in zip(mobilenet_report.layers, body, strict=True):
        assert f" {r.name} " in line, line
    check_layer_table(mobilenet_report, 120)


def _g(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", REPORTS)
def test_worst_elements_at_width(which, width, request):
    report = request.getfixturevalue(which)
    fitted = render_worst(report)
    rows = []
    for r in report.layers:
        for i, w in enumerate(r.worst_elements or ()):
            ulp = w["ulp"]
            cells = [str(tuple(w["index"])), _g(w["reference"], 9), _g(w["candidate"], 9)]
            cells += [_g(w.get("exact"), 9), f"{ulp:,}" if ulp < 10_000_000 else f"{ulp:.3g}"]
            cells.append(_g(w.get("bound"), 3))
            rows.append((r.name if i == 0 else "", ["", *cells]))
    dropped = check_rows_whole(fitted, width, [(n, c) for n, c in rows if n] or rows)
    assert set(dropped) <= {"bound", "exact", "ULP"}
    if width == 160:
        assert dropped == []


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", ["flipped_report", "long_names_report"])
def test_histograms_at_width(which, width, request):
    report = request.getfixturevalue(which)
    fitted = render_histograms(report)
    rows = [
        (r.name, ["", r.histogram[0][0], f"{r.histogram[0][1]:,}", ""])
        for r in report.layers
        if r.histogram
    ]
    assert check_rows_whole(fitted, width, rows) == []
    text = text_at(width, fitted)
    for r in report.layers:
        for bucket, count in r.histogram or ():
            assert re.search(rf"(^|\s){re.escape(bucket)}\s+{re.escape(f'{count:,}')}(\s|$)", text)


@pytest.mark.parametrize("width", WIDTHS)
def test_growth_and_summary_keep_every_figure(examples, width):
    """Text under the tables wraps between words: every word of the wide text is there, whole."""
    import convdiff

    report = convdiff.compare(
        str(examples / "deep8.keras"),
        str(examples / "deep8_input.npy"),
        mode="propagated",
        fma=False,
    )
    for part in (render_growth(report), render_summary(report)):
        wide, narrow = text_at(1000, part), text_at(width, part)
        assert all(cell_len(line) <= width for line in narrow.splitlines())
        assert narrow.split() == wide.split()


# --------------------------------------------------------------------------- the compared side


def test_impl_title_and_worst_column_name_the_user_side(flipped_report):
    text = text_at(160, render_table(flipped_report), render_worst(flipped_report))
    assert text.splitlines()[0] == (
        "convdiff: " + flipped_report.model + "  (your implementation for conv2d, mode isolated)"
    )
    assert "order sequential" not in text
    assert headers_of(table_parts(text.split("Worst elements")[1])[0])[:4] == [
        "layer",
        "index",
        "Keras",
        "yours",
    ]


def test_impl_on_one_layer_names_the_order_for_the_others(examples):
    from click.testing import CliRunner

    from convdiff.cli import cli

    args = [
        str(examples / "deep8.keras"),
        str(examples / "deep8_input.npy"),
        "--impl",
        f"conv1={examples / 'my_conv2d.py'}:forward_flipped",
        "--stop-at-first",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "(your implementation for conv1, order auto elsewhere, mode isolated)" in " ".join(
        result.stdout.split()
    )
    # stopped early: the summary says how many layers were never compared
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        "2 layers: 1 identical, 1 divergent. Stopped after the first divergent layer: "
        "6 of 8 layers not compared. FAIL"
    )
    document = json.loads(CliRunner().invoke(cli, [*args, "--json", "-"]).stdout)
    assert document["stopped_early"] is True
    assert document["layers_not_compared"] == [f"conv{i}" for i in range(2, 8)]
    assert [layer["name"] for layer in document["layers"]] == ["conv0", "conv1"]


def test_a_full_run_is_not_stopped_early_and_one_layer_is_singular(examples):
    from click.testing import CliRunner

    from convdiff.cli import cli

    args = [str(examples / "one_layer.h5"), str(examples / "one_layer_input.npy")]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--stop-at-first"])
    assert result.stdout.strip() == "1 layer: 1 identical. PASS"
    document = json.loads(CliRunner().invoke(cli, [*args, "--json", "-"]).stdout)
    assert document["stopped_early"] is False and document["layers_not_compared"] == []


# --------------------------------------------------------------------------- golden text


def _comparison(max_ulp, p99, max_abs, fraction, bound, size=4096):
    return Comparison(
        size=size,
        max_ulp=max_ulp,
        mean_ulp=p99 / 4,
        median_ulp=0.0,
        p99_ulp=p99,
        max_abs=max_abs,
        max_rel=max_abs,
        mismatch_count=round(fraction * size),
        mismatch_fraction=fraction,
        nan_mismatch=0,
        inf_mismatch=0,
        bound_ratio=bound,
        worst=None,
    )


def golden_report(reference: str | None = None) -> Report:
    """A report from fixed figures (no CPU in it): every status, long names, huge figures, an
    implementation of the user's on two layers and convdiff's kernels on the rest."""
    shape = (1, 48, 48, 144)
    layers = [
        LayerResult(0, "rescaling", "Rescaling", (1, 96, 96, 3), "float32", "identical"),
        LayerResult(1, "block_16_expand_relu", "ReLU", shape, "float32", "rounding"),
        LayerResult(
            2, "expanded_conv_depthwise_BN", "BatchNormalization", shape, "float32", "rounding"
        ),
        LayerResult(3, "conv2d_flipped", "Conv2D", (1, 64, 64, 32), "float32", "divergent"),
        LayerResult(4, "layer_scale", "LayerScale", shape, "float32", "skipped"),
        LayerResult(5, "classification_head_dense", "Dense", (1, 1000), "float32", "error"),
    ]
    layers[0].comparison = _comparison(0, 0.0, 0.0, 0.0, 0.0)
    layers[1].comparison = _comparison(3, 1.0, 5.96e-08, 0.012, 0.031)
    layers[2].comparison = _comparison(1024, 12.5, 2.38e-07, 0.266, 0.18)
    layers[2].budget_violations = ["max 1,024 ULP > budget 8"]
    layers[3].comparison = _comparison(1_067_467_210, 1.06e9, 1.25, 0.741, 4.99e6)
    layers[3].impl = "my_conv2d.py:forward_flipped"
    layers[5].impl = "my_dense.py:forward"
    layers[2].worst_elements = [
        {
            "index": [0, 47, 47, 143],
            "reference": 0.00719081052,
            "candidate": 0.0071906177,
            "exact": 0.00719071,
            "ulp": 1024,
            "bound": 1.1e-06,
        },
        {
            "index": [0, 3, 0, 7],
            "reference": -1.54001811e-13,
            "candidate": -1.53888309e-13,
            "exact": -1.53953158e-13,
            "ulp": 8375,
            "bound": 6.39e-14,
        },
    ]
    layers[3].worst_elements = [
        {
            "index": [0, 15, 36, 26],
            "reference": 0.0,
            "candidate": 1.25200772,
            "exact": 0.0,
            "ulp": 1_067_467_210,
            "bound": 1.56e-06,
        },
    ]
    layers[1].histogram = [("0", 4047), ("1", 37), ("2-3", 12)]
    layers[3].histogram = [("0", 1061), ("1", 0), ("2-3", 0), ("536870912-1073741823", 3035)]
    settings = {"order_label": "sequential+fma", "mode": "isolated", "reference": reference}
    return Report("mobilenet_like.keras", "input.npy", settings, {}, layers)


def golden_text(width: int) -> str:
    report = golden_report()
    return text_at(width, render_table(report), render_histograms(report), render_worst(report))


@pytest.mark.parametrize("width", [80, 160])
def test_golden(width):
    expected = (GOLDEN / f"report_{width}.txt").read_text()
    assert golden_text(width) == expected, "regenerate with: python tests/test_terminal.py"


@pytest.mark.parametrize(
    ("width", "dropped"),
    [
        (160, []),
        (100, ["#", "p99 ULP", "class"]),
        (80, ["#", "p99 ULP", "class", "max abs", "shape"]),
        (60, ["#", "p99 ULP", "class", "max abs", "shape"]),
    ],
)
def test_golden_report_drops_the_documented_columns(width, dropped):
    assert check_layer_table(golden_report(), width) == dropped
    text = text_at(width, render_table(golden_report()))
    # names are shortened (to 16 cells, here) only after the five columns are gone
    assert ("block_16…nd_relu" in text) == (width == 60)
    assert ("block_16_expand_relu" in text) == (width != 60)


def test_worst_column_is_the_recording_with_reference():
    report = golden_report(reference="ref.npz")
    text = text_at(160, render_table(report), render_worst(report))
    assert "(compared with recording ref.npz, mode isolated)" in text.splitlines()[0]
    assert "order" not in text.splitlines()[0]
    assert "recording" in headers_of(table_parts(text.split("Worst elements")[1])[0])


def test_mixed_sides_say_which_layer_is_whose():
    text = text_at(160, render_worst(golden_report()))
    assert "yours/NumPy" in headers_of(table_parts(text)[0])
    assert "your implementation's values for conv2d_flipped" in " ".join(text.split())


def test_readme_states_the_drop_orders():
    """The README's note on narrow terminals lists, per table, the columns in the code's order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- narrow -->") : readme.index("<!-- /narrow -->")]
    bullets = section.split("\n- ")[1:]
    report = golden_report()
    tables = (render_table(report), render_worst(report), render_histograms(report))
    for bullet, order, fitted in zip(
        bullets, (TABLE_STEPS, WORST_STEPS, HISTOGRAM_STEPS), tables, strict=True
    ):
        headers = {c.header for c in fitted.columns if c.header}
        named = [n for n in re.findall(r"`([^`]+)`", bullet) if n in headers]
        assert named == [s for s in order if s in headers], (bullet, order)
        assert ("long names" in bullet) == (SHORTEN in order)
        assert ("line of its own" in bullet) == (HEADINGS in order)
        assert ("bars are shortened" in bullet) == (NARROW in order)


def test_shorten_middle():
    assert shorten_middle("block_16_expand_relu", 20) == "block_16_expand_relu"
    assert shorten_middle("block_16_expand_relu", 16) == "block_16…nd_relu"
    assert shorten_middle("block_16_expand_relu", 17) == "block_16…and_relu"
    assert shorten_middle("conv2d#2", 5) == "co…#2"
    assert all(cell_len(shorten_middle("x" * 40, n)) == n for n in range(1, 30))


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for w in (80, 160):
        (GOLDEN / f"report_{w}.txt").write_text(golden_text(w))
        print(f"wrote {GOLDEN / f'report_{w}.txt'}")
