"""Where an artifact's bytes come from: MQTT chunk transfer or HTTP(S) with Range.

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
  one-line reason. Bytes already yielded stay valid: resuming, also after an
  MQTT reconnect, is simply calling :meth:`Fetcher.stream` again with the new
  offset (the store does this from its ``.part`` file's length).
* A stream ending before the declared size is not an error for the fetcher
  when the source itself says the blob ends there; the store decides.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared import topics
from shared.envelope import b64decode
from shared.errors import DecodeError, TransferError, TransportError
from shared.messages import ArtifactChunk, ArtifactRequest, encode

__all__ = [
    "MAX_CHUNK_BYTES",
    "Fetcher",
    "HttpFetcher",
    "MqttChunkFetcher",
    "Publish",
]

_log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 512 * 1024
"""Largest ``length`` an :class:`ArtifactRequest` may ask for (bytes)."""

Publish = Callable[[str, bytes], Awaitable[None]]
"""``publish(topic, payload)``: the agent's MQTT publish (QoS 1)."""


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


# ----- MQTT chunks ------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Slot:
    """One requested range; ``ids`` are every request id sent for it (re-requests)."""

    offset: int
    length: int
    ids: list[str] = field(default_factory=list)
    retries: int = 0
    deadline: float = 0.0


class _Stream:
    """One :meth:`MqttChunkFetcher.stream` call's bookkeeping; synchronous, no I/O.

    ``slots`` are requested ranges not answered yet (by offset), ``by_id`` every
    live request id, ``ready`` answered bytes waiting for an earlier offset.
    ``routes`` is the fetcher's request id -> stream map: ids are removed there
    as soon as they are answered or dropped.
    """

    def __init__(self, sha256: str, size: int, offset: int, routes: dict[str, _Stream]) -> None:
        self.sha256 = sha256
        self.declared = size
        self.inbox: asyncio.Queue[ArtifactChunk] = asyncio.Queue()
        self.slots: dict[int, _Slot] = {}
        self.by_id: dict[str, _Slot] = {}
        self.ready: dict[int, bytes] = {}
        self.end = size  # where the stream stops; the source's own size refines it
        self.source_size: int | None = None
        self.next_request = self.position = offset
        self._routes = routes

    def take_ready(self) -> list[bytes]:
        """The answered bytes that continue the stream at ``position``, in order."""
        taken: list[bytes] = []
        while self.position in self.ready:
            data = self.ready.pop(self.position)
            self.position += len(data)
            taken.append(data)
        return taken

    def new_slots(self, chunk_bytes: int, window: int) -> list[_Slot]:
        """Ranges to request now: in flight plus buffered stays within ``window``."""
        made: list[_Slot] = []
        while self.next_request < self.end and len(self.slots) + len(self.ready) < window:
            slot = _Slot(self.next_request, min(chunk_bytes, self.end - self.next_request))
            self.slots[slot.offset] = slot
            self.next_request += slot.length
            made.append(slot)
        return made

    def register(self, slot: _Slot, request_id: str) -> None:
        slot.ids.append(request_id)
        self.by_id[request_id] = slot
        self._routes[request_id] = self

    def forget(self, slot: _Slot) -> None:
        del self.slots[slot.offset]
        for rid in slot.ids:
            self.by_id.pop(rid, None)
            self._routes.pop(rid, None)

    def close(self) -> None:
        for rid in self.by_id:
            self._routes.pop(rid, None)

    def accept(self, chunk: ArtifactChunk) -> None:
        """Take one reply: its bytes wait in ``ready`` until their turn.

        Replies to ranges already answered (under another id) or dropped are ignored.

        Raises:
            TransferError: the controller refused, or the reply is malformed,
                misplaced, of the wrong length, or of a blob that changed size.
        """
        slot = self.by_id.get(chunk.request_id)
        if slot is None or self.slots.get(slot.offset) is not slot:
            return
        if chunk.error is not None:
            raise TransferError(
                f"controller refused chunk at offset {slot.offset}: {_one_line(chunk.error)}"
            )
        if chunk.offset != slot.offset:
            raise TransferError(f"chunk for offset {slot.offset} claims offset {chunk.offset}")
        if self.source_size is None:
            self._learn_size(chunk.size)
            if self.slots.get(slot.offset) is not slot:
                return  # past the end the source declared
        elif chunk.size != self.source_size:
            raise TransferError(
                f"source changed the blob size from {self.source_size} to {chunk.size}"
            )
        data = self._checked_data(chunk, slot, chunk.size)  # the source size, checked above
        self.forget(slot)
        self.ready[slot.offset] = data[: self.end - slot.offset]

    def _learn_size(self, source_size: int) -> None:
        """The first reply tells the source's size: never ask past declared size + 1."""
        self.source_size = source_size
        # One extra byte proves an oversize blob; more is never asked for.
        self.end = min(source_size, self.declared + 1)
        for stale in [s for s in self.slots.values() if s.offset >= self.end]:
            self.forget(stale)
        self.next_request = min(self.next_request, self.end)

    @staticmethod
    def _checked_data(chunk: ArtifactChunk, slot: _Slot, source_size: int) -> bytes:
        try:
            data = b64decode(chunk.data, "chunk data")
        except DecodeError:
            raise TransferError(f"chunk at offset {slot.offset} is not valid base64") from None
        last = slot.offset + len(data) == source_size
        if len(data) > slot.length or (len(data) < slot.length and not last):
            raise TransferError(
                f"chunk at offset {slot.offset} has {len(data)} bytes, asked for {slot.length}"
            )
        return data


