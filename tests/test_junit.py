"""JUnit XML: one test case per layer, counts consistent, valid against a JUnit schema."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from support import assert_valid_junit

from convdiff.junit import to_junit
from convdiff.metrics import compare
from convdiff.report import Report
from convdiff.runner import LayerResult


def _result(index, name, class_name, status, comparison=None, **kwargs) -> LayerResult:
    return LayerResult(
        index, name, class_name, (1, 4), "float32", status, None, comparison, **kwargs
    )


def _report(layers, **kwargs) -> Report:
    settings = {"order": "sequential", "order_label": "sequential+fma", "mode": "isolated"}
    settings["max_ulp"] = kwargs.pop("max_ulp", None)
    environment = {"tensorflow": "2.21.0", "onednn": True, "intra_op_threads": 0}
    return Report("models/net.keras", "x.npy", settings, environment, layers, **kwargs)


def _every_status() -> Report:
    ref = np.float32([1.0, 2.0, 3.0, 4.0])
    off = ref.copy()
    off[2] = 7.0
    near = np.nextafter(ref, np.float32(10))
    bound = np.full(4, 1e-5)
    layers = [
        _result(0, "conv", "Conv2D", "identical", compare(ref, ref, bound)),
        _result(
            1,
            "dense",
            "Dense",
            "rounding",
            compare(ref, near, bound),
            budget_violations=["max ULP 1 > 0 (--max-ulp 0)"],
        ),
        _result(2, "bad", "Twice", "divergent", compare(ref, off, bound)),
        _result(3, "custom", "LayerScale", "skipped"),
        _result(4, "mine", "Conv2D", "error"),
        _result(5, "dense", "Dense", "rounding", compare(ref, near, bound)),
    ]
    layers[3].reason = "no NumPy kernel for LayerScale"
    layers[4].reason = "your implementation raised ValueError: shapes do not align"
    layers[4].traceback = 'Traceback (most recent call last):\n  File "my_conv.py", line 3'
    layers[5].name = "dense#2"
    return _report(layers, max_ulp=0, notes=["input cast from float64 to float32"])


def test_every_status_maps_to_its_junit_outcome(junit_schema):
    suite = assert_valid_junit(to_junit(_every_status()), junit_schema)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "2", "1")
    assert suite.get("skipped") == "1" and suite.get("name") == "convdiff net.keras"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "0 conv (Conv2D)",
        "1 dense (Dense)",
        "2 bad (Twice)",
        "3 custom (LayerScale)",
        "4 mine (Conv2D)",
        "5 dense#2 (Dense)",
    ]
    assert {c.get("classname") for c in cases} == {"net.keras"}
    assert list(cases[0]) == [] and list(cases[5]) == []

    budget = cases[1].find("failure")
    assert budget.get("type") == "over budget"
    assert budget.get("message") == (
        "rounding, over budget; max 1 ULP; 0.0477x the rounding bound; max ULP 1 > 0 (--max-ulp 0)"
    )
    divergent = cases[2].find("failure")
    assert divergent.get("type") == "divergent"
    assert divergent.get("message").startswith("divergent; max 10,485,760 ULP; 4e+05x the rounding")
    assert "worst at (2,): Keras 3.0, NumPy 7.0, 10,485,760 ULP, bound 1e-05" in divergent.text
    assert "bound_ratio: 4e+05" in divergent.text

    assert cases[3].find("skipped").get("message") == "no NumPy kernel for LayerScale"
    error = cases[4].find("error")
    assert (
        error.get("message") == "error; your implementation raised ValueError: shapes do not align"
    )
    assert 'File "my_conv.py", line 3' in error.text
    assert suite.find("system-out").text == "input cast from float64 to float32"


def test_settings_and_environment_are_properties(junit_schema):
    suite = assert_valid_junit(to_junit(_every_status()), junit_schema)
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["model"] == "models/net.keras" and props["inputs"] == "x.npy"
    assert props["settings.order_label"] == "sequential+fma" and props["settings.max_ulp"] == "0"
    assert props["environment.tensorflow"] == "2.21.0" and props["environment.onednn"] == "true"
    assert props["convdiff.version"]


def test_budget_violations_from_the_runner_are_used(junit_schema):
    report = _every_status()
    report.layers[1].budget_violations = ["0.99 ULP quantile 3 > 2 (--max-ulp dense=2)"]
    suite = assert_valid_junit(to_junit(report), junit_schema)
    failure = suite.findall("testcase")[1].find("failure")
    assert failure.get("message").endswith("0.99 ULP quantile 3 > 2 (--max-ulp dense=2)")
    assert "budget: 0.99 ULP quantile 3 > 2" in failure.text


def test_divergent_and_over_budget_is_one_failure(junit_schema):
    report = _every_status()
    report.layers[2].budget_violations = ["max ULP 10,485,760 > 0 (--max-ulp 0)"]
    case = assert_valid_junit(to_junit(report), junit_schema).findall("testcase")[2]
    assert [c.tag for c in case] == ["failure"]
    assert case.find("failure").get("message").startswith("divergent, over budget; max 10,485,760")


def test_text_that_xml_cannot_hold_is_escaped_or_replaced(junit_schema):
    report = _every_status()
    report.layers[4].reason = 'bad <tag> & "quote"\x00\x1b end'
    report.layers[3].name = "odd\x07name<&>"
    suite = assert_valid_junit(to_junit(report), junit_schema)
    cases = suite.findall("testcase")
    assert cases[4].find("error").get("message") == 'error; bad <tag> & "quote"\ufffd\ufffd end'
    assert cases[3].get("name") == "3 odd\ufffdname<&> (LayerScale)"


def test_durations_timestamp_and_empty_report(junit_schema):
    report = _every_status()
    for layer, seconds in zip(report.layers, [0.5, 1, 0.25, 0, 2, 0.125], strict=True):
        layer.seconds = seconds
    data = to_junit(report, timestamp=datetime(2026, 1, 2, 3, 4, 5))
    suite = assert_valid_junit(data, junit_schema)
    assert suite.get("time") == "3.875" and suite.get("timestamp") == "2026-01-02T03:04:05"
    assert [c.get("time") for c in suite.findall("testcase")][:2] == ["0.500", "1.000"]
    empty = assert_valid_junit(to_junit(_report([])), junit_schema)
    assert empty.get("tests") == "0" and empty.findall("testcase") == []


def test_schema_rejects_what_ci_readers_reject(junit_schema):
    """The junit_schema can fail: a case without classname, a count that is not a number, two
    outcomes in one case."""
    if junit_schema is None:
        pytest.skip("xmlschema is not installed")
    import xmlschema

    good = to_junit(_every_status()).decode()
    junit_schema.validate(good)
    broken = [
        good.replace('classname="net.keras" name="0 conv (Conv2D)"', 'name="0 conv (Conv2D)"'),
        good.replace('failures="2"', 'failures="two"', 1),
        good.replace(
            '<skipped message="no NumPy kernel for LayerScale" />',
            '<skipped message="x" /><failure message="y" />',
        ),
        good.replace("<testsuites ", '<testsuites skipped="1" ', 1),
    ]
    for document in broken:
        assert document != good
        with pytest.raises(xmlschema.XMLSchemaValidationError):
            junit_schema.validate(document)


def test_real_run_over_budget(examples, junit_schema):
    """The seed model without FMA: rounding everywhere, over a budget of 0 ULP."""
    from convdiff.api import compare as compare_model

    report = compare_model(
        examples / "one_layer.h5", examples / "one_layer_input.npy", fma=False, max_ulp=0
    )
    suite = assert_valid_junit(to_junit(report), junit_schema)
    (case,) = suite.findall("testcase")
    assert case.get("classname") == "one_layer.h5" and case.get("name") == "0 conv2d (Conv2D)"
    # each layer's time: running it through Keras and comparing it
    assert float(case.get("time")) > 0 and case.get("time") == f"{report.layers[0].seconds:.3f}"
    failure = case.find("failure")
    max_ulp = report.layers[0].comparison.max_ulp
    assert failure.get("type") == "over budget" and max_ulp > 0
    assert failure.get("message").startswith(f"rounding, over budget; max {max_ulp:,} ULP; ")
    assert f"max ULP {max_ulp:,} > 0 (--max-ulp 0)" in failure.get("message")


# --------------------------------------------------------------------------- the CI example


def test_the_bound_is_a_budget_that_holds_on_any_cpu(examples, tmp_path):
    """The README's CI command without a raw ULP budget: a correct model passes on any CPU
    (every difference within its rigorous bound), a wrong implementation fails."""
    from click.testing import CliRunner

    from convdiff.cli import cli

    for model, x in (("deep8.keras", "deep8_input.npy"), ("one_layer.h5", "one_layer_input.npy")):
        args = [str(examples / model), str(examples / x), "--junit", str(tmp_path / "r.xml")]
        for fma in ("--fma", "--no-fma"):  # rounding differences or none: both pass
            assert CliRunner().invoke(cli, [*args, fma]).exit_code == 0
    wrong = f"conv2d={examples / 'my_conv2d.py'}:forward_no_bias"
    result = CliRunner().invoke(cli, [*args, "--impl", wrong])
    assert result.exit_code == 1
    assert "matches if the bias is left out" in " ".join(result.stdout.split())


@pytest.mark.parametrize("status", [0, 1, 2])
@pytest.mark.parametrize("max_ulp", ["4", ""])
def test_ci_step_passes_budget_and_junit_and_keeps_the_exit_status(tmp_path, status, max_ulp):
    """examples/ci/convdiff-step.sh, with a stand-in convdiff that records its arguments."""
    import os
    import subprocess

    script = Path(__file__).resolve().parent.parent / "examples" / "ci" / "convdiff-step.sh"
    stub = tmp_path / "bin" / "convdiff"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\nexit "$RC"\n')
    stub.chmod(0o755)
    (tmp_path / "block1=16").touch()  # a file a glob would expand to: it must not
    env = {
        **os.environ,
        "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
        "ARGS_FILE": str(tmp_path / "args"),
        "RC": str(status),
        "CONVDIFF_MAX_ULP": max_ulp,
        "CONVDIFF_ARGS": "--max-ulp block*=16  --quantile 0.999",
    }
    env.pop("CONVDIFF_INSTALL", None)
    env.pop("CONVDIFF_OUT", None)
    done = subprocess.run(
        ["bash", str(script), "net.keras"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == status, done.stderr
    assert (tmp_path / "args").read_text().splitlines() == [
        "net.keras",
        "--random-input",
        "--seed",
        "0",
        *(["--max-ulp", max_ulp] if max_ulp else []),
        "--json",
        "convdiff-report/report.json",
        "--junit",
        "convdiff-report/report.xml",
        "--max-ulp",
        "block*=16",
        "--quantile",
        "0.999",
    ]
    assert (tmp_path / "convdiff-report").is_dir()
