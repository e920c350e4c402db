"""Connecting to the broker with aiomqtt: client construction, back-off, error mapping.

aiomqtt 2.x does not reconnect by itself: callers loop over
:func:`reconnect_delays` and build a fresh client per attempt (a client can be
reused but not re-entered). ``aiomqtt.MqttError`` is translated to
:class:`~shared.errors.BrokerUnavailableError` at this boundary.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.broker import BrokerAddress
from shared.errors import BrokerUnavailableError

__all__ = ["make_client", "map_mqtt_errors", "reconnect_delays"]


def reconnect_delays(
    *, initial_s: float = 0.5, maximum_s: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Exponential back-off with full jitter: 0..min(max, initial * 2**n)."""
    rand = rng or random.Random()
    ceiling = initial_s
    while True:
        yield rand.uniform(initial_s / 2, ceiling)
        ceiling = min(maximum_s, ceiling * 2)


def make_client(
    address: BrokerAddress,
    *,
    client_id: str,
    will: aiomqtt.Will | None = None,
    persistent: bool,
    session_expiry_s: int = 7 * 86_400,
    keepalive_s: int = 30,
    ca_file: str | None = None,
    max_queued_incoming: int | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client. ``persistent`` keeps the session (and queued QoS 1) on the broker."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s if persistent else 0
    tls_context = ssl.create_default_context(cafile=ca_file) if address.tls else None
    return aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=will,
        clean_start=not persistent,
        properties=properties,
        keepalive=keepalive_s,
        tls_context=tls_context,
        timeout=10,
        max_concurrent_outgoing_calls=32,
        max_queued_incoming_messages=max_queued_incoming,
        # Small QoS 1 messages (chunk requests, acks) must not wait for Nagle's 40 ms.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


@contextmanager
def map_mqtt_errors(what: str) -> Iterator[None]:
    """Re-raise ``aiomqtt.MqttError`` as :class:`BrokerUnavailableError`."""
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise BrokerUnavailableError(f"{what}: {exc}") from exc
