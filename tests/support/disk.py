"""A small real filesystem for disk-full tests: a tmpfs mounted for one test, then filled.

Mounting needs the privilege to mount; where it is missing the test is skipped
with the reason (:func:`small_disk`). Used by the integration and end-to-end
disk-full tests through the ``small_disk`` fixture in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["DISK_BYTES", "fill", "small_disk"]

# A node keeps 64 MiB free besides a download (ArtifactStore.download's
# reserve): the filesystem must pass that check for a deploy to start.
DISK_BYTES = 72 * 1024 * 1024


@contextlib.contextmanager
def small_disk(mount_point: Path, size: int = DISK_BYTES) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``mount_point`` (made here), unmounted after."""
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem holding ``disk`` has not one byte left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    return filler
