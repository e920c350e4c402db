"""Telling a full disk from a broken one.

A full data disk (``ENOSPC``, or a quota: ``EDQUOT``) is a state the node lives
through: it keeps serving, drops telemetry, fails the download that hit it, and
carries on by itself once space returns. Any other I/O failure keeps its own
meaning. This module only classifies; the parts that write decide what to do.

SQLite reports a full disk as ``SQLITE_FULL`` when a write is refused, but
creating its shared-memory index (``-shm``) on a full disk fails as a plain
``SQLITE_IOERR``; such an error counts as a full disk only when the filesystem
really has (almost) no room left.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

from shared.errors import EdgeFleetError

__all__ = ["ALMOST_FULL_BYTES", "DiskFullError", "is_disk_full"]

ALMOST_FULL_BYTES = 256 * 1024  # below this much free space, an SQLite I/O error means full

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(EdgeFleetError):
    """The node's data disk has no room for a write; retry once space returns."""

    code = "disk_full"


def is_disk_full(exc: BaseException, directory: Path | None = None) -> bool:
    """Whether ``exc`` means the disk (holding ``directory``) is full.

    ``OSError`` with ``ENOSPC``/``EDQUOT``, ``sqlite3`` ``SQLITE_FULL``, or an
    SQLite I/O error while ``directory``'s filesystem has under
    :data:`ALMOST_FULL_BYTES` free. Follows ``__cause__`` (a wrapped error).
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
            if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR and directory is not None:
                return _almost_full(directory)
        seen = seen.__cause__
    return False


def _almost_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < ALMOST_FULL_BYTES
    except OSError:
        return False
