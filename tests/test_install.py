"""The README's two set-up commands in one environment: ``pip install .`` and a run, then
``pip install -e .``: the second install must be the one that runs, and nothing the first run
cached may shadow it (numba's cache once lived inside the installed package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository's tracked files (the installs write build files into it)."""
    listed = _run(["git", "ls-files", "-z"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    target = tmp_path_factory.mktemp("checkout") / "convdiff"
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> Path:
    """A fresh virtual environment that sees this one's packages (TensorFlow, numba...) behind
    its own site-packages, so that installing convdiff there takes seconds."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False)
    inner = _run(
        [str(home / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"]
    )
    site = Path(inner.stdout.strip())
    outer = [p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])]
    (site / "outer.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    return home


def test_editable_install_after_a_regular_one_and_a_run(checkout, environment, tmp_path):
    python = str(environment / "bin" / "python")
    convdiff = str(environment / "bin" / "convdiff")
    env = {**os.environ, "CONVDIFF_CACHE_DIR": str(tmp_path / "cache"), "CONVDIFF_NUMBA": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("NUMBA_CACHE_DIR", None)  # convdiff places numba's cache itself, as for a user
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    example = [str(checkout / "examples" / n) for n in ("one_layer.h5", "one_layer_input.npy")]

    done = _run([*pip, str(checkout)], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first = _run([convdiff, *example, "--quiet"], env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    done = _run([*pip, "-e", str(checkout)], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    second = _run([convdiff, *example, "--json", "-"], env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["convdiff_version"] and report["passed"] is True
    where = _run([python, "-c", "import convdiff; print(convdiff.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).parent == checkout / "convdiff", where.stdout
