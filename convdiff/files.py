"""File checks and signatures shared by the model-file and input-file readers."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
# Large reads (arrays, archive members) go in chunks of this many bytes.
READ_CHUNK = 16 * 2**20
# What zipfile (and zlib under it) raise for a damaged or unusual archive.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    OSError,
    EOFError,
    ValueError,  # includes UnicodeDecodeError for a member name flagged as UTF-8
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
    OverflowError,
)


def check_file(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse a missing, unreadable, non-regular (directory, FIFO, device) or empty file."""
    try:
        if not path.exists():
            raise error(f"{what} {str(path)!r} does not exist")
        if path.is_dir():
            raise error(f"{what} {str(path)!r} is a directory; expected a file")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise error(f"{what} {str(path)!r} is not a regular file")
        size = path.stat().st_size
    except OSError as exc:  # a parent without search permission, a name too long...
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise error(f"{what} {str(path)!r} is empty")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {str(path)!r} cannot be read (permission denied)")


def read_head(path: Path, n: int, what: str, error: type[Exception]) -> bytes:
    """The first ``n`` bytes of a file (its signature)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None
