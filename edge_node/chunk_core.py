"""Assembling a broadcast blob on a node: which bytes it has, which it must ask for, and when.

Pure and synchronous: bytes and times in, decisions out; the fetcher
(:mod:`edge_node.fetchers`) moves the bytes.

:class:`Assembly` keeps, for one download:

* ``position``: every byte before it has been handed out, in order, exactly
  once (the store hashes and writes them);
* buffered pieces that arrived ahead of ``position`` (a broadcast that began
  before this node joined sends the blob's tail first): disjoint, each inside
  ``[position, end)``, at most ``buffer_bytes`` in all; a piece that does not
  fit is dropped and asked for again later;
* ``end``: where the stream stops: the declared size until a chunk tells the
  source's size, then the smaller of that and declared size + 1 (one byte past
  the declared size proves an oversize blob; more is never kept or asked for).

:class:`RepairClock` decides when a node asks (again) for what it lacks: never
while useful bytes keep arriving, at the earliest ``base_s`` (jittered) after
its previous request, sooner after the sender says it has nothing more
scheduled (a final chunk), and with the wait doubling after every request that
brought nothing new, up to ``max_s``; after ``max_requests`` fruitless
requests the download has stalled. However many nodes miss a chunk, each asks
at most once per wait, and the controller coalesces their asks. When the
controller comes (back) online, :meth:`RepairClock.restart` makes the next
request due at once with the wait starting over: the requests sent while no
controller listened were dropped by the broker, not refused, and waiting out
the back-off would only stall the download.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from enum import Enum

from shared.chunks import Chunk
from shared.errors import TransferError
from shared.messages import MAX_REQUEST_RANGES

__all__ = ["Assembly", "Offer", "RepairClock"]


class Offer(Enum):
    """What :meth:`Assembly.offer` did with a chunk."""

    USED = "used"  # it brought bytes this download lacked
    DUPLICATE = "duplicate"  # every byte of it was had already (or lies past the end)
    NO_ROOM = "no_room"  # it lies ahead and the buffer is full: dropped, asked for later


class Assembly:
    """One blob's bytes arriving in any order, handed out in order (see the module docstring)."""

    def __init__(self, *, declared: int, position: int, buffer_bytes: int) -> None:
        """Raises: ValueError on a negative position, a declared size below 1 or no buffer."""
        if declared < 1 or not 0 <= position <= declared or buffer_bytes < 0:
            raise ValueError("invalid declared size, position or buffer size")
        self.declared = declared
        self.position = position
        self.end = declared
        self.source_size: int | None = None
        self.buffer_bytes = buffer_bytes
        self.buffered = 0
        self._starts: list[int] = []  # sorted starts of the buffered pieces
        self._pieces: dict[int, bytes] = {}

    @property
    def done(self) -> bool:
        return self.position >= self.end

    def offer(self, chunk: Chunk) -> Offer:
        """Take what ``chunk`` brings that this download lacks.

        Raises:
            TransferError: the chunk says the blob has another size than an
                earlier one said (the source changed under the download).
        """
        self._learn_size(chunk.total)
        start, stop = max(chunk.offset, self.position), min(chunk.end, self.end)
        used = False
        no_room = False
        for gap_start, gap_stop in self._gaps(start, stop):
            piece = chunk.data[gap_start - chunk.offset : gap_stop - chunk.offset]
            if gap_start != self.position and self.buffered + len(piece) > self.buffer_bytes:
                no_room = True
                continue
            bisect.insort(self._starts, gap_start)
            self._pieces[gap_start] = piece
            self.buffered += len(piece)
            used = True
        if used:
            return Offer.USED
        return Offer.NO_ROOM if no_room else Offer.DUPLICATE

    def take(self) -> list[bytes]:
        """The buffered bytes that continue the stream at ``position``, in order."""
        taken: list[bytes] = []
        while self._starts and self._starts[0] == self.position:
            start = self._starts.pop(0)
            data = self._pieces.pop(start)
            self.buffered -= len(data)
            self.position += len(data)
            taken.append(data)
        return taken

    def missing(self) -> list[tuple[int, int]]:
        """``(offset, length)`` ranges of ``[position, end)`` not buffered, sorted.

        At most :data:`~shared.messages.MAX_REQUEST_RANGES`; past that, the
        last range runs to the end (re-sending some buffered bytes).
        """
        ranges: list[tuple[int, int]] = []
        cursor = self.position
        for start in self._starts:
            if start > cursor:
                ranges.append((cursor, start - cursor))
            cursor = start + len(self._pieces[start])
        if cursor < self.end:
            ranges.append((cursor, self.end - cursor))
        if len(ranges) > MAX_REQUEST_RANGES:
            tail = ranges[MAX_REQUEST_RANGES - 1][0]
            ranges = [*ranges[: MAX_REQUEST_RANGES - 1], (tail, self.end - tail)]
        return ranges

    def _learn_size(self, total: int) -> None:
        if self.source_size is None:
            self.source_size = total
            self.end = min(total, self.declared + 1)
            self._drop_from(self.end)
        elif total != self.source_size:
            raise TransferError(
                f"source changed the blob size from {self.source_size} to {total} bytes"
            )

    def _drop_from(self, limit: int) -> None:
        """Forget buffered bytes at or past ``limit`` (cutting a piece that crosses it)."""
        while self._starts and self._starts[-1] + len(self._pieces[self._starts[-1]]) > limit:
            start = self._starts[-1]
            piece = self._pieces[start]
            self.buffered -= len(piece)
            if start < limit:
                self._pieces[start] = piece[: limit - start]
                self.buffered += limit - start
                return
            self._starts.pop()
            del self._pieces[start]

    def _gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of ``[start, stop)`` no buffered piece covers."""
        gaps: list[tuple[int, int]] = []
        index = bisect.bisect_right(self._starts, start) - 1
        cursor = start
        if index >= 0:
            previous = self._starts[index]
            cursor = max(cursor, previous + len(self._pieces[previous]))
            index += 1
        else:
            index = 0
        while cursor < stop:
            following = self._starts[index] if index < len(self._starts) else stop
            if following > cursor:
                gaps.append((cursor, min(following, stop)))
            if index >= len(self._starts):
                break
            cursor = max(cursor, following + len(self._pieces[following]))
            index += 1
        return gaps


@dataclass(slots=True)
class RepairClock:
    """When to ask for missing ranges (see the module docstring). Times are monotonic seconds."""

    base_s: float
    max_s: float
    max_requests: int
    rng: random.Random = field(default_factory=random.Random)
    fruitless: int = 0  # requests since the last useful byte
    last_request: float | None = None
    last_progress: float = 0.0
    final_seen: bool = False
    _next: float = 0.0  # the last request's time plus its jittered pause

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s or self.max_requests < 1:
            raise ValueError("invalid repair timing")

    def wait_s(self) -> float:
        """The pause owed after the last request, doubling with each fruitless one."""
        return min(self.max_s, self.base_s * 2.0 ** max(0, self.fruitless - 1))

    def progressed(self, now: float) -> None:
        """Useful bytes arrived at ``now``."""
        self.fruitless = 0
        self.last_progress = now

    def saw_final(self) -> None:
        """The sender has nothing more scheduled: ask as soon as the pause allows."""
        self.final_seen = True

    def due_at(self) -> float:
        """The earliest time the next request may go (0: at once, for the first)."""
        if self.last_request is None:
            return 0.0
        if self.final_seen:
            return self._next
        # Bytes may still be flowing: wait for a whole pause without any first.
        return max(self._next, self.last_progress + self.wait_s())

    def restart(self) -> None:
        """The controller came (back) online: ask at once, the back-off and the count anew."""
        self.fruitless = 0
        self.last_request = None
        self.final_seen = False

    def requested(self, now: float) -> None:
        """A request goes out at ``now``.

        Raises:
            TransferError: ``max_requests`` requests in a row brought nothing.
        """
        if self.last_request is not None:
            if self.fruitless >= self.max_requests:
                raise TransferError(
                    f"no new bytes after {self.fruitless} requests "
                    f"(the last {self.wait_s():g} s apart)"
                )
            self.fruitless += 1
        self.last_request = now
        self.final_seen = False
        # Jitter spreads nodes that missed the same chunk, so they do not all ask at once.
        self._next = now + self.wait_s() * self.rng.uniform(0.75, 1.25)
