"""What every supported database must do: ``check_*`` functions taking any open
:class:`Store`, listed in :data:`CORE_CHECKS`.

tests/unit/fleet_controller/store/test_store.py runs them on SQLite and
tests/integration/test_store_postgres.py on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from fleet_controller.rollout_core import HealthSample, NodeProgress, RolloutRecord
from fleet_controller.store import (
    AuditInfo,
    DeploymentInfo,
    DuplicateModelError,
    DuplicateRolloutError,
    LeaseLostError,
    NodeInfo,
    PendingStatus,
    RolloutInfo,
    RolloutReader,
    Store,
    StoreError,
    UnknownNodeError,
    UnknownRolloutError,
)
from shared.labels import parse_selector
from shared.messages import (
    NodeRolloutState,
    RolloutState,
)
from shared.operations import RolloutPolicy
from shared.result_batch import batch_of
from tests.unit.fleet_controller.store.store_kit import (
    NOW,
    REF1,
    REF2,
    SHA1,
    SHA2,
    N,
    batch,
    health_sample,
    manifest,
    record,
    result,
    state,
    status,
    telemetry,
)

# ----- core checks (SQLite here, PostgreSQL in tests/integration) -------------------------


def check_command_seq_increments(store: Store) -> None:
    assert [store.next_command_seq() for _ in range(3)] == [1, 2, 3]


def check_results_stored_once(store: Store) -> None:
    assert store.ingest.write([], [batch("n1", 1, range(1, 4))], [], NOW) == {"n1": 1}
    # The same slot again (lost ack), and a new slot repeating result 3.
    assert store.ingest.write([], [batch("n1", 1, range(1, 4))], [], NOW + 1) == {"n1": 1}
    assert store.ingest.write([], [batch("n1", 2, [3, 4])], [], NOW + 2) == {"n1": 2}
    # Twice within one call.
    again = batch("n1", 3, [5])
    assert store.ingest.write([], [again, again], [], NOW + 3) == {"n1": 3}
    results = store.results.list("n1")
    assert sorted(r.seq for r in results) == [1, 2, 3, 4, 5]
    first = next(r for r in results if r.seq == 1)
    assert first.model == REF1
    assert first.topk == result(1).topk
    assert first.tensors == result(1).tensors
    assert first.source == "camera0"
    assert first.to_dict()["model"] == REF1.model_dump()
    assert store.results.table_counts()["results"] == 5
    assert store.results.list("nobody") == []
    assert len(store.results.list(limit=2)) == 2


def check_statuses_stored_once(store: Store) -> None:
    assert store.ingest.write([status("n1", 1), status("n1", 1)], [], [], NOW) == {"n1": 1}
    assert store.ingest.write([status("n1", 1)], [], [], NOW) == {"n1": 1}
    assert store.results.table_counts()["statuses"] == 1


def check_contiguous_ack_with_out_of_order_slots(store: Store) -> None:
    assert store.ingest.write([], [batch("n1", 1, [1]), batch("n1", 2, [2])], [], NOW) == {"n1": 2}
    assert store.ingest.write([], [batch("n1", 4, [4])], [], NOW) == {}  # slot 3 is missing
    assert store.results.table_counts()["stored_slots"] == 1
    # Slot 3 is a status: statuses and results share the outbox sequence.
    assert store.ingest.write([status("n1", 3)], [], [], NOW) == {"n1": 4}
    assert store.results.table_counts()["stored_slots"] == 0
    node = store.nodes.get("n1")
    assert node is not None
    assert node.acked_seq == 4
    # Another node's slots are counted separately.
    assert store.ingest.write([status("n2", 2)], [batch("n1", 5, [5])], [], NOW) == {"n1": 5}
    assert store.ingest.write([status("n2", 1)], [], [], NOW) == {"n2": 2}


def check_unknown_nodes_are_created_offline(store: Store) -> None:
    store.ingest.write([], [], [telemetry("t1", NOW)], NOW + 5)
    node = store.nodes.get("t1")
    assert node is not None
    assert (node.online, node.session, node.acked_seq, node.last_seen) == (False, 0, 0, NOW + 5)
    assert node.labels == {}
    assert node.model is None


def check_stale_death_is_ignored(store: Store) -> None:
    assert store.nodes.apply_state(state("n1", online=True, session=2, labels={"a": "b"}), NOW)
    assert not store.nodes.apply_state(state("n1", online=False, session=1), NOW + 1)
    node = store.nodes.get("n1")
    assert node is not None
    assert node.online
    assert node.session == 2
    assert node.last_seen == NOW
    assert node.labels == {"a": "b"}
    assert node.model == REF1
    assert node.previous_model == REF2
    assert node.capabilities is not None
    assert node.capabilities.cpus == 4
    assert node.agent_version == "0.1.0"
    # A death of the same session marks it offline and keeps what the birth said.
    death = state("n1", online=False, session=2, model=None, ts=NOW + 2)
    assert store.nodes.apply_state(death, NOW + 2)
    node = store.nodes.get("n1")
    assert node is not None
    assert (node.online, node.session, node.last_seen, node.model) == (False, 2, NOW + 2, REF1)
    # A newer birth updates everything, a birth without a model clears it.
    assert store.nodes.apply_state(state("n1", online=True, session=3, model=None), NOW + 3)
    node = store.nodes.get("n1")
    assert node is not None
    assert (node.online, node.session, node.model, node.labels) == (True, 3, None, {})
    # A death of an unknown node creates it offline.
    assert store.nodes.apply_state(state("n9", online=False, session=7), NOW)
    gone = store.nodes.get("n9")
    assert gone is not None
    assert (gone.online, gone.session) == (False, 7)


def check_retained_states_keep_their_own_time_and_version(store: Store) -> None:
    """A controller starting now reads births and deaths retained long ago: the nodes
    were last seen when those were sent, not now, and say which agent they run."""
    born = state("b1", online=True, session=4, ts=NOW - 3600, agent_version="1.2.3")
    died = state("d1", online=False, session=2, ts=NOW - 7200, agent_version="1.2.0")
    assert store.nodes.apply_state(born, NOW)
    assert store.nodes.apply_state(died, NOW)
    b1, d1 = store.nodes.get("b1"), store.nodes.get("d1")
    assert b1 is not None
    assert d1 is not None
    assert (b1.online, b1.agent_version, b1.last_seen) == (True, "1.2.3", NOW - 3600)
    assert (d1.online, d1.agent_version, d1.last_seen) == (False, "1.2.0", NOW - 7200)
    # A node's clock ahead of ours counts as now; last_seen never goes back.
    assert store.nodes.apply_state(state("b1", online=True, session=5, ts=NOW + 60), NOW)
    assert store.nodes.apply_state(state("b1", online=False, session=5, ts=NOW - 60), NOW + 1)
    b1 = store.nodes.get("b1")
    assert b1 is not None
    assert (b1.online, b1.last_seen) == (False, NOW)
    # A death that names no agent version keeps the one the birth gave.
    assert store.nodes.apply_state(state("d1", online=False, session=2, agent_version=""), NOW)
    d1 = store.nodes.get("d1")
    assert d1 is not None
    assert (d1.agent_version, d1.last_seen) == ("1.2.0", NOW)


def check_nodes_selector_revoke_touch(store: Store) -> None:
    store.nodes.apply_state(state("a", online=True, session=1, labels={"site": "x"}), NOW)
    store.nodes.apply_state(
        state("b", online=True, session=1, labels={"site": "x", "tier": "1"}), NOW
    )
    store.nodes.apply_state(state("c", online=True, session=1, labels={"site": "y"}), NOW)
    assert [n.node_id for n in store.nodes.list()] == ["a", "b", "c"]
    assert [n.node_id for n in store.nodes.list(parse_selector("site=x"))] == ["a", "b"]
    assert [n.node_id for n in store.nodes.list(parse_selector("site=x,tier=1"))] == ["b"]
    assert store.nodes.list(parse_selector("site=z")) == []
    assert [n.node_id for n in store.nodes.list(parse_selector("site notin (x)"))] == ["c"]
    store.nodes.set_revoked("b", revoked=True)
    assert [n.node_id for n in store.nodes.list() if n.revoked] == ["b"]
    # A later birth keeps the revocation and the ack position.
    store.nodes.apply_state(state("b", online=True, session=2), NOW)
    b = store.nodes.get("b")
    assert b is not None
    assert b.revoked
    store.nodes.set_revoked("b", revoked=False)
    store.nodes.set_revoked("new", revoked=True)
    new = store.nodes.get("new")
    assert new is not None
    assert new.revoked
    assert not new.online
    store.nodes.touch("a", NOW + 50)
    store.nodes.touch("a", NOW + 10)  # last_seen never goes back
    a = store.nodes.get("a")
    assert a is not None
    assert a.last_seen == NOW + 50
    assert store.nodes.get("nobody") is None
    assert isinstance(a, NodeInfo)
    assert a.to_dict()["labels"] == {"site": "x"}


def check_models(store: Store) -> None:
    added = store.models.add(manifest("1.10.0"), '{"env":1}', "alice", NOW)
    assert (added.name, added.version, added.sha256, added.size) == ("det", "1.10.0", SHA1, 1234)
    assert added.manifest == manifest("1.10.0")
    assert added.envelope == '{"env":1}'
    with pytest.raises(DuplicateModelError, match=r"det@1\.10\.0"):
        store.models.add(manifest("1.10.0", SHA2), "{}", "bob", NOW)
    store.models.add(manifest("1.9.0", SHA2), "{}", "bob", NOW + 1)
    store.models.add(manifest("1.10.0-rc.1", "c3" * 32), "{}", "bob", NOW + 2)
    store.models.add(manifest("0.1.0", "d4" * 32, name="alpha"), "{}", "bob", NOW + 3)
    listed = [(m.name, m.version) for m in store.models.list()]
    assert listed == [
        ("alpha", "0.1.0"),
        ("det", "1.9.0"),
        ("det", "1.10.0-rc.1"),
        ("det", "1.10.0"),
    ]
    got = store.models.get("det", "1.9.0")
    assert got is not None
    assert got.sha256 == SHA2
    assert got.added_by == "bob"
    assert store.models.get("det", "9.9.9") is None
    by_sha = store.models.by_sha(SHA1)
    assert by_sha is not None
    assert by_sha.version == "1.10.0"
    assert store.models.by_sha("ee" * 32) is None
    assert "envelope" not in added.to_dict()


def check_rollout_round_trip_and_events(store: Store) -> None:
    first = record()
    info = store.rollouts.create(first, "alice", NOW)
    assert isinstance(info, RolloutInfo)
    assert (info.rollout_id, info.state, info.model, info.created_by) == (
        "r1",
        RolloutState.PENDING,
        REF2,
        "alice",
    )
    with pytest.raises(DuplicateRolloutError):
        store.rollouts.create(first, "alice", NOW)
    assert store.rollouts.load("r1") == first
    assert store.rollouts.load("nope") is None
    running = record(
        {
            "a": NodeProgress(node_id="a", wave=0, sent_at=NOW, from_model=REF1, runs=10),
            "b": NodeProgress(node_id="b", wave=1, sent_at=NOW),
        },
        state=RolloutState.RUNNING,
        wave_started_at=NOW,
    )
    store.rollouts.save(running, NOW + 1)
    assert store.rollouts.load("r1") == running
    # a: progress; b: only its reason changes (a row update, no event).
    later = replace(
        running,
        nodes={
            "a": replace(running.nodes["a"], state=N.DOWNLOADING),
            "b": replace(running.nodes["b"], reason="waiting"),
        },
    )
    store.rollouts.save(later, NOW + 2)
    store.rollouts.save(later, NOW + 3)  # nothing changed: no events
    failed = replace(
        later,
        nodes={**later.nodes, "a": replace(later.nodes["a"], state=N.FAILED, code="model_invalid")},
        state=RolloutState.FAILED,
        reason="1 of 2 nodes failed",
    )
    store.rollouts.save(failed, NOW + 4)
    assert store.rollouts.load("r1") == failed
    events = [(e.node_id, e.state, e.code, e.ts) for e in store.rollouts.events("r1")]
    assert events == [
        ("a", N.QUEUED, None, NOW + 1),
        ("b", N.QUEUED, None, NOW + 1),
        ("a", N.DOWNLOADING, None, NOW + 2),
        ("a", N.FAILED, "model_invalid", NOW + 4),
    ]
    assert store.rollouts.events("nope") == []
    [info] = store.rollouts.list()
    assert (info.state, info.reason, info.updated_at) == (
        RolloutState.FAILED,
        "1 of 2 nodes failed",
        NOW + 4,
    )
    assert dict(info.node_counts) == {"failed": 1, "queued": 1}
    assert store.rollouts.list(active_only=True) == []
    store.rollouts.create(
        replace(first, spec=replace(first.spec, rollout_id="r2")), "bob", NOW + 10
    )
    assert [i.rollout_id for i in store.rollouts.list()] == ["r1", "r2"]
    assert [i.rollout_id for i in store.rollouts.list(active_only=True)] == ["r2"]
    with pytest.raises(UnknownRolloutError):
        store.rollouts.save(replace(first, spec=replace(first.spec, rollout_id="r3")), NOW)


def check_audit_newest_first(store: Store) -> None:
    store.audit.append(
        "alice", "rollout.start", {"model": "det@1.0.0", "waves": [1, 100]}, "ok", None, NOW
    )
    store.audit.append(
        "bob", "rollout.abort", {"rollout_id": "r1"}, "failed", "no such rollout", NOW + 2
    )
    store.audit.append("carol", "node.revoke", {"node": "n1", "odd": {1, 2}}, "ok", None, NOW + 1)
    entries = store.audit.list()
    assert [e.operator for e in entries] == ["bob", "carol", "alice"]
    assert isinstance(entries[0], AuditInfo)
    assert entries[0].detail == "no such rollout"
    assert entries[2].args == {"model": "det@1.0.0", "waves": [1, 100]}
    assert entries[1].args["odd"] == "{1, 2}"  # not JSON: stored as text
    assert [e.operator for e in store.audit.list(limit=1)] == ["bob"]


def check_prune(store: Store) -> None:
    store.ingest.write(
        [],
        [batch("n1", 1, [1, 2], ts=NOW - 100), batch("n1", 2, [3], ts=NOW)],
        [telemetry("n1", NOW - 100), telemetry("n1", NOW - 50), telemetry("n1", NOW)],
        NOW,
    )
    assert store.results.prune(NOW - 60, NOW - 10) == (1, 2)
    assert store.results.prune(NOW - 60, NOW - 10) == (0, 0)
    assert [r.seq for r in store.results.list("n1")] == [3]
    # A re-sent pruned slot does not bring its results back.
    assert store.ingest.write([], [batch("n1", 1, [1, 2], ts=NOW - 100)], [], NOW) == {"n1": 2}
    assert [r.seq for r in store.results.list("n1")] == [3]


def check_samples(store: Store) -> None:
    store.ingest.write(
        [],
        [],
        [
            telemetry("n1", NOW + 2, inferences=300, errors=3, p95=9.0),
            telemetry("n1", NOW, inferences=100, errors=1),
            telemetry("n2", NOW - 10),
            telemetry("n3", NOW + 1),
        ],
        NOW,
    )
    found = store.ingest.samples(["n1", "n2", "quiet"], NOW)
    assert found == {
        "n1": [health_sample(NOW), health_sample(NOW + 2, inferences=300, errors=3, p95=9.0)],
        "n2": [],
        "quiet": [],
    }
    assert store.ingest.samples([], NOW) == {}


def check_report(store: Store) -> None:
    store.ingest.write(
        [],
        [
            batch_of("n1", 1, [result(1, corner=True), result(2), result(3, model=REF2)]),
            batch("n2", 1, [1]),
        ],
        [],
        NOW,
    )
    report = store.results.report()
    assert report["totals"]["results"] == 4
    assert report["totals"]["corner_cases"] == 1
    assert report["nodes"] == [
        {"node_id": "n1", "results": 3, "corner_cases": 1, "mean_latency_ms": 3.0},
        {"node_id": "n2", "results": 1, "corner_cases": 0, "mean_latency_ms": 3.0},
    ]
    assert [(m["version"], m["results"]) for m in report["models"]] == [("1.0.0", 3), ("1.1.0", 1)]


def check_step_rollout_folds_each_stored_status_once(store: Store) -> None:
    """Statuses reach the rollout only up to the node's contiguous slot, exactly once."""
    store.rollouts.create(record({"n1": NodeProgress(node_id="n1", wave=0)}), "op", NOW)
    store.ingest.write([status("n1", 1), status("n1", 3, N.ACTIVATED)], [], [], NOW)
    seen: list[list[tuple[int, NodeRolloutState]]] = []

    def fold(
        current: RolloutRecord, pending: list[PendingStatus], _reader: RolloutReader
    ) -> tuple[RolloutRecord, int]:
        seen.append([(p.seq, p.state) for p in pending])
        return replace(current, reason=f"step {len(seen)}"), len(pending)

    assert store.rollouts.step("r1", fold, NOW)[1] == 1  # slot 3 waits for slot 2
    store.ingest.write([status("n1", 2)], [], [], NOW + 1)
    assert store.rollouts.step("r1", fold, NOW + 1)[1] == 2
    assert store.rollouts.step("r1", fold, NOW + 2)[1] == 0
    assert seen == [[(1, N.DOWNLOADING)], [(2, N.DOWNLOADING), (3, N.ACTIVATED)], []]
    loaded = store.rollouts.load("r1")
    assert loaded is not None
    assert loaded.reason == "step 3"


