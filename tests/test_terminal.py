"""What a person sees in a real terminal: the command runs in a pseudo-terminal and its bytes go
through a VT100 emulator (pyte), so cursor moves and erasures count as they do on screen."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
import time

import pyte

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def run_in_terminal(args: list[str], columns: int, rows: int = 40, timeout_s: float = 300):
    """Run ``convdiff ARGS`` with stdout and stderr on one pseudo-terminal of the given size.

    Returns:
        The raw bytes written and the screen's lines after they were all shown.
    """
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


def test_progress_line_is_gone_before_the_table(examples):
    """The spinner is drawn while layers are compared and erased before the first line of
    output: the screen starts with the table's title, and no spinner frame is left anywhere."""
    raw, screen = run_in_terminal(
        [str(examples / "one_layer.h5"), str(examples / "one_layer_input.npy")], columns=100
    )
    assert "comparing layers" in raw, "the progress line was never drawn: nothing was tested"
    shown = [line for line in screen if line]
    assert shown[0].startswith("convdiff: "), screen
    assert not any(c in line for line in shown for c in SPINNER), screen
    assert not any("comparing layers" in line or "layer 0:" in line for line in shown), screen
    assert shown[-1].endswith("PASS"), screen
