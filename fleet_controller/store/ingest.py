"""Ingest: what nodes send (statuses, result batches, telemetry), stored before it is acked.

Invariants:

* **Durable before ack.** :meth:`IngestRepository.write` stores a batch's
  statuses, results and telemetry in ONE transaction and returns the acks to
  publish only after it committed.
* **Each outbox slot is stored once** (:class:`shared.rules.SlotLedger`, the
  one contiguous-ack rule): every status and result batch occupies one slot of
  its node's outbox; a slot at or below the node's ``acked_seq``, or already
  held in ``stored_slots``, was committed with its whole content and is
  skipped (so results pruned since cannot come back). Results are also unique
  per (node, result seq), statuses per (node, slot).
* **Decided under the node row lock.** The node rows are locked in sorted
  order (``SELECT ... FOR UPDATE``) before the ledger is loaded: a second
  controller ingesting for the same node waits, then sees this one's slots, so
  ``acked_seq`` never goes backwards and two ingests never deadlock.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, repeat
from typing import Any

import msgspec
from sqlalchemy import bindparam, delete, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_controller.rollout_core import HealthSample
from fleet_controller.store.database import Database
from fleet_controller.store.nodes import ensure_nodes
from fleet_controller.store.tables import (
    NODES,
    SLOTS,
    STATUSES,
    TELEMETRY,
    NodeRow,
    StoredSlotRow,
    TelemetryRow,
)
from shared.messages import NodeStatus, Telemetry
from shared.result_batch import ResultBatch
from shared.rules import SlotLedger

__all__ = ["IngestRepository", "select_samples"]


class IngestRepository:
    """``store.ingest``: the ingest transaction, and the health samples it stored."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(
        self,
        statuses: Sequence[NodeStatus],
        batches: Sequence[ResultBatch],
        telemetry: Sequence[Telemetry],
        now: float,
    ) -> dict[str, int]:
        """Store what nodes sent, in ONE transaction, and say which acks to publish.

        Results are stored once per (node, result seq), statuses once per
        (node, outbox slot); telemetry is appended. Each status and result batch
        occupies one outbox slot: its slot is recorded, and the node's
        ``acked_seq`` advances through contiguous stored slots. Nodes never seen
        get a row (offline); every node heard from gets ``last_seen = now``.

        Returns ``{node_id: acked_seq}`` for every node whose ``acked_seq``
        advanced, and for every node that re-sent a slot at or below its
        ``acked_seq`` (its Ack was lost: acking again lets its outbox delete the
        slot). Publish these only after this method returned.

        Raises: StoreError (nothing was stored; the nodes will re-send).
        """
        slotted = sorted({m.node for m in statuses} | {b.node for b in batches})
        touched = sorted(set(slotted) | {t.node for t in telemetry})
        if not touched:
            return {}
        with self._db.session(write=True) as s:
            ensure_nodes(self._db, s, touched, now)
            ledgers = _lock_ledgers(s, touched, slotted)
            # Statuses first, then batches: the order in which slots are offered.
            status_rows = [_status_row(m) for m in statuses if ledgers[m.node].offer(m.seq)]
            fresh = [b for b in batches if ledgers[b.node].offer(b.seq)]
            self._insert(s, status_rows, fresh, [_telemetry_row(t) for t in telemetry])
            s.exec(
                update(NODES)
                .where(NODES.c.node_id.in_(touched), NODES.c.last_seen < now)
                .values(last_seen=now)
            )
            for ledger in ledgers.values():
                ledger.advance()
            self._save_ledgers(s, ledgers)
        acks = {node_id: ledger.ack_due() for node_id, ledger in ledgers.items()}
        return {node_id: ack for node_id, ack in acks.items() if ack is not None}

    def _insert(
        self,
        s: Session,
        statuses: list[dict[str, Any]],
        batches: list[ResultBatch],
        telemetry: list[dict[str, Any]],
    ) -> None:
        if statuses:
            s.exec(self._db.insert(STATUSES).on_conflict_do_nothing(), params=statuses)
        if batches:
            rows = chain.from_iterable(_result_rows(b) for b in batches)
            _bulk_insert_results(s, self._db.dialect, rows)
        if telemetry:
            s.exec(TELEMETRY.insert(), params=telemetry)

    def _save_ledgers(self, s: Session, ledgers: Mapping[str, SlotLedger]) -> None:
        """Remember the fresh slots held above a gap; move the marks that advanced."""
        held = [
            {"node_id": node_id, "seq": slot}
            for node_id, ledger in ledgers.items()
            for slot in ledger.fresh_above()
        ]
        if held:
            s.exec(
                self._db.insert(SLOTS).on_conflict_do_nothing(index_elements=["node_id", "seq"]),
                params=held,
            )
        moves = [
            {"b_node": node_id, "b_acked": ledger.acked}
            for node_id, ledger in ledgers.items()
            if ledger.advanced
        ]
        if moves:
            s.exec(
                update(NODES)
                .where(
                    NODES.c.node_id == bindparam("b_node"),
                    NODES.c.acked_seq < bindparam("b_acked"),
                )
                .values(acked_seq=bindparam("b_acked")),
                params=moves,
            )
            s.exec(
                delete(SLOTS).where(
                    SLOTS.c.node_id == bindparam("b_node"), SLOTS.c.seq <= bindparam("b_acked")
                ),
                params=moves,
            )

    def samples(self, node_ids: Iterable[str], since: float) -> dict[str, list[HealthSample]]:
        """Health samples from telemetry at or after ``since``, oldest first, for
        each of ``node_ids`` (an empty list for a node without any).

        Raises: StoreError.
        """
        with self._db.session(write=False) as s:
            return select_samples(s, node_ids, since)


