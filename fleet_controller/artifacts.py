"""Artifacts in and out: answering nodes' chunk requests, receiving operators' uploads.

* **Chunks out.** Each :class:`~shared.messages.ArtifactRequest` is answered on
  ``artifact/{sha256}/data/{node}`` with one chunk read off the event loop; at
  most :data:`CHUNK_SLOTS` are read at a time, so a fleet downloading at once
  cannot exhaust threads or memory. A chunk that cannot be read or sent is
  logged and not answered: the node asks again.
* **Uploads in** (``model.upload``) go through the
  :class:`~fleet_controller.blobs.BlobStore`: a chunk is appended only at the
  offset where the stored part ends (otherwise the answer says where that is,
  and the uploader resumes there), fsynced, hashed as it arrives, and the
  complete part becomes the blob by an atomic rename, or is deleted when it
  does not hash to the announced sha256.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from fleet_controller.blobs import BlobStore, answer_chunk
from fleet_controller.link import ControllerLink
from shared import topics
from shared.errors import TransportError, UsageError
from shared.messages import ArtifactRequest, encode

__all__ = ["CHUNK_SLOTS", "Artifacts"]

log = logging.getLogger(__name__)

CHUNK_SLOTS = 16  # chunk answers read and sent at the same time


class Artifacts:
    def __init__(
        self, blobs: BlobStore, link: ControllerLink, *, fleet: str, metrics: Counter[str]
    ) -> None:
        self.blobs = blobs
        self._link = link
        self._fleet = fleet
        self._metrics = metrics
        self._slots = asyncio.Semaphore(CHUNK_SLOTS)

    async def serve_chunk(self, request: ArtifactRequest) -> None:
        """Answer one chunk request; never raises (the node asks again)."""
        try:
            async with self._slots:
                chunk = await asyncio.to_thread(answer_chunk, self.blobs, request)
                topic = topics.artifact_data(self._fleet, request.sha256, request.node)
                await self._link.publish(topic, encode(chunk), qos=1)
        except TransportError as exc:
            log.debug("chunk for %s not sent: %s", request.node, exc)
            return
        except Exception:
            self._metrics["chunk_errors"] += 1
            log.exception(
                "cannot answer %s's request for %s at %d",
                request.node,
                request.sha256[:12],
                request.offset,
            )
            return
        self._metrics["chunks_served"] += 1

    def receive_upload(self, sha256: str, offset: int, size: int, data: bytes) -> dict[str, Any]:
        """Store one upload chunk (in a worker thread); returns ``{"received", "complete"}``.

        Raises:
            UsageError: the chunk would make the blob larger than ``size``.
            DigestMismatchError: the complete upload hashes to another sha256.
        """
        blobs = self.blobs
        if blobs.has(sha256):
            return {"received": size, "complete": True}
        have = blobs.part_size(sha256)
        if offset != have:
            return {"received": have, "complete": False}
        if have + len(data) > size:
            blobs.discard_part(sha256)
            raise UsageError("upload exceeds its declared size")
        have = blobs.append_part(sha256, offset, data)
        if have < size:
            return {"received": have, "complete": False}
        blobs.commit_part(sha256)
        return {"received": have, "complete": True}
