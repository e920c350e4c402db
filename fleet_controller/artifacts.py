"""Artifacts in and out: answering nodes' chunk requests, receiving operators' uploads.

* **Chunks out.** Each :class:`~shared.messages.ArtifactRequest` is answered on
  ``artifact/{sha256}/data/{node}`` with one chunk read off the event loop; at
  most :data:`CHUNK_SLOTS` are read at a time, so a fleet downloading at once
  cannot exhaust threads or memory. A chunk that cannot be read or sent is
  logged and not answered: the node asks again.
* **Only for commanded downloads.** A request is answered only when the node
  takes part in an active rollout of that blob (the store's
  ``rollouts.fetchers``, cached for :data:`FETCHERS_TTL_S`), and within the
  node's rate (:data:`~fleet_controller.quotas.CHUNKS_PER_S`); anything else is
  dropped unanswered and counted (``chunks_refused``, ``chunks_rate_limited``).
* **Uploads in** (``model.upload``) go through the
  :class:`~fleet_controller.blobs.BlobStore`: a chunk is appended only at the
  offset where the stored part ends (otherwise the answer says where that is,
  and the uploader resumes there), fsynced, hashed as it arrives, and the
  complete part becomes the blob by an atomic rename, or is deleted when it
  does not hash to the announced sha256. An upload is at most ``max_upload_bytes``,
  at most :data:`MAX_PARTS` run at once, and a part nobody appended to for
  :data:`UPLOAD_IDLE_S` is deleted (:meth:`Artifacts.sweep_uploads`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from fleet_controller.blobs import BlobStore, answer_chunk
from fleet_controller.link import ControllerLink
from fleet_controller.quotas import (
    BURST_S,
    CHUNKS_PER_S,
    DEFAULT_MAX_UPLOAD_BYTES,
    RateLimiter,
)
from fleet_controller.ticker import wait_or_stop
from shared import topics
from shared.errors import EdgeFleetError, TransportError, UsageError
from shared.messages import ArtifactRequest, encode

__all__ = [
    "CHUNK_SLOTS",
    "FETCHERS_TTL_S",
    "MAX_PARTS",
    "UPLOAD_IDLE_S",
    "Artifacts",
]

log = logging.getLogger(__name__)

CHUNK_SLOTS = 16  # chunk answers read and sent at the same time
FETCHERS_TTL_S = 2.0  # how long the nodes allowed to fetch a blob are cached
MAX_PARTS = 8  # uploads in progress at once
UPLOAD_IDLE_S = 3600.0  # a part untouched this long is abandoned
_SWEEP_EVERY_S = 300.0


class Artifacts:
    def __init__(
        self,
        blobs: BlobStore,
        link: ControllerLink,
        *,
        fleet: str,
        metrics: Counter[str],
        fetchers: Callable[[str], frozenset[str]],
        clock: Callable[[], float],
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self.blobs = blobs
        self._max_upload_bytes = max_upload_bytes
        self._link = link
        self._fleet = fleet
        self._metrics = metrics
        self._fetchers = fetchers
        self._clock = clock
        self._allowed: dict[str, tuple[float, frozenset[str]]] = {}  # sha256: (at, nodes)
        self._rate = RateLimiter(CHUNKS_PER_S, CHUNKS_PER_S * BURST_S)
        self._slots = asyncio.Semaphore(CHUNK_SLOTS)

    async def _may_fetch(self, request: ArtifactRequest) -> bool:
        """Whether ``request.node`` was commanded to fetch the blob (see the module docstring)."""
        now = self._clock()
        at, nodes = self._allowed.get(request.sha256, (0.0, frozenset()))
        if request.node not in nodes and now - at >= FETCHERS_TTL_S / 4:
            nodes = await asyncio.to_thread(self._fetchers, request.sha256)
            self._allowed = {
                sha: entry
                for sha, entry in self._allowed.items()
                if now - entry[0] < FETCHERS_TTL_S
            }
            self._allowed[request.sha256] = (now, nodes)
        return request.node in nodes

    async def serve_chunk(self, request: ArtifactRequest) -> None:
        """Answer one chunk request if allowed; never raises (the node asks again)."""
        if not self._rate.allow(request.node, self._clock()):
            self._metrics["chunks_rate_limited"] += 1
            return
        try:
            if not await self._may_fetch(request):
                self._metrics["chunks_refused"] += 1
                log.debug("%s has no rollout of %s to fetch", request.node, request.sha256[:12])
                return
        except Exception:
            self._metrics["chunk_errors"] += 1
            log.exception("cannot tell whether %s may fetch %s", request.node, request.sha256[:12])
            return
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

    async def sweep_uploads(self, stopping: asyncio.Event) -> None:
        """Every few minutes, delete uploads abandoned for :data:`UPLOAD_IDLE_S`."""
        while not await wait_or_stop(stopping, _SWEEP_EVERY_S):
            try:
                pruned = await asyncio.to_thread(self.blobs.prune_parts, UPLOAD_IDLE_S)
            except OSError as exc:
                log.warning("cannot remove abandoned uploads: %s", exc)
                continue
            for sha256 in pruned:
                log.info("removed the abandoned upload of %s", sha256[:12])

    def receive_upload(self, sha256: str, offset: int, size: int, data: bytes) -> dict[str, Any]:
        """Store one upload chunk (in a worker thread); returns ``{"received", "complete"}``.

        Raises:
            UsageError: the chunk would make the blob larger than ``size``.
            DigestMismatchError: the complete upload hashes to another sha256.
        """
        blobs = self.blobs
        if blobs.has(sha256):
            return {"received": size, "complete": True}
        if size > self._max_upload_bytes:
            raise UsageError(
                f"an upload of {size} bytes is over this controller's limit of "
                f"{self._max_upload_bytes} (fleetctl serve --max-upload-bytes)"
            )
        have = blobs.part_size(sha256)
        if have == 0 and blobs.parts() >= MAX_PARTS:
            raise EdgeFleetError(
                f"{MAX_PARTS} uploads are in progress already: finish one, or wait "
                f"{UPLOAD_IDLE_S / 60:g} minutes for abandoned ones to be removed"
            )
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
