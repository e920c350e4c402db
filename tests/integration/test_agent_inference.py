"""A real node under load against a real Mosquitto: hot-swaps, the outbox across an outage.

Every scenario runs a :class:`~edge_node.agent.NodeAgent` against a real
Mosquitto and real onnxruntime, with the test harness as the controller. Waits
are event driven (``harness.wait_for``) or polls against a deadline, never
sleeps used as synchronization. Acks, restarts and sources run on the
in-memory broker in ``tests/unit/edge_node/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session, reconnect_delays
from shared import topics
from shared.broker import parse_broker_url
from shared.errors import TransportError
from shared.messages import NodeState, decode
from shared.result_batch import decode_results
from tests.support.broker import Broker, BrokerFactory
from tests.support.harness import Harness, Registered, RunningNode, node_config, start_node
from tests.support.node_checks import (
    NODE,
    assert_contiguous,
    first_arrivals,
    poll_until,
    results_of,
    wait_drained,
)
from tests.support.node_checks import deploy_and_wait as deploy_to

pytestmark = pytest.mark.integration


async def deploy_and_wait(harness: Harness, model: Registered, *, rollout_id: str) -> None:
    await deploy_to(harness, NODE, model, rollout_id)


class SlotObserver:
    """A second consumer of the node's result batches, with a persistent session.

    The harness, like the controller's replicas, uses a clean session: after a
    broker restart it misses whatever the node publishes before it has
    subscribed again (the node re-sends that later, out of arrival order). A
    persistent subscription on a persistent broker gets every publication queued
    across the outage, in the order the node published it, so its arrival order
    shows the order the node sent its outbox in.
    """

    def __init__(self, broker_url: str, fleet: str) -> None:
        self._transport = MqttTransport(parse_broker_url(broker_url))
        self._fleet = fleet
        self.slots: list[int] = []
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SlotObserver:
        self._task = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(20):
            await self.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        while not self._task.done():  # again if a cancel was swallowed (see Harness)
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        session = Session(
            client_id=f"observer-{self._fleet}", persistent=True, session_expiry_s=600
        )
        delays = reconnect_delays(initial_s=0.1, maximum_s=0.5)
        while True:
            try:
                async with self._transport.connect(session) as link:
                    await link.subscribe([(topics.results(self._fleet, NODE), 1)])
                    self.connected.set()
                    async for message in link.messages():
                        self.slots.append(decode_results(message.payload).seq)
            except TransportError:
                self.connected.clear()
            await asyncio.sleep(next(delays))  # reconnect back-off (not a wait: polls no state)


# ----- 1. hot-swap under load ---------------------------------------------------


def test_hot_swap_under_load_fails_no_request(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    swaps = 20
    concurrency = 2
    micro_batch = 4

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            # Versions must rise (a downgrade is refused), so the two weight sets
            # alternate under 1.0.0, 1.0.1, ...; equal files register the same blob.
            models = [
                harness.register((classifier_v1, classifier_v2)[i % 2], "clf", f"1.0.{i}")
                for i in range(swaps + 1)
            ]
            config = node_config(
                harness,
                NODE,
                tmp_path / NODE,
                source="synthetic",
                # Under load, but no faster than the in-process harness (same loop,
                # same GIL) turns results into rows: flat out, a node now makes
                # tens of thousands a second and the deploys' statuses queue
                # behind them in the outbox.
                rate_hz=2000.0,
                concurrency=concurrency,
                micro_batch=micro_batch,
                batch_max=1000,
            )
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, models[0], rollout_id="r0")
                await harness.wait_for(lambda: len(results_of(harness)) > 0, what="first results")
                for i, model in enumerate(models[1:], start=1):
                    await deploy_and_wait(harness, model, rollout_id=f"r{i}")
                    assert node.agent.active == model.manifest.ref
                await node.stop()
                stats = node.agent.stats()

        assert stats["errors"] == 0, stats
        results = results_of(harness)
        index_of = {m.manifest.version: i for i, m in enumerate(models)}
        sha_of = {m.manifest.version: m.manifest.sha256 for m in models}
        assert len(set(sha_of.values())) == 2
        for result in results.values():
            # Named after the weights that produced it: version and sha belong together.
            assert result.model.version in index_of, result.model
            assert result.model.sha256 == sha_of[result.model.version], result.model
            assert result.source == "synthetic"
        after_first_swap = [r for r in results.values() if index_of[r.model.version] >= 1]
        assert len(after_first_swap) > 200, "results stopped flowing during the swaps"
        served = {index_of[r.model.version] for r in results.values()}
        assert served == set(range(swaps + 1)), f"models that served no request: {served}"

        # Along increasing result seq the active version never goes back, except for
        # a run already under way on the old model when a swap happened: it
        # finishes there and may be numbered after the other worker's run on the
        # new model. So at most one run (micro_batch results) per other worker, and
        # only one version back. (Seen in about half of the runs.)
        newest = 0
        late: Counter[int] = Counter()
        for seq in sorted(results):
            index = index_of[results[seq].model.version]
            if index >= newest:
                newest = index
            else:
                assert index == newest - 1, f"result {seq} ran on {index} after {newest}"
                late[newest] += 1
        assert all(count <= (concurrency - 1) * micro_batch for count in late.values()), late

    asyncio.run(scenario())


# ----- 2. outbox across a broker outage -----------------------------------------


def test_outbox_keeps_order_and_loses_nothing_across_a_broker_outage(
    persistent_broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with (
            Harness(persistent_broker.url, fleet_id, tmp_path) as harness,
            SlotObserver(persistent_broker.url, fleet_id) as observer,
        ):
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="synthetic", rate_hz=200.0)
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, model, rollout_id="r1")
                await harness.wait_for(
                    lambda: (
                        len(harness.slots_seen.get(NODE, [])) >= 3
                        and harness.acked.get(NODE, 0) >= harness.slots_seen[NODE][2]
                    ),
                    what="result batches stored and acknowledged",
                )
                await asyncio.to_thread(persistent_broker.stop)
                await poll_until(
                    lambda: not node.agent.connected.is_set(), what="the node to notice"
                )
                written_before = node.agent.outbox_stats().last_seq
                await poll_until(
                    lambda: node.agent.outbox_stats().last_seq >= written_before + 5,
                    what="result batches written while the broker is down",
                )
                assert not node.agent.connected.is_set()
                written_offline = node.agent.outbox_stats().last_seq
                assert node.agent.outbox_stats().depth >= written_offline - written_before
                await asyncio.to_thread(persistent_broker.start)
                await harness.wait_for(
                    lambda: harness.acked.get(NODE, 0) >= written_offline,
                    what=f"acks to reach slot {written_offline} after the restart",
                )
                flushed, last_slot = await wait_drained(node, what="the outbox to drain")
                result_slots = {s for s in harness.slots_seen[NODE] if s <= last_slot}
                await poll_until(
                    lambda: set(observer.slots) >= result_slots,
                    what="the observer to see every result batch",
                )
                await node.stop()

        assert node.agent.stats()["errors"] == 0
        # Nothing lost: results are numbered without gaps (a fresh node starts at
        # its clock in microseconds), and every result that reached the outbox
        # before it drained was stored.
        seqs = sorted(results_of(harness))
        assert_contiguous(seqs, "result seqs")
        assert len(seqs) >= flushed
        # Every outbox slot up to the drained one, statuses and result batches, was stored.
        status_slots = {s.seq for s in harness.statuses if s.node == NODE}
        first_slot = min(result_slots | status_slots)
        assert result_slots | status_slots >= set(range(first_slot, last_slot + 1))
        # Order kept: the node published its outbox in slot order, across the outage.
        sent = first_arrivals(observer.slots)
        assert sent == sorted(sent), f"slots out of order: {sent}"
        assert set(sent) >= result_slots

    asyncio.run(scenario())


# ----- clean shutdown, on either broker ------------------------------------------


@pytest.fixture(params=["memory", "mosquitto"])
def any_broker(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> str | MemoryBroker:
    """The in-memory broker, or a real Mosquitto's URL."""
    if request.param == "memory":
        return MemoryBroker()
    return broker_factory().url


