"""An in-process MQTT broker behind the transport seam, for fast tests.

:class:`MemoryBroker` keeps the parts of Mosquitto's behaviour that EdgeFleet
depends on, and :meth:`MemoryBroker.transport` hands out
:class:`~edgefleet_io.transport.Transport` objects that connect to it. It
runs on one event loop and moves no bytes through sockets, so a test of the
agent's commands or the controller's ingest takes milliseconds.

What it keeps (each also checked against a real Mosquitto by the transport
contract tests):

* **Retained messages**: kept per topic, replaced by a newer one, cleared by an
  empty payload, delivered (flagged ``retain``) on subscribe. Like Mosquitto
  2.0 (and unlike MQTT 5 §4.8.2) that includes a ``$share`` subscription: each
  member gets the retained messages its filter matches when it subscribes.
* **Sessions**: a persistent session keeps its subscriptions and queues QoS 1
  messages while its client is away; a clean one is discarded when its
  connection ends, and a clean connect discards whatever the client id had.
  Messages queued or handed to a connection but not yet read by the client
  when the connection drops are delivered again on the next connect of a
  persistent session (QoS 1 redelivery); QoS 0 ones are lost.
* **Shared subscriptions**: ``$share/{group}/{filter}`` hands each message to
  one member of the group in turn (connected members and away persistent ones,
  which get it queued); with no member the message is dropped.
* **Last Will**: published when a connection ends other than by leaving its
  ``async with``: :meth:`MemoryBroker.drop` (a network loss), a takeover by a
  new connection with the same client id, or :meth:`MemoryBroker.stop` does
  *not* (the broker itself is gone).
* **The client's inbox**: a session with an inbox policy
  (:mod:`edgefleet_io.inbox`) takes what the connection holds into it before
  each read, as the MQTT client does on receipt: lanes, rate limits and drops
  apply, and messages in it are lost with the connection (a real client has
  acknowledged them).
* **Queue limit**: like ``max_queued_messages``, messages for one client above
  ``max_queued`` are dropped and counted in :attr:`MemoryBroker.dropped`.
* **Outages**: :meth:`stop` ends every connection (their reads and writes raise
  :class:`~shared.errors.BrokerUnavailableError`) and refuses new ones until
  :meth:`start`; with ``persistence=False`` (Mosquitto's default) sessions and
  retained messages are lost, as across a real restart without persistence.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from edgefleet_io.inbox import Inbox, InboxPolicy
from edgefleet_io.transport import Message, Session, Will, topic_matches
from shared.errors import BrokerUnavailableError

__all__ = ["MemoryBroker", "MemoryLink", "MemoryTransport"]

_SHARE = "$share/"


@dataclass(eq=False)
class _Queued:
    message: Message
    qos: int


@dataclass(eq=False)
class _ClientSession:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # plain filter -> qos
    queue: deque[_Queued] = field(default_factory=deque)  # while away
    link: MemoryLink | None = None


@dataclass(eq=False)
class _Group:
    members: list[str] = field(default_factory=list)  # client ids, in joining order
    qos: dict[str, int] = field(default_factory=dict)
    turn: itertools.count[int] = field(default_factory=itertools.count)


class MemoryLink:
    """One connection to a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        session: _ClientSession,
        will: Will | None,
        inbox: InboxPolicy | None = None,
    ) -> None:
        self._broker = broker
        self._session = session
        self.will = will
        self._inbox: deque[_Queued] = deque()  # the broker's queue for this connection
        # The client's side: what it took off the connection, waiting for the reader.
        self._received: Inbox[Message] | None = (
            None if inbox is None else Inbox(inbox, lambda m: (m.topic, len(m.payload)))
        )
        self._wakeup = asyncio.Event()
        self._error: BrokerUnavailableError | None = None

    @property
    def client_id(self) -> str:
        return self._session.client_id

    @property
    def alive(self) -> bool:
        return self._error is None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        self._check()
        await asyncio.sleep(0)  # a publish is I/O: let the other tasks run
        self._check()
        self._broker.route(Message(topic, bytes(payload)), qos=qos, retain=retain)

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        self._check()
        await asyncio.sleep(0)
        self._check()
        self._broker.subscribe(self._session, filters)

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        self._check()
        await asyncio.sleep(0)
        self._check()
        self._broker.unsubscribe(self._session, filters)

    async def messages(self) -> AsyncIterator[Message]:
        received = self._received
        while True:
            if received is None:
                while self._inbox:
                    yield self._inbox.popleft().message
            else:
                # Like a real client: take everything off the connection into the
                # inbox at once (its lanes and drops apply), then read by priority.
                while True:
                    while self._inbox:
                        received.put_nowait(self._inbox.popleft().message)
                    if received.empty():
                        break
                    yield received.get_nowait()
            self._check()
            self._wakeup.clear()
            await self._wakeup.wait()

    def deliver(self, queued: _Queued, limit: int | None) -> bool:
        if limit is not None and len(self._inbox) >= limit:
            return False
        self._inbox.append(queued)
        self._wakeup.set()
        return True

    def end(self, reason: str) -> list[_Queued]:
        """Mark the link dead; returns what it held that the client never read."""
        self._error = BrokerUnavailableError(reason)
        self._wakeup.set()
        unread = list(self._inbox)
        self._inbox.clear()
        return unread


