"""The outbox between a real node and a controller that acknowledges, or does not.

On the in-memory broker, with real onnxruntime and the node's real SQLite
outbox. The harness acknowledges with the protocol's own rule
(:class:`shared.rules.SlotLedger`); ``acking`` off loses its acks. Waits are
on harness messages or polls of node state against a deadline.

Outages of a real broker (a restarted Mosquitto with a persistent observer) stay
in ``tests/integration/test_agent_inference.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from edgefleet_io.memory import MemoryBroker
from shared import topics
from shared.acks import sign_ack
from shared.envelope import PAYLOAD_COMMAND, SigningKey, sign_envelope
from shared.messages import Ack, encode
from tests.support.harness import Harness, RunningNode, node_config
from tests.support.node_checks import (
    NODE,
    assert_contiguous,
    deploy_and_wait,
    poll_until,
    results_of,
    wait_drained,
)

# ----- a controller that stops acknowledging ------------------------------------


def test_unacknowledged_entries_are_resent_until_acked(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(
                harness,
                NODE,
                tmp_path / NODE,
                source="synthetic",
                rate_hz=100.0,
                resend_after_s=1.0,
            )
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, NODE, model, "r1")
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


def test_forged_acks_free_nothing_and_a_signed_one_does(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="synthetic", rate_hz=100.0)
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, NODE, model, "r1")
                harness.acking = False
                await poll_until(
                    lambda: node.agent.outbox_stats().last_seq - harness.acked[NODE] >= 5,
                    what="five entries sent past the last ack",
                )
                high = Ack(node=NODE, seq=2**62, ts=time.time())
                ack_topic = topics.ack(fleet_id, NODE)
                forged = [
                    encode(high),  # unsigned, as acks were
                    sign_ack(high, SigningKey.generate()),  # a key nobody trusts
                    sign_ack(high.model_copy(update={"node": "other"}), harness.rollout),
                    sign_envelope(encode(high), PAYLOAD_COMMAND, [harness.rollout]).to_bytes(),
                ]
                for data in forged:
                    await harness.publish(ack_topic, data)
                await poll_until(
                    lambda: node.agent.stats()["refused_acks"] == len(forged),
                    what="every forged ack refused",
                )
                # Genuine acks still in flight free at most up to the last one published;
                # everything above it is still held.
                stats = node.agent.outbox_stats()
                assert stats.depth >= stats.last_seq - harness.acked[NODE] >= 5
                # The positive control: the controller's own signature frees what was sent.
                await harness.publish(ack_topic, sign_ack(high, harness.rollout))
                await poll_until(
                    lambda: node.agent.outbox_stats().depth < stats.depth,
                    what="a signed ack to free entries",
                )

    asyncio.run(scenario())


# ----- a node restart keeps unacknowledged results ------------------------------


def test_node_restart_resends_unacknowledged_results(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="synthetic", rate_hz=100.0)
            async with RunningNode(config, transport=harness.transport) as first:
                await deploy_and_wait(harness, NODE, model, "r1")
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
            async with RunningNode(config, transport=harness.transport) as second:
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
