"""The outbox's file: durable across crashes, and bad files refused without damage."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_node.outbox import (
    Outbox,
    OutboxError,
    OutboxStats,
)
from tests.unit.edge_node.outbox_kit import (
    REPO,
    TEL_TOPIC,
    TOPIC,
    payload_for,
    seq_of,
    sized,
)

# ----- durability ------------------------------------------------------------


def test_database_is_in_wal_mode(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put("results", TOPIC, payload_for)
        other = sqlite3.connect(db)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            other.close()


# Python 3.13+ warns when an unclosed sqlite3 connection is collected; abandoning
# the object without close() is exactly what this test means to do.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_data_survives_an_abandoned_object(db: Path) -> None:
    ob = Outbox(db)
    for _ in range(3):
        ob.put("results", TOPIC, payload_for)
    ob.mark_sent([1], 5.0)
    ob.put_telemetry(TEL_TOPIC, b"t")
    ob.ack(1)
    del ob
    gc.collect()

    with Outbox(db) as again:
        assert again.stats() == OutboxStats(
            depth=2,
            telemetry_depth=1,
            bytes=2 * (len(payload_for(2)) + len(TOPIC)) + 1 + len(TEL_TOPIC),
            last_seq=3,
            dropped_telemetry=0,
        )
        assert [seq_of(e) for e in again.due(0.0, resend_after_s=1.0, limit=10)] == [2, 3]
        assert again.put("results", TOPIC, payload_for) == 4


def test_second_open_while_first_is_still_alive_sees_committed_data(db: Path) -> None:
    first = Outbox(db)
    try:
        first.put("results", TOPIC, payload_for)
        with Outbox(db) as second:
            assert [e.seq for e in second.due(0.0, resend_after_s=1.0, limit=10)] == [1]
    finally:
        first.close()


def test_data_survives_a_process_that_exits_without_closing(db: Path) -> None:
    n = 200
    child = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from edge_node.outbox import Outbox

        ob = Outbox(Path(sys.argv[1]))
        for _ in range(int(sys.argv[2])):
            ob.put("results", "t", lambda seq: b'{"seq":%d}' % seq)
        ob.put_telemetry("tel", b"last words")
        os._exit(0)  # no close(), no atexit, no checkpoint: a crash as far as SQLite knows
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", child, str(db), str(n)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    # The commits live in the WAL, not yet checkpointed into the main file.
    assert db.with_name(db.name + "-wal").stat().st_size > 0

    with Outbox(db) as ob:
        assert ob.depth() == n
        assert ob.last_seq() == n
        entries = ob.due(0.0, resend_after_s=1.0, limit=n + 10)
        assert [seq_of(e) for e in entries] == list(range(1, n + 1))
        assert [t.payload for t in ob.telemetry_due(10)] == [b"last words"]
        assert ob.put("results", "t", payload_for) == n + 1


def test_usable_from_worker_threads_via_asyncio_to_thread(db: Path) -> None:
    async def scenario() -> list[int]:
        ob = await asyncio.to_thread(Outbox, db)
        try:
            seqs = [
                await asyncio.to_thread(ob.put, "results", TOPIC, payload_for) for _ in range(3)
            ]
            await asyncio.to_thread(ob.mark_sent, [1], 1.0)
            await asyncio.to_thread(ob.ack, 1)
            due = await asyncio.to_thread(lambda: ob.due(0.0, resend_after_s=1.0, limit=10))
            assert [e.seq for e in due] == [2, 3]
            return seqs
        finally:
            await asyncio.to_thread(ob.close)

    assert asyncio.run(scenario()) == [1, 2, 3]


# ----- bad files -------------------------------------------------------------


def test_garbage_file_raises_outbox_error_naming_the_path(db: Path) -> None:
    garbage = b"this is definitely not an SQLite database \x00\xff" * 200
    db.write_bytes(garbage)
    with pytest.raises(OutboxError, match="corrupt or unreadable") as info:
        Outbox(db)
    assert str(db) in str(info.value)
    assert db.read_bytes() == garbage  # nothing deleted or rewritten


def test_damaged_pages_raise_outbox_error(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(200):
            ob.put("results", TOPIC, lambda seq: payload_for(seq) + sized(500))
    raw = bytearray(db.read_bytes())
    page = 4096
    assert len(raw) > 4 * page
    raw[page:] = b"\xa5" * (len(raw) - page)  # keep page 1 (header and schema) intact
    db.write_bytes(bytes(raw))
    with pytest.raises(OutboxError, match=str(db)):
        Outbox(db)


def test_foreign_sqlite_database_is_refused_and_left_alone(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError, match="not an outbox"):
        Outbox(db)
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert tables == {"results"}


def test_newer_schema_version_is_refused(db: Path) -> None:
    Outbox(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(db)


def test_unopenable_path_raises_outbox_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "outbox.sqlite"
    with pytest.raises(OutboxError, match=str(missing)):
        Outbox(missing)
    with pytest.raises(OutboxError, match=str(tmp_path)):
        Outbox(tmp_path)  # a directory


def test_closed_outbox_raises_and_close_is_idempotent(db: Path) -> None:
    ob = Outbox(db)
    ob.close()
    ob.close()
    with pytest.raises(OutboxError, match="closed"):
        ob.put("results", TOPIC, payload_for)
    with pytest.raises(OutboxError, match="closed"):
        ob.due(0.0, resend_after_s=1.0, limit=1)