def check_step_reads_nodes_and_samples_in_its_transaction(store: Store) -> None:
    """``decide`` gets the stored record once, with a reader on the same transaction."""
    store.rollouts.create(record(), "op", NOW)
    store.nodes.apply_state(state("a", online=True, session=1, labels={"site": "a"}), NOW)
    store.nodes.apply_state(state("b", online=True, session=1, labels={"site": "b"}), NOW)
    store.ingest.write([], [], [telemetry("a", NOW - 10), telemetry("a", NOW + 1)], NOW)

    def decide(
        current: RolloutRecord, pending: list[PendingStatus], reader: RolloutReader
    ) -> tuple[RolloutRecord, dict[str, list[HealthSample]]]:
        nodes = reader.nodes(current.spec.selector)
        assert [n.node_id for n in nodes] == ["a"]
        return current, reader.samples([n.node_id for n in nodes], NOW)

    new, samples = store.rollouts.step("r1", decide, NOW + 2)
    assert new == record()
    assert samples == {"a": [health_sample(NOW + 1)]}
    assert store.rollouts.events("r1") == []  # an unchanged record is not saved again
    with pytest.raises(UnknownRolloutError, match="unknown rollout r9"):
        store.rollouts.step("r9", decide, NOW)


def check_birth_floor_settles_slots_a_wiped_node_no_longer_has(store: Store) -> None:
    """A node that comes back with a new outbox numbers from its clock; its birth's
    floor tells the controller that every lower slot is settled."""
    assert store.ingest.write([status("n1", 1), status("n1", 2)], [], [], NOW) == {"n1": 2}
    store.ingest.write([status("n1", 5)], [], [], NOW)  # stored above a gap
    wiped = state("n1", online=True, session=1).model_copy(update={"outbox_floor": 1_000})
    assert store.nodes.apply_state(wiped, NOW + 1)
    node = store.nodes.get("n1")
    assert node is not None
    assert node.acked_seq == 999
    assert store.ingest.write([status("n1", 1_000)], [], [], NOW + 2) == {"n1": 1_000}
    lower = state("n1", online=True, session=2).model_copy(update={"outbox_floor": 10})
    store.nodes.apply_state(lower, NOW + 3)  # a floor never lowers the mark
    node = store.nodes.get("n1")
    assert node is not None
    assert node.acked_seq == 1_000


