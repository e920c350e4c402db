"""Where an artifact's bytes come from: the controller's MQTT broadcast, or HTTP(S) with Range.

A :class:`Fetcher` turns *(sha256, declared size, offset)* into the blob's bytes
from ``offset`` on. Fetchers only move bytes: they neither hash nor judge the
blob; :class:`edge_node.artifacts.ArtifactStore` does that while it streams.

Invariants every fetcher here keeps:

* Bytes are yielded strictly in offset order, starting exactly at ``offset``,
  with no gap and no overlap; chunks may have any non-zero length.
* At most one byte past the declared size is ever yielded (or asked for), which
  is enough for the store to detect an oversize blob and no more.
* Every failure of the source or the transport (stall, refusal, cut connection,
  malformed reply) is raised as :class:`~shared.errors.TransferError` with a
  one-line reason; a broadcast request that could not be published is not one
  by itself: it counts as a request that brought nothing (see
  :class:`BroadcastFetcher`). Bytes already yielded stay valid: resuming, also after an
  MQTT reconnect, is simply calling :meth:`Fetcher.stream` again with the new
  offset (the store does this from its ``.part`` file's length).
* A stream ending before the declared size is not an error for the fetcher
  when the source itself says the blob ends there; the store decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol

from edge_node.chunk_core import Assembly, Offer, RepairClock
from shared import topics
from shared.chunks import Frame, Refusal
from shared.errors import TransferError, TransportError
from shared.messages import ArtifactRequest, encode

__all__ = [
    "BroadcastFetcher",
    "Fetcher",
    "HttpFetcher",
    "Publish",
    "Subscribe",
]

_log = logging.getLogger(__name__)

_LEAVE_TIMEOUT_S = 2.0

Publish = Callable[[str, bytes], Awaitable[None]]
"""``publish(topic, payload)``: the agent's MQTT publish (QoS 1)."""

Subscribe = Callable[[str], Awaitable[None]]
"""``subscribe(topic)`` (or unsubscribe) on the agent's current MQTT connection."""


class Fetcher(Protocol):
    """A source of artifact bytes."""

    def stream(self, sha256: str, size: int, offset: int) -> AsyncIterator[bytes]:
        """Yield blob ``sha256`` (declared ``size`` bytes) from ``offset``, in order.

        Raises:
            TransferError: the transfer stalled or the source failed.
        """
        ...


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


# ----- MQTT broadcast ---------------------------------------------------------


