"""CI and daily-debugging features through the command line, on real saved models: budgets,
JUnit, recorded references, compare-runs, --layers, --stop-at-first, --quiet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from support import assert_valid_junit, run_cli

from convdiff.cli import cli


@pytest.fixture
def deep(examples):
    return examples / "deep8.keras", examples / "deep8_input.npy"


def test_junit_file_is_valid_and_fails_over_budget(deep, tmp_path, junit_schema):
    out = tmp_path / "report.xml"
    result = run_cli(*deep, "--no-fma", "--max-ulp", "0", "--junit", out)
    assert result.exit_code == 1
    suite = assert_valid_junit(out.read_bytes(), junit_schema)
    cases = suite.findall("testcase")
    assert len(cases) == 8 and all(c.find("failure") is not None for c in cases)
    ok = run_cli(*deep, "--junit", out)
    assert ok.exit_code == 0
    cases = assert_valid_junit(out.read_bytes(), junit_schema).findall("testcase")
    assert all(len(list(c)) == 0 for c in cases)


def test_per_layer_budget_override_and_quantile(deep):
    args = [*deep, "--no-fma", "--json", "-"]
    base = json.loads(run_cli(*args).stdout)
    worst = max(layer["max_ulp"] for layer in base["layers"])
    # a global budget that fits every layer, then one layer overridden down to 0
    result = run_cli(*args, "--max-ulp", str(worst), "--max-ulp", "conv3=0")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["over_budget"] == ["conv3"]
    assert report["layers"][3]["budget_violations"][0].endswith("(--max-ulp conv3=0)")
    # the median of every layer is within a budget its max exceeds
    p50 = run_cli(*args, "--max-ulp", "0", "--quantile", "0.5")
    assert p50.exit_code == 0, json.loads(p50.stdout)["over_budget"]


def test_atol_rtol(deep):
    args = [*deep, "--no-fma", "--json", "-"]
    assert run_cli(*args, "--atol", "1e-5").exit_code == 0
    tight = run_cli(*args, "--atol", "0", "--rtol", "0")
    assert tight.exit_code == 1


def test_layers_filter_and_stop_at_first(deep, tmp_path, examples):
    report = json.loads(run_cli(*deep, "--layers", "conv[12]", "--json", "-").stdout)
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2"]
    result = run_cli(*deep, "--layers", "nothing*")
    assert result.exit_code == 2 and "--layers 'nothing*' matches no layer" in result.stderr
    # stop at the first divergent layer: a wrong user implementation for conv1
    (tmp_path / "wrong.py").write_text(
        "def f(x, k, b):\n    return (x[..., :16] * 3).astype(x.dtype)\n"
    )
    data = json.loads(
        run_cli(
            *deep,
            "--impl",
            f"conv1={tmp_path / 'wrong.py'}:f",
            "--mode",
            "propagated",
            "--stop-at-first",
            "--json",
            "-",
        ).stdout
    )
    assert [layer["status"] for layer in data["layers"]] == ["identical", "divergent"]


def test_quiet_prints_one_line(deep):
    result = run_cli(*deep, "--quiet")
    assert result.exit_code == 0
    assert result.stdout.strip().splitlines() == ["8 layers: 8 identical. PASS"]


def test_save_outputs_then_reference(deep, tmp_path):
    rec = tmp_path / "run.npz"
    assert run_cli(*deep, "--save-outputs", rec).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]
    model = deep[0]
    result = run_cli(model, "--reference", rec, "--json", "-")  # inputs come from the recording
    report = json.loads(result.stdout)
    assert result.exit_code == 0
    assert report["settings"]["reference"] == str(rec)
    assert {layer["status"] for layer in report["layers"]} == {"identical"}
    # a recording that differs: one layer's output perturbed by one ULP -> rounding, named
    data = dict(np.load(rec))
    data["layer/conv4"] = np.nextafter(data["layer/conv4"], np.float32(np.inf))
    np.savez_compressed(tmp_path / "perturbed.npz", **data)
    report = json.loads(
        run_cli(model, "--reference", tmp_path / "perturbed.npz", "--json", "-").stdout
    )
    statuses = {layer["name"]: layer["status"] for layer in report["layers"]}
    assert statuses["conv4"] == "rounding" and statuses["conv3"] == "identical"
    assert statuses["conv5"] in ("identical", "rounding")


def test_reference_lists_unmatched_layers(deep, tmp_path):
    rec = tmp_path / "run.npz"
    run_cli(*deep, "--save-outputs", rec)
    data = dict(np.load(rec))
    data["layer/renamed"] = data.pop("layer/conv7")
    meta = json.loads(bytes(data["meta"]).decode())
    meta["layers"] = [("renamed" if n == "conv7" else n) for n in meta["layers"]]
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(tmp_path / "renamed.npz", **data)
    result = run_cli(deep[0], "--reference", tmp_path / "renamed.npz", "--json", "-")
    report = json.loads(result.stdout)
    assert "layers only in the recording: renamed" in result.stderr
    assert "layers not in the recording: conv7" in result.stderr
    conv7 = next(layer for layer in report["layers"] if layer["name"] == "conv7")
    assert conv7["status"] == "skipped" and "not in the recording" in conv7["reason"]


def test_compare_runs(deep, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_cli(*deep, "--save-outputs", a)
    run_cli(*deep, "--save-outputs", b)
    result = CliRunner().invoke(cli, ["compare-runs", str(a), str(b), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert {layer["status"] for layer in json.loads(result.stdout)["layers"]} == {"identical"}
    data = dict(np.load(b))
    data["layer/conv2"] = np.nextafter(data["layer/conv2"], np.float32(np.inf))
    np.savez_compressed(b, **data)
    # without the model: figures, no verdict; a budget still fails the run
    result = CliRunner().invoke(cli, ["compare-runs", str(a), str(b), "--json", "-"])
    layers = {entry["name"]: entry for entry in json.loads(result.stdout)["layers"]}
    assert layers["conv2"]["status"] == "skipped" and layers["conv2"]["max_ulp"] == 1
    assert result.exit_code == 0
    assert (
        CliRunner().invoke(cli, ["compare-runs", str(a), str(b), "--max-ulp", "0"]).exit_code == 1
    )
    # with the model: bounds and verdicts
    result = CliRunner().invoke(
        cli, ["compare-runs", str(a), str(b), "--model", str(deep[0]), "--json", "-"]
    )
    layers = {entry["name"]: entry for entry in json.loads(result.stdout)["layers"]}
    assert layers["conv2"]["status"] == "rounding" and layers["conv1"]["status"] == "identical"
    bad = CliRunner().invoke(cli, ["compare-runs", str(a), str(tmp_path / "missing.npz")])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: ")


def test_many_inputs_directory_and_glob(deep, tmp_path, junit_schema):
    model, x = deep
    for i in range(3):
        data = np.load(x) if i == 0 else np.random.default_rng(i).standard_normal((1, 32, 32, 3))
        np.save(tmp_path / f"in{i}.npy", data.astype("float32"))
    (tmp_path / "notes.txt").write_text("not an input")
    result = run_cli(model, tmp_path, "--quiet")
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 0 and lines[-1] == "3 inputs: 3 PASS, 0 FAIL"
    assert [line.split(":")[0] for line in lines[:3]] == [
        str(tmp_path / f"in{i}.npy") for i in range(3)
    ]
    document = json.loads(run_cli(model, str(tmp_path / "in[12].npy"), "--json", "-").stdout)
    assert document["passed"] is True and [r["inputs"] for r in document["runs"]] == [
        str(tmp_path / "in1.npy"),
        str(tmp_path / "in2.npy"),
    ]
    out = tmp_path / "many.xml"
    run_cli(model, tmp_path, "--junit", out, "--no-fma", "--max-ulp", "0")
    suites = assert_valid_junit_many(out.read_bytes(), junit_schema)
    assert len(suites) == 3
    missing = run_cli(model, str(tmp_path / "*.npz"))
    assert missing.exit_code == 2 and "names no .npy or .npz input file" in missing.stderr


def assert_valid_junit_many(data: bytes, junit_schema) -> list:
    import xml.etree.ElementTree as ET

    junit_schema.validate(data.decode())
    root = ET.fromstring(data)
    suites = root.findall("testsuite")
    assert int(root.get("tests")) == sum(int(s.get("tests")) for s in suites)
    assert int(root.get("failures")) == sum(int(s.get("failures")) for s in suites)
    return suites
