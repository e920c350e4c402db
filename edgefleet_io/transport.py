"""The MQTT seam: what the controller, the nodes and the operator tools need of a broker.

A :class:`Transport` opens connections to one broker; a connection is a
:class:`Link`, used inside ``async with transport.connect(session) as link``.
Two implementations keep the same contract: :class:`edgefleet_io.mqtt.MqttTransport`
(a real broker) and :class:`edgefleet_io.memory.MemoryTransport` (in process).

The contract:

* **Errors.** Connecting, publishing, subscribing and reading messages raise
  :class:`~shared.errors.TransportError` (``BrokerUnavailableError``) when the
  broker cannot be reached or the connection ends; nothing else leaks out.
  A link is dead after its first error: the caller leaves the ``async with``
  and connects again after a :func:`reconnect_delays` pause.
* **Publish.** ``await link.publish(...)`` returns once the broker has the
  message (QoS 1: its PUBACK). That proves nothing about the subscriber: Mosquitto
  drops queued messages for slow consumers, hence EdgeFleet's application acks.
* **Sessions.** ``Session.persistent`` keeps subscriptions and queued QoS 1
  messages on the broker while the client is away (MQTT 5 session expiry);
  otherwise every connect starts clean and the session ends with the
  connection. QoS 1 messages not yet handed to the client when its connection
  drops are delivered again when it comes back.
* **Retained messages** are delivered on subscribe, flagged ``retain``; an
  empty retained payload clears the topic. Mosquitto 2.0 delivers them to a
  ``$share/{group}/`` subscriber too (MQTT 5 says it should not), so a shared
  consumer must not rely on either.
* **Shared subscriptions** (``$share/{group}/{filter}``) hand each message to
  one member of the group, in turn.
* **Incoming messages** wait for the reader in an
  :class:`~edgefleet_io.inbox.Inbox` when ``Session.inbox`` gives a policy
  (bounded lanes by priority, rate limits per key, drops counted), else in one
  unbounded FIFO (short-lived clients that read what they asked for). Order
  is the broker's within a lane, not across lanes.
* **Last Will.** A connection that ends without a clean exit (network loss,
  keep-alive timeout, another client taking over its id) publishes its
  :class:`Will`; leaving the ``async with`` normally does not.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from edgefleet_io.inbox import InboxPolicy

__all__ = [
    "DEFAULT_SESSION_EXPIRY_S",
    "Link",
    "Message",
    "Session",
    "Transport",
    "Will",
    "reconnect_delays",
    "topic_matches",
]

DEFAULT_SESSION_EXPIRY_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Will:
    """Published by the broker for a connection that ends without a clean exit."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    """One received message; ``payload`` is empty for a cleared retained topic."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """How to connect: identity, Will, and whether the broker keeps the session."""

    client_id: str
    will: Will | None = None
    persistent: bool = False
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S  # only when ``persistent``
    keepalive_s: int = 30
    inbox: InboxPolicy | None = None  # how received messages wait for the reader; None: one FIFO


class Link(Protocol):
    """One live connection. Every method raises TransportError once it is gone."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Hand one message to the broker (QoS 1: wait for its PUBACK)."""
        ...

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe to ``(filter, qos)`` pairs, waiting for the broker's SUBACK."""
        ...

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        """Remove subscriptions (also from a persistent session), waiting for the UNSUBACK."""
        ...

    def messages(self) -> AsyncIterator[Message]:
        """Every message for this connection the session's inbox kept, highest
        priority first (without an inbox policy: all, in the order the broker sent them)."""
        ...


class Transport(Protocol):
    """Opens :class:`Link` connections to one broker."""

    def connect(self, session: Session) -> AbstractAsyncContextManager[Link]:
        """``async with transport.connect(session) as link``. Raises: TransportError."""
        ...


def reconnect_delays(
    *, initial_s: float = 0.5, maximum_s: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Exponential back-off with jitter: ``initial/2 .. min(maximum, initial * 2**n)``."""
    rand = rng or random.Random()
    ceiling = initial_s
    while True:
        yield rand.uniform(initial_s / 2, ceiling)
        ceiling = min(maximum_s, ceiling * 2)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` is one level, a final ``#`` any number (also none).

    A filter starting with a wildcard never matches a topic starting with ``$``.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    wanted = topic_filter.split("/")
    levels = topic.split("/")
    for index, part in enumerate(wanted):
        if part == "#":
            return index == len(wanted) - 1
        if index >= len(levels):
            return False
        if part not in ("+", levels[index]):
            return False
    return len(levels) == len(wanted)