class MqttChunkFetcher:
    """Fetch a blob from the controller in chunks over MQTT.

    Requests (:class:`ArtifactRequest`) go to ``artifact_request(fleet, sha,
    node)``; the agent routes every :class:`ArtifactChunk` arriving on
    ``artifact_data(fleet, sha, node)`` to :meth:`deliver`. ``window`` requests
    are kept in flight; replies that arrive out of order wait in a buffer
    (in flight + buffered <= ``window`` chunks). A chunk that does not arrive
    within ``stall_timeout_s`` is asked for again under a new request id (a late
    reply to the old id is still accepted), at most ``max_retries`` times.

    Resume after a reconnect: call :meth:`stream` again with the new offset.
    Replies to the previous stream's requests then carry unknown request ids
    and are ignored.

    One instance may serve several streams at once (e.g. two digests); all of
    it runs on one event loop, and :meth:`deliver` must be called on that loop.
    """

    def __init__(
        self,
        *,
        node_id: str,
        fleet: str,
        publish: Publish,
        chunk_bytes: int = 256 * 1024,
        window: int = 4,
        stall_timeout_s: float = 30.0,
        max_retries: int = 5,
    ) -> None:
        """Raises: ValueError on an invalid id or setting (TopicError for ids)."""
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be within 1..{MAX_CHUNK_BYTES}")
        if window < 1:
            raise ValueError("window must be at least 1")
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self._node = topics.check_id(node_id, "node")
        self._fleet = topics.check_id(fleet, "fleet")
        self._publish = publish
        self._chunk_bytes = chunk_bytes
        self._window = window
        self._stall_timeout_s = stall_timeout_s
        self._max_retries = max_retries
        # request id -> the stream that sent it; removed as soon as it is answered
        self._routes: dict[str, _Stream] = {}

    def deliver(self, chunk: ArtifactChunk) -> bool:
        """Hand a chunk received on ``artifact_data`` to the stream that asked for it.

        Returns False (and drops the chunk) when no live stream sent its
        request id or the digest differs: a stale reply from before a
        reconnect, a duplicate, or someone else's.
        """
        stream = self._routes.get(chunk.request_id)
        if stream is None or stream.sha256 != chunk.sha256:
            _log.debug(
                "ignoring artifact chunk %s for %s (no such request)",
                chunk.request_id,
                chunk.sha256[:12],
            )
            return False
        stream.inbox.put_nowait(chunk)
        return True

    async def stream(self, sha256: str, size: int, offset: int) -> AsyncIterator[bytes]:
        """Yield blob ``sha256`` from ``offset``; see the class docstring.

        Raises:
            TransferError: a chunk stalled past its retries, the controller
                answered with an error, a chunk was malformed or of the wrong
                length, or publishing a request failed.
            ValueError: invalid ``sha256``, ``size`` or ``offset``.
        """
        topics.check_sha256(sha256)
        if size < 1 or offset < 0:
            raise ValueError("size must be positive and offset not negative")
        if offset >= size:
            return
        loop = asyncio.get_running_loop()
        state = _Stream(sha256, size, offset, self._routes)
        try:
            while True:
                for data in state.take_ready():
                    yield data
                if state.position >= state.end:
                    return
                for slot in state.new_slots(self._chunk_bytes, self._window):
                    await self._request(state, slot, loop)
                chunk = await self._next_chunk(state, loop)
                if chunk is not None:
                    state.accept(chunk)
        finally:
            state.close()

    async def _next_chunk(
        self, state: _Stream, loop: asyncio.AbstractEventLoop
    ) -> ArtifactChunk | None:
        """The next reply, or None after re-requesting what stalled past its deadline."""
        deadline = min(s.deadline for s in state.slots.values())
        try:
            async with asyncio.timeout_at(deadline):
                return await state.inbox.get()
        except TimeoutError:
            await self._on_stall(state, loop)
            return None

    async def _request(self, state: _Stream, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        request_id = uuid.uuid4().hex[:16]
        state.register(slot, request_id)
        request = ArtifactRequest(
            node=self._node,
            sha256=state.sha256,
            request_id=request_id,
            offset=slot.offset,
            length=slot.length,
        )
        topic = topics.artifact_request(self._fleet, state.sha256, self._node)
        try:
            await self._publish(topic, encode(request))
        except (TransportError, OSError) as exc:
            raise TransferError(
                f"cannot request chunk at offset {slot.offset}: {_one_line(str(exc))}"
            ) from exc
        slot.deadline = loop.time() + self._stall_timeout_s

    async def _on_stall(self, state: _Stream, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for slot in sorted(state.slots.values(), key=lambda s: s.offset):
            if slot.deadline > now:
                continue
            if slot.retries >= self._max_retries:
                raise TransferError(
                    f"no chunk at offset {slot.offset} after {slot.retries + 1} requests "
                    f"({self._stall_timeout_s:g} s each)"
                )
            slot.retries += 1
            _log.info(
                "re-requesting %s offset %d (attempt %d)",
                state.sha256[:12],
                slot.offset,
                slot.retries + 1,
            )
            await self._request(state, slot, loop)


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