class MemoryTransport:
    """Connections to one :class:`MemoryBroker` (what ``Transport`` asks for)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def __str__(self) -> str:
        return "memory://broker"

    @asynccontextmanager
    async def connect(self, session: Session) -> AsyncIterator[MemoryLink]:
        """Raises: BrokerUnavailableError while the broker is stopped."""
        await asyncio.sleep(0)
        link = self._broker.open(session)
        try:
            yield link
        finally:
            self._broker.close(link)


class MemoryBroker:
    """An in-process broker; see the module docstring for what it keeps."""

    def __init__(self, *, persistence: bool = False, max_queued: int | None = 100_000) -> None:
        self.persistence = persistence
        self.max_queued = max_queued
        self.running = True
        self.dropped = 0
        self.published = 0
        self._retained: dict[str, bytes] = {}
        self._sessions: dict[str, _ClientSession] = {}
        self._groups: dict[tuple[str, str], _Group] = {}

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self)

    # ----- outages and faults -----------------------------------------------------------

    def stop(self) -> None:
        """The broker goes away: every connection ends (no Wills), connects are refused."""
        self.running = False
        for session in list(self._sessions.values()):
            if session.link is not None:
                self._lost(session, "broker stopped", will=False)
        if not self.persistence:
            self._sessions.clear()
            self._groups.clear()
            self._retained.clear()

    def start(self) -> None:
        self.running = True

    def drop(self, client_id: str) -> bool:
        """The client's network goes: its connection ends and its Will is published.

        Returns False when the client is not connected.
        """
        session = self._sessions.get(client_id)
        if session is None or session.link is None:
            return False
        self._lost(session, "connection lost", will=True)
        return True

    def connected(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        return session is not None and session.link is not None

    def retained(self, topic: str) -> bytes | None:
        return self._retained.get(topic)

    # ----- connections ------------------------------------------------------------------

    def open(self, request: Session) -> MemoryLink:
        if not self.running:
            raise BrokerUnavailableError("broker memory://broker: connection refused")
        session = self._sessions.get(request.client_id)
        if session is not None and session.link is not None:
            self._lost(session, "session taken over", will=True)
        if session is None or not request.persistent:
            self._discard(request.client_id)
            session = _ClientSession(request.client_id, request.persistent)
            self._sessions[request.client_id] = session
        session.persistent = request.persistent
        link = MemoryLink(self, session, request.will, request.inbox)
        session.link = link
        while session.queue:
            link.deliver(session.queue.popleft(), None)
        return link

    def close(self, link: MemoryLink) -> None:
        """A clean exit (leaving ``async with``): no Will; a clean session ends."""
        session = self._sessions.get(link.client_id)
        if session is None or session.link is not link:
            return  # already dropped or taken over
        self._lost(session, "disconnected", will=False)

    def _lost(self, session: _ClientSession, reason: str, *, will: bool) -> None:
        link = session.link
        if link is None:
            return
        session.link = None
        unread = link.end(reason)
        if session.persistent:
            session.queue.extendleft(reversed([q for q in unread if q.qos > 0]))
        else:
            self._discard(session.client_id)
        if will and link.will is not None:
            w = link.will
            self.route(Message(w.topic, w.payload), qos=w.qos, retain=w.retain)

    def _discard(self, client_id: str) -> None:
        self._sessions.pop(client_id, None)
        for key in list(self._groups):
            self._leave_group(key, client_id)

    def _leave_group(self, key: tuple[str, str], client_id: str) -> None:
        group = self._groups.get(key)
        if group is not None and client_id in group.qos:
            group.members.remove(client_id)
            del group.qos[client_id]
            if not group.members:
                del self._groups[key]

    # ----- subscriptions and routing ----------------------------------------------------

    def subscribe(self, session: _ClientSession, filters: Sequence[tuple[str, int]]) -> None:
        for topic_filter, qos in filters:
            if topic_filter.startswith(_SHARE):
                group_name, _, plain = topic_filter[len(_SHARE) :].partition("/")
                group = self._groups.setdefault((group_name, plain), _Group())
                if session.client_id not in group.qos:
                    group.members.append(session.client_id)
                group.qos[session.client_id] = qos
            else:
                plain = topic_filter
                session.subscriptions[topic_filter] = qos
            for topic, payload in list(self._retained.items()):
                if topic_matches(plain, topic):
                    self._send(session, Message(topic, payload, retain=True), qos)

    def unsubscribe(self, session: _ClientSession, filters: Sequence[str]) -> None:
        for topic_filter in filters:
            if topic_filter.startswith(_SHARE):
                group_name, _, plain = topic_filter[len(_SHARE) :].partition("/")
                self._leave_group((group_name, plain), session.client_id)
            else:
                session.subscriptions.pop(topic_filter, None)

    def route(self, message: Message, *, qos: int, retain: bool) -> None:
        self.published += 1
        if retain:
            if message.payload:
                self._retained[message.topic] = message.payload
            else:
                self._retained.pop(message.topic, None)
        for session in list(self._sessions.values()):
            granted = [
                q for f, q in session.subscriptions.items() if topic_matches(f, message.topic)
            ]
            if granted:
                self._send(session, message, min(qos, max(granted)))
        for (_, plain), group in list(self._groups.items()):
            if group.members and topic_matches(plain, message.topic):
                member = group.members[next(group.turn) % len(group.members)]
                target = self._sessions.get(member)
                if target is not None:
                    self._send(target, message, min(qos, group.qos[member]))

    def _send(self, session: _ClientSession, message: Message, qos: int) -> None:
        queued = _Queued(message, qos)
        if session.link is not None:
            if not session.link.deliver(queued, self.max_queued):
                self.dropped += 1
            return
        if not session.persistent or qos == 0:
            return
        if self.max_queued is not None and len(session.queue) >= self.max_queued:
            self.dropped += 1
            return
        session.queue.append(queued)
