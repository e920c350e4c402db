"""The outbox matches a simple in-memory model under random operations."""

from __future__ import annotations

import itertools
import shutil
import tempfile
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
    RESEND_DOUBLINGS,
    Outbox,
    OutboxFullError,
    OutboxStats,
)
from tests.unit.edge_node.outbox_kit import (
    TEL_TOPIC,
    TOPIC,
    payload_for,
    seq_of,
)

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
        # Never beyond an entry that was never sent: a forged ack frees nothing unsent.
        unsent = [s for s in self.pending if s <= upto and self.attempts[s] == 0]
        if unsent:
            upto = min(unsent) - 1
        gone = [s for s in self.pending if s <= upto]
        assert self.ob.ack(seq) == len(gone)
        for s in gone:
            del self.pending[s], self.sent_at[s], self.attempts[s]

    @rule(limit=st.integers(1, 8))
    def send(self, limit: int) -> None:
        def due(s: int) -> bool:
            at = self.sent_at[s]
            backoff = 2 ** min(max(self.attempts[s] - 1, 0), RESEND_DOUBLINGS)
            return at is None or at + self.RESEND_AFTER_S * backoff < self.now

        expected = sorted(s for s in self.sent_at if due(s))[:limit]
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
