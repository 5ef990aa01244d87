"""Where convdiff keeps what it computes once and reuses: a user cache directory, never the
installed package (a cache written beside the code survives a reinstall and can shadow it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir(name: str) -> Path | None:
    """A writable directory ``name`` under convdiff's cache root, made if needed; None when
    none can be made (a read-only home): callers then work without a cache.

    The root is ``$CONVDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/convdiff``, else
    ``~/.cache/convdiff``.
    """
    path = _root() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):  # mkdir succeeds on a read-only mount
            pass
    except OSError:
        return None
    return path


def _root() -> Path:
    if os.environ.get("CONVDIFF_CACHE_DIR"):
        return Path(os.environ["CONVDIFF_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "convdiff"