def check_operators_labels_and_forget(store: Store) -> None:
    store.nodes.apply_state(
        state("a", online=True, session=1, labels={"site": "x", "gpu": "1"}), NOW
    )
    node = store.nodes.set_labels("a", {"site": "y", "gpu": None, "tier": "gold"})
    assert (dict(node.labels), dict(node.announced)) == (
        {"site": "y", "tier": "gold"},
        {"site": "x", "gpu": "1"},
    )
    assert [n.node_id for n in store.nodes.list(parse_selector("site=y,!gpu"))] == ["a"]
    assert store.nodes.list(parse_selector("site=x")) == []
    # A birth replaces the announced labels, never the operators'.
    store.nodes.apply_state(state("a", online=True, session=2, labels={"site": "z"}), NOW + 1)
    node = store.nodes.set_labels("a", {"site": False})
    assert dict(node.labels) == {"site": "z", "tier": "gold"}
    stored = store.nodes.get("a")
    assert stored is not None
    assert stored.to_dict()["central_labels"] == {"gpu": None, "tier": "gold"}
    with pytest.raises(UnknownNodeError, match="unknown node nobody"):
        store.nodes.set_labels("nobody", {"k": "v"})
    with pytest.raises(StoreError, match="node a is online"):
        store.nodes.forget("a")
    store.nodes.apply_state(state("a", online=False, session=2), NOW + 2)
    assert store.nodes.forget("a").node_id == "a"
    assert store.nodes.get("a") is None
    with pytest.raises(UnknownNodeError):
        store.nodes.forget("a")


