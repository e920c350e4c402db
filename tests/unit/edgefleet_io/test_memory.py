"""What only the in-memory broker can show quickly: network loss, redelivery, queue limits.

The behaviour it shares with Mosquitto is checked against both in
tests/integration/test_transport_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.transport import Link, Message, Session, Will
from shared.errors import BrokerUnavailableError

T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(5):
            return await scenario()

    return asyncio.run(bounded())


async def take(link: Link, count: int) -> list[Message]:
    got: list[Message] = []
    async for message in link.messages():
        got.append(message)
        if len(got) == count:
            break
    return got


def test_a_dropped_connection_publishes_its_will_and_fails_its_reads() -> None:
    broker = MemoryBroker()
    transport = broker.transport()
    will = Will("f/node/n1/state", b"offline")

    async def scenario() -> tuple[list[Message], bool, bool]:
        async with transport.connect(Session(client_id="watch")) as watcher:
            await watcher.subscribe([("f/node/+/state", 1)])
            async with transport.connect(Session(client_id="n1", will=will)) as node:
                assert broker.connected("n1")
                assert broker.drop("n1")
                with pytest.raises(BrokerUnavailableError, match="connection lost"):
                    await node.publish("f/x", b"1")
                reading = False
                try:
                    await take(node, 1)
                except BrokerUnavailableError:
                    reading = True
            return await take(watcher, 1), reading, broker.drop("n1")

    got, reading_failed, dropped_again = run(scenario)
    assert [(m.topic, m.payload, m.retain) for m in got] == [("f/node/n1/state", b"offline", False)]
    assert broker.retained("f/node/n1/state") == b"offline"
    assert reading_failed
    assert not dropped_again  # not connected any more


def test_unread_qos1_messages_are_redelivered_to_a_persistent_session() -> None:
    broker = MemoryBroker()
    transport = broker.transport()
    node = Session(client_id="n1", persistent=True)

    async def scenario() -> list[bytes]:
        async with transport.connect(node) as link:
            await link.subscribe([("f/cmd", 1), ("f/telemetry", 0)])
            async with transport.connect(Session(client_id="ctl")) as ctl:
                await ctl.publish("f/cmd", b"c1")
                await ctl.publish("f/telemetry", b"t", qos=0)
                await ctl.publish("f/cmd", b"c2")
            first = await take(link, 1)
            broker.drop("n1")  # c2 and the QoS 0 message were handed over but never read
        async with transport.connect(node) as link:
            return [m.payload for m in first + await take(link, 1)]

    assert run(scenario) == [b"c1", b"c2"]


def test_a_full_client_queue_drops_and_counts() -> None:
    broker = MemoryBroker(max_queued=3)
    transport = broker.transport()

    async def scenario() -> list[bytes]:
        async with transport.connect(Session(client_id="slow")) as slow:
            await slow.subscribe([("f/#", 1)])
            async with transport.connect(Session(client_id="fast")) as fast:
                for index in range(5):
                    await fast.publish("f/x", str(index).encode())
            return [m.payload for m in await take(slow, 3)]

    assert run(scenario) == [b"0", b"1", b"2"]
    assert broker.dropped == 2


def test_shared_group_with_no_member_drops_the_message() -> None:
    broker = MemoryBroker()
    transport = broker.transport()

    async def scenario() -> list[bytes]:
        async with transport.connect(Session(client_id="a")) as member:
            await member.subscribe([("$share/g/f/req", 1)])
        async with transport.connect(Session(client_id="node")) as node:
            await node.publish("f/req", b"lost")  # the group's only member left
        async with transport.connect(Session(client_id="b")) as member:
            await member.subscribe([("$share/g/f/req", 1), ("f/marker", 1)])
            await member.publish("f/req", b"kept")
            return [m.payload for m in await take(member, 1)]

    assert run(scenario) == [b"kept"]
