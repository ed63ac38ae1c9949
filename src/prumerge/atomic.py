"""Writing files whole or not at all.

A summary or config written in place can be left empty by a full disk or a kill mid-write,
losing the good file it replaced. These helpers write a temporary file in the same folder and
rename it into place (atomic on POSIX and Windows), so readers see the old file or the new
one, never a part. A write error removes the temporary file and becomes one ``PrumergeError``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from prumerge.errors import PrumergeError

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    Raises:
        PrumergeError: The folder cannot be written or the disk is full; ``path`` keeps
            what it held before and no temporary file is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise PrumergeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``write_bytes_atomic`` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))
