"""A real node under inference load: hot-swaps, outbox across outages and restarts, sources.

Every scenario runs a :class:`~edge_node.agent.NodeAgent` against a real
Mosquitto and real onnxruntime, with the test harness as the controller. Waits
are event driven (``harness.wait_for``) or polls against a deadline, never
sleeps used as synchronization.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from edge_node.session import make_client
from shared import topics
from shared.broker import parse_broker_url
from shared.messages import (
    InferenceResult,
    InferReply,
    InferRequest,
    NodeState,
    ResultBatch,
    TensorData,
    decode,
    encode,
)
from tests.support.broker import Broker
from tests.support.harness import Harness, Registered, RunningNode, node_config

pytestmark = pytest.mark.integration

NODE = "n1"


# ----- helpers -------------------------------------------------------------------


async def poll_until(
    predicate: Callable[[], bool], *, timeout_s: float = 30.0, what: str, every_s: float = 0.01
) -> None:
    """Re-check ``predicate`` every ``every_s`` until it holds or ``timeout_s`` passes.

    For node-side state (outbox depth, counters) that no harness message announces.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(every_s)  # poll against the deadline


async def wait_drained(node: RunningNode, *, what: str) -> tuple[int, int]:
    """Poll until the node's outbox is empty: every slot written so far is acknowledged.

    Returns ``(results, last_slot)`` read in the same step as the depth: how many
    results had reached the outbox by then, and the last slot assigned. (A node's
    stop only sends what it can, so tests check delivery on a running node.)
    """
    seen: list[tuple[int, int]] = []

    def drained() -> bool:
        outbox = node.agent.outbox_stats()
        if outbox.depth:
            return False
        stats = node.agent.stats()
        seen.append((stats["inferences"] - stats["pending"], outbox.last_seq))
        return True

    await poll_until(drained, what=what)
    return seen[-1]


async def deploy_and_wait(harness: Harness, model: Registered, *, rollout_id: str) -> None:
    command = await harness.deploy(NODE, model, rollout_id=rollout_id)
    await harness.wait_state(command, "succeeded")


def results_of(harness: Harness) -> dict[int, InferenceResult]:
    return harness.results.get(NODE, {})


def assert_contiguous(seqs: list[int], what: str) -> None:
    assert seqs, f"no {what}"
    ordered = sorted(seqs)
    missing = sorted(set(range(ordered[0], ordered[-1] + 1)) - set(ordered))
    assert not missing, f"{what}: {len(missing)} missing, first {missing[:10]}"
    assert len(ordered) == len(set(ordered)), f"{what}: duplicates"


def first_arrivals(seqs: list[int]) -> list[int]:
    """``seqs`` without repeats, each at its first arrival (QoS 1 may deliver twice)."""
    return list(dict.fromkeys(seqs))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write atomically: the directory source must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")  # dot files are ignored by the source
    with tmp.open("wb") as handle:
        np.save(handle, array)
    tmp.replace(path)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


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
        self._address = parse_broker_url(broker_url)
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
        while True:
            client = make_client(
                self._address,
                client_id=f"observer-{self._fleet}",
                persistent=True,
                session_expiry_s=600,
            )
            try:
                async with client:
                    await client.subscribe(topics.results(self._fleet, NODE), qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.slots.append(decode(ResultBatch, message.payload).seq)
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)  # reconnect back-off (not a wait: polls no state)


# ----- 1. hot-swap under load ---------------------------------------------------


def test_hot_swap_under_load_fails_no_request(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    swaps = 20
    concurrency = 2

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
                rate_hz=None,
                concurrency=concurrency,
                batch_max=1000,
            )
            async with RunningNode(config) as node:
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
        # a request already running on the old model when a swap happened: it
        # finishes there and may complete (and take its seq) after the other worker
        # ran one on the new model. So at most one per other worker (micro_batch is
        # 1), and only one version back. (Seen in about half of the runs.)
        newest = 0
        late: Counter[int] = Counter()
        for seq in sorted(results):
            index = index_of[results[seq].model.version]
            if index >= newest:
                newest = index
            else:
                assert index == newest - 1, f"result {seq} ran on {index} after {newest}"
                late[newest] += 1
        assert all(count <= concurrency - 1 for count in late.values()), late

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
            async with RunningNode(config) as node:
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


# ----- 3. a controller that stops acknowledging ---------------------------------


