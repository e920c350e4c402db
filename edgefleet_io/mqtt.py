"""The transport seam over a real MQTT 5 broker, with aiomqtt.

This is the only module that imports aiomqtt (a lint rule enforces it):
every ``aiomqtt.MqttError`` becomes :class:`~shared.errors.BrokerUnavailableError`
here, so the rest of EdgeFleet handles one error family
(:class:`~shared.errors.TransportError`).

aiomqtt 2.x does not reconnect by itself; callers loop with
:func:`edgefleet_io.transport.reconnect_delays` and connect again (a fresh
client per attempt: a client can be reused but not re-entered).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet_io.transport import Message, Session
from shared.broker import BrokerAddress
from shared.errors import BrokerUnavailableError

__all__ = ["MqttLink", "MqttTransport"]

CONNECT_TIMEOUT_S = 10
MAX_CONCURRENT_PUBLISHES = 32


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise BrokerUnavailableError(f"{what}: {exc}") from exc


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

    async def messages(self) -> AsyncIterator[Message]:
        with _mapped(f"connection to {self._where}"):
            async for message in self._client.messages:
                payload = message.payload
                data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                yield Message(message.topic.value, data, bool(message.retain))


class MqttTransport:
    """Connections to the broker at ``address`` (``mqtts://`` verifies with ``ca_file``)."""

    def __init__(self, address: BrokerAddress, *, ca_file: str | None = None) -> None:
        self.address = address
        self._ca_file = ca_file

    def __str__(self) -> str:
        return str(self.address)

    def _client(self, session: Session) -> aiomqtt.Client:
        address = self.address
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session.session_expiry_s if session.persistent else 0
        will = session.will
        return aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=session.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=None
            if will is None
            else aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain),
            clean_start=not session.persistent,
            properties=properties,
            keepalive=session.keepalive_s,
            tls_context=ssl.create_default_context(cafile=self._ca_file) if address.tls else None,
            timeout=CONNECT_TIMEOUT_S,
            max_concurrent_outgoing_calls=MAX_CONCURRENT_PUBLISHES,
            max_queued_incoming_messages=session.max_queued_incoming,
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
