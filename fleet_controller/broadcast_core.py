"""What the controller still has to broadcast of one blob: a carousel of chunks.

Pure and synchronous; :mod:`fleet_controller.artifacts` reads the bytes,
publishes them and paces the sending.

A blob of ``size`` bytes is cut into fixed chunks of ``chunk_bytes`` (the last
one shorter), numbered from 0. A :class:`Carousel` keeps the set of chunk
numbers wanted and not yet sent, and a cursor:

* :meth:`Carousel.wanted` maps a node's byte ranges to chunk numbers that are
  not scheduled yet: a chunk asked for by any number of nodes before it goes
  out is sent once (that is the coalescing: the cost of a wave is the blob's
  size, not nodes x size). Nor is a chunk sent after the node was listening
  (``heard_since``): a node subscribes before it asks, so a request read late
  (a busy controller) does not send again what the node has had meanwhile; if
  it lost one anyway, it asks for that gap after the pass;
* :meth:`Carousel.schedule` adds chunk numbers;
* :meth:`Carousel.next` takes the first scheduled chunk at or after the
  cursor, wrapping around, and moves the cursor past it. A node that joins in
  the middle gets the rest of the current pass first and its beginning after
  it, so the nodes already in the pass are not held back;
* **a chunk goes out again at the earliest ``hold_s`` after it last went**
  (:meth:`Carousel.ready_at` says when a held one may): the nodes that join
  or ask again within that pause share one re-send, instead of one each. A
  broadcast reaches every node downloading the blob, so each re-send costs
  the broker and every node the chunk, not only the nodes that lacked it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.chunks import clamp_ranges

__all__ = ["Carousel"]


class Carousel:
    """Chunks of one blob still to send (see the module docstring)."""

    def __init__(self, *, size: int, chunk_bytes: int, hold_s: float = 0.0) -> None:
        """Raises: ValueError on a size or chunk size below 1, or a negative hold."""
        if size < 1 or chunk_bytes < 1 or hold_s < 0:
            raise ValueError("size and chunk_bytes must be positive, hold_s not negative")
        self.hold_s = hold_s
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.count = -(-size // chunk_bytes)
        self._scheduled = bytearray(self.count)
        self._sent_at = [float("-inf")] * self.count
        self.pending = 0
        self._cursor = 0

    @property
    def idle(self) -> bool:
        """Nothing is scheduled."""
        return self.pending == 0

    def span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index``."""
        offset = index * self.chunk_bytes
        return offset, min(self.chunk_bytes, self.size - offset)

    def wanted(
        self, ranges: Iterable[Sequence[int]], *, heard_since: float = float("inf")
    ) -> list[int]:
        """Chunk numbers covering ``(offset, length)`` ranges that are neither scheduled
        nor sent at or after ``heard_since`` (when the asking node was listening).

        Ranges are cut to the blob; the part of a range past its end asks for nothing.
        """
        found: set[int] = set()
        for offset, length in clamp_ranges(ranges, self.size):
            first = offset // self.chunk_bytes
            last = (offset + length - 1) // self.chunk_bytes
            found.update(
                i
                for i in range(first, last + 1)
                if not self._scheduled[i] and self._sent_at[i] < heard_since
            )
        return sorted(found)

    def schedule(self, indices: Iterable[int]) -> None:
        for index in indices:
            if not self._scheduled[index]:
                self._scheduled[index] = 1
                self.pending += 1

    def ready_at(self) -> float | None:
        """When the earliest scheduled chunk may go (None: nothing is scheduled)."""
        if self.pending == 0:
            return None
        return min(self._sent_at[i] + self.hold_s for i in self._scheduled_indices())

    def _scheduled_indices(self) -> list[int]:
        """Scheduled chunk numbers from the cursor on, wrapping around."""
        order = range(self._cursor, self._cursor + self.count)
        return [i % self.count for i in order if self._scheduled[i % self.count]]

    def next(self, now: float) -> int | None:
        """The next chunk to send at ``now`` (then unscheduled), or None when none is
        scheduled or every scheduled one is held (see :meth:`ready_at`)."""
        if self.pending == 0:
            return None
        index = next(
            (i for i in self._scheduled_indices() if self._sent_at[i] + self.hold_s <= now), None
        )
        if index is None:
            return None
        self._scheduled[index] = 0
        self._sent_at[index] = now
        self.pending -= 1
        self._cursor = (index + 1) % self.count
        return index
