"""Ingest (fleet_controller.ingest) driven by fake nodes on the in-memory broker.

A fake node publishes what an agent publishes and reads its acks; each ack is
the sign that what came before it was committed, so the tests wait on acks,
never on time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet_controller.quotas import BURST_S
from fleet_controller.store import Store, StoreError
from shared import topics
from shared.messages import NodeRolloutState, NodeStatus, encode
from tests.unit.fleet_controller.kit import FLEET, controller, eventually, result_batch, run

N = NodeRolloutState


def stored(store: Store) -> dict[str, int]:
    return store.results.table_counts()


def result_seqs(store: Store, node: str) -> list[int]:
    return sorted(r.seq for r in store.results.list(node))


def test_each_slot_is_stored_once_and_acked_after_commit(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            await node.results(1, [1, 2, 3])
            assert await node.next_ack() == 1
            assert result_seqs(ctl.store, "n1") == [1, 2, 3]  # committed before the ack
            # The same slot again (its ack was lost): skipped, acked again.
            await node.results(1, [1, 2, 3])
            assert await node.next_ack() == 1
            # A new slot repeating result 3.
            await node.results(2, [3, 4])
            assert await node.next_ack() == 2
            # A status is a slot too, stored once.
            await node.status(3, N.DOWNLOADING)
            assert await node.next_ack() == 3
            await node.status(3, N.DOWNLOADING)
            assert await node.next_ack() == 3
            assert result_seqs(ctl.store, "n1") == [1, 2, 3, 4]
            counts = stored(ctl.store)
            assert (counts["results"], counts["statuses"]) == (4, 1)
            node_info = ctl.store.nodes.get("n1")
            assert node_info is not None
            assert node_info.acked_seq == 3

    run(scenario)


def test_the_ack_is_the_contiguous_mark(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            await node.results(1, [1])
            assert await node.next_ack() == 1
            await node.results(3, [3])  # slot 2 is missing: stored, held, not acked
            await node.results(1, [1])  # a re-send, re-acked at the mark
            assert await node.next_ack() == 1
            assert stored(ctl.store)["stored_slots"] == 1
            # Slot 2 is a status: statuses and results share the outbox sequence.
            await node.status(2, N.QUEUED)
            assert await node.next_ack() == 3
            assert stored(ctl.store)["stored_slots"] == 0
            assert result_seqs(ctl.store, "n1") == [1, 3]

    run(scenario)


def test_a_birth_outbox_floor_settles_the_slots_below_it(tmp_path: Path, keys: Path) -> None:
    """A wiped node numbers its outbox from its clock; its birth says where it starts."""

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            await node.birth(session=1)
            await node.results(1, [1])
            assert await node.next_ack() == 1
            await node.birth(session=1, outbox_floor=1_000)
            await node.results(1_000, [1_000])
            assert await node.next_ack() == 1_000  # nothing below 1000 is awaited
            await node.results(500, [500])  # below the mark: settled, acked again
            assert await node.next_ack() == 1_000
            await node.birth(session=2, outbox_floor=10)  # a floor never lowers the mark
            await node.results(1_001, [1_001])
            assert await node.next_ack() == 1_001
            assert result_seqs(ctl.store, "n1") == [1, 1_000, 1_001]
            info = ctl.store.nodes.get("n1")
            assert info is not None
            assert (info.online, info.session, info.acked_seq) == (True, 2, 1_001)

    run(scenario)


def test_telemetry_and_births_are_stored(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            await node.birth(labels={"site": "berlin"})
            await node.telemetry(inferences=42)
            await node.results(1, [1])
            assert await node.next_ack() == 1  # queued after the birth and telemetry
            info = ctl.store.nodes.get("n1")
            assert info is not None
            assert (info.online, dict(info.labels)) == (True, {"site": "berlin"})
            assert stored(ctl.store)["telemetry"] == 1

    run(scenario)


def test_a_message_naming_another_node_than_its_topic_is_dropped(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            spoof = NodeStatus(
                node="n2", seq=1, command_id="c1", rollout_id="r1", state=N.QUEUED, ts=ctl.clock()
            )
            await node.link.publish(topics.status(FLEET, "n1"), encode(spoof))
            await node.results(1, [1])
            assert await node.next_ack() == 1
            assert ctl.store.nodes.get("n2") is None
            assert ctl.service.metrics["malformed"] == 1

    run(scenario)


def test_a_poison_message_does_not_block_the_rest_of_its_batch(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            write = ctl.store.ingest.write
            poisoned = [True]

            def fragile(statuses: Any, batches: Any, telemetry: Any, now: float) -> Any:
                if poisoned[0] and any("poison" in b.source for b in batches):
                    raise ValueError("cannot store this")
                return write(statuses, batches, telemetry, now)

            monkeypatch.setattr(ctl.store.ingest, "write", fragile)
            async with ctl.node("bad") as bad, ctl.node("good") as good:
                # One batch: it fails as a whole, then is stored one by one.
                await ctl.service.ingest.store(
                    [
                        result_batch("bad", 1, [1], source="poison"),
                        result_batch("good", 1, [1]),
                        result_batch("bad", 2, [2]),
                    ]
                )
                assert ctl.service.metrics["ingest_failed"] == 1
                assert await good.next_ack() == 1
                assert result_seqs(ctl.store, "good") == [1]
                assert result_seqs(ctl.store, "bad") == [2]  # stored, held above the gap
                # The same over the broker: the poison is not acked, the rest is.
                await bad.results(3, [3], source="poison")
                await good.results(2, [2])
                assert await good.next_ack() == 2
                await eventually(
                    "the poison message is counted again",
                    lambda: ctl.service.metrics["ingest_failed"] == 2,
                )
                # The node re-sends what was never acked; once it stores, the mark moves.
                poisoned[0] = False
                await bad.results(1, [1], source="poison")
                assert await bad.next_ack() == 2
                await bad.results(3, [3], source="poison")
                assert await bad.next_ack() == 3
                assert result_seqs(ctl.store, "bad") == [1, 2, 3]
            async with ctl.operator() as op:
                assert await op.call("nodes.list")  # the controller is alive

    run(scenario)


def test_a_store_error_drops_the_batch_unacked_and_the_resend_is_stored(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.node("n1") as node:
            write = ctl.store.ingest.write
            down = [True]

            def flaky(*args: Any) -> Any:
                if down[0]:
                    down[0] = False
                    raise StoreError("database is away")
                return write(*args)

            monkeypatch.setattr(ctl.store.ingest, "write", flaky)
            await node.results(1, [1])
            await eventually("the write was tried", lambda: not down[0])
            await node.results(1, [1])  # the node re-sends after its resend timeout
            assert await node.next_ack() == 1
            assert result_seqs(ctl.store, "n1") == [1]

    run(scenario)


def test_a_retried_batch_is_decoded_and_charged_to_its_quota_once(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node may send one result (a burst of one): a retry after a failed
    # transaction must not charge it again and refuse what it already admitted.
    async def scenario() -> None:
        async with controller(tmp_path, keys, node_results_per_s=1.0 / BURST_S) as ctl:
            write = ctl.store.ingest.write
            failures = [1]

            def flaky(statuses: Any, batches: Any, telemetry: Any, now: float) -> Any:
                if failures[0]:
                    failures[0] -= 1
                    raise ValueError("the first transaction fails")
                return write(statuses, batches, telemetry, now)

            monkeypatch.setattr(ctl.store.ingest, "write", flaky)
            async with ctl.node("n1") as node:
                await ctl.service.ingest.store([result_batch("n1", 1, [1])])
                assert await node.next_ack() == 1
            metrics = ctl.service.metrics
            assert metrics["quota_refused_results"] == 0
            assert metrics["stored"] == 1
            assert result_seqs(ctl.store, "n1") == [1]

    run(scenario)