def test_unacknowledged_entries_are_resent_until_acked(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(
                harness,
                NODE,
                tmp_path / NODE,
                source="synthetic",
                rate_hz=100.0,
                resend_after_s=1.0,
            )
            async with RunningNode(config) as node:
                await deploy_and_wait(harness, model, rollout_id="r1")
                await harness.wait_for(
                    lambda: len(harness.slots_seen.get(NODE, [])) >= 2, what="results"
                )
                harness.acking = False
                acked_before = harness.acked[NODE]
                depth_before = node.agent.outbox_stats().depth

                def resent() -> list[int]:
                    counts = Counter(harness.slots_seen[NODE])
                    return [s for s, n in counts.items() if n > 1 and s > acked_before]

                await poll_until(
                    lambda: node.agent.outbox_stats().depth >= depth_before + 5,
                    what="the outbox to grow without acks",
                )
                await harness.wait_for(lambda: bool(resent()), what="an unacked slot re-sent")
                assert harness.acked[NODE] == acked_before

                harness.acking = True  # acks again on the next message it stores
                pending = node.agent.outbox_stats().last_seq
                await harness.wait_for(
                    lambda: harness.acked[NODE] >= pending, what=f"acks to reach slot {pending}"
                )
                flushed, _ = await wait_drained(node, what="the outbox to drain")
                await node.stop()

        assert node.agent.stats()["errors"] == 0
        seqs = sorted(results_of(harness))
        assert_contiguous(seqs, "result seqs")
        assert len(seqs) >= flushed

    asyncio.run(scenario())


# ----- 4. a node restart keeps unacknowledged results ---------------------------


def test_node_restart_resends_unacknowledged_results(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="synthetic", rate_hz=100.0)
            async with RunningNode(config) as first:
                await deploy_and_wait(harness, model, rollout_id="r1")
                status_slot = max(s.seq for s in harness.statuses if s.node == NODE)
                await harness.wait_for(
                    lambda: harness.acked.get(NODE, 0) >= status_slot,
                    what="the deploy statuses acknowledged",
                )
                harness.acking = False
                acked_before = harness.acked[NODE]
                await harness.wait_for(
                    lambda: len(harness.slots_seen.get(NODE, [])) >= 5, what="results"
                )
                await first.stop()
            first_run = first.agent.stats()["inferences"]
            unacked = set(range(acked_before + 1, first.agent.outbox_stats().last_seq + 1))
            assert first_run > 0
            assert unacked
            seen_before_restart = len(harness.slots_seen[NODE])

            harness.acking = True
            async with RunningNode(config) as second:
                assert second.agent.active == model.manifest.ref
                await harness.wait_for(
                    lambda: (
                        harness.acked[NODE] >= max(unacked)
                        and len(results_of(harness)) >= first_run + 10
                    ),
                    what="first-run results re-sent and acknowledged, new ones flowing",
                )
                await second.stop()

        # Every unacknowledged slot went out again from disk after the restart.
        resent = set(harness.slots_seen[NODE][seen_before_restart:])
        assert unacked <= resent, sorted(unacked - resent)
        # All first-run results arrived; the second run's come after.
        seqs = sorted(results_of(harness))
        run1, run2 = seqs[:first_run], seqs[first_run:]
        assert_contiguous(run1, "first-run result seqs")
        assert_contiguous(run2, "second-run result seqs")
        assert run2[0] > run1[-1]  # numbering resumes above everything handed out

    asyncio.run(scenario())


# ----- 5. requests over MQTT ------------------------------------------------------


def test_mqtt_source_replies_and_survives_malformed_requests(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    client_id = "app1"

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            spec = model.manifest.inputs[0]
            config = node_config(harness, NODE, tmp_path / NODE, source="mqtt")
            async with RunningNode(config) as node:
                await deploy_and_wait(harness, model, rollout_id="r1")
                address = parse_broker_url(broker.url)
                async with aiomqtt.Client(
                    address.host,
                    address.port,
                    identifier=f"{client_id}-{fleet_id}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                ) as app:
                    await app.subscribe(topics.infer_reply(fleet_id, NODE, client_id), qos=1)
                    request_topic = topics.infer_request(fleet_id, NODE)

                    async def ask(tensor: TensorData) -> InferReply:
                        request = InferRequest(
                            id=uuid.uuid4().hex, client=client_id, inputs=(tensor,)
                        )
                        await app.publish(request_topic, encode(request), qos=1)
                        async with asyncio.timeout(20):
                            async for message in app.messages:
                                assert isinstance(message.payload, bytes)
                                reply = decode(InferReply, message.payload)
                                if reply.id == request.id:
                                    return reply
                        raise AssertionError("reply stream ended")

                    good = TensorData(name=spec.name, shape=(1, 8), data=tuple(range(8)))
                    reply = await ask(good)
                    assert reply.ok, reply.error
                    assert reply.result is not None
                    assert reply.result.model == model.manifest.ref
                    assert reply.result.source == f"mqtt:{client_id}"
                    assert reply.result.topk

                    await app.publish(request_topic, b"{not json", qos=1)
                    await app.publish(request_topic, b'{"v": 1, "type": "infer_request"}', qos=1)
                    # Well-formed JSON whose tensor cannot run: answered with an error.
                    short = TensorData(name=spec.name, shape=(1, 8), data=(1.0, 2.0))
                    bad = await ask(short)
                    assert not bad.ok
                    assert bad.error
                    assert bad.result is None
                    unknown = TensorData(name="nope", shape=(1, 8), data=(0.0,) * 8)
                    bad = await ask(unknown)
                    assert not bad.ok
                    assert bad.error

                    again = await ask(good)
                    assert again.ok
                    assert again.result is not None
                    assert not node.task.done()
                await node.stop()

    asyncio.run(scenario())


# ----- 6. a directory of input files ----------------------------------------------


def test_directory_source_infers_each_file_and_skips_garbage(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def sources(harness: Harness) -> set[str | None]:
        return {r.source for r in results_of(harness).values()}

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="dir", source_dir=inbox)
            rng = np.random.default_rng(7)
            write_npy(inbox / "a.npy", rng.standard_normal((1, 8)).astype(np.float32))
            write_npy(inbox / "b.npy", rng.standard_normal(8).astype(np.float32))  # no batch axis
            write_bytes(inbox / "c.npy", b"\x93NUMPY garbage, not an array" * 3)
            write_bytes(inbox / "d.txt", b"not an input type")
            async with RunningNode(config) as node:
                await deploy_and_wait(harness, model, rollout_id="r1")
                await harness.wait_for(
                    lambda: {"dir:a.npy", "dir:b.npy"} <= sources(harness), what="a and b"
                )
                write_npy(inbox / "e.npy", rng.standard_normal((1, 8)).astype(np.float32))
                await harness.wait_for(lambda: "dir:e.npy" in sources(harness), what="e")
                await node.stop()
                assert node.agent.stats()["errors"] == 0

        assert sources(harness) == {"dir:a.npy", "dir:b.npy", "dir:e.npy"}
        assert len(results_of(harness)) == 3
        assert all(r.model == model.manifest.ref for r in results_of(harness).values())

    asyncio.run(scenario())


# ----- 7. change gating -------------------------------------------------------------


def test_change_gating_skips_unchanged_inputs(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frame = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)
    for index in range(5):
        write_npy(inbox / f"f{index}.npy", frame)
    write_npy(inbox / "f5.npy", frame + 1.0)  # a real change

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(
                harness,
                NODE,
                tmp_path / NODE,
                source="dir",
                source_dir=inbox,
                change_threshold=0.01,
            )
            async with RunningNode(config) as node:
                await deploy_and_wait(harness, model, rollout_id="r1")
                await harness.wait_for(
                    lambda: (
                        {r.source for r in results_of(harness).values()}
                        >= {"dir:f0.npy", "dir:f5.npy"}
                    ),
                    what="the first frame and the changed one",
                )
                await node.stop()
                stats = node.agent.stats()

        assert stats["skips"] == 4, stats
        assert sorted(r.source or "" for r in results_of(harness).values()) == [
            "dir:f0.npy",
            "dir:f5.npy",
        ]

    asyncio.run(scenario())


# ----- 8. clean shutdown ------------------------------------------------------------


def test_clean_stop_publishes_retained_death_with_the_birth_session(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            config = node_config(harness, NODE, tmp_path / NODE)
            async with RunningNode(config) as node:
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
            address = parse_broker_url(broker.url)
            async with aiomqtt.Client(
                address.host,
                address.port,
                identifier=f"monitor-{fleet_id}",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as monitor:
                await monitor.subscribe(topics.state(fleet_id, NODE), qos=1)
                async with asyncio.timeout(10):
                    message = await anext(aiter(monitor.messages))
                assert message.retain
                assert isinstance(message.payload, bytes)
                retained = decode(NodeState, message.payload)
            assert not retained.online
            assert retained.session == birth.session

    asyncio.run(scenario())
