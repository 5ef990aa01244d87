"""The README is the front door: its generated parts and example outputs must stay true."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from convdiff.cli import cli
from convdiff.kernels import supported_layers_markdown
from convdiff.runtime import onednn_setting

# Runs Keras on the CPU and compares bits: .ci/run runs it again with oneDNN's other setting.
pytestmark = pytest.mark.onednn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _shown_runs() -> list[tuple[str, list[str]]]:
    """Every ```text block of the README that starts with ``$ convdiff ...``: command, output."""
    blocks = re.findall(r"```text\n(\$ convdiff [^\n]*)\n(.*?)```", README.read_text(), re.S)
    return [(cmd, out.splitlines()) for cmd, out in blocks]


def test_supported_layers_list_matches_registry():
    text = README.read_text()
    match = re.search(r"<!-- supported-layers -->\n(.*?)<!-- /supported-layers -->", text, re.S)
    assert match and match.group(1) == supported_layers_markdown(), (
        "README's layer list is stale: run `python -m convdiff.kernels --readme`"
    )


def test_readme_shows_example_runs():
    commands = [cmd for cmd, _ in _shown_runs()]
    assert "$ convdiff examples/one_layer.h5 examples/one_layer_input.npy" in commands
    assert len(commands) >= 3


def _without_orders(lines: list[str]) -> tuple[list[str], list[str]]:
    """An output's lines without its ``Order:`` lines (each wrapped at the width), and those:
    they come last, before the tally."""
    lines = [line.rstrip() for line in lines]
    first = next((i for i, line in enumerate(lines) if line.startswith("Order: ")), None)
    if first is None:
        return lines, []
    return lines[:first] + lines[-1:], lines[first:-1]


def _invoke(args: list[str]) -> tuple[int, str]:
    """Exit status and standard output of ``convdiff ARGS`` at 100 columns: in this process,
    or in one of its own where the command asks for another oneDNN setting than this
    process's (TensorFlow takes it only before its import)."""
    asked = True if "--onednn" in args else False if "--no-onednn" in args else None
    if asked is None or asked == onednn_setting():
        result = CliRunner().invoke(cli, args)
        return result.exit_code, result.stdout
    env = {**os.environ, "COLUMNS": "100"}
    command = [sys.executable, "-m", "convdiff", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout


def _reproduces(args: list[str], order: str) -> bool:
    """Whether ``order`` gives Keras's own bits on every compared layer of the command's model
    and input on this machine, with the command's oneDNN setting."""
    onednn = [a for a in args if a in ("--onednn", "--no-onednn")]
    code, out = _invoke([*args[:2], *onednn, "--order", order, "--json", "-"])
    assert code in (0, 1), out
    return all(r["status"] in ("identical", "skipped") for r in json.loads(out)["layers"])


@pytest.mark.parametrize(("command", "shown"), _shown_runs(), ids=lambda v: str(v)[:60])
def test_example_output_is_true(command, shown, monkeypatch):
    """Each shown run, re-run at the README's width (100 columns), prints what is shown, on
    every machine where its figures hold (elsewhere the test skips): a run in the default
    order, auto, wherever auto reproduces TensorFlow on the example's layers; a run in a
    named order, such as ``--no-fma``'s sequential one, where TensorFlow adds the example's
    sums as on the README's machine, one FMA chain in order (``--order sequential``
    reproduces them). The ``Order:`` lines name this machine's trees, which differ between
    CPUs (the README says so): they are compared where the trees are the README's."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "100")
    args = shlex.split(command)[2:]
    code, out = _invoke(args)
    assert code in (0, 1), out
    order = "auto" if re.search(r"\border auto\b", out.splitlines()[0]) else "sequential"
    if not _reproduces(args, order):
        pytest.skip(f"--order {order} does not reproduce {args[0]} on this machine")
    got, got_orders = _without_orders(out.splitlines())
    want, want_orders = _without_orders(shown)
    assert got == want
    assert bool(got_orders) == bool(want_orders)
    if got_orders != want_orders:
        pytest.skip(f"TensorFlow here adds in other trees than the README's: {got_orders}")


def test_python_example_runs_as_written():
    """The README's Python example, run from the repository root as a new user would."""
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (code,) = [b for b in blocks if "convdiff.compare(" in b]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "True None", done.stdout
