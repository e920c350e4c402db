"""The edge node's content-addressed model store.

Layout under ``root/models``::

    <sha256>                a complete blob whose bytes hash to <sha256>
    <sha256>.part           a partial download (unverified prefix; resumable)
    <sha256>.manifest.json  the signed manifest envelope, bytes as received

Invariants:

* A file named ``<sha256>`` only ever appears by ``os.replace`` of a ``.part``
  whose full content was hashed while streaming, matched the manifest's digest
  and size, and was fsynced (the directory is fsynced after the rename). A
  crash leaves at worst a ``.part``.
* A ``.part`` is never longer than the declared size. Its bytes are not
  trusted: on resume they are hashed again and the final digest covers them.
* At most declared size + 1 bytes are read from a source; the extra byte proves
  the blob is oversize and the ``.part`` is deleted.
* A transfer failure (:class:`~shared.errors.TransferError`, cancellation, a
  stream that ends early) keeps the ``.part`` for resume; a digest or size
  mismatch deletes it, and so does a full disk
  (:class:`ArtifactDiskFullError`): the space goes back to the outbox and the
  node's state, and the next try starts over.
* One download per digest at a time in a store; :meth:`ArtifactStore.retain`
  never deletes a digest that is being downloaded.
* Hashing files, hashing/writing chunks of 64 KiB or more and the final fsync
  run in worker threads, never on the event loop: on a process-wide pool of
  :data:`IO_THREADS` kept for artifacts, so a download never queues behind
  the outbox's fsyncs in asyncio's default pool (the simulator runs a
  thousand nodes' stores in one process).
* Digests are checked to be 64 lowercase hex characters before they become a
  file name, so no path can escape the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from edge_node.disk import DiskFullError, is_disk_full
from edge_node.fetchers import Fetcher
from edgefleet_io.files import atomic_write
from shared.errors import DigestMismatchError, EdgeFleetError, TransferError
from shared.messages import ModelManifest
from shared.topics import check_sha256

__all__ = [
    "IO_THREADS",
    "PROGRESS_INTERVAL_S",
    "ArtifactDiskFullError",
    "ArtifactError",
    "ArtifactStore",
    "InsufficientSpaceError",
    "Progress",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""

_THREAD_MIN_BYTES = 64 * 1024  # chunks at least this big are hashed/written off the loop
_READ_BLOCK_BYTES = 1024 * 1024
PROGRESS_INTERVAL_S = 5.0
"""At most one progress report per download this often (seconds): a thousand nodes
downloading at once must not send the controller hundreds of statuses a second."""
_PART = ".part"
_MANIFEST = ".manifest.json"
_NAME = re.compile(r"([0-9a-f]{64})(\.part|\.manifest\.json|\.manifest\.json\.tmp)?")


class ArtifactError(EdgeFleetError):
    """The model store cannot hold or write an artifact."""

    code = "artifact_error"


class ArtifactDiskFullError(ArtifactError, DiskFullError):
    """The disk filled up while an artifact was written (its ``.part`` is deleted)."""

    code = "disk_full"


def _write_error(what: str, exc: OSError) -> ArtifactError:
    """``exc`` from writing ``what``, as the store's error (a full disk as its own)."""
    if is_disk_full(exc):
        return ArtifactDiskFullError(f"disk full: {what}: {exc.strerror or exc}")
    return ArtifactError(f"{what}: {exc.strerror or exc}")


class InsufficientSpaceError(ArtifactError):
    """Not enough free disk for the rest of a download plus the reserve."""

    code = "insufficient_space"


