"""Render the README's screenshot of the --html report for the flipped-kernel example:

    python scripts/screenshot.py            # writes docs/report-flipped.png

Runs convdiff on the bundled example with ``--impl conv2d=examples/my_conv2d.py:forward_flipped
--html``, opens the page in headless Chromium (Debian's ``chromium`` package) at 1100 pixels wide
and stores the window as a PNG (recompressed with Pillow, installed with matplotlib).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "report-flipped.png"
WINDOW = (1100, 1640)


def main() -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as tmp:
        page, shot = Path(tmp) / "report.html", Path(tmp) / "shot.png"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "convdiff",
                "examples/one_layer.h5",
                "examples/one_layer_input.npy",
                "--impl",
                "conv2d=examples/my_conv2d.py:forward_flipped",
                "--html",
                str(page),
                "--quiet",
            ],
            cwd=ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            check=False,  # exit status 1: the layer is divergent
        )
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={Path(tmp) / 'profile'}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--screenshot={shot}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        from PIL import Image

        Image.open(shot).convert("RGB").save(TARGET, format="PNG", optimize=True)
    print(f"{TARGET.relative_to(ROOT)}: {TARGET.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
