"""The outbox against real SQLite files: sequencing, resend, ack, telemetry, caps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_node.outbox import (
    RESEND_DOUBLINGS,
    Outbox,
    OutboxError,
    OutboxFullError,
    OutboxStats,
)
from shared.errors import EdgeFleetError
from tests.unit.edge_node.outbox_kit import (
    STATUS_TOPIC,
    TEL_TOPIC,
    TOPIC,
    payload_for,
    seq_of,
    sized,
)

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
        ob.mark_sent([1, 2, 3], 1.0)
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


def test_resends_back_off_doubling_up_to_the_cap_and_a_requeue_sends_at_once(
    db: Path,
) -> None:
    """An unacked entry's re-send delay doubles with each send, up to 8 x; nothing drops."""
    with Outbox(db) as ob:
        ob.put("status", TOPIC, payload_for)
        sent_at = 0.0
        ob.mark_sent([1], sent_at)
        for delay in (10.0, 20.0, 40.0, 80.0, 80.0, 80.0):  # 2 ** min(sends - 1, 3) x 10 s
            assert ob.due(sent_at + delay - 0.5, resend_after_s=10.0, limit=10) == []
            (entry,) = ob.due(sent_at + delay + 0.5, resend_after_s=10.0, limit=10)
            assert entry.seq == 1
            sent_at += delay + 0.5
            ob.mark_sent([1], sent_at)
        assert RESEND_DOUBLINGS == 3
        # A reconnect sends everything again at once, however far backed off.
        ob.requeue_all()
        assert [e.attempts for e in ob.due(sent_at, resend_after_s=10.0, limit=10)] == [7]


def test_a_longer_cap_lets_the_delay_keep_doubling_up_to_it(db: Path) -> None:
    """While the controller is silent the sender passes a cap of minutes, not 8 x."""
    with Outbox(db) as ob:
        ob.put("status", TOPIC, payload_for)
        sent_at = 0.0
        ob.mark_sent([1], sent_at)
        for delay in (10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0):
            due = ob.due(sent_at + delay - 0.5, resend_after_s=10.0, limit=10, max_resend_s=300)
            assert due == []
            (entry,) = ob.due(
                sent_at + delay + 0.5, resend_after_s=10.0, limit=10, max_resend_s=300
            )
            sent_at += delay + 0.5
            ob.mark_sent([entry.seq], sent_at)


def test_mark_sent_ignores_acked_and_unknown_seqs(db: Path) -> None:
    with Outbox(db) as ob:
        for _ in range(2):
            ob.put("results", TOPIC, payload_for)
        ob.mark_sent([1], 5.0)
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
        ob.mark_sent(range(1, 7), 1.0)
        assert ob.ack(0) == 0
        assert ob.ack(3) == 3
        assert ob.depth() == 3
        assert ob.ack(3) == 0
        assert ob.ack(2) == 0
        assert [e.seq for e in ob.due(10.0, resend_after_s=1.0, limit=10)] == [4, 5, 6]
        assert ob.ack(6) == 3
        assert ob.depth() == 0
        assert ob.stats().bytes == 0


def test_ack_above_last_seq_is_clamped_and_logged(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(db) as ob:
        for _ in range(2):
            ob.put("results", TOPIC, payload_for)
        ob.mark_sent([1, 2], 1.0)
        with caplog.at_level(logging.WARNING, logger="edge_node.outbox"):
            assert ob.ack(10) == 2
        assert "ack for seq 10 above last assigned seq 2" in caplog.text
        # Seqs 3..10 did not exist when acked: they must still wait for their own ack.
        assert ob.put("results", TOPIC, payload_for) == 3
        assert ob.depth() == 1
        assert [e.seq for e in ob.due(0.0, resend_after_s=1.0, limit=10)] == [3]
        ob.mark_sent([3], 2.0)
        assert ob.ack(3) == 1


def test_a_forged_ack_cannot_free_entries_never_sent(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack is only the controller's word for what it was sent: entries that
    never went out stay, whatever seq an ack names."""
    with Outbox(db) as ob:
        for _ in range(5):
            ob.put("results", TOPIC, payload_for)
        ob.mark_sent([1, 2], 1.0)
        with caplog.at_level(logging.WARNING, logger="edge_node.outbox"):
            assert ob.ack(5) == 2
        assert "ack for seq 5 reaches seq 3, never sent; clamped" in caplog.text
        assert [e.seq for e in ob.due(0.0, resend_after_s=1.0, limit=10)] == [3, 4, 5]
        ob.requeue_all()  # a reconnect makes sent entries due again: still "sent before"
        ob.mark_sent([3, 4, 5], 2.0)
        assert ob.ack(5) == 3
        assert ob.depth() == 0


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
        assert ob.stats().bytes == 500

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
        assert ob.stats().bytes == 1000

        # Telemetry when results fill the cap: the new one is dropped, and counted.
        assert not ob.put_telemetry("t", b"late")
        assert ob.telemetry_depth() == 0
        assert ob.stats().dropped_telemetry == 6

        # An ack of what was sent makes room; the next seq follows with no gap.
        ob.mark_sent([1], 1.0)
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


def test_first_seq_numbers_a_new_outbox_only(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, first_seq=5_000) as outbox:
        assert outbox.floor() == 5_000
        assert outbox.put("status", "t", lambda seq: b"%d" % seq) == 5_000
        assert outbox.put("status", "t", lambda seq: b"%d" % seq) == 5_001
        outbox.mark_sent([5_000, 5_001], 1.0)
        outbox.ack(5_000)
        assert outbox.floor() == 5_001
        outbox.ack(5_001)
        assert outbox.floor() == 5_002  # empty: the next number to assign
    with Outbox(path, first_seq=1) as reopened:  # an existing outbox keeps its numbering
        assert reopened.put("status", "t", lambda seq: b"%d" % seq) == 5_002
