"""The controller's store on a real PostgreSQL server.

The server is ``EDGEFLEET_TEST_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); every test is skipped,
with the reason, when it cannot be reached within a few seconds. Each test gets
its own schema (``t_<random>``, via ``Store.open(url, schema=...)``), dropped
afterwards, so tests never see each other's rows and leave nothing behind.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, make_url, text

from fleet_controller.store import SCHEMA_VERSION, Store, StoreError
from fleet_controller.store.database import PG_STALLED_TRANSACTION_S
from tests.support.postgres import PG_URL
from tests.unit.fleet_controller.store.core_checks import CORE_CHECKS
from tests.unit.fleet_controller.store.store_kit import NOW, batch

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema(pg_admin: Engine) -> Iterator[str]:
    """A schema name unique to this test; the store creates it, we drop it after."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with pg_admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def pg_store(schema: str) -> Iterator[Store]:
    with Store.open(PG_URL, schema=schema) as store:
        yield store


@pytest.mark.parametrize("check", CORE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_core_on_postgres(pg_store: Store, check: Callable[[Store], None]) -> None:
    check(pg_store)


def test_tables_live_in_the_test_schema(pg_admin: Engine, schema: str, pg_store: Store) -> None:
    with pg_admin.connect() as conn:
        tables = set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
            ).scalars()
        )
    assert {"meta", "nodes", "results", "stored_slots", "statuses", "audit"} <= tables
    assert pg_store.dialect == "postgresql"
    assert pg_store.schema == schema


def test_newer_schema_version_is_refused(pg_admin: Engine, schema: str) -> None:
    Store.open(PG_URL, schema=schema).close()
    with pg_admin.begin() as conn:
        conn.execute(
            text(f"UPDATE \"{schema}\".meta SET value = :v WHERE key = 'schema_version'"),
            {"v": str(SCHEMA_VERSION + 1)},
        )
    with pytest.raises(StoreError, match="newer") as caught:
        Store.open(PG_URL, schema=schema)
    assert "\n" not in str(caught.value)


def test_reopen_keeps_data(schema: str) -> None:
    with Store.open(PG_URL, schema=schema) as store:
        assert store.next_command_seq() == 1
        store_id = store.store_id
    with Store.open(PG_URL, schema=schema) as store:
        assert store.next_command_seq() == 2
        assert store.store_id == store_id  # replicas on one database share its identity


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_urls_use_psycopg(schema: str, scheme: str) -> None:
    url = make_url(PG_URL).set(drivername=scheme).render_as_string(hide_password=False)
    with Store.open(url, schema=schema) as store:
        assert store.next_command_seq() >= 1


def test_bad_schema_name_is_refused(pg_admin: Engine) -> None:
    with pytest.raises(StoreError, match="plain identifier"):
        Store.open(PG_URL, schema='x"; DROP TABLE y; --')


def test_command_seq_is_unique_across_two_stores_and_threads(schema: str) -> None:
    stores = [Store.open(PG_URL, schema=schema), Store.open(PG_URL, schema=schema)]
    drawn: list[list[int]] = [[], []]
    failures: list[BaseException] = []

    def draw(index: int) -> None:
        try:
            for _ in range(200):
                drawn[index].append(stores[index].next_command_seq())
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert failures == []
    values = drawn[0] + drawn[1]
    assert len(set(values)) == 400
    assert sorted(values) == list(range(1, 401))


def test_two_stores_ingesting_one_node_ack_every_slot(schema: str) -> None:
    # Two controllers behind a shared subscription get alternate slots of one node.
    stores = [Store.open(PG_URL, schema=schema), Store.open(PG_URL, schema=schema)]
    failures: list[BaseException] = []

    def send(store: Store, slots: range) -> None:
        try:
            for slot in slots:
                store.ingest.write(
                    [], [batch("n1", slot, [slot]), batch("n2", slot, [slot])], [], NOW
                )
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=send, args=(stores[i - 1], range(i, 101, 2))) for i in (1, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for node_id in ("n1", "n2"):
        node = stores[0].nodes.get(node_id)
        assert node is not None
        assert node.acked_seq == 100
    counts = stores[0].results.table_counts()
    assert counts["stored_slots"] == 0
    assert counts["results"] == 200
    for store in stores:
        store.close()


def test_ingest_decides_under_the_node_row_lock(
    pg_admin: Engine, schema: str, pg_store: Store
) -> None:
    # Another controller holds n1's row while it stores slot 2 (acked_seq 1 -> 2);
    # meanwhile this one stores slot 3. It must wait for the row, then see
    # acked_seq 2 and ack 3. Deciding on the stale acked_seq 1 would park slot 3
    # behind a gap that never fills (the node has deleted slot 2 on its ack).
    pg_store.ingest.write([], [batch("n1", 1, [1])], [], NOW)
    done = threading.Event()
    acks: list[dict[str, int]] = []

    def ingest() -> None:
        acks.append(pg_store.ingest.write([], [batch("n1", 3, [3])], [], NOW))
        done.set()

    nodes = f'"{schema}".nodes'
    with pg_admin.connect() as conn, conn.begin():
        conn.execute(text(f"SELECT 1 FROM {nodes} WHERE node_id = 'n1' FOR UPDATE"))
        thread = threading.Thread(target=ingest)
        thread.start()
        assert not done.wait(0.5), "ingest did not wait for the node's row lock"
        conn.execute(text(f"UPDATE {nodes} SET acked_seq = 2 WHERE node_id = 'n1'"))
    thread.join(timeout=10)
    assert done.is_set()
    assert acks == [{"n1": 3}]
    assert pg_store.results.table_counts()["stored_slots"] == 0


def test_a_transaction_left_idle_is_ended_by_the_server(pg_store: Store) -> None:
    """A controller frozen mid-transaction must not hold the lease's row lock for ever."""
    with pg_store._db.session(write=False) as s:
        setting = s.connection().execute(text("SHOW idle_in_transaction_session_timeout"))
        assert setting.scalar_one() == f"{PG_STALLED_TRANSACTION_S}s"
