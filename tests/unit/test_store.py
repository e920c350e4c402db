"""The controller's store (fleet_controller.store) against real SQLite files.

The ``check_*`` functions take any open :class:`Store` and are listed in
``CORE_CHECKS``: this module runs them on SQLite, and
``tests/integration/test_store_postgres.py`` runs the same ones on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleet_controller.rollout_core import HealthSample, NodeProgress, RolloutRecord, RolloutSpec
from fleet_controller.store import (
    SCHEMA_VERSION,
    AuditInfo,
    DuplicateModelError,
    DuplicateRolloutError,
    NodeInfo,
    PendingStatus,
    RolloutInfo,
    RolloutReader,
    Store,
    StoreError,
    UnknownRolloutError,
)
from shared.errors import EdgeFleetError
from shared.messages import (
    Capabilities,
    InferenceResult,
    LatencyStats,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    ResultBatch,
    RolloutState,
    Telemetry,
    TensorData,
    TensorSpec,
    TopK,
)

NOW = 1_700_000_000.0  # UNIX seconds: every call gets this explicit clock (or an offset)
SHA1 = "a1" * 32
SHA2 = "b2" * 32
REF1 = ModelRef(name="det", version="1.0.0", sha256=SHA1)
REF2 = ModelRef(name="det", version="1.1.0", sha256=SHA2)
N = NodeRolloutState


# ----- message builders ----------------------------------------------------------------


def result(
    seq: int, *, ts: float = NOW, corner: bool = False, model: ModelRef = REF1
) -> InferenceResult:
    return InferenceResult(
        seq=seq,
        model=model,
        input_digest=f"{seq:016x}",
        latency_ms=2.0 + seq % 3,
        ts=ts,
        topk=(TopK(index=1, label="cat", score=0.9), TopK(index=0, label=None, score=0.1)),
        tensors=(TensorData(name="probs", shape=(2,), data=(0.1, 0.9)),) if seq % 2 else None,
        corner_case=corner,
        source="camera0",
    )


def batch(node: str, slot: int, seqs: range | list[int], *, ts: float = NOW) -> ResultBatch:
    return ResultBatch(node=node, seq=slot, results=tuple(result(s, ts=ts) for s in seqs))


def status(node: str, slot: int, state: NodeRolloutState = N.DOWNLOADING) -> NodeStatus:
    return NodeStatus(
        node=node,
        seq=slot,
        command_id="c1",
        rollout_id="r1",
        state=state,
        progress=50.0,
        ts=NOW,
    )


def telemetry(
    node: str, ts: float, *, inferences: int = 100, errors: int = 1, p95: float = 7.5
) -> Telemetry:
    return Telemetry(
        node=node,
        ts=ts,
        uptime_s=60.0,
        inferences=inferences,
        errors=errors,
        skips=2,
        queue_depth=0,
        outbox_depth=3,
        latency=LatencyStats(p50_ms=3.0, p95_ms=p95, p99_ms=9.0),
        cpu_percent=12.5,
        memory_bytes=2**33,
        model=REF1,
    )


def state(
    node: str,
    *,
    online: bool,
    session: int,
    labels: dict[str, str] | None = None,
    model: ModelRef | None = REF1,
) -> NodeState:
    return NodeState(
        node=node,
        online=online,
        session=session,
        agent_version="0.1.0",
        model=model,
        previous_model=REF2 if model is not None else None,
        labels=labels or {},
        capabilities=Capabilities(
            providers=("CPUExecutionProvider",), cpus=4, memory_bytes=2**32, disk_free_bytes=2**34
        ),
        ts=NOW,
    )


def manifest(version: str, sha: str = SHA1, name: str = "det") -> ModelManifest:
    spec = TensorSpec(name="input", dtype="float32", shape=("N", 8))
    return ModelManifest(
        name=name,
        version=version,
        sha256=sha,
        size=1234,
        inputs=(spec,),
        outputs=(TensorSpec(name="probs", dtype="float32", shape=("N", 4)),),
        created_at=NOW,
    )


def record(nodes: dict[str, NodeProgress] | None = None, **changes: object) -> RolloutRecord:
    spec = RolloutSpec(rollout_id="r1", model=REF2, selector={"site": "a"})
    base = RolloutRecord(spec=spec, nodes=nodes or {})
    return replace(base, **changes)  # type: ignore[arg-type]


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
    assert store.nodes.apply_state(state("n1", online=False, session=2, model=None), NOW + 2)
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


def check_nodes_selector_revoke_touch(store: Store) -> None:
    store.nodes.apply_state(state("a", online=True, session=1, labels={"site": "x"}), NOW)
    store.nodes.apply_state(
        state("b", online=True, session=1, labels={"site": "x", "tier": "1"}), NOW
    )
    store.nodes.apply_state(state("c", online=True, session=1, labels={"site": "y"}), NOW)
    assert [n.node_id for n in store.nodes.list()] == ["a", "b", "c"]
    assert [n.node_id for n in store.nodes.list({"site": "x"})] == ["a", "b"]
    assert [n.node_id for n in store.nodes.list({"site": "x", "tier": "1"})] == ["b"]
    assert store.nodes.list({"site": "z"}) == []
    store.nodes.set_revoked("b", True)  # noqa: FBT003
    assert [n.node_id for n in store.nodes.list() if n.revoked] == ["b"]
    # A later birth keeps the revocation and the ack position.
    store.nodes.apply_state(state("b", online=True, session=2), NOW)
    b = store.nodes.get("b")
    assert b is not None
    assert b.revoked
    store.nodes.set_revoked("b", False)  # noqa: FBT003
    store.nodes.set_revoked("new", True)  # noqa: FBT003
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
    baseline = HealthSample(NOW - 5, SHA1, 10, 0, 4.0)
    running = record(
        {
            "a": NodeProgress(node_id="a", wave=0, sent_at=NOW, from_model=REF1, baseline=baseline),
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
        "n1": [HealthSample(NOW, SHA1, 100, 1, 7.5), HealthSample(NOW + 2, SHA1, 300, 3, 9.0)],
        "n2": [],
        "quiet": [],
    }
    assert store.ingest.samples([], NOW) == {}


def check_report(store: Store) -> None:
    store.ingest.write(
        [],
        [
            ResultBatch(
                node="n1",
                seq=1,
                results=(result(1, corner=True), result(2), result(3, model=REF2)),
            ),
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
    assert samples == {"a": [HealthSample(NOW + 1, SHA1, 100, 1, 7.5)]}
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


CORE_CHECKS: list[Callable[[Store], None]] = [
    check_birth_floor_settles_slots_a_wiped_node_no_longer_has,
    check_step_rollout_folds_each_stored_status_once,
    check_step_reads_nodes_and_samples_in_its_transaction,
    check_command_seq_increments,
    check_results_stored_once,
    check_statuses_stored_once,
    check_contiguous_ack_with_out_of_order_slots,
    check_unknown_nodes_are_created_offline,
    check_stale_death_is_ignored,
    check_nodes_selector_revoke_touch,
    check_models,
    check_rollout_round_trip_and_events,
    check_audit_newest_first,
    check_prune,
    check_samples,
    check_report,
]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(str(db_path)) as opened:
        yield opened


@pytest.mark.parametrize("check", CORE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_core(store: Store, check: Callable[[Store], None]) -> None:
    check(store)


# ----- SQLite specifics ------------------------------------------------------------------


def test_sqlite_file_is_in_wal_mode_and_survives_reopen(db_path: Path) -> None:
    with Store.open(f"sqlite:///{db_path}") as store:
        store.next_command_seq()
        store.models.add(manifest("1.0.0"), "{}", "alice", NOW)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Store.open(str(db_path)) as store:
        assert store.next_command_seq() == 2
        assert [m.version for m in store.models.list()] == ["1.0.0"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("mysql://u@h/db", "unsupported database 'mysql'", id="mysql"),
        pytest.param("nonsense://x", "unsupported database", id="unknown-scheme"),
        pytest.param(
            "postgresql+psycopg://u:secret@h:notaport/db", "invalid database URL", id="port"
        ),
        pytest.param("sqlite://", "in-memory", id="memory"),
        pytest.param("", "no database given", id="empty"),
        pytest.param(
            "postgresql+psycopg://nobody:secret@127.0.0.1:1/db?connect_timeout=2",
            "cannot open database",
            id="unreachable",
        ),
    ],
)
def test_bad_url_is_a_one_line_store_error(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as caught:
        Store.open(url)
    text = str(caught.value)
    assert "\n" not in text
    assert "secret" not in text
    assert isinstance(caught.value, EdgeFleetError)


def test_missing_directory_is_a_one_line_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unable to open database file") as caught:
        Store.open(str(tmp_path / "no" / "such" / "dir" / "fleet.db"))
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(StoreError, match="not a database") as caught:
        Store.open(str(path))
    assert "\n" not in str(caught.value)


def test_schema_is_refused_for_sqlite(db_path: Path) -> None:
    with pytest.raises(StoreError, match="only for PostgreSQL"):
        Store.open(str(db_path), schema="s1")


def test_bad_sqlite_synchronous_is_refused(db_path: Path) -> None:
    with pytest.raises(StoreError, match="FULL or NORMAL"):
        Store.open(str(db_path), sqlite_synchronous="OFF")  # type: ignore[arg-type]


def test_newer_schema_version_is_refused(db_path: Path) -> None:
    Store.open(str(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    with pytest.raises(StoreError, match="newer") as caught:
        Store.open(str(db_path))
    assert "\n" not in str(caught.value)
    with sqlite3.connect(db_path) as conn:  # refused, not modified
        value = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    conn.close()
    assert value == str(SCHEMA_VERSION + 1)


def test_errors_after_open_are_one_line_store_errors(db_path: Path) -> None:
    with Store.open(str(db_path)) as store:
        with sqlite3.connect(db_path) as conn:
            conn.execute("DROP TABLE results")
        conn.close()
        with pytest.raises(StoreError, match="no such table") as caught:
            store.results.list()
        assert "\n" not in str(caught.value)


def test_command_seq_is_unique_across_stores_and_threads(db_path: Path) -> None:
    stores = [Store.open(str(db_path)), Store.open(str(db_path))]
    drawn: list[list[int]] = [[], []]

    def draw(index: int) -> None:
        for _ in range(100):
            drawn[index].append(stores[index].next_command_seq())

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    values = drawn[0] + drawn[1]
    assert sorted(values) == list(range(1, 201))
    assert drawn[0] == sorted(drawn[0])


def test_concurrent_ingest_from_threads_acks_every_slot(store: Store) -> None:
    # Two writers split one node's slots (odd/even), as two controllers behind a
    # shared subscription would: the ack still reaches the last slot.
    def send(slots: range) -> None:
        for slot in slots:
            store.ingest.write([], [batch("n1", slot, [slot])], [], NOW)

    threads = [threading.Thread(target=send, args=(range(i, 61, 2),)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    node = store.nodes.get("n1")
    assert node is not None
    assert node.acked_seq == 60
    assert store.results.table_counts()["stored_slots"] == 0
    assert store.results.table_counts()["results"] == 60


def test_corrupt_stored_record_is_a_store_error(db_path: Path, store: Store) -> None:
    store.rollouts.create(record(), "alice", NOW)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE rollouts SET record_json = '{\"format\": 1}'")
    conn.close()
    with pytest.raises(StoreError, match="rollout r1: stored record unreadable"):
        store.rollouts.load("r1")


def test_command_seq_never_falls_below_the_floor(tmp_path: Path) -> None:
    """A controller whose database was lost still numbers above what nodes applied."""
    store = Store.open(str(tmp_path / "fresh.db"))
    try:
        assert store.next_command_seq() == 1
        assert store.next_command_seq(floor=1_000) == 1_000
        assert store.next_command_seq(floor=10) == 1_001
    finally:
        store.close()
