"""The transport seam's contract, held by a real Mosquitto and by the in-memory broker.

Every test runs twice: against ``broker_config/dev.conf`` on a real Mosquitto
(through :class:`edgefleet_io.mqtt.MqttTransport`) and against
:class:`edgefleet_io.memory.MemoryBroker`. Tests that pass on both show that the
in-memory broker behaves like Mosquitto wherever EdgeFleet depends on it, so
the fast tests built on it are honest.

Absence of a message is shown without sleeping: a marker published after it on
the same path arrives first, since a broker delivers one publisher's messages
in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Link, Message, Session, Transport, Will
from shared.broker import parse_broker_url
from shared.errors import TransportError
from tests.support.broker import BrokerFactory

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEADLINE_S = 10.0


@dataclass
class Under:
    """A broker under test: connect through ``transport``; ``stop``/``start`` an outage."""

    kind: str
    transport: Transport
    stop: Callable[[], None]
    start: Callable[[], None]


def _under(kind: str, broker_factory: BrokerFactory, *, persistence: bool) -> Under:
    if kind == "memory":
        memory = MemoryBroker(persistence=persistence)
        return Under(kind, memory.transport(), memory.stop, memory.start)
    real = broker_factory(persistence=persistence)
    return Under(kind, MqttTransport(parse_broker_url(real.url)), real.stop, real.start)


@pytest.fixture(params=["memory", "mosquitto"])
def under(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> Under:
    return _under(request.param, broker_factory, persistence=False)


@pytest.fixture(params=["memory", "mosquitto"])
def persistent_under(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> Under:
    return _under(request.param, broker_factory, persistence=True)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(4 * DEADLINE_S):
            return await scenario()

    return asyncio.run(bounded())


def session(client_id: str | None = None, **options: object) -> Session:
    return Session(client_id=client_id or f"c-{uuid.uuid4().hex[:8]}", **options)  # type: ignore[arg-type]


async def receive(link: Link, count: int = 1) -> list[Message]:
    """The next ``count`` messages on ``link``, within the deadline."""
    got: list[Message] = []
    async with asyncio.timeout(DEADLINE_S):
        async for message in link.messages():
            got.append(message)
            if len(got) == count:
                break
    return got


async def until_marker(link: Link, marker_topic: str) -> list[Message]:
    """Every message before the one on ``marker_topic`` (which proves the rest absent)."""
    got: list[Message] = []
    async with asyncio.timeout(DEADLINE_S):
        async for message in link.messages():
            if message.topic == marker_topic:
                return got
            got.append(message)
    raise AssertionError("the link ended before the marker")


@pytest.fixture
def topic(fleet_id: str) -> str:
    return f"fleet/v1/{fleet_id}"


# ----- publish, order, retained ------------------------------------------------------


def test_messages_arrive_in_publish_order(under: Under, topic: str) -> None:
    async def scenario() -> list[Message]:
        async with under.transport.connect(session()) as link:
            await link.subscribe([(f"{topic}/#", 1)])
            for index in range(20):
                await link.publish(f"{topic}/n/{index % 3}", str(index).encode())
            return await receive(link, 20)

    got = run(scenario)
    assert [m.payload for m in got] == [str(i).encode() for i in range(20)]
    assert not any(m.retain for m in got)


def test_retained_message_reaches_late_subscribers_and_empty_payload_clears_it(
    under: Under, topic: str
) -> None:
    state = f"{topic}/node/n1/state"
    marker = f"{topic}/marker"

    async def scenario() -> tuple[list[Message], list[Message]]:
        async with under.transport.connect(session()) as writer:
            await writer.publish(state, b"old", retain=True)
            await writer.publish(state, b"birth", retain=True)
            async with under.transport.connect(session()) as late:
                await late.subscribe([(f"{topic}/node/+/state", 1)])
                first = await receive(late, 1)
            await writer.publish(state, b"", retain=True)
            async with under.transport.connect(session()) as later:
                await later.subscribe([(f"{topic}/node/+/state", 1), (marker, 1)])
                await writer.publish(marker, b"m")
                second = await until_marker(later, marker)
        return first, second

    first, second = run(scenario)
    assert [(m.payload, m.retain) for m in first] == [(b"birth", True)]
    assert second == []


def test_shared_subscription_splits_messages_and_gets_retained_ones_like_mosquitto(
    under: Under, topic: str
) -> None:
    share = f"$share/controllers/{topic}/node/+/status"
    marker = f"{topic}/node/x/status"

    async def scenario() -> tuple[list[Message], list[Message]]:
        async with under.transport.connect(session()) as writer:
            await writer.publish(f"{topic}/node/n1/status", b"retained", retain=True)
            async with (
                under.transport.connect(session()) as one,
                under.transport.connect(session()) as two,
            ):
                await one.subscribe([(share, 1)])
                await two.subscribe([(share, 1)])
                for index in range(10):
                    await writer.publish(f"{topic}/node/n1/status", str(index).encode())
                # One marker each: round-robin hands the next two to one member each.
                await writer.publish(marker, b"m")
                await writer.publish(marker, b"m")
                return await until_marker(one, marker), await until_marker(two, marker)

    got_one, got_two = run(scenario)
    # Mosquitto 2.0 hands retained messages to every new shared subscriber.
    assert [(m.payload, m.retain) for m in got_one[:1]] == [(b"retained", True)]
    assert [(m.payload, m.retain) for m in got_two[:1]] == [(b"retained", True)]
    live = sorted(int(m.payload) for m in [*got_one[1:], *got_two[1:]])
    assert live == list(range(10))  # every live message to exactly one member
    assert len(got_one) > 1
    assert len(got_two) > 1


def test_unsubscribe_stops_delivery_also_for_a_persistent_session(under: Under, topic: str) -> None:
    node = session(f"node-{uuid.uuid4().hex[:6]}", persistent=True, session_expiry_s=3600)
    blob, marker = f"{topic}/artifact/x/data", f"{topic}/marker"

    async def scenario() -> tuple[list[Message], list[Message]]:
        async with under.transport.connect(node) as link:
            await link.subscribe([(blob, 0), (marker, 1)])
            await link.publish(blob, b"while subscribed")
            await link.publish(marker, b"")
            before = await until_marker(link, marker)
            await link.unsubscribe([blob])
        async with under.transport.connect(node) as link:
            await link.publish(blob, b"after unsubscribing")
            await link.publish(marker, b"")
            return before, await until_marker(link, marker)

    before, after = run(scenario)
    assert [m.payload for m in before] == [b"while subscribed"]
    assert after == []


def test_qos0_messages_are_not_queued_for_an_away_persistent_session(
    under: Under, topic: str
) -> None:
    node = session(f"node-{uuid.uuid4().hex[:6]}", persistent=True, session_expiry_s=3600)
    blob, cmd = f"{topic}/artifact/x/data", f"{topic}/node/n1/cmd"

    async def scenario() -> list[Message]:
        async with under.transport.connect(node) as link:
            await link.subscribe([(blob, 0), (cmd, 1)])
        async with under.transport.connect(session()) as controller:
            await controller.publish(blob, b"a chunk", qos=1)
            await controller.publish(cmd, b"a command", qos=1)
        async with under.transport.connect(node) as link:
            return await receive(link, 1)

    assert [m.payload for m in run(scenario)] == [b"a command"]


# ----- sessions ------------------------------------------------------------------------


def test_persistent_session_keeps_subscriptions_and_queued_messages(
    under: Under, topic: str
) -> None:
    node = session(f"node-{uuid.uuid4().hex[:6]}", persistent=True, session_expiry_s=3600)
    cmd = f"{topic}/node/n1/cmd"

    async def scenario() -> list[Message]:
        async with under.transport.connect(node) as link:
            await link.subscribe([(cmd, 1)])
        async with under.transport.connect(session()) as controller:
            await controller.publish(cmd, b"deploy v2")
        async with under.transport.connect(node) as link:
            return await receive(link, 1)  # no subscribe: the session kept it

    assert [m.payload for m in run(scenario)] == [b"deploy v2"]


def test_clean_session_forgets_subscriptions_and_a_clean_connect_discards_a_kept_one(
    under: Under, topic: str
) -> None:
    client_id = f"node-{uuid.uuid4().hex[:6]}"
    cmd = f"{topic}/node/n1/cmd"
    marker = f"{topic}/marker"

    async def scenario() -> list[Message]:
        kept = session(client_id, persistent=True, session_expiry_s=3600)
        async with under.transport.connect(kept) as link:
            await link.subscribe([(cmd, 1)])
        async with under.transport.connect(session(client_id)) as link:
            pass  # clean start: the kept session is gone
        async with under.transport.connect(session()) as controller:
            await controller.publish(cmd, b"lost")
        async with under.transport.connect(kept) as link:
            await link.subscribe([(marker, 1)])
            async with under.transport.connect(session()) as controller:
                await controller.publish(marker, b"m")
            return await until_marker(link, marker)

    assert run(scenario) == []


def test_will_is_published_on_takeover_but_not_on_a_clean_exit(under: Under, topic: str) -> None:
    state = f"{topic}/node/n1/state"
    marker = f"{topic}/marker"
    client_id = f"node-{uuid.uuid4().hex[:6]}"
    will = Will(state, b"offline", qos=1, retain=True)

    async def scenario() -> tuple[list[Message], bool]:
        async with under.transport.connect(session()) as watcher:
            await watcher.subscribe([(state, 1), (marker, 1)])
            async with under.transport.connect(session(client_id, will=will)):
                pass  # clean exit: no Will
            first = under.transport.connect(session(client_id, will=will))
            old = await first.__aenter__()
            failed = False
            try:
                # Another connection with the same id takes over: the old one ends
                # without a clean exit, so the broker publishes its Will.
                async with under.transport.connect(session(client_id)):
                    got = await receive(watcher, 1)
                    try:
                        async with asyncio.timeout(DEADLINE_S):
                            async for _ in old.messages():
                                pass
                    except TransportError:
                        failed = True
            finally:
                with contextlib.suppress(TransportError):
                    await first.__aexit__(None, None, None)
            return got, failed

    got, failed = run(scenario)
    assert [(m.topic, m.payload) for m in got] == [(state, b"offline")]
    assert failed  # the taken-over link reports its end as a TransportError


# ----- outages ------------------------------------------------------------------------


def test_an_outage_ends_links_with_transport_errors_and_refuses_connects(
    under: Under, topic: str
) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        reading_failed = publishing_failed = connect_failed = False
        connection = under.transport.connect(session())
        link = await connection.__aenter__()
        try:
            await link.subscribe([(f"{topic}/#", 1)])
            under.stop()
            try:
                async with asyncio.timeout(DEADLINE_S):
                    async for _ in link.messages():
                        pass
            except TransportError:
                reading_failed = True
            try:
                await link.publish(f"{topic}/x", b"1")
            except TransportError:
                publishing_failed = True
        finally:
            with contextlib.suppress(TransportError):
                await connection.__aexit__(None, None, None)
        try:
            async with under.transport.connect(session()):
                pass
        except TransportError:
            connect_failed = True
        under.start()
        async with under.transport.connect(session()) as link:
            await link.subscribe([(f"{topic}/#", 1)])
            await link.publish(f"{topic}/x", b"back")
            assert [m.payload for m in await receive(link, 1)] == [b"back"]
        return reading_failed, publishing_failed, connect_failed

    assert run(scenario) == (True, True, True)


def test_a_restart_keeps_retained_messages_and_sessions_only_with_persistence(
    persistent_under: Under, topic: str
) -> None:
    under = persistent_under
    node = session(f"node-{uuid.uuid4().hex[:6]}", persistent=True, session_expiry_s=3600)
    cmd = f"{topic}/node/n1/cmd"
    state = f"{topic}/node/n1/state"

    async def before() -> None:
        async with under.transport.connect(node) as link:
            await link.subscribe([(cmd, 1)])
        async with under.transport.connect(session()) as controller:
            await controller.publish(cmd, b"queued")
            await controller.publish(state, b"birth", retain=True)

    async def after() -> tuple[list[Message], list[Message]]:
        async with under.transport.connect(node) as link:
            queued = await receive(link, 1)
        async with under.transport.connect(session()) as watcher:
            await watcher.subscribe([(state, 1)])
            retained = await receive(watcher, 1)
        return queued, retained

    run(before)
    under.stop()
    under.start()
    queued, retained = run(after)
    assert [m.payload for m in queued] == [b"queued"]
    assert [(m.payload, m.retain) for m in retained] == [(b"birth", True)]
