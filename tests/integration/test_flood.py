"""A real controller under a flood of junk through a real Mosquitto.

The controller service runs in process with small inbox bounds, so a few
thousand malformed messages overflow every lane; meanwhile an operator asks
for the node list and a node sends result batches (resending what is not
acknowledged, as the agent's outbox does). The request must be answered, the
results stored, and the drops counted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Link, Session
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.keys import init_keys, load_trust
from fleet_controller.link import InboxLimits
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.acks import open_ack
from shared.broker import parse_broker_url
from tests.support.broker import Broker
from tests.unit.fleet_controller.kit import result_batch

pytestmark = pytest.mark.integration

JUNK_COUNT = 4_000
BATCHES = 5  # result batches the node sends (slots 1..5), 10 results each: 50
DEADLINE_S = 30.0
# Small lanes and rates, so that this flood overflows every one of them.
LIMITS = InboxLimits(
    control_messages=20,
    control_per_s=20.0,
    control_burst=20.0,
    ingest_messages=50,
    node_messages_per_s=50.0,
    node_burst=100.0,
    junk_messages=20,
)


def junk(fleet: str, n: int) -> tuple[str, bytes]:
    """Malformed messages on every kind of topic the controller reads but ``ctl/request``
    (which the broker's ACLs leave to operators), from made-up nodes."""
    node = f"junk-{n % 7}"
    topic = [
        topics.results(fleet, node),
        topics.status(fleet, node),
        topics.telemetry(fleet, node),
        topics.state(fleet, node),
        topics.artifact_request(fleet, "ab" * 32, node),
    ][n % 5]
    payload = [b"x", b"{}", b"[" * 2_000, b'{"v":1,"type":"status"}', os.urandom(64)][(n // 5) % 5]
    return topic, payload


async def eventually(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling against the deadline


async def flood(link: Link, fleet: str) -> None:
    for n in range(JUNK_COUNT):
        topic, payload = junk(fleet, n)
        await link.publish(topic, payload, qos=0)


async def send_results(link: Link, fleet: str, keys: Path) -> None:
    """Publish slots 1..BATCHES, resending the unacknowledged ones until all are acked."""
    acked = 0
    messages = aiter(link.messages())
    trust = load_trust(keys, now=time.time())
    deadline = time.monotonic() + DEADLINE_S
    while acked < BATCHES:
        assert time.monotonic() < deadline, f"results acknowledged up to {acked} only"
        for slot in range(acked + 1, BATCHES + 1):
            seqs = list(range(slot * 10 - 9, slot * 10 + 1))
            await link.publish(topics.results(fleet, "n1"), result_batch("n1", slot, seqs).payload)
        try:
            async with asyncio.timeout(1.0):  # the resend interval
                while acked < BATCHES:
                    message = await anext(messages)
                    ack = open_ack(message.payload, trust=trust, node="n1", now=time.time())
                    acked = max(acked, ack.seq)
        except TimeoutError:
            continue


def test_operator_requests_and_results_get_through_a_flood(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        address = parse_broker_url(broker.url)
        transport = MqttTransport(address)
        keys = tmp_path / "keys"
        init_keys(keys, now=time.time())
        service = ControllerService(
            ControllerConfig(
                broker=address,
                db_url=str(tmp_path / "fleet.db"),
                keys_dir=keys,
                fleet=fleet_id,
                inbox=LIMITS,
            )
        )
        running = asyncio.get_running_loop().create_task(service.run())
        try:
            async with asyncio.timeout(DEADLINE_S):
                await service.connected.wait()
            async with (
                transport.connect(Session(client_id="flooder")) as flooder,
                transport.connect(Session(client_id="n1")) as node,
                CtlClient(transport, fleet=fleet_id, identity=OperatorIdentity.load(keys)) as ctl,
            ):
                await node.subscribe([(topics.ack(fleet_id, "n1"), 1)])
                flooding = asyncio.get_running_loop().create_task(flood(flooder, fleet_id))
                await eventually("the flood to arrive", lambda: service.metrics["malformed"] > 100)
                nodes = await ctl.call("nodes.list")
                assert isinstance(nodes, list)
                await send_results(node, fleet_id, keys)
                await flooding
                metrics = service.metrics

                def accounted() -> int:
                    dropped = (n for k, n in metrics.items() if k.startswith("inbox_dropped_"))
                    return metrics["malformed"] + sum(dropped)

                # Every junk message was refused as malformed or dropped by the inbox.
                await eventually("all junk accounted for", lambda: accounted() >= JUNK_COUNT)
            counts = await asyncio.to_thread(service.store.results.table_counts)
            assert (counts["results"], counts["statuses"], counts["telemetry"]) == (50, 0, 0)
            assert metrics["inbox_over_rate_ingest"] > 0
            assert metrics["inbox_dropped_junk"] > 0
        finally:
            service.stop()
            async with asyncio.timeout(DEADLINE_S):
                await running

    asyncio.run(scenario())