@dataclass(slots=True)
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class ArtifactStore:
    """Blobs by sha256 under ``root/models``, downloaded through a :class:`Fetcher`.

    ``monotonic`` is the clock used to throttle progress callbacks (injectable
    for tests).
    """

    def __init__(self, root: Path, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        """Create ``root/models`` if needed.

        Raises:
            OSError: the directory cannot be created.
        """
        self._dir = root / "models"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._monotonic = monotonic
        self._locks: dict[str, _Lock] = {}

    @property
    def directory(self) -> Path:
        return self._dir

    # ----- queries ---------------------------------------------------------

    def path(self, sha: str) -> Path:
        """Where the complete blob ``sha`` lives (whether or not it exists).

        Raises:
            TopicError: ``sha`` is not 64 lowercase hex characters.
        """
        return self._dir / check_sha256(sha)

    def _part(self, sha: str) -> Path:
        return self._dir / (check_sha256(sha) + _PART)

    def has(self, sha: str, size: int | None = None) -> bool:
        """True if blob ``sha`` is complete (and ``size`` bytes long, when given).

        Cheap: no hashing. Use :meth:`verify` to re-hash.
        """
        try:
            actual = self.path(sha).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    def partial_bytes(self, sha: str) -> int:
        """Length of the ``.part`` file of ``sha``, 0 when there is none."""
        try:
            return self._part(sha).stat().st_size
        except FileNotFoundError:
            return 0

    async def verify(self, sha: str) -> bool:
        """Re-hash blob ``sha`` in a worker thread; False if missing or different."""
        path = self.path(sha)

        def digest() -> str | None:
            hasher = hashlib.sha256()
            try:
                _hash_file(path, hasher)
            except FileNotFoundError:
                return None
            return hasher.hexdigest()

        return await _in_io_thread(digest) == sha

    # ----- manifests -------------------------------------------------------

    def save_manifest(self, sha: str, envelope_bytes: bytes) -> Path:
        """Store the signed manifest envelope of ``sha`` atomically and durably.

        Raises:
            ArtifactError: it cannot be written.
        """
        target = self._dir / (check_sha256(sha) + _MANIFEST)
        try:
            atomic_write(target, envelope_bytes)
        except OSError as exc:
            raise _write_error(f"cannot save manifest {sha[:12]}", exc) from exc
        return target

    def load_manifest_bytes(self, sha: str) -> bytes | None:
        """The envelope bytes saved for ``sha``, or None when there are none."""
        try:
            return (self._dir / (check_sha256(sha) + _MANIFEST)).read_bytes()
        except FileNotFoundError:
            return None

    # ----- housekeeping ----------------------------------------------------

    def remove(self, sha: str) -> None:
        """Delete blob, ``.part`` and manifest of ``sha`` (missing files are fine)."""
        check_sha256(sha)
        for suffix in ("", _PART, _MANIFEST, _MANIFEST + ".tmp"):
            (self._dir / (sha + suffix)).unlink(missing_ok=True)

    def retain(self, keep: Iterable[str]) -> list[str]:
        """Delete every blob, ``.part`` and manifest whose digest is not in ``keep``.

        Digests being downloaded right now are kept too. Files that are not
        named like store entries are left alone. Returns the digests removed,
        sorted.
        """
        keep_set = set(keep) | set(self._locks)
        removed: set[str] = set()
        for entry in self._dir.iterdir():
            match = _NAME.fullmatch(entry.name)
            if match is None or match[1] in keep_set or not entry.is_file():
                continue
            entry.unlink(missing_ok=True)
            removed.add(match[1])
        if removed:
            _log.info("removed %d artifact(s) not retained", len(removed))
        return sorted(removed)

    # ----- download --------------------------------------------------------

    async def download(
        self,
        manifest: ModelManifest,
        fetcher: Fetcher,
        *,
        progress: Progress | None = None,
        min_free_bytes: int = 64 * 1024 * 1024,
    ) -> Path:
        """Make blob ``manifest.sha256`` present and return its path.

        Resumes from an existing ``.part``. ``progress`` is called at most once
        per :data:`PROGRESS_INTERVAL_S` while streaming and once at the end with
        ``(size, size)``.

        Raises:
            InsufficientSpaceError: free disk < remaining bytes + ``min_free_bytes``
                (checked before anything is requested).
            DigestMismatchError: the source sent more than the declared size, or
                the bytes hash differently; the ``.part`` is deleted.
            TransferError: from the fetcher, or the stream ended early; the
                ``.part`` is kept for resume.
            ArtifactDiskFullError: the disk filled up; the ``.part`` is deleted.
            ArtifactError: the ``.part`` cannot be read or written.
        """
        sha = check_sha256(manifest.sha256)
        entry = self._locks.setdefault(sha, _Lock())
        entry.users += 1
        try:
            async with entry.lock:
                return await self._download(manifest, fetcher, progress, min_free_bytes)
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[sha]

    async def _download(
        self,
        manifest: ModelManifest,
        fetcher: Fetcher,
        progress: Progress | None,
        min_free_bytes: int,
    ) -> Path:
        sha, size = manifest.sha256, manifest.size
        final, part = self.path(sha), self._part(sha)
        if self._complete(sha, size):
            if progress is not None:
                progress(size, size)
            return final
        have = self._resumable_bytes(sha, size)
        self._check_space(manifest, have, min_free_bytes)
        try:
            writer = await _PartWriter.open(part, have)
            with writer.file:
                if writer.received < size:
                    oversize = await self._receive(writer, fetcher, sha, size, progress)
                    if oversize:
                        writer.discard()
                        raise DigestMismatchError(
                            f"artifact larger than declared size ({size} bytes) for {sha[:12]}"
                        )
                if writer.received < size:
                    raise TransferError(
                        f"transfer of {sha[:12]} ended at {writer.received} of {size} bytes"
                    )
                await writer.commit(sha, final)
        except ArtifactDiskFullError:
            # No resume from a full disk: the partial bytes are what filled it.
            part.unlink(missing_ok=True)
            _log.error("download of %s hit a full disk; partial file removed", sha[:12])
            raise
        if progress is not None:
            progress(size, size)
        _log.info("stored artifact %s (%d bytes)", sha[:12], size)
        return final

    def _complete(self, sha: str, size: int) -> bool:
        """Whether the blob is already here; a complete file of the wrong size is removed."""
        if self.has(sha, size):
            return True
        final = self.path(sha)
        if final.exists():
            _log.warning("blob %s has the wrong size; downloading it again", sha[:12])
            final.unlink()
        return False

    def _resumable_bytes(self, sha: str, size: int) -> int:
        """How much of a ``.part`` to resume from (a too long one is restarted)."""
        have = self.partial_bytes(sha)
        if have > size:
            _log.warning("partial %s is larger than declared; restarting", sha[:12])
            self._part(sha).unlink()
            return 0
        return have

    def _check_space(self, manifest: ModelManifest, have: int, min_free_bytes: int) -> None:
        """Raises: InsufficientSpaceError when the rest and the reserve do not fit."""
        free = shutil.disk_usage(self._dir).free
        remaining = manifest.size - have
        needed = remaining + min_free_bytes
        if free < needed:
            raise InsufficientSpaceError(
                f"need {needed} bytes free for {manifest.name} {manifest.version} "
                f"({remaining} to download + {min_free_bytes} reserve), have {free}"
            )

    async def _receive(
        self,
        writer: _PartWriter,
        fetcher: Fetcher,
        sha: str,
        size: int,
        progress: Progress | None,
    ) -> bool:
        """Stream the rest into ``writer``; True when the source sent more than ``size``.

        ``progress`` is called at most once per :data:`PROGRESS_INTERVAL_S` while
        streaming (not for the last byte: the caller reports completion).
        """
        last_report = float("-inf")
        chunks = fetcher.stream(sha, size, writer.received)
        try:
            async for data in chunks:
                if writer.received + len(data) > size:
                    return True  # stop at declared size + 1 byte
                await writer.append(data)
                now = self._monotonic()
                if (
                    progress is not None
                    and writer.received < size
                    and now - last_report >= PROGRESS_INTERVAL_S
                ):
                    last_report = now
                    progress(writer.received, size)
        finally:
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()
        return False


class _PartWriter:
    """An open ``.part`` file and the running hash of everything in it."""

    def __init__(self, part: Path, file: IO[bytes], hasher: hashlib._Hash, received: int) -> None:
        self.part = part
        self.file = file
        self.hasher = hasher
        self.received = received

    @classmethod
    async def open(cls, part: Path, have: int) -> _PartWriter:
        """Open ``part`` for appending, hashing its first ``have`` bytes again.

        Raises:
            ArtifactError: the ``.part`` cannot be read or opened.
        """
        hasher = hashlib.sha256()
        try:
            if have:
                have = await _in_io_thread(_hash_file, part, hasher)
            file = part.open("ab")
        except OSError as exc:
            raise _write_error(f"cannot open {part.name}", exc) from exc
        return cls(part, file, hasher, have)

    async def append(self, data: bytes) -> None:
        """Raises: ArtifactError when the write fails."""
        await _append(self.file, self.hasher, data, self.part)
        self.received += len(data)

    def discard(self) -> None:
        """The bytes are wrong: close and delete the ``.part``."""
        self.file.close()
        self.part.unlink(missing_ok=True)

    async def commit(self, sha: str, final: Path) -> None:
        """Rename the ``.part`` to ``final`` if its hash is ``sha``.

        Raises:
            DigestMismatchError: the bytes hash differently (the ``.part`` is deleted).
            ArtifactError: the file cannot be synced or renamed.
        """
        actual = self.hasher.hexdigest()
        if actual != sha:
            self.discard()
            raise DigestMismatchError(
                f"artifact sha256 {actual[:12]}… does not match manifest {sha[:12]}…"
            )
        try:
            await _in_io_thread(_commit, self.file, self.part, final)
        except OSError as exc:
            raise _write_error(f"cannot store {sha[:12]}", exc) from exc


# ----- blocking helpers (run in worker threads where noted) -------------------

IO_THREADS = 8  # hashing needs the cores; writing and fsyncing mostly wait on the disk
_io_pool: list[ThreadPoolExecutor] = []  # the process-wide pool, made on first use


async def _in_io_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` on the artifact I/O pool."""
    if not _io_pool:
        _io_pool.append(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="artifact-io"))
    return await asyncio.get_running_loop().run_in_executor(_io_pool[0], func, *args)


def _hash_file(path: Path, hasher: hashlib._Hash) -> int:
    """Feed ``path`` into ``hasher``; return the number of bytes read."""
    count = 0
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK_BYTES):
            hasher.update(block)
            count += len(block)
    return count


def _write_and_hash(file: IO[bytes], hasher: hashlib._Hash, data: bytes) -> None:
    file.write(data)
    hasher.update(data)


async def _append(file: IO[bytes], hasher: hashlib._Hash, data: bytes, part: Path) -> None:
    try:
        if len(data) >= _THREAD_MIN_BYTES:
            await _in_io_thread(_write_and_hash, file, hasher, data)
        else:
            _write_and_hash(file, hasher, data)
    except OSError as exc:
        raise _write_error(f"cannot write {part.name}", exc) from exc


def _commit(file: IO[bytes], part: Path, final: Path) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(part, final)
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
