"""Bounded, prioritised incoming queues: what a flood of messages may cost a reader.

A broker delivers as fast as the network allows, a reader handles one message
at a time: whatever waits between them must be bounded, or a flood grows
memory without limit and everything important waits behind it. An
:class:`Inbox` sits where the MQTT client hands over received messages (in
place of aiomqtt's unbounded FIFO, and in front of the in-memory transport's
reader) and keeps, for an :class:`InboxPolicy`:

* **Sorting from the topic alone**, once, on arrival: ``policy.sort(topic)``
  names the message's lane (an index into ``policy.lanes``, highest priority
  first) and its rate key (a node, a topic; None: not limited). No payload is
  parsed here, so sorting costs the same for junk as for anything else.
* **Rate limits per key and lane**: a message whose key has used up its
  lane's token bucket (``rate_per_s``, ``burst``) goes to the *last* lane
  instead (the junk lane), counted as ``inbox_over_rate_{lane}``. It is not
  dropped for that alone: it waits until nothing better does.
* **Bounded lanes**: each holds at most ``max_messages`` messages and
  ``max_bytes`` payload bytes. A full lane drops the oldest message of its
  heaviest sender (the longest FIFO, see below) to make room (a single
  message bigger than ``max_bytes`` is dropped itself); every drop is counted
  as ``inbox_dropped_{lane}``. All counts go to ``policy.counters``, which the
  owner exposes with its own metrics.
* **Priority, then fairness**: the reader gets a message of the
  highest-priority lane that holds one; within a lane, each rate key has its
  own FIFO and the keys are served in turn, so a node sending little waits
  behind one message of each other sender, not behind a flood. Order is kept
  per key, not across keys or lanes.

A dropped QoS 1 message is lost from the broker's point of view (the client
acknowledged it on receipt): a policy must only drop what the sender repeats
(results and statuses, resent until the controller acks them), what nobody
waits for (junk, telemetry), or what a waiting client times out on (an
operator request: the operator sees the timeout).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.rates import RateLimiter

__all__ = ["Inbox", "InboxPolicy", "Lane", "Sorter"]

T = TypeVar("T")

_RATE_KEYS = 10_000  # buckets kept per lane; made-up keys cannot grow memory beyond it
_LOOK = 32  # keys a full lane compares to find the longest FIFO to drop from

Sorter = Callable[[str], tuple[int, str | None]]
"""A topic's lane (index into the policy's lanes) and its rate key (None: unlimited)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lane:
    """One priority class of incoming messages."""

    name: str
    max_messages: int  # held at once; the oldest go first
    max_bytes: int  # payload bytes held at once
    rate_per_s: float | None = None  # per rate key; None: unlimited
    burst: float = 0.0  # messages a key may send at once (its bucket's size)


@dataclass(frozen=True, kw_only=True, eq=False)
class InboxPolicy:
    """How a connection's incoming messages are sorted, limited and bounded.

    ``lanes`` go from the highest priority to the lowest; the last one takes
    what is over its rate. ``counters`` receives the drop counts (shared with
    the owner's metrics); ``clock`` is monotonic seconds.
    """

    lanes: tuple[Lane, ...]
    sort: Sorter
    counters: Counter[str] = field(default_factory=Counter)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if not self.lanes:
            raise ValueError("an inbox needs at least one lane")


