"""Files convdiff writes (JSON and JUnit reports, recordings): checked before any work starts,
written atomically (never a half-written file), and JSON that stays JSON (no ``NaN`` or
``Infinity`` tokens, no numpy scalars).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.errors import OutputError


def check_writable(path: str) -> None:
    """Fail before any work starts if ``path`` cannot be written (``-`` is stdout).

    A temporary file is created and removed beside it: ``os.access`` says yes to root even on a
    read-only or immutable directory.
    """
    if path == "-":
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"output path {path!r} is a directory; expected a file name")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path!r}: directory {str(parent)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        why = f"permission denied ({exc.strerror})" if denied else (exc.strerror or str(exc))
        raise OutputError(f"cannot write {path!r}: {why}") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"cannot write {path!r}: permission denied")


def temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` (the same file system, so that it can be renamed into
    place), with the permissions a newly created file gets here (mkstemp's own are 0600).

    Raises:
        OutputError: when it cannot be created.
    """
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: never a half file."""
    target = Path(path)
    fd, tmp = temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def json_safe(value: Any) -> Any:
    """``value`` made of plain JSON values: non-finite floats as the strings ``"nan"``,
    ``"inf"``, ``"-inf"``; numpy scalars as Python numbers; keys as strings; anything else
    (paths, dtypes) as its string."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