def _lock_ledgers(s: Session, touched: list[str], slotted: list[str]) -> dict[str, SlotLedger]:
    """Lock every touched node's row (sorted) and load the ledger of each slotted one.

    ``touched`` and ``slotted`` are sorted; ``slotted`` is a subset of ``touched``.
    """
    # Lock before deciding: a second controller ingesting for the same node
    # waits here (PostgreSQL) and then sees the slots this one committed.
    acked: dict[str, int] = dict(
        s.exec(
            select(col(NodeRow.node_id), col(NodeRow.acked_seq))
            .where(col(NodeRow.node_id).in_(touched))
            .order_by(col(NodeRow.node_id))
            .with_for_update()
        ).all()
    )
    held: dict[str, list[int]] = defaultdict(list)
    if slotted:
        for node_id, seq in s.exec(
            select(col(StoredSlotRow.node_id), col(StoredSlotRow.seq)).where(
                col(StoredSlotRow.node_id).in_(slotted)
            )
        ).all():
            held[node_id].append(seq)
    return {node_id: SlotLedger(acked[node_id], held[node_id]) for node_id in slotted}


def select_samples(
    s: Session, node_ids: Iterable[str], since: float
) -> dict[str, list[HealthSample]]:
    """Health samples at or after ``since`` per node, oldest first (every node a key)."""
    wanted = sorted(set(node_ids))
    found: dict[str, list[HealthSample]] = {node_id: [] for node_id in wanted}
    if not wanted:
        return found
    rows = (
        s.connection()
        .execute(
            sa_select(
                col(TelemetryRow.node_id),
                col(TelemetryRow.ts),
                col(TelemetryRow.model_sha256),
                col(TelemetryRow.period_inferences),
                col(TelemetryRow.period_errors),
                col(TelemetryRow.latency_hist),
            )
            .where(
                col(TelemetryRow.node_id).in_(wanted),
                col(TelemetryRow.ts) >= since,
                col(TelemetryRow.period_inferences).is_not(None),
            )
            .order_by(col(TelemetryRow.node_id), col(TelemetryRow.ts), col(TelemetryRow.id))
        )
        .all()
    )
    for node_id, ts, sha, inferences, errors, hist in rows:
        found[node_id].append(HealthSample(ts, sha, inferences or 0, errors or 0, _histogram(hist)))
    return found


def _histogram(text: str | None) -> tuple[tuple[int, int], ...]:
    """A stored ``latency_hist`` (written by this module from a validated message)."""
    if not text:
        return ()
    return tuple((int(bucket), int(count)) for bucket, count in json.loads(text))


# ----- row builders (plain dicts for executemany) ----------------------------------------


def _status_row(m: NodeStatus) -> dict[str, Any]:
    return {
        "node_id": m.node,
        "seq": m.seq,
        "command_id": m.command_id,
        "rollout_id": m.rollout_id,
        "state": m.state.value,
        "code": m.code,
        "reason": m.reason,
        "progress": m.progress,
        "duplicate": m.duplicate,
        "applied": False,
        "ts": m.ts,
    }