class _FairLane(Generic[T]):
    """One lane: a FIFO per rate key, the keys served in turn.

    Full, it drops the oldest message of its longest FIFO (among the incoming
    key's and the next :data:`_LOOK` in turn: a bounded look), so a heavy
    sender loses its own messages first and a light one is served after at
    most one message of each other sender.
    """

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.count = 0
        self.bytes = 0
        self._fifos: dict[str | None, deque[tuple[T, int]]] = {}
        self._turns: deque[str | None] = deque()  # the keys with a FIFO, in serving order

    def put(self, key: str | None, item: T, size: int) -> int:
        """Queue ``item``; returns how many messages were dropped for it (itself, if larger
        than the lane)."""
        lane = self.lane
        if size > lane.max_bytes:
            return 1
        dropped = 0
        while self.count and (
            self.count >= lane.max_messages or self.bytes + size > lane.max_bytes
        ):
            self._drop_heaviest(key)
            dropped += 1
        fifo = self._fifos.get(key)
        if fifo is None:
            fifo = self._fifos[key] = deque()
            self._turns.append(key)
        fifo.append((item, size))
        self.count += 1
        self.bytes += size
        return dropped

    def get(self) -> T:
        """The next key's oldest message (only called while ``count`` > 0)."""
        key = self._turns.popleft()
        fifo = self._fifos[key]
        item, size = fifo.popleft()
        self.count -= 1
        self.bytes -= size
        if fifo:
            self._turns.append(key)
        else:
            del self._fifos[key]
        return item

    def _drop_heaviest(self, incoming: str | None) -> None:
        candidates = list(itertools.islice(self._turns, _LOOK))
        if incoming in self._fifos:
            candidates.append(incoming)
        # On a tie the first in turn loses: if that empties its FIFO, it is the head.
        victim = max(candidates, key=lambda k: len(self._fifos[k]))
        fifo = self._fifos[victim]
        _, size = fifo.popleft()
        self.count -= 1
        self.bytes -= size
        if not fifo:
            del self._fifos[victim]
            self._turns.remove(victim)  # the head (see the tie rule): O(1)


class Inbox(asyncio.Queue[T]):
    """An :class:`asyncio.Queue` that sorts, limits and bounds as its policy says.

    ``measure`` gives an item's topic and payload size. ``put_nowait`` never
    raises ``QueueFull`` (a full lane drops instead); ``get`` and
    ``get_nowait`` return the highest-priority item.
    """

    def __init__(self, policy: InboxPolicy, measure: Callable[[T], tuple[str, int]]) -> None:
        self._policy = policy
        self._measure = measure
        super().__init__()

    def _init(self, maxsize: int) -> None:  # called by asyncio.Queue.__init__
        lanes = self._policy.lanes
        self._lanes: list[_FairLane[T]] = [_FairLane(lane) for lane in lanes]
        self._held = 0
        self._limiters = [
            None
            if lane.rate_per_s is None
            else RateLimiter(lane.rate_per_s, max(lane.burst, 1.0), max_keys=_RATE_KEYS)
            for lane in lanes
        ]

    def qsize(self) -> int:
        return self._held

    def empty(self) -> bool:
        return self._held == 0

    def full(self) -> bool:
        return False  # a full lane makes room by dropping; the queue as a whole never refuses

    def held_bytes(self) -> int:
        """Payload bytes held now (at most the sum of the lanes' ``max_bytes``)."""
        return sum(lane.bytes for lane in self._lanes)

    def _put(self, item: T) -> None:
        policy = self._policy
        topic, size = self._measure(item)
        index, key = policy.sort(topic)
        last = len(self._lanes) - 1
        index = min(max(index, 0), last)
        limiter = self._limiters[index]
        if key is not None and limiter is not None and not limiter.allow(key, policy.clock()):
            name = policy.lanes[index].name
            policy.counters[f"inbox_over_rate_{name}"] += 1
            if index == last:  # over the junk lane's own rate: nowhere lower to go
                policy.counters[f"inbox_dropped_{name}"] += 1
                return
            index = last
        lane = self._lanes[index]
        before = lane.count
        dropped = lane.put(key, item, size)
        if dropped:
            policy.counters[f"inbox_dropped_{lane.lane.name}"] += dropped
        self._held += lane.count - before

    def _get(self) -> T:
        for lane in self._lanes:
            if lane.count:
                self._held -= 1
                return lane.get()
        raise asyncio.QueueEmpty  # unreachable: asyncio.Queue checks empty() first
