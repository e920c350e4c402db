"""The controller's store (fleet_controller.store) against real SQLite files: the core
checks every database must pass, then what is particular to SQLite."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_controller.store import (
    SCHEMA_VERSION,
    Store,
    StoreError,
)
from shared.errors import EdgeFleetError
from tests.unit.fleet_controller.store.core_checks import CORE_CHECKS
from tests.unit.fleet_controller.store.store_kit import (
    NOW,
    batch,
    health_sample,
    manifest,
    record,
    state,
    telemetry,
)


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


def test_store_id_is_written_once_and_differs_between_databases(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as a, Store.open(str(tmp_path / "b.db")) as b:
        first = a.store_id
        assert len(first) == 32
        assert int(first, 16) >= 0
        assert b.store_id != first
    with Store.open(f"sqlite:///{tmp_path}/a.db") as again:
        assert again.store_id == first
    # A database made before stores had an identity gets one when next opened, then keeps it.
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'store_id'")
    conn.close()
    with Store.open(str(tmp_path / "a.db")) as upgraded:
        given = upgraded.store_id
    assert given != first
    with Store.open(str(tmp_path / "a.db")) as again:
        assert again.store_id == given


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


def test_a_version_1_store_gains_the_period_columns(db_path: Path) -> None:
    """Version 1 kept no telemetry periods: opening it adds the columns, keeps the rows."""
    with Store.open(str(db_path)) as store:
        store.ingest.write([], [], [telemetry("n1", NOW)], NOW)
    with sqlite3.connect(db_path) as conn:
        for column in ("period_inferences", "period_errors", "latency_hist"):
            conn.execute(f"ALTER TABLE telemetry DROP COLUMN {column}")
        conn.execute("ALTER TABLE nodes DROP COLUMN central_labels")
        conn.execute("DROP TABLE deployments")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    with Store.open(str(db_path)) as store:
        store.ingest.write([], [], [telemetry("n1", NOW + 1)], NOW)
        assert store.ingest.samples(["n1"], NOW - 1) == {"n1": [health_sample(NOW + 1)]}
    with sqlite3.connect(db_path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        rows = conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()
    conn.close()
    assert (version[0], rows[0]) == (str(SCHEMA_VERSION), 2)


def test_a_version_2_store_gains_central_labels_and_deployments(db_path: Path) -> None:
    """Version 2 had no operators' labels and no deployments: opening it adds
    both and keeps the nodes, whose effective labels are then their own."""
    with Store.open(str(db_path)) as store:
        store.nodes.apply_state(state("n1", online=True, session=1, labels={"site": "a"}), NOW)
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE nodes DROP COLUMN central_labels")
        conn.execute("DROP TABLE deployments")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with Store.open(str(db_path)) as store:
        node = store.nodes.set_labels("n1", {"tier": "gold"})
        assert dict(node.labels) == {"site": "a", "tier": "gold"}
        assert store.deployments.list() == []
    with sqlite3.connect(db_path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version[0] == str(SCHEMA_VERSION)


def test_a_version_4_store_gains_the_lease_table(db_path: Path) -> None:
    with Store.open(str(db_path)) as store:
        store_id = store.store_id
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TABLE leases")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.close()
    with Store.open(str(db_path)) as store:
        assert store.store_id == store_id
        assert store.leases.acquire("rollouts", "a", 5.0).held_by("a")
    with sqlite3.connect(db_path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version[0] == str(SCHEMA_VERSION) == "5"


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
