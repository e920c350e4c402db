"""The broker fixtures run a real Mosquitto that real aiomqtt (MQTT 5) clients use.

Also checks broker_config's ACL template against that real broker. Absence of
a message is shown without sleeping: a marker message published after it on
the same path arrives first (Mosquitto delivers one client's messages in order).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import (
    Broker,
    BrokerNotInstalledError,
    free_port,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
V5 = aiomqtt.ProtocolVersion.V5
DEADLINE_S = 10.0


def client(
    broker: Broker,
    *,
    identifier: str | None = None,
    username: str | None = None,
    will: aiomqtt.Will | None = None,
    clean_start: bool = True,
    session_expiry_s: int | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client for ``broker`` (call inside a running event loop)."""
    properties = None
    if session_expiry_s is not None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry_s
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier or f"test-{uuid.uuid4().hex[:8]}",
        username=username,
        password=f"pw-{username}" if username else None,
        protocol=V5,
        will=will,
        clean_start=clean_start,
        properties=properties,
        timeout=DEADLINE_S,
    )


async def next_message(mqtt: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(DEADLINE_S):
        return await anext(mqtt.messages)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run`` with an overall deadline, so a hung test fails instead of stalling."""

    async def bounded() -> T:
        async with asyncio.timeout(4 * DEADLINE_S):
            return await coro_fn()

    return asyncio.run(bounded())


# ----- the fixtures ------------------------------------------------------------


def test_broker_fixture_listens_on_its_url(broker: Broker) -> None:
    assert broker.running
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.host == "127.0.0.1"
    config = broker.config_file.read_text()
    assert f"listener {broker.port} 127.0.0.1" in config.splitlines()
    assert "persistence false" in config.splitlines()


def test_publish_and_receive_mqtt5(broker: Broker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/node/n1/telemetry"

    async def scenario() -> aiomqtt.Message:
        async with client(broker) as mqtt:
            await mqtt.subscribe(topic, qos=1)
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = "application/json"
            properties.UserProperty = [("fleet", topic_prefix)]
            await mqtt.publish(topic, b'{"cpu": 0.5}', qos=1, properties=properties)
            return await next_message(mqtt)

    message = run(scenario)
    assert message.topic.value == topic
    assert message.payload == b'{"cpu": 0.5}'
    assert message.qos == 1
    assert message.properties is not None  # MQTT 5 properties only travel over v5
    assert message.properties.ContentType == "application/json"
    assert ("fleet", topic_prefix) in message.properties.UserProperty


def test_retained_message_survives_restart_when_persistent(
    persistent_broker: Broker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/node/n1/state"

    async def publish() -> None:
        async with client(persistent_broker) as mqtt:
            await mqtt.publish(topic, b"online", qos=1, retain=True)

    async def read_back() -> aiomqtt.Message:
        async with client(persistent_broker) as mqtt:
            await mqtt.subscribe(topic, qos=1)
            return await next_message(mqtt)

    run(publish)
    port = persistent_broker.port
    persistent_broker.stop()
    assert not persistent_broker.running
    persistent_broker.start()
    assert persistent_broker.port == port
    message = run(read_back)
    assert message.payload == b"online"
    assert message.retain


def test_retained_message_is_gone_after_restart_without_persistence(
    broker: Broker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/node/n1/state"

    async def publish() -> None:
        async with client(broker) as mqtt:
            await mqtt.publish(topic, b"online", qos=1, retain=True)

    async def first_after_subscribe() -> aiomqtt.Message:
        async with client(broker) as mqtt:
            await mqtt.subscribe(topic, qos=1)
            # A retained message would be delivered before this marker.
            await mqtt.publish(topic, b"marker", qos=1)
            return await next_message(mqtt)

    run(publish)
    broker.kill()
    broker.start()
    message = run(first_after_subscribe)
    assert message.payload == b"marker"
    assert not message.retain


def test_persistent_session_receives_qos1_sent_while_offline_across_restart(
    persistent_broker: Broker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/node/n1/cmd"
    node_id = f"{topic_prefix.rsplit('/', 1)[-1]}-n1"

    async def subscribe_then_leave() -> None:
        # Clean Start = 0 even on this first connect (the client id is new, so the
        # session is new anyway): Mosquitto 2.0.11 keeps an MQTT 5 session whose
        # CONNECT had Clean Start = 1 in memory only, and loses it on restart
        # despite its session expiry interval. aiomqtt's default
        # (MQTT_CLEAN_START_FIRST_ONLY) sets Clean Start = 1 on a client's first connect.
        async with client(
            persistent_broker, identifier=node_id, clean_start=False, session_expiry_s=3600
        ) as node:
            await node.subscribe(topic, qos=1)

    async def publish_while_node_offline() -> None:
        async with client(persistent_broker) as controller:
            await controller.publish(topic, b"deploy v2", qos=1)

    async def reconnect() -> aiomqtt.Message:
        # No subscribe: the restored session still holds the subscription.
        async with client(
            persistent_broker, identifier=node_id, clean_start=False, session_expiry_s=3600
        ) as node:
            return await next_message(node)

    run(subscribe_then_leave)
    run(publish_while_node_offline)
    persistent_broker.restart()
    message = run(reconnect)
    assert message.topic.value == topic
    assert message.payload == b"deploy v2"
    assert message.qos == 1


def test_restart_after_kill_reuses_the_port(broker: Broker, topic_prefix: str) -> None:
    url = broker.url
    broker.kill()
    assert not broker.running
    broker.start()
    assert broker.url == url

    async def echo() -> aiomqtt.Message:
        async with client(broker) as mqtt:
            await mqtt.subscribe(f"{topic_prefix}/#", qos=0)
            await mqtt.publish(f"{topic_prefix}/ping", b"1", qos=0)
            return await next_message(mqtt)

    message = run(echo)
    assert message.payload == b"1"


def test_persistence_option_renders_a_private_location(persistent_broker: Broker) -> None:
    lines = persistent_broker.config_file.read_text().splitlines()
    assert "persistence true" in lines
    assert f"persistence_location {persistent_broker.persistence_dir}{os.sep}" in lines
    persistent_broker.stop()
    assert (persistent_broker.persistence_dir / "mosquitto.db").is_file()


def test_missing_mosquitto_is_a_clear_error(tmp_path: Path) -> None:
    broker = Broker(tmp_path, executable=str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(BrokerNotInstalledError, match="no-such-mosquitto"):
        broker.start()
    assert not broker.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