# Results are the bulk: rows are plain tuples built column by column and
# written through the driver itself (executemany on SQLite, COPY on
# PostgreSQL), without SQLAlchemy's per-row work.
_SQLITE_INSERT = """
INSERT OR IGNORE INTO results (node_id, seq, model_name, model_version, model_sha256,
    input_digest, latency_ms, ts, topk_json, tensors_json, corner_case, source)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
# PostgreSQL: COPY into a per-connection staging table (emptied at every
# commit), then one INSERT that skips (node_id, seq) already stored, as ON
# CONFLICT DO NOTHING does.
_PG_STAGE_CREATE = """
CREATE TEMPORARY TABLE IF NOT EXISTS results_incoming
    (LIKE results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""
_PG_COPY = """
COPY results_incoming (node_id, seq, model_name, model_version, model_sha256,
    input_digest, latency_ms, ts, topk_json, tensors_json, corner_case, source) FROM STDIN"""
_PG_MOVE = """
INSERT INTO results (node_id, seq, model_name, model_version, model_sha256,
    input_digest, latency_ms, ts, topk_json, tensors_json, corner_case, source)
SELECT node_id, seq, model_name, model_version, model_sha256,
    input_digest, latency_ms, ts, topk_json, tensors_json, corner_case, source
FROM results_incoming
ON CONFLICT (node_id, seq) DO NOTHING"""
_JSON = msgspec.json.Encoder()


def _bulk_insert_results(s: Session, dialect: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """Write result rows (in the column order above), skipping stored ones."""
    driver: Any = s.connection().connection.driver_connection
    if dialect == "sqlite":
        driver.executemany(_SQLITE_INSERT, rows)
        return
    with driver.cursor() as cursor:
        cursor.execute(_PG_STAGE_CREATE)
        with cursor.copy(_PG_COPY) as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(_PG_MOVE)


def _result_rows(b: ResultBatch) -> Iterator[tuple[Any, ...]]:
    """``b``'s results as rows, column by column (kept as they arrived where the
    store does not look inside: digests, top-k and tensors as compact JSON)."""
    n = len(b)
    models = b.models
    width = b.digest_len
    digests = b.digests
    return zip(
        repeat(b.node, n),
        b.result_seq,
        [models[i].name for i in b.model],
        [models[i].version for i in b.model],
        [models[i].sha256 for i in b.model],
        [digests[i : i + width] for i in range(0, n * width, width)],
        b.latency_ms,
        b.ts,
        _topk_json(b),
        [None if t is None else _JSON.encode(t).decode() for t in b.tensors],
        b.corner_case,
        b.source,
        strict=True,
    )


def _topk_json(b: ResultBatch) -> list[str | None]:
    """Each result's top-k as ``[[index, score, label], ...]`` (None: no top-k)."""
    if not b.topk_index:
        return [None] * len(b)
    labels: list[str | None] = [*b.labels, None]  # index -1 names the None
    named = map(labels.__getitem__, b.topk_label)
    entries = list(zip(b.topk_index, b.topk_score, named, strict=True))
    out: list[str | None] = []
    start = 0
    for k in b.topk_k:
        end = start + k
        out.append(_JSON.encode(entries[start:end]).decode() if k else None)
        start = end
    return out


def _telemetry_row(t: Telemetry) -> dict[str, Any]:
    return {
        "node_id": t.node,
        "ts": t.ts,
        "inferences": t.inferences,
        "errors": t.errors,
        "skips": t.skips,
        "queue_depth": t.queue_depth,
        "outbox_depth": t.outbox_depth,
        "p50_ms": t.latency.p50_ms,
        "p95_ms": t.latency.p95_ms,
        "p99_ms": t.latency.p99_ms,
        "cpu_percent": t.cpu_percent,
        "memory_bytes": t.memory_bytes,
        "model_sha256": None if t.model is None else t.model.sha256,
        "period_inferences": None if t.period is None else t.period.inferences,
        "period_errors": None if t.period is None else t.period.errors,
        "latency_hist": None
        if t.period is None
        else _JSON.encode([list(pair) for pair in t.period.latency]).decode(),
    }
