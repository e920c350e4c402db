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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, delete, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_controller.rollout_core import HealthSample
from fleet_controller.store.database import Database
from fleet_controller.store.nodes import ensure_nodes
from fleet_controller.store.tables import (
    NODES,
    RESULTS,
    SLOTS,
    STATUSES,
    TELEMETRY,
    NodeRow,
    StoredSlotRow,
    TelemetryRow,
)
from shared.messages import (
    InferenceResult,
    NodeStatus,
    ResultBatch,
    Telemetry,
    TensorData,
    TopK,
)
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
            result_rows = [
                _result_row(b.node, r)
                for b in batches
                if ledgers[b.node].offer(b.seq)
                for r in b.results
            ]
            self._insert(s, status_rows, result_rows, [_telemetry_row(t) for t in telemetry])
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
        results: list[dict[str, Any]],
        telemetry: list[dict[str, Any]],
    ) -> None:
        if statuses:
            s.exec(self._db.insert(STATUSES).on_conflict_do_nothing(), params=statuses)
        if results:
            s.exec(
                self._db.insert(RESULTS).on_conflict_do_nothing(index_elements=["node_id", "seq"]),
                params=results,
            )
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

# Results are the hot path: one reused encoder (the C one), keys in a fixed order.
_ROW_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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


def _result_row(node_id: str, r: InferenceResult) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "seq": r.seq,
        "model_name": r.model.name,
        "model_version": r.model.version,
        "model_sha256": r.model.sha256,
        "input_digest": r.input_digest,
        "latency_ms": r.latency_ms,
        "ts": r.ts,
        "topk_json": _topk_json(r.topk),
        "tensors_json": _tensors_json(r.tensors),
        "corner_case": r.corner_case,
        "source": r.source,
    }


def _topk_json(topk: Sequence[TopK] | None) -> str | None:
    if topk is None:
        return None
    return _ROW_JSON.encode([{"index": t.index, "label": t.label, "score": t.score} for t in topk])


def _tensors_json(tensors: Sequence[TensorData] | None) -> str | None:
    if tensors is None:
        return None
    return _ROW_JSON.encode(
        [
            {"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape), "data": list(t.data)}
            for t in tensors
        ]
    )


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
        else _ROW_JSON.encode([list(pair) for pair in t.period.latency]),
    }