def test_clean_stop_publishes_retained_death_with_the_birth_session(
    any_broker: str | MemoryBroker, fleet_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Harness(any_broker, fleet_id, tmp_path) as harness:
            async with start_node(harness, NODE, tmp_path / NODE) as node:
                await harness.wait_for(
                    lambda: any(s.node == NODE and s.online for s in harness.states),
                    what="the birth",
                )
                birth = [s for s in harness.states if s.node == NODE and s.online][-1]
                stopping_at = time.time()
                await node.stop()
            await harness.wait_for(
                lambda: any(s.node == NODE and not s.online for s in harness.states),
                what="the death",
            )
            death = next(s for s in harness.states if s.node == NODE and not s.online)
            assert death.session == birth.session
            # Published by stop() itself, not the Will registered at connect time.
            assert death.ts >= stopping_at

            # Retained: a monitor that subscribes afterwards is told the node is offline.
            async with harness.transport.connect(
                Session(client_id=f"monitor-{fleet_id}")
            ) as monitor:
                await monitor.subscribe([(topics.state(fleet_id, NODE), 1)])
                async with asyncio.timeout(10):
                    message = await anext(aiter(monitor.messages()))
                assert message.retain
                retained = decode(NodeState, message.payload)
            assert not retained.online
            assert retained.session == birth.session

    asyncio.run(scenario())
