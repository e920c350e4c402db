"""CPU hogs: load the machine while a test or benchmark judges timing.

:func:`cpu_hogs` starts ``count`` processes that spin on the CPU (by default
one per core) and stops them on exit, so health gates, timeouts and stall
detection are checked on a busy machine, as the brief for timing decisions asks.
The hogs run at the normal priority: they compete with the code under test
for every core.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["cpu_hogs"]

_SPIN = "while True:\n    pass\n"


@contextmanager
def cpu_hogs(count: int | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` busy processes (default: one per core) for the duration of the block."""
    wanted = count if count is not None else (os.cpu_count() or 1)
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPIN],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(wanted)
    ]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
