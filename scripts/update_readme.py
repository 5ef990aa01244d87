"""Regenerate the README's generated parts: every shown ``$ convdiff ...`` run (re-run at 100
columns) and the supported-layer list. tests/test_readme.py checks both stay true.

    python scripts/update_readme.py
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"```text\n(\$ convdiff [^\n]*)\n(.*?)```", re.S)


def rerun(match: re.Match) -> str:
    command = match.group(1)
    env = {**os.environ, "COLUMNS": "100"}
    args = [sys.executable, "-m", "convdiff", *shlex.split(command)[2:]]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    body = "\n".join(line.rstrip() for line in out.splitlines())
    return f"```text\n{command}\n{body}\n```"


def main() -> None:
    README.write_text(BLOCK.sub(rerun, README.read_text()))
    subprocess.run([sys.executable, "-m", "convdiff.kernels", "--readme"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
