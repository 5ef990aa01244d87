"""``--profile``: seconds per phase (convdiff.timing), phases counted without overlap."""

from __future__ import annotations

import re
import time

from click.testing import CliRunner

from convdiff.cli import cli
from convdiff.timing import PHASES, Timings, phase


def test_an_inner_phase_counts_for_itself_only():
    with Timings() as timings:
        with phase("statistics"):
            time.sleep(0.02)
            with phase("bound"):
                time.sleep(0.05)
        time.sleep(0.01)
    assert 0.05 <= timings.seconds["bound"] < timings.total
    # the outer phase's own time excludes the inner one's
    assert 0.02 <= timings.seconds["statistics"] < 0.05
    assert timings.other >= 0.01
    total = sum(timings.seconds.values()) + timings.other
    assert abs(total - timings.total) < 1e-9


def test_phases_outside_timings_cost_nothing_and_record_nothing():
    with phase("keras"):
        pass
    with Timings() as timings:
        pass
    assert set(timings.seconds.values()) == {0.0}


def test_profile_prints_every_phase_after_the_report(examples):
    result = CliRunner().invoke(
        cli,
        [str(examples / "one_layer.keras"), str(examples / "one_layer_input.npy"), "--profile"],
    )
    assert result.exit_code == 0, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Profile (seconds): "), result.stderr
    figures = dict((name, float(value)) for name, value in re.findall(r"(\w+) (\d+\.\d\d)", line))
    assert list(figures) == [*PHASES, "other", "total"]
    # printed to 0.01 s: a phase of the one-layer example can read 0.00 (the compiled kernel
    # takes milliseconds); the phases' own figures are checked below, unrounded
    assert figures["startup"] > 0
    assert sum(v for k, v in figures.items() if k != "total") <= figures["total"] + 0.05
    assert "1 layer" in result.stdout  # the report itself is unchanged


def test_every_phase_of_a_run_is_timed(examples):
    """The one layer is loaded, run by Keras, computed and bounded by convdiff, and judged:
    each of those phases holds time of its own."""
    import convdiff

    paths = examples / "one_layer.keras", examples / "one_layer_input.npy"
    with Timings() as timings:
        convdiff.compare(*map(str, paths))
    for name in ("startup", "keras", "kernel", "bound", "statistics"):
        assert timings.seconds[name] > 0, name
    assert sum(timings.seconds.values()) <= timings.total


def test_without_profile_nothing_is_printed(examples):
    result = CliRunner().invoke(
        cli, [str(examples / "one_layer.keras"), str(examples / "one_layer_input.npy")]
    )
    assert result.exit_code == 0
    assert "Profile" not in result.stderr


def test_revealing_is_a_phase_of_its_own_on_the_first_run_only(examples, fresh_tree_cache):
    """auto's probes of TensorFlow are timed as ``reveal`` (not ``other``) where a layer's
    trees are revealed, and cost nothing once they are cached."""
    import convdiff

    paths = [str(examples / "one_layer.keras"), str(examples / "one_layer_input.npy")]
    runs = []
    for _ in range(2):
        with Timings() as timings:
            convdiff.compare(*paths)
        runs.append(timings.seconds["reveal"])
    assert runs[0] > 0 and runs[1] == 0, runs