def check_deployments(store: Store) -> None:
    policy = RolloutPolicy(waves=(50.0, 100.0))
    info = DeploymentInfo(
        name="cams",
        selector=parse_selector("site=a"),
        model=REF1,
        policy=policy,
        created_by="alice",
        created_at=NOW,
        updated_at=NOW,
    )
    assert store.deployments.put(info) == info
    assert store.deployments.get("cams") == info
    assert store.deployments.hold("cams", SHA1, {"n1": "rejected"}, now=NOW + 1)
    assert not store.deployments.hold("cams", SHA2, {"n2": "x"}, now=NOW + 1)  # not its target
    assert store.deployments.claim(info, "r1", now=NOW + 2)
    assert not store.deployments.claim(info, "r2", now=NOW + 2)  # lost the race
    moved_away = replace(info, rollout_id="r1", selector=parse_selector("site=b"))
    assert not store.deployments.claim(moved_away, "r2", now=NOW + 2)  # not what it read
    got = store.deployments.get("cams")
    assert got is not None
    assert (got.rollout_id, dict(got.held)) == ("r1", {"n1": "rejected"})
    # The same target keeps what is held; a new one empties it and keeps the creator.
    later = replace(info, policy=RolloutPolicy(), created_by="bob", updated_at=NOW + 3)
    assert dict(store.deployments.put(later).held) == {"n1": "rejected"}
    moved = store.deployments.put(replace(later, model=REF2))
    assert (dict(moved.held), moved.created_by, moved.policy) == ({}, "alice", RolloutPolicy())
    assert [d.name for d in store.deployments.list()] == ["cams"]
    assert store.deployments.delete("cams")
    assert not store.deployments.delete("cams")
    assert store.deployments.get("cams") is None


