"""The outbox against real SQLite files: sequencing, resend, ack, caps, crashes."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from edge_node.outbox import (
    Outbox,
    OutboxEntry,
    OutboxError,
    OutboxFullError,
    OutboxStats,
)
from shared.errors import EdgeFleetError

REPO = Path(__file__).resolve().parents[2]
TOPIC = "fleet/v1/default/node/n1/results"
STATUS_TOPIC = "fleet/v1/default/node/n1/status"
TEL_TOPIC = "fleet/v1/default/node/n1/telemetry"


def payload_for(seq: int) -> bytes:
    return json.dumps({"type": "results", "node": "n1", "seq": seq}).encode()


def seq_of(entry: OutboxEntry) -> int:
    value = json.loads(entry.payload)["seq"]
    assert isinstance(value, int)
    return value


def sized(n: int) -> bytes:
    """A payload of exactly ``n`` bytes."""
    return b"x" * n


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


# ----- sequencing ------------------------------------------------------------


def test_seq_starts_at_one_and_increases_across_kinds(db: Path) -> None:
    with Outbox(db) as ob:
        assert ob.last_seq() == 0
        seqs = [
            ob.put("status", STATUS_TOPIC, payload_for),
            ob.put("results", TOPIC, payload_for),
            ob.put("results", TOPIC, payload_for),
            ob.put("status", STATUS_TOPIC, payload_for),
        ]
        assert seqs == [1, 2, 3, 4]
        assert ob.last_seq() == 4
        assert ob.depth() == 4
        kinds = [(e.seq, e.kind, e.topic) for e in ob.due(0.0, resend_after_s=10, limit=10)]
        assert kinds == [
            (1, "status", STATUS_TOPIC),
            (2, "results", TOPIC),
            (3, "results", TOPIC),
            (4, "status", STATUS_TOPIC),
        ]


def test_payload_embeds_the_assigned_seq(db: Path) -> None:
    seen: list[int] = []

    def make(seq: int) -> bytes:
        seen.append(seq)
        return payload_for(seq)

    with Outbox(db) as ob:
        for _ in range(5):
            ob.put("results", TOPIC, make)
        entries = ob.due(0.0, resend_after_s=10, limit=100)
    assert seen == [1, 2, 3, 4, 5]
    assert [seq_of(e) for e in entries] == [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].payload == payload_for(1)


def test_seq_continues_after_reopen_even_when_everything_was_acked(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(3):
            ob.put("results", TOPIC, payload_for)
        assert ob.ack(3) == 3
        assert ob.depth() == 0
    with Outbox(db) as ob:
        assert ob.last_seq() == 3
        assert ob.depth() == 0
        assert ob.put("status", STATUS_TOPIC, payload_for) == 4
    with Outbox(db) as ob:
        assert ob.put("results", TOPIC, payload_for) == 5


def test_failing_payload_callback_stores_nothing_and_consumes_no_seq(db: Path) -> None:
    def boom(seq: int) -> bytes:
        raise RuntimeError(f"encoder failed at {seq}")

    with Outbox(db) as ob:
        ob.put("results", TOPIC, payload_for)
        with pytest.raises(RuntimeError, match="encoder failed at 2"):
            ob.put("results", TOPIC, boom)
        with pytest.raises(TypeError, match="not bytes"):
            ob.put("results", TOPIC, str)  # type: ignore[arg-type]
        assert ob.depth() == 1
        assert ob.last_seq() == 1
        assert ob.put("results", TOPIC, payload_for) == 2


def test_unknown_kind_is_refused(db: Path) -> None:
    with Outbox(db) as ob, pytest.raises(ValueError, match="kind"):
        ob.put("telemetry", TOPIC, payload_for)  # type: ignore[arg-type]


# ----- due, mark_sent, requeue_all -------------------------------------------


def test_due_lists_unsent_then_resends_after_the_timeout(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(4):
            ob.put("results", TOPIC, payload_for)
        first = ob.due(100.0, resend_after_s=30.0, limit=2)
        assert [e.seq for e in first] == [1, 2]
        assert all(e.attempts == 0 for e in first)
        ob.mark_sent([1, 2], 100.0)

        # In flight and not yet timed out: only the never-sent ones are due.
        assert [e.seq for e in ob.due(100.0, resend_after_s=30.0, limit=10)] == [3, 4]
        assert [e.seq for e in ob.due(130.0, resend_after_s=30.0, limit=10)] == [3, 4]
        ob.mark_sent([3, 4], 120.0)
        assert ob.due(130.0, resend_after_s=30.0, limit=10) == []

        # Past the timeout they come back, still in seq order, attempts counted.
        again = ob.due(130.5, resend_after_s=30.0, limit=10)
        assert [(e.seq, e.attempts) for e in again] == [(1, 1), (2, 1)]
        ob.mark_sent([1], 131.0)
        later = ob.due(200.0, resend_after_s=30.0, limit=10)
        assert [(e.seq, e.attempts) for e in later] == [(1, 2), (2, 1), (3, 1), (4, 1)]
        assert ob.due(200.0, resend_after_s=30.0, limit=0) == []


def test_mark_sent_ignores_acked_and_unknown_seqs(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(2):
            ob.put("results", TOPIC, payload_for)
        ob.ack(1)
        ob.mark_sent([1, 2, 99], 10.0)
        ob.mark_sent([], 11.0)
        assert ob.due(10.0, resend_after_s=5.0, limit=10) == []
        assert [(e.seq, e.attempts) for e in ob.due(16.0, resend_after_s=5.0, limit=10)] == [(2, 1)]


def test_requeue_all_makes_every_unacked_entry_due_in_order(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(5):
            ob.put("results", TOPIC, payload_for)
        ob.mark_sent([1, 2, 3, 4, 5], 50.0)
        ob.ack(2)
        assert ob.due(51.0, resend_after_s=60.0, limit=10) == []
        assert ob.requeue_all() == 3
        entries = ob.due(51.0, resend_after_s=60.0, limit=10)
        assert [(e.seq, e.attempts) for e in entries] == [(3, 1), (4, 1), (5, 1)]
        assert ob.requeue_all() == 0


# ----- ack -------------------------------------------------------------------


def test_ack_deletes_up_to_seq_and_is_idempotent(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(6):
            ob.put("results", TOPIC, payload_for)
        assert ob.ack(0) == 0
        assert ob.ack(3) == 3
        assert ob.depth() == 3
        assert ob.ack(3) == 0
        assert ob.ack(2) == 0
        assert [e.seq for e in ob.due(0.0, resend_after_s=1.0, limit=10)] == [4, 5, 6]
        assert ob.ack(6) == 3
        assert ob.depth() == 0
        assert ob.bytes_used() == 0


def test_ack_above_last_seq_is_clamped_and_logged(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(db) as ob:
        for _ in range(2):
            ob.put("results", TOPIC, payload_for)
        with caplog.at_level(logging.WARNING, logger="edge_node.outbox"):
            assert ob.ack(10) == 2
        assert "ack for seq 10 above last assigned seq 2" in caplog.text
        # Seqs 3..10 did not exist when acked: they must still wait for their own ack.
        assert ob.put("results", TOPIC, payload_for) == 3
        assert ob.depth() == 1
        assert [e.seq for e in ob.due(0.0, resend_after_s=1.0, limit=10)] == [3]
        assert ob.ack(3) == 1


def test_ack_on_an_empty_outbox_is_clamped_to_zero(db: Path) -> None:
    with Outbox(db) as ob:
        assert ob.ack(5) == 0
        assert ob.put("status", STATUS_TOPIC, payload_for) == 1
        assert ob.depth() == 1


# ----- telemetry -------------------------------------------------------------


def test_telemetry_is_not_sequenced(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put("results", TOPIC, payload_for)
        assert ob.put_telemetry(TEL_TOPIC, b'{"t":1}')
        assert ob.put_telemetry(TEL_TOPIC, b'{"t":2}')
        assert ob.put("results", TOPIC, payload_for) == 2
        assert ob.last_seq() == 2
        assert ob.depth() == 2
        assert ob.telemetry_depth() == 2
        assert [e.seq for e in ob.due(0.0, resend_after_s=1.0, limit=10)] == [1, 2]

        tel = ob.telemetry_due(10)
        assert [(t.topic, t.payload) for t in tel] == [
            (TEL_TOPIC, b'{"t":1}'),
            (TEL_TOPIC, b'{"t":2}'),
        ]
        assert [t.payload for t in ob.telemetry_due(1)] == [b'{"t":1}']
        assert ob.telemetry_sent([tel[0].id, 12345]) == 1
        assert [t.payload for t in ob.telemetry_due(10)] == [b'{"t":2}']
        assert ob.telemetry_sent([]) == 0
        # Telemetry leaving never touches the sequence or the pending entries.
        assert ob.depth() == 2
        assert ob.last_seq() == 2


def test_telemetry_ids_are_never_reused(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put_telemetry(TEL_TOPIC, b"a")
        (old,) = ob.telemetry_due(10)
        ob.telemetry_sent([old.id])
        ob.put_telemetry(TEL_TOPIC, b"b")
        (new,) = ob.telemetry_due(10)
        assert new.id > old.id
        # A stale id from an earlier telemetry_due() cannot delete the new row.
        assert ob.telemetry_sent([old.id]) == 0
        assert ob.telemetry_depth() == 1


# ----- size caps -------------------------------------------------------------


def test_cap_drops_oldest_telemetry_first_then_refuses_results(db: Path) -> None:
    # Sizes count payload + topic bytes; topic "t" is one byte.
    with Outbox(db, max_bytes=1000) as ob:
        for i in range(5):
            assert ob.put_telemetry("t", bytes([48 + i]) * 99)  # 100 bytes each
        assert ob.bytes_used() == 500

        # 700 more bytes: 200 over the cap, so the two oldest telemetry go.
        assert ob.put("results", "t", lambda seq: sized(699)) == 1
        assert [t.payload[:1] for t in ob.telemetry_due(10)] == [b"2", b"3", b"4"]
        assert ob.stats() == OutboxStats(
            depth=1, telemetry_depth=3, bytes=1000, last_seq=1, dropped_telemetry=2
        )

        # Results can use the whole cap: all telemetry goes.
        assert ob.put("status", "t", lambda seq: sized(299)) == 2
        assert ob.telemetry_depth() == 0
        assert ob.stats().dropped_telemetry == 5

        # Only results left: refused, nothing stored, no seq consumed.
        with pytest.raises(OutboxFullError, match="full"):
            ob.put("results", "t", lambda seq: sized(1))
        assert ob.depth() == 2
        assert ob.last_seq() == 2
        assert ob.bytes_used() == 1000

        # Telemetry when results fill the cap: the new one is dropped, and counted.
        assert not ob.put_telemetry("t", b"late")
        assert ob.telemetry_depth() == 0
        assert ob.stats().dropped_telemetry == 6

        # An ack makes room; the next seq follows with no gap.
        assert ob.ack(1) == 1
        assert ob.put("results", "t", lambda seq: sized(99)) == 3


def test_results_refused_without_dropping_telemetry_that_would_not_help(db: Path) -> None:
    with Outbox(db, max_bytes=1000) as ob:
        ob.put("results", "t", lambda seq: sized(899))  # 900 bytes
        assert ob.put_telemetry("t", sized(49))  # 50 bytes
        with pytest.raises(OutboxFullError):
            ob.put("results", "t", lambda seq: sized(149))  # 150: only 100 could be freed
        assert ob.telemetry_depth() == 1
        assert ob.stats().dropped_telemetry == 0


def test_telemetry_makes_room_by_dropping_older_telemetry(db: Path) -> None:
    with Outbox(db, max_bytes=300) as ob:
        for name in (b"a", b"b", b"c"):
            assert ob.put_telemetry("t", name * 99)
        assert ob.put_telemetry("t", b"d" * 99)
        assert [t.payload[:1] for t in ob.telemetry_due(10)] == [b"b", b"c", b"d"]
        assert ob.stats().dropped_telemetry == 1
        # A telemetry message bigger than the whole cap drops itself, not the others.
        assert not ob.put_telemetry("t", sized(400))
        assert ob.telemetry_depth() == 3
        assert ob.stats().dropped_telemetry == 2


def test_entry_cap_counts_rows_of_both_tables(db: Path) -> None:
    with Outbox(db, max_entries=3) as ob:
        for name in (b"a", b"b", b"c"):
            ob.put_telemetry(TEL_TOPIC, name)
        assert ob.put("results", TOPIC, payload_for) == 1
        assert [t.payload for t in ob.telemetry_due(10)] == [b"b", b"c"]
        ob.put("results", TOPIC, payload_for)
        ob.put("results", TOPIC, payload_for)
        assert ob.telemetry_depth() == 0
        with pytest.raises(OutboxFullError):
            ob.put("status", STATUS_TOPIC, payload_for)
        assert ob.depth() == 3
        assert ob.last_seq() == 3


def test_an_entry_bigger_than_the_cap_is_a_value_error(db: Path) -> None:
    with Outbox(db, max_bytes=100) as ob:
        with pytest.raises(ValueError, match="can never fit"):
            ob.put("results", "t", lambda seq: sized(100))
        assert ob.last_seq() == 0
    with pytest.raises(ValueError, match="at least 1"):
        Outbox(db, max_entries=0)


def test_dropped_telemetry_counter_survives_reopen(db: Path) -> None:
    with Outbox(db, max_bytes=10) as ob:
        for _ in range(4):
            ob.put_telemetry("t", b"123456789")
        assert ob.stats().dropped_telemetry == 3
    with Outbox(db, max_bytes=10) as ob:
        assert ob.stats() == OutboxStats(
            depth=0, telemetry_depth=1, bytes=10, last_seq=0, dropped_telemetry=3
        )


def test_errors_belong_to_the_edgefleet_family() -> None:
    assert issubclass(OutboxError, EdgeFleetError)
    assert issubclass(OutboxFullError, EdgeFleetError)
    # "Wait for acks" and "storage is broken" are never caught by one except clause.
    assert not issubclass(OutboxFullError, OutboxError)


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


# ----- property: random operations against an in-memory model ---------------


class OutboxModel(RuleBasedStateMachine):
    """Random puts, acks, sends, requeues, telemetry and reopens vs. a plain model.

    The cap is small so the telemetry-dropping and OutboxFullError paths run.
    """

    MAX_BYTES = 3000
    MAX_ENTRIES = 25
    RESEND_AFTER_S = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prop-"))
        self.path = self.dir / "outbox.sqlite"
        self.ob = self._open()
        self.now = 1000.0
        self.last_seq = 0
        self.assigned: list[int] = []
        self.pending: dict[int, int] = {}  # seq -> size
        self.sent_at: dict[int, float | None] = {}
        self.attempts: dict[int, int] = {}
        self.telemetry: list[tuple[int, bytes]] = []  # (size, payload), oldest first
        self.dropped = 0
        self.counter = 0

    def _open(self) -> Outbox:
        return Outbox(self.path, max_bytes=self.MAX_BYTES, max_entries=self.MAX_ENTRIES)

    def teardown(self) -> None:
        self.ob.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        assert self.ob.last_seq() == 0

    # --- helpers of the model
    def _used(self) -> int:
        return sum(self.pending.values()) + sum(size for size, _ in self.telemetry)

    def _rows(self) -> int:
        return len(self.pending) + len(self.telemetry)

    def _make_room(self, size: int) -> None:
        while self.telemetry and (
            self._used() + size > self.MAX_BYTES or self._rows() + 1 > self.MAX_ENTRIES
        ):
            self.telemetry.pop(0)
            self.dropped += 1

    # --- rules
    @rule(kind=st.sampled_from(["status", "results"]), extra=st.integers(0, 600))
    def put(self, kind: str, extra: int) -> None:
        seen: list[int] = []

        def make(seq: int) -> bytes:
            seen.append(seq)
            return payload_for(seq) + b" " * extra

        size = len(payload_for(self.last_seq + 1)) + extra + len(TOPIC)
        fits = (
            sum(self.pending.values()) + size <= self.MAX_BYTES
            and len(self.pending) + 1 <= self.MAX_ENTRIES
        )
        if not fits:
            with pytest.raises(OutboxFullError):
                self.ob.put(kind, TOPIC, make)  # type: ignore[arg-type]
            return
        seq = self.ob.put(kind, TOPIC, make)  # type: ignore[arg-type]
        assert seq == self.last_seq + 1
        assert seen == [seq]
        assert seq not in self.assigned
        self._make_room(size)
        self.last_seq = seq
        self.assigned.append(seq)
        self.pending[seq] = size
        self.sent_at[seq] = None
        self.attempts[seq] = 0

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        choices = st.integers(0, self.last_seq + 5)
        if self.pending:  # also ack exactly at pending seqs, as a real controller does
            choices |= st.sampled_from(sorted(self.pending))
        seq = data.draw(choices, label="ack seq")
        upto = min(seq, self.last_seq)
        gone = [s for s in self.pending if s <= upto]
        assert self.ob.ack(seq) == len(gone)
        for s in gone:
            del self.pending[s], self.sent_at[s], self.attempts[s]

    @rule(limit=st.integers(1, 8))
    def send(self, limit: int) -> None:
        cutoff = self.now - self.RESEND_AFTER_S
        expected = sorted(s for s, at in self.sent_at.items() if at is None or at < cutoff)[:limit]
        entries = self.ob.due(self.now, resend_after_s=self.RESEND_AFTER_S, limit=limit)
        assert [e.seq for e in entries] == expected
        assert [e.attempts for e in entries] == [self.attempts[s] for s in expected]
        assert all(seq_of(e) == e.seq for e in entries)
        self.ob.mark_sent([e.seq for e in entries], self.now)
        for s in expected:
            self.sent_at[s] = self.now
            self.attempts[s] += 1

    @rule(dt=st.sampled_from([0.0, 1.0, 5.0, 10.0, 10.5, 30.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def requeue(self) -> None:
        was_sent = sum(1 for s in self.pending if self.sent_at[s] is not None)
        assert self.ob.requeue_all() == was_sent
        for s in self.pending:
            self.sent_at[s] = None

    @rule(size=st.integers(1, 400))
    def put_telemetry(self, size: int) -> None:
        self.counter += 1
        payload = self.counter.to_bytes(4, "big") * (size // 4 + 1)
        payload = payload[:size]
        total = size + len(TEL_TOPIC)
        fits = (
            sum(self.pending.values()) + total <= self.MAX_BYTES
            and len(self.pending) + 1 <= self.MAX_ENTRIES
        )
        assert self.ob.put_telemetry(TEL_TOPIC, payload) is fits
        if not fits:
            self.dropped += 1
            return
        self._make_room(total)
        self.telemetry.append((total, payload))

    @precondition(lambda self: bool(self.telemetry))
    @rule(k=st.integers(1, 5))
    def send_telemetry(self, k: int) -> None:
        due = self.ob.telemetry_due(k)
        assert [t.payload for t in due] == [p for _, p in self.telemetry[:k]]
        assert self.ob.telemetry_sent([t.id for t in due]) == len(due)
        del self.telemetry[: len(due)]

    @rule()
    def reopen(self) -> None:
        self.ob.close()
        self.ob = self._open()

    # --- invariants
    @invariant()
    def counters_match_the_model(self) -> None:
        assert self.ob.stats() == OutboxStats(
            depth=len(self.pending),
            telemetry_depth=len(self.telemetry),
            bytes=self._used(),
            last_seq=self.last_seq,
            dropped_telemetry=self.dropped,
        )

    @invariant()
    def everything_pending_is_listed_in_strictly_increasing_order(self) -> None:
        far_future = self.now + 1e9
        seqs = [
            e.seq for e in self.ob.due(far_future, resend_after_s=0.0, limit=self.MAX_ENTRIES + 1)
        ]
        assert all(a < b for a, b in itertools.pairwise(seqs))
        assert seqs == sorted(self.pending)

    @invariant()
    def seqs_are_never_reused(self) -> None:
        assert len(self.assigned) == len(set(self.assigned))
        assert self.assigned == list(range(1, self.last_seq + 1))


OutboxModel.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
test_outbox_matches_model = OutboxModel.TestCase


def test_first_seq_numbers_a_new_outbox_only(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, first_seq=5_000) as outbox:
        assert outbox.floor() == 5_000
        assert outbox.put("status", "t", lambda seq: b"%d" % seq) == 5_000
        assert outbox.put("status", "t", lambda seq: b"%d" % seq) == 5_001
        outbox.ack(5_000)
        assert outbox.floor() == 5_001
        outbox.ack(5_001)
        assert outbox.floor() == 5_002  # empty: the next number to assign
    with Outbox(path, first_seq=1) as reopened:  # an existing outbox keeps its numbering
        assert reopened.put("status", "t", lambda seq: b"%d" % seq) == 5_002
