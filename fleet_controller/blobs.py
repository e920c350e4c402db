"""The controller's content-addressed blob store and the artifact chunk answer.

Blobs live at ``ROOT/<sha256>``; they are written once (temp file, fsync,
rename) and never modified, so any number of readers can serve chunks while
ingest goes on. :func:`answer_chunk` turns a node's :class:`ArtifactRequest`
into the :class:`ArtifactChunk` reply, or an error chunk for an unknown blob.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from shared.envelope import b64encode
from shared.errors import EdgeFleetError
from shared.messages import ArtifactChunk, ArtifactRequest
from shared.topics import check_sha256

__all__ = ["BlobStore", "UnknownBlobError", "answer_chunk"]

_COPY_BYTES = 1024 * 1024


class UnknownBlobError(EdgeFleetError):
    """No blob with that digest is stored."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

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
            os.replace(tmp, self.path(sha))
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
            os.replace(tmp, self.path(sha))
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


def answer_chunk(store: BlobStore, request: ArtifactRequest) -> ArtifactChunk:
    """The reply to one chunk request (an error chunk for an unknown blob)."""
    try:
        size = store.size(request.sha256)
        data = store.read(request.sha256, request.offset, request.length)
    except UnknownBlobError as exc:
        return ArtifactChunk(
            sha256=request.sha256,
            request_id=request.request_id,
            offset=request.offset,
            size=0,
            error=str(exc),
        )
    return ArtifactChunk(
        sha256=request.sha256,
        request_id=request.request_id,
        offset=request.offset,
        size=size,
        data=b64encode(data),
    )
