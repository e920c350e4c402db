"""The transport seam over a real MQTT broker (5, or 3.1.1 by the address), with aiomqtt.

This is the only module that imports aiomqtt (a lint rule enforces it):
every ``aiomqtt.MqttError`` becomes :class:`~shared.errors.BrokerUnavailableError`
here, so the rest of EdgeFleet handles one error family
(:class:`~shared.errors.TransportError`).

aiomqtt 2.x does not reconnect by itself; callers loop with
:func:`edgefleet_io.transport.reconnect_delays` and connect again (a fresh
client per attempt: a client can be reused but not re-entered).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet_io.inbox import Inbox, InboxPolicy
from edgefleet_io.transport import Message, Session
from shared.broker import BrokerAddress
from shared.errors import BrokerUnavailableError, UsageError

__all__ = ["MqttLink", "MqttTransport"]

CONNECT_TIMEOUT_S = 10
MAX_CONCURRENT_PUBLISHES = 32


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise BrokerUnavailableError(f"{what}: {exc}") from exc


def _tls_context(
    address: BrokerAddress, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext | None:
    """Raises: UsageError (see :class:`MqttTransport`)."""
    if not address.tls:
        if cert_file or key_file:
            raise UsageError(f"a client certificate needs an mqtts:// broker, not {address}")
        return None
    if bool(cert_file) != bool(key_file):
        raise UsageError("a client certificate needs both its certificate and its key file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file and key_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        what = ", ".join(f for f in (ca_file, cert_file, key_file) if f) or "the system CAs"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"cannot load TLS files ({what}): {reason}") from None
    return context


class _Received(Inbox[Message]):
    """The inbox aiomqtt puts its received messages into, kept as slim
    :class:`~edgefleet_io.transport.Message` s: an ``aiomqtt.Message`` carries
    paho's MQTT 5 properties object (a few KiB each), which a full lane of
    thousands would multiply."""

    def put_nowait(self, item: Message | aiomqtt.Message) -> None:
        super().put_nowait(item if isinstance(item, Message) else _slim(item))


def _queue_type(policy: InboxPolicy | None) -> type[asyncio.Queue[aiomqtt.Message]] | None:
    """What aiomqtt keeps received messages in: an inbox for ``policy``.

    paho hands each message to aiomqtt on the event loop, which puts it into
    this queue at once, so lanes, rate limits and drops apply before anything
    waits: nothing piles up in front of the inbox. aiomqtt calls
    ``queue_type(maxsize=...)``; a factory stands in for the class.
    """
    if policy is None:
        return None  # aiomqtt's own unbounded FIFO

    def inbox(maxsize: int = 0) -> _Received:
        return _Received(policy, _measure)

    return cast("type[asyncio.Queue[aiomqtt.Message]]", inbox)


def _measure(message: Message) -> tuple[str, int]:
    return message.topic, len(message.payload)


def _slim(message: aiomqtt.Message) -> Message:
    payload = message.payload
    data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
    return Message(message.topic.value, data, bool(message.retain))


class MqttLink:
    """One aiomqtt connection behind the :class:`~edgefleet_io.transport.Link` contract."""

    def __init__(self, client: aiomqtt.Client, where: str) -> None:
        self._client = client
        self._where = where

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        with _mapped(f"publishing to {self._where}"):
            await self._client.publish(topic, payload, qos=qos, retain=retain)

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        with _mapped(f"subscribing at {self._where}"):
            await self._client.subscribe(list(filters))

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        with _mapped(f"unsubscribing at {self._where}"):
            await self._client.unsubscribe(list(filters))

    async def messages(self) -> AsyncIterator[Message]:
        with _mapped(f"connection to {self._where}"):
            async for message in self._client.messages:
                # With an inbox policy aiomqtt's queue already holds slim messages.
                item = cast("Message | aiomqtt.Message", message)
                yield item if isinstance(item, Message) else _slim(item)


class MqttTransport:
    """Connections to the broker at ``address`` (``mqtts://`` verifies the broker
    with ``ca_file`` and, given ``cert_file`` and ``key_file``, presents that
    client certificate: mutual TLS)."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """Raises: UsageError when the CA, certificate or key cannot be loaded, or a
        certificate is given without ``mqtts://``."""
        self.address = address
        self._tls_context = _tls_context(address, ca_file, cert_file, key_file)

    def __str__(self) -> str:
        return str(self.address)

    def _session_options(self, session: Session) -> dict[str, Any]:
        """MQTT 5: clean start and session expiry. MQTT 3.1.1 has no expiry: a
        persistent session is ``clean_session=False`` and lasts until a clean connect
        (or the broker's own expiry setting)."""
        if self.address.mqtt_version == "3.1.1":
            return {
                "protocol": aiomqtt.ProtocolVersion.V311,
                "clean_session": not session.persistent,
            }
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session.session_expiry_s if session.persistent else 0
        return {
            "protocol": aiomqtt.ProtocolVersion.V5,
            "clean_start": not session.persistent,
            "properties": properties,
        }

    def _client(self, session: Session) -> aiomqtt.Client:
        address = self.address
        will = session.will
        return aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=session.client_id,
            will=None
            if will is None
            else aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain),
            **self._session_options(session),
            keepalive=session.keepalive_s,
            tls_context=self._tls_context,
            timeout=CONNECT_TIMEOUT_S,
            max_concurrent_outgoing_calls=MAX_CONCURRENT_PUBLISHES,
            queue_type=_queue_type(session.inbox),
            # Small QoS 1 messages (chunk requests, acks) must not wait for Nagle's 40 ms.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    @asynccontextmanager
    async def connect(self, session: Session) -> AsyncIterator[MqttLink]:
        """Raises: BrokerUnavailableError (also for TLS and authentication failures)."""
        client = self._client(session)
        with _mapped(f"broker {self.address}"):
            async with client:
                yield MqttLink(client, str(self.address))
