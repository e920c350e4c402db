"""Artifacts in and out: broadcasting blobs to downloading nodes, receiving operators' uploads.

* **Broadcast out.** A node's :class:`~shared.messages.ArtifactRequest` names
  the byte ranges of a blob it lacks. The chunks covering them (of
  :data:`CHUNK_BYTES`) are scheduled on the blob's
  :class:`~fleet_controller.broadcast_core.Carousel` and published once, as
  binary frames (:mod:`shared.chunks`), on ``artifact/{sha256}/data``, which
  the broker fans out to every node downloading that blob. A chunk asked for
  by many nodes before it goes out is sent once: the controller's cost per
  wave is the blob's size, not nodes x size. The first request for an idle
  blob starts a broadcast once no other node has asked for
  :data:`GATHER_QUIET_S` (at most :data:`GATHER_MAX_S` after the first ask),
  so a wave's nodes share one pass; a chunk goes out again at the earliest
  :data:`REPAIR_HOLD_S` after it last went, so the nodes that join late or
  lost it within that pause share one re-send (each re-send reaches every
  downloading node); chunks are read off the event loop,
  published :data:`BROADCAST_WINDOW` at a time and paced to
  ``broadcast_bytes_per_s`` so the broker and slow nodes keep up. The
  last chunk of a pass is flagged final: nodes then ask for their gaps. A
  blob this controller does not hold is refused to the asking node on its own
  ``artifact/{sha256}/data/{node}``. A chunk that cannot be read or sent is
  logged: the nodes ask again.
* **Only for commanded downloads.** A request is served only when the node
  takes part in an active rollout of that blob (the store's
  ``rollouts.fetchers``, cached for :data:`FETCHERS_TTL_S`), and within the
  node's rate (:data:`~fleet_controller.quotas.CHUNKS_PER_S`): a request costs
  one token and each chunk it newly schedules another (chunks others asked for
  already cost nothing, and so do chunks sent since the node asked: it was
  subscribed by then, see :data:`CLOCK_SKEW_S`); what is over the rate is dropped and counted
  (``chunks_refused``, ``chunks_rate_limited``), and the node asks again later.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleet_controller.blobs import BlobStore, UnknownBlobError
from fleet_controller.broadcast_core import Carousel
from fleet_controller.link import ControllerLink
from fleet_controller.quotas import (
    BURST_S,
    CHUNKS_PER_S,
    DEFAULT_MAX_UPLOAD_BYTES,
    RateLimiter,
)
from fleet_controller.ticker import wait_or_stop
from shared import topics
from shared.chunks import encode_chunk, encode_refusal
from shared.errors import EdgeFleetError, TransportError, UsageError
from shared.messages import ArtifactRequest

__all__ = [
    "BROADCAST_BYTES_PER_S",
    "BROADCAST_WINDOW",
    "CHUNK_BYTES",
    "CLOCK_SKEW_S",
    "FETCHERS_TTL_S",
    "GATHER_MAX_S",
    "GATHER_QUIET_S",
    "MAX_PARTS",
    "REPAIR_HOLD_S",
    "UPLOAD_IDLE_S",
    "Artifacts",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CHUNK_BYTES = 256 * 1024  # bytes per broadcast chunk
BROADCAST_BYTES_PER_S = 32 * 1024 * 1024  # pace of one blob's broadcast
BROADCAST_WINDOW = 4  # chunks of one broadcast published and not yet acknowledged
GATHER_QUIET_S = 0.25  # a broadcast starts once no other node has asked for this long...
GATHER_MAX_S = 2.0  # ...or this long after the first ask
REPAIR_HOLD_S = 2.0  # a chunk is sent again at the earliest this long after it last went
CLOCK_SKEW_S = 0.5  # a chunk sent this long after a request's ``ts`` reached its node
FETCHERS_TTL_S = 2.0  # how long the nodes allowed to fetch a blob are cached
MAX_PARTS = 8  # uploads in progress at once
UPLOAD_IDLE_S = 3600.0  # a part untouched this long is abandoned
_SWEEP_EVERY_S = 300.0


@dataclass(slots=True)
class _Cast:
    """One blob's broadcast: what is left to send, and when nodes asked (loop time)."""

    carousel: Carousel
    first_ask: float
    last_ask: float
    askers: set[str] = field(default_factory=set)


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
        chunk_bytes: int = CHUNK_BYTES,
        broadcast_bytes_per_s: float = BROADCAST_BYTES_PER_S,
        gather_quiet_s: float = GATHER_QUIET_S,
        gather_max_s: float = GATHER_MAX_S,
        repair_hold_s: float = REPAIR_HOLD_S,
    ) -> None:
        self.blobs = blobs
        self._max_upload_bytes = max_upload_bytes
        self._link = link
        self._fleet = fleet
        self._metrics = metrics
        self._fetchers = fetchers
        self._clock = clock
        self._chunk_bytes = chunk_bytes
        self._bytes_per_s = broadcast_bytes_per_s
        self._gather_quiet_s = gather_quiet_s
        self._gather_max_s = gather_max_s
        self._repair_hold_s = repair_hold_s
        self._allowed: dict[str, tuple[float, frozenset[str]]] = {}  # sha256: (at, nodes)
        self._rate = RateLimiter(CHUNKS_PER_S, CHUNKS_PER_S * BURST_S)
        self._casts: dict[str, _Cast] = {}  # sha256: its broadcast, while one runs
        self._io = ThreadPoolExecutor(1, thread_name_prefix="artifact-io")

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
        """Schedule what ``request`` asks for, running the blob's broadcast when none
        runs yet (this call then lasts until it ends); never raises (the node asks again)."""
        if not self._rate.allow(request.node, self._clock()):
            self._metrics["chunks_rate_limited"] += 1
            return
        try:
            if not await self._may_fetch(request):
                self._metrics["chunks_refused"] += 1
                log.debug("%s has no rollout of %s to fetch", request.node, request.sha256[:12])
                return
            cast, starts = await self._cast_for(request.sha256)
        except UnknownBlobError as exc:
            await self._refuse(request, str(exc))
            return
        except Exception:
            self._metrics["chunk_errors"] += 1
            log.exception("cannot tell whether %s may fetch %s", request.node, request.sha256[:12])
            return
        self._schedule(cast, request)
        if starts:
            await self._broadcast(request.sha256, cast)

    async def _in_io_thread(self, func: Callable[..., _T], *args: Any) -> _T:
        """``func(*args)`` on the broadcaster's own thread: reading a chunk never waits
        behind the store's writes in asyncio's default pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, func, *args)

    async def _cast_for(self, sha256: str) -> tuple[_Cast, bool]:
        """The running broadcast of ``sha256``, or a new one (and True: the caller runs it).

        Raises: UnknownBlobError.
        """
        cast = self._casts.get(sha256)
        if cast is not None:
            return cast, False
        size = await self._in_io_thread(self.blobs.size, sha256)
        cast = self._casts.get(sha256)  # another request may have started one meanwhile
        if cast is not None:
            return cast, False
        now = asyncio.get_running_loop().time()
        carousel = Carousel(size=size, chunk_bytes=self._chunk_bytes, hold_s=self._repair_hold_s)
        cast = _Cast(carousel, now, now)
        self._casts[sha256] = cast
        return cast, True

    def _schedule(self, cast: _Cast, request: ArtifactRequest) -> None:
        """Add the chunks ``request`` needs that are not scheduled yet, as its rate allows."""
        wanted = cast.carousel.wanted(request.ranges, heard_since=request.ts + CLOCK_SKEW_S)
        granted = 0
        now = self._clock()
        while granted < len(wanted) and self._rate.allow(request.node, now):
            granted += 1
        if request.node not in cast.askers:  # a node asking again does not hold the start back
            cast.askers.add(request.node)
            cast.last_ask = asyncio.get_running_loop().time()
        cast.carousel.schedule(wanted[:granted])
        self._metrics["chunks_scheduled"] += granted
        if granted < len(wanted):
            self._metrics["chunks_rate_limited"] += len(wanted) - granted

    async def _broadcast(self, sha256: str, cast: _Cast) -> None:
        """Send ``cast``'s chunks until none is scheduled or in flight; then forget it."""
        sending: set[asyncio.Task[None]] = set()
        try:
            await self._gather(cast)
            await self._send_all(sha256, cast.carousel, sending)
        except TransportError as exc:
            log.debug("broadcast of %s cut short: %s", sha256[:12], exc)
        except Exception:
            self._metrics["chunk_errors"] += 1
            log.exception("cannot broadcast %s", sha256[:12])
        finally:
            for task in sending:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # seen: the first failure was raised above
            del self._casts[sha256]

    async def _send_all(
        self, sha256: str, carousel: Carousel, sending: set[asyncio.Task[None]]
    ) -> None:
        """Publish scheduled chunks, :data:`BROADCAST_WINDOW` at a time, paced.

        Returns once nothing is scheduled and nothing is in flight (with no pause
        between that check and the caller forgetting the cast, so a chunk
        scheduled meanwhile is never lost). Raises: TransportError.
        """
        topic = topics.artifact_broadcast(self._fleet, sha256)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            full = len(sending) >= BROADCAST_WINDOW
            index = None if full else carousel.next(self._clock())
            if index is None:
                ready = None if full else carousel.ready_at()  # a held chunk's time
                if not sending and ready is None:
                    return
                pause = None if ready is None else max(0.0, ready - self._clock())
                if not sending:
                    await asyncio.sleep(pause or 0.0)  # the hold-off, not synchronisation
                    continue
                done, _ = await asyncio.wait(
                    sending, timeout=pause, return_when=asyncio.FIRST_COMPLETED
                )
                sending.difference_update(done)
                failed = [e for task in done if (e := task.exception()) is not None]
                if failed:
                    raise failed[0]
                continue
            offset, length = carousel.span(index)
            data = await self._in_io_thread(self.blobs.read, sha256, offset, length)
            frame = encode_chunk(sha256, offset, carousel.size, data, final=carousel.idle)
            sending.add(loop.create_task(self._publish_chunk(topic, frame, length)))
            due = max(due, loop.time() - 1.0) + length / self._bytes_per_s
            if due > loop.time():
                await asyncio.sleep(due - loop.time())  # pacing, not synchronisation

    async def _publish_chunk(self, topic: str, frame: bytes, length: int) -> None:
        await self._link.publish(topic, frame, qos=1)
        self._metrics["chunks_sent"] += 1
        self._metrics["chunk_bytes_sent"] += length

    async def _gather(self, cast: _Cast) -> None:
        """Wait until nodes have stopped asking for a moment, or for long enough."""
        loop = asyncio.get_running_loop()
        while True:
            start = min(cast.last_ask + self._gather_quiet_s, cast.first_ask + self._gather_max_s)
            wait = start - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _refuse(self, request: ArtifactRequest, reason: str) -> None:
        self._metrics["chunks_unknown_blob"] += 1
        topic = topics.artifact_data(self._fleet, request.sha256, request.node)
        try:
            await self._link.publish(topic, encode_refusal(request.sha256, reason), qos=1)
        except TransportError as exc:
            log.debug("refusal for %s not sent: %s", request.node, exc)

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