class BroadcastFetcher:
    """Fetch a blob from the controller's broadcast over MQTT, asking only for gaps.

    For each :meth:`stream` it subscribes (QoS 0) to ``artifact_broadcast(fleet,
    sha)``, where the controller publishes each chunk of a blob once for every
    node downloading it, and asks (:class:`~shared.messages.ArtifactRequest` on
    ``artifact_request(fleet, sha, node)``) for the byte ranges it lacks: all
    of them at first, then, NACK-style, only the gaps, when the
    :class:`~edge_node.chunk_core.RepairClock` says so. Chunks that arrive
    ahead of the write position wait in a buffer of at most ``buffer_bytes``;
    what does not fit is asked for again later. QoS 0 keeps the broker from
    queueing a blob for a node that is away; whatever a node misses, it repairs.

    The agent routes every frame received on ``artifact_broadcast`` and on
    ``artifact_data(fleet, sha, node)`` (a refusal for this node) to
    :meth:`deliver`. One stream per digest at a time (the store serialises
    downloads of a digest); all of it runs on one event loop. A request whose
    publish fails (a link so busy that it times out) does not end the stream:
    the node stays subscribed, keeps what arrives, and asks again when the
    repair clock allows; ``max_requests`` fruitless requests end it, and a lost
    connection is the caller's to watch (:class:`edge_node.downloads.Downloader`).

    Requests go to the controllers' shared subscription group, and the broker
    drops what reaches a group with no member. So while ``controller_offline()``
    says the retained ``controller/state`` is offline, the stream asks nothing
    (once every ``max_repair_s`` it still asks, uncounted, in case that state is
    stale) and never stalls; :meth:`controller_online` (the controller came
    back) makes every running stream ask at once, its repair clock started over.

    Resume after a reconnect: call :meth:`stream` again with the new offset.
    """

    def __init__(
        self,
        *,
        node_id: str,
        fleet: str,
        publish: Publish,
        subscribe: Subscribe,
        unsubscribe: Subscribe,
        buffer_bytes: int = 1024 * 1024,
        repair_after_s: float = 2.0,
        max_repair_s: float = 30.0,
        max_requests: int = 8,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        controller_offline: Callable[[], bool] = lambda: False,
    ) -> None:
        """Raises: ValueError on an invalid id or setting (TopicError for ids)."""
        if buffer_bytes < 0:
            raise ValueError("buffer_bytes must not be negative")
        RepairClock(base_s=repair_after_s, max_s=max_repair_s, max_requests=max_requests)
        self._node = topics.check_id(node_id, "node")
        self._fleet = topics.check_id(fleet, "fleet")
        self._publish = publish
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._buffer_bytes = buffer_bytes
        self._repair_after_s = repair_after_s
        self._max_repair_s = max_repair_s
        self._max_requests = max_requests
        self._rng = rng or random.Random()
        self._clock = clock
        self._controller_offline = controller_offline
        # sha256 -> its stream's frames; None: the controller came online, ask now
        self._inboxes: dict[str, asyncio.Queue[Frame | None]] = {}

    def deliver(self, frame: Frame) -> bool:
        """Hand a received frame to the stream of its digest; False (dropped) when none runs."""
        inbox = self._inboxes.get(frame.sha256)
        if inbox is None:
            return False
        inbox.put_nowait(frame)
        return True

    def controller_online(self) -> None:
        """The controller came (back) online: every running stream asks for its gaps now."""
        for inbox in self._inboxes.values():
            inbox.put_nowait(None)

    async def stream(self, sha256: str, size: int, offset: int) -> AsyncIterator[bytes]:
        """Yield blob ``sha256`` from ``offset``; see the class docstring.

        Raises:
            TransferError: the controller refused the blob, requests went
                unanswered past the repair clock's limit, the blob changed size,
                or subscribing or publishing failed.
            ValueError: invalid ``sha256``, ``size`` or ``offset``, or a
                stream of this digest is running already.
        """
        topics.check_sha256(sha256)
        if size < 1 or offset < 0:
            raise ValueError("size must be positive and offset not negative")
        if offset >= size:
            return
        if sha256 in self._inboxes:
            raise ValueError(f"a stream of {sha256[:12]} is running already")
        inbox: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._inboxes[sha256] = inbox
        topic = topics.artifact_broadcast(self._fleet, sha256)
        try:
            await self._call(self._subscribe, topic, "cannot subscribe to the broadcast")
            assembly = Assembly(declared=size, position=offset, buffer_bytes=self._buffer_bytes)
            repair = RepairClock(
                base_s=self._repair_after_s,
                max_s=self._max_repair_s,
                max_requests=self._max_requests,
                rng=self._rng,
            )
            async with contextlib.aclosing(self._assemble(sha256, inbox, assembly, repair)) as out:
                async for data in out:
                    yield data
        finally:
            del self._inboxes[sha256]
            await self._leave(topic)

    async def _assemble(
        self,
        sha256: str,
        inbox: asyncio.Queue[Frame | None],
        assembly: Assembly,
        repair: RepairClock,
    ) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        while True:
            for data in assembly.take():
                yield data
            if assembly.done:
                return
            # No controller listens: asking would only be dropped and count
            # towards a stall. Wait for it (or probe now and then, uncounted).
            held = self._controller_offline()
            if not held and repair.due_at() <= loop.time():
                repair.requested(loop.time())
                await self._try_request(sha256, assembly.missing())
                continue
            wake_at = loop.time() + self._max_repair_s if held else repair.due_at()
            try:
                async with asyncio.timeout_at(wake_at):
                    frame = await inbox.get()
            except TimeoutError:
                if held:
                    await self._try_request(sha256, assembly.missing())
                continue
            if frame is None:
                repair.restart()
                continue
            if isinstance(frame, Refusal):
                raise TransferError(f"controller refused {sha256[:12]}: {_one_line(frame.reason)}")
            if assembly.offer(frame) is Offer.USED:
                repair.progressed(loop.time())
            if frame.final:
                repair.saw_final()

    async def _try_request(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        try:
            await self._request(sha256, ranges)
        except TransferError as exc:
            # Not sent (a busy link timed out): stay subscribed and ask again
            # when the repair clock says. Leaving would throw away the chunks
            # on their way and ask for the whole rest anew.
            _log.info("%s; asking again later", exc)

    async def _request(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        request = ArtifactRequest(
            node=self._node, sha256=sha256, ranges=tuple(ranges), ts=self._clock()
        )
        topic = topics.artifact_request(self._fleet, sha256, self._node)
        _log.debug("asking for %d range(s) of %s", len(ranges), sha256[:12])
        await self._call(
            lambda t: self._publish(t, encode(request)), topic, "cannot request chunks"
        )

    @staticmethod
    async def _call(action: Subscribe, topic: str, what: str) -> None:
        try:
            await action(topic)
        except (TransportError, OSError) as exc:
            raise TransferError(f"{what}: {_one_line(str(exc))}") from exc

    async def _leave(self, topic: str) -> None:
        """Unsubscribe, best effort: a dead connection took the subscription's use with it."""
        try:
            async with asyncio.timeout(_LEAVE_TIMEOUT_S):
                await self._unsubscribe(topic)
        except (TransportError, OSError, TimeoutError) as exc:
            _log.debug("could not unsubscribe from %s: %s", topic, exc)


# ----- HTTP(S) ---------------------------------------------------------------


def _close_opened(opening: asyncio.Future[http.client.HTTPResponse]) -> None:
    """Close the response of an open whose caller was cancelled meanwhile."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class HttpFetcher:
    """Fetch a blob with one HTTP(S) GET and ``Range: bytes=<offset>-``.

    ``206`` must carry a ``Content-Range`` starting at the offset asked for; a
    server that ignores Range and answers ``200`` is accepted and the first
    ``offset`` bytes are read and dropped. Blocking socket work runs in worker
    threads (``asyncio.to_thread``), one read of at most ``chunk_bytes`` at a
    time; ``timeout_s`` bounds connecting and each read. Certificates are
    verified with ``ssl_context`` or Python's default context. Error messages
    name the host only: URLs may carry credentials.
    """

    def __init__(
        self,
        *,
        url: str,
        timeout_s: float = 30.0,
        chunk_bytes: int = 256 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Raises: ValueError if ``url`` is not http(s) with a host, or a setting is invalid."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("artifact URL must be http:// or https:// with a host")
        if timeout_s <= 0 or chunk_bytes < 1:
            raise ValueError("timeout_s and chunk_bytes must be positive")
        self._url = url
        self._where = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        handlers: list[urllib.request.BaseHandler] = []
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    async def stream(self, sha256: str, size: int, offset: int) -> AsyncIterator[bytes]:
        """Yield the body from ``offset`` (at most ``size + 1 - offset`` bytes).

        Raises:
            TransferError: connection failure, timeout, HTTP error status
                (416 included), a wrong ``Content-Range``, or a body cut short.
            ValueError: negative ``offset`` or ``size`` below 1.
        """
        if size < 1 or offset < 0:
            raise ValueError("size must be positive and offset not negative")
        budget = size + 1 - offset  # bytes we will read at most
        if budget <= 0:
            return
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self._url,
            headers={"Range": f"bytes={offset}-", "Accept-Encoding": "identity"},
        )
        # Worker threads cannot be interrupted: if we are cancelled while one
        # opens or reads, it keeps the response and closes it when it returns
        # (closing under a running read would race with it).
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, request))
        try:
            response = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        reading: asyncio.Future[bytes] | None = None

        async def read(amount: int) -> bytes:
            nonlocal reading
            reading = asyncio.ensure_future(asyncio.to_thread(self._read, response, amount))
            return await asyncio.shield(reading)

        try:
            skip = self._check(response, offset)
            while skip > 0:
                dropped = await read(min(self._chunk_bytes, skip))
                if not dropped:
                    raise TransferError(f"{self._where} ended the body before offset {offset}")
                skip -= len(dropped)
            while budget > 0:
                data = await read(min(self._chunk_bytes, budget))
                if not data:
                    break
                budget -= len(data)
                yield data
            missing = response.length  # what Content-Length still promised
            if budget > 0 and missing:
                raise TransferError(
                    f"{self._where} closed the connection with {missing} bytes missing"
                )
        finally:
            if reading is not None and not reading.done():
                reading.add_done_callback(lambda _: response.close())
            else:
                response.close()

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        try:
            response = self._opener.open(request, timeout=self._timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:
                raise TransferError(
                    f"{self._where} cannot serve the range asked for (HTTP 416)"
                ) from None
            raise TransferError(
                f"{self._where} answered HTTP {exc.code} {_one_line(str(exc.reason))}"
            ) from None
        except urllib.error.URLError as exc:
            raise TransferError(
                f"cannot reach {self._where}: {_one_line(str(exc.reason))}"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(
                f"cannot fetch from {self._where}: {_one_line(str(exc)) or type(exc).__name__}"
            ) from exc
        if not isinstance(response, http.client.HTTPResponse):
            response.close()
            raise TransferError(f"unexpected response type from {self._where}")
        return response

    def _check(self, response: http.client.HTTPResponse, offset: int) -> int:
        """Return how many leading body bytes to drop, or raise TransferError."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise TransferError(f"{self._where} sent a {encoding!r}-encoded body")
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if match is None or int(match[1]) != offset:
                raise TransferError(
                    f"{self._where} answered Content-Range {_one_line(content_range)!r} "
                    f"to a request for bytes={offset}-"
                )
            return 0
        if response.status == 200:
            return offset
        raise TransferError(f"{self._where} answered HTTP {response.status} to a ranged GET")

    def _read(self, response: http.client.HTTPResponse, amount: int) -> bytes:
        try:
            return response.read(amount)
        except (OSError, http.client.HTTPException) as exc:
            reason = _one_line(str(exc)) or type(exc).__name__
            raise TransferError(f"reading from {self._where} failed: {reason}") from exc
