"""The README is the front door: its generated parts and example output must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from convdiff.cli import cli
from convdiff.kernels import supported_layers_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    match = re.search(re.escape(marker) + r"\n```[a-z]*\n(.*?)```", text, flags=re.S)
    assert match, marker
    return match.group(1)


def test_supported_layers_list_matches_registry():
    text = README.read_text()
    match = re.search(r"<!-- supported-layers -->\n(.*?)<!-- /supported-layers -->", text, re.S)
    assert match and match.group(1) == supported_layers_markdown(), (
        "README's layer list is stale: run `python -m convdiff.kernels --readme`"
    )


def test_example_output_is_true(examples, monkeypatch):
    from test_end_to_end import bit_exact_cpu

    monkeypatch.setenv("COLUMNS", "100")
    result = CliRunner().invoke(
        cli, [str(examples / "one_layer.h5"), str(examples / "one_layer_input.npy")]
    )
    shown = _block_after("<!-- example-output -->")
    command = shown.splitlines()[0]
    assert command == "$ convdiff examples/one_layer.h5 examples/one_layer_input.npy"
    if not bit_exact_cpu():
        return  # the figures shown were measured on x86-64 with AVX-512 and oneDNN
    actual = result.stdout.replace(str(examples) + "/", "examples/")
    assert [line.rstrip() for line in actual.splitlines()] == [
        line.rstrip() for line in shown.splitlines()[1:]
    ]
