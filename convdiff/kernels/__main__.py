"""``python -m convdiff.kernels``: print the supported-layer list, or with ``--readme`` rewrite
the README's generated section."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from convdiff.kernels import supported_layers_markdown

START, END = "<!-- supported-layers -->", "<!-- /supported-layers -->"


def update_readme(path: Path) -> None:
    text = path.read_text()
    block = f"{START}\n{supported_layers_markdown()}{END}"
    path.write_text(
        re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    )


if __name__ == "__main__":
    if "--readme" in sys.argv:
        update_readme(Path(__file__).resolve().parents[2] / "README.md")
    else:
        sys.stdout.write(supported_layers_markdown())
