"""The controller's content-addressed blob store.

Blobs live at ``ROOT/<sha256>``; they are written once (temp file, fsync,
rename, fsync of the folder) and never modified, so any number of readers can
serve chunks (:meth:`BlobStore.read`) while ingest goes on.

Uploads (``model.upload``) grow a part file ``ROOT/.<sha256>.upload`` one
chunk at a time: each chunk is fsynced before it is acknowledged, hashed as it
arrives (after a restart the part is re-hashed once, in blocks), and a complete
part becomes the blob by the same atomic rename. No step reads a whole blob
into memory.

**One directory for all replicas.** Any replica may be asked for any chunk or
upload, so every replica of a store must use the same directory (one host,
or a shared filesystem). :func:`check_blob_dir` checks it at start: the
directory holds a marker, ``.edgefleet-blobs``, naming the store and the
directory's random identity, and the database records the identity of the
first directory marked. A directory of another store, or a second directory
for the same store (a replica with a local folder instead of the shared one),
is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import DigestMismatchError, EdgeFleetError, UsageError
from shared.topics import check_sha256

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["MARKER", "BlobDirError", "BlobStore", "UnknownBlobError", "check_blob_dir"]

MARKER = ".edgefleet-blobs"  # "<store id> <directory id>": whose blobs these are

_COPY_BYTES = 1024 * 1024


class UnknownBlobError(EdgeFleetError):
    """No blob with that digest is stored."""


class BlobDirError(UsageError):
    """The blob directory is not the one this store's replicas share."""


def check_blob_dir(root: Path, store_id: str, claim: Callable[[str], str]) -> str:
    """Check that ``root`` is the blob directory of store ``store_id``, marking it
    if it is not marked yet; returns the directory's identity.

    ``claim(dir_id)`` records ``dir_id`` in the store unless it has one already,
    and returns the recorded one (:meth:`~fleet_controller.store.Store.claim_blob_dir`).
    The marker is written before the claim (exclusively: of two replicas marking
    one directory together, both keep the first marker), so a crash between the
    two leaves nothing to refuse at the next start.

    Raises:
        BlobDirError: the marker names another store or another directory than
            the store records, or is unreadable (one line, naming the marker).
        OSError: the marker cannot be written.
    """
    marker = root / MARKER
    if not marker.exists():
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".marker.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{store_id} {uuid.uuid4().hex}\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, marker)
            except FileExistsError:
                pass  # another replica marked it first: theirs stands
            else:
                _fsync_dir(root)
        finally:
            os.unlink(tmp)
    words = marker.read_text(errors="replace").split()
    if len(words) != 2:
        raise BlobDirError(f"blob directory marker {marker} is unreadable: remove it and restart")
    marked_store, dir_id = words
    if marked_store != store_id:
        raise BlobDirError(
            f"blob directory {root} belongs to store {marked_store}, the database is store "
            f"{store_id}: give this replica the database its blobs belong to"
        )
    recorded = claim(dir_id)
    if recorded != dir_id:
        raise BlobDirError(
            f"blob directory {root} is not the one the replicas of store {store_id} share "
            f"(its marker {marker} says {dir_id}, the database {recorded}): mount the shared "
            f"directory there; if that one is lost, write '{store_id} {recorded}' into the marker"
        )
    return dir_id


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the folder's entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs by sha256 under ``root``; thread-safe (the service calls it from worker threads)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises uploads: one writer per part file
        self._hashing: dict[str, tuple[int, _Hash]] = {}  # sha -> (bytes hashed, digest so far)

    def path(self, sha256: str) -> Path:
        return self.root / check_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """Raises: UnknownBlobError."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise UnknownBlobError(f"no blob {sha256[:12]}") from None

    def _install(self, tmp: Path, sha256: str) -> None:
        """Atomically make ``tmp`` (written and fsynced) the blob ``sha256``."""
        os.replace(tmp, self.path(sha256))
        _fsync_dir(self.root)

    def add_file(self, source: Path) -> str:
        """Copy ``source`` in, hashing as it goes; returns its sha256."""
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming.")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                while block := src.read(_COPY_BYTES):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            self._install(Path(tmp), sha)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def add_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming.")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._install(Path(tmp), sha)
        return sha

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Raises: UnknownBlobError."""
        try:
            with self.path(sha256).open("rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        except FileNotFoundError:
            raise UnknownBlobError(f"no blob {sha256[:12]}") from None

    def copy_to(self, sha256: str, destination: Path) -> None:
        shutil.copyfile(self.path(sha256), destination)

    # ----- uploads ------------------------------------------------------------------------

    def _part(self, sha256: str) -> Path:
        return self.root / f".{check_sha256(sha256)}.upload"

    def part_size(self, sha256: str) -> int:
        """Bytes of ``sha256`` uploaded so far (0: none)."""
        try:
            return self._part(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def append_part(self, sha256: str, offset: int, data: bytes) -> int:
        """Append ``data`` to the upload of ``sha256`` when it starts at ``offset``, the
        part's size, durably (fsync); returns the part's size afterwards.

        Nothing is written when ``offset`` is not where the part ends (a resent or
        overtaken chunk): the caller answers with the size, and the uploader resumes there.
        """
        with self._lock:
            have = self.part_size(sha256)
            if offset != have or not data:
                return have
            digest = self._digest(sha256, have)
            try:
                with self._part(sha256).open("ab") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                self._hashing.pop(sha256, None)  # the part may hold part of it: hash afresh
                raise
            digest.update(data)
            self._hashing[sha256] = (have + len(data), digest)
            return have + len(data)

    def commit_part(self, sha256: str) -> None:
        """Install the complete upload of ``sha256`` as that blob.

        Raises:
            DigestMismatchError: the part hashes to something else (it is deleted).
        """
        with self._lock:
            part = self._part(sha256)
            if self.has(sha256) and not part.exists():
                return  # a concurrent upload of the same blob installed it
            digest = self._digest(sha256, self.part_size(sha256)).hexdigest()
            self._hashing.pop(sha256, None)
            if digest != sha256:
                part.unlink(missing_ok=True)
                raise DigestMismatchError(
                    f"uploaded blob hashes to {digest[:12]}, not {sha256[:12]}"
                )
            self._install(part, sha256)

    def parts(self) -> int:
        """Uploads in progress."""
        return sum(1 for _ in self.root.glob(".*.upload"))

    def prune_parts(self, idle_s: float) -> list[str]:
        """Delete uploads nobody appended to for ``idle_s`` seconds (by file time);
        the sha256 of each one deleted."""
        cutoff = time.time() - idle_s
        pruned: list[str] = []
        with self._lock:
            for part in self.root.glob(".*.upload"):
                try:
                    if part.stat().st_mtime >= cutoff:
                        continue
                    part.unlink()
                except FileNotFoundError:
                    continue
                sha256 = part.name[1:].removesuffix(".upload")
                self._hashing.pop(sha256, None)
                pruned.append(sha256)
        return pruned

    def discard_part(self, sha256: str) -> None:
        with self._lock:
            self._hashing.pop(sha256, None)
            self._part(sha256).unlink(missing_ok=True)

    def _digest(self, sha256: str, size: int) -> _Hash:
        """The running digest of a part of ``size`` bytes (re-hashed in blocks if unknown)."""
        known = self._hashing.get(sha256)
        if known is not None and known[0] == size:
            return known[1]
        digest = hashlib.sha256()
        if size:
            with self._part(sha256).open("rb") as handle:
                while block := handle.read(_COPY_BYTES):
                    digest.update(block)
        self._hashing[sha256] = (size, digest)
        return digest