def check_lease_terms(store: Store) -> None:
    """One holder at a time; a renewal keeps the term, a takeover after expiry starts one."""
    first = store.leases.acquire("rollouts", "a", 60.0)
    assert (first.holder, first.token) == ("a", 1)
    assert first.held_by("a")
    other = store.leases.acquire("rollouts", "b", 60.0)
    assert (other.holder, other.token) == ("a", 1)  # a holds it: b waits
    assert not other.held_by("b")
    assert 0 < other.remaining_s <= 60.0
    assert store.leases.acquire("rollouts", "a", 60.0).token == 1  # renewed, same term
    assert store.leases.release(first.fence)
    assert not store.leases.release(first.fence)  # over already: nothing to end
    taken = store.leases.acquire("rollouts", "b", 60.0)
    assert (taken.holder, taken.token) == ("b", 2)
    back = store.leases.acquire("rollouts", "a", 60.0)
    assert (back.holder, back.token) == ("b", 2)
    current = store.leases.get("rollouts")
    assert current is not None
    assert (current.holder, current.token) == ("b", 2)
    assert store.leases.get("other") is None
    with pytest.raises(StoreError, match="positive"):
        store.leases.acquire("rollouts", "a", 0.0)


def check_fenced_steps(store: Store) -> None:
    """A step under a term that is over writes nothing; an operator's step needs no term."""
    store.rollouts.create(record(), "op", NOW)
    old = store.leases.acquire("rollouts", "a", 60.0).fence
    paused = replace(record(), state=RolloutState.PAUSED)
    store.rollouts.step("r1", lambda r, _p, _rd: (replace(r, wave=1), None), NOW, fence=old)
    assert store.rollouts.load("r1") == replace(record(), wave=1)
    store.leases.release(old)  # a released (or expired) term is over...
    with pytest.raises(LeaseLostError, match="expired"):
        store.rollouts.step("r1", lambda r, _p, _rd: (paused, None), NOW, fence=old)
    new = store.leases.acquire("rollouts", "b", 60.0).fence
    assert new.token == old.token + 1
    with pytest.raises(LeaseLostError, match="is over; b"):  # ...and so is one taken over
        store.rollouts.step("r1", lambda r, _p, _rd: (paused, None), NOW, fence=old)
    with pytest.raises(LeaseLostError):
        store.rollouts.force_state("r1", RolloutState.FAILED, "x", NOW, fence=old)
    assert store.rollouts.load("r1") == replace(record(), wave=1)  # untouched
    store.rollouts.step("r1", lambda r, _p, _rd: (paused, None), NOW)  # an operator's step
    store.rollouts.step("r1", lambda r, _p, _rd: (r, None), NOW, fence=new)
    loaded = store.rollouts.load("r1")
    assert loaded is not None
    assert loaded.state is RolloutState.PAUSED


def check_blob_dir_claim(store: Store) -> None:
    """The first blob directory recorded stays the store's."""
    assert store.claim_blob_dir("d1") == "d1"
    assert store.claim_blob_dir("d2") == "d1"


CORE_CHECKS: list[Callable[[Store], None]] = [
    check_lease_terms,
    check_fenced_steps,
    check_blob_dir_claim,
    check_operators_labels_and_forget,
    check_deployments,
    check_birth_floor_settles_slots_a_wiped_node_no_longer_has,
    check_step_rollout_folds_each_stored_status_once,
    check_step_reads_nodes_and_samples_in_its_transaction,
    check_command_seq_increments,
    check_results_stored_once,
    check_statuses_stored_once,
    check_contiguous_ack_with_out_of_order_slots,
    check_unknown_nodes_are_created_offline,
    check_stale_death_is_ignored,
    check_retained_states_keep_their_own_time_and_version,
    check_nodes_selector_revoke_touch,
    check_models,
    check_rollout_round_trip_and_events,
    check_audit_newest_first,
    check_prune,
    check_samples,
    check_report,
]
