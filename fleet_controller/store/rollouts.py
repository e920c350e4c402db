"""Rollouts: each one's engine record, its per-node rows, and their history of events.

Invariants:

* **The record is the truth.** ``record_json`` holds the whole
  :class:`~fleet_controller.rollout_core.RolloutRecord`; the ``state``,
  ``wave`` and ``reason`` columns and the ``rollout_nodes`` rows are written
  from it in the same transaction, for queries and operators.
* **One step at a time, each status folded once.** :meth:`RolloutRepository.step`
  locks the rollout row (``SELECT ... FOR UPDATE``; ``BEGIN IMMEDIATE`` on
  SQLite), loads the record once, hands the pure ``decide`` the statuses not yet
  folded (only those at or below their node's contiguous ``acked_seq``, so
  every earlier slot of the node is stored) and marks them applied in the
  transaction that saves the new record: with several controllers, a status
  is folded exactly once, whichever controller ingested it.
* **Events are appended, never rewritten.** Every save appends one
  ``rollout_events`` row per node whose state or code changed versus what was
  stored; :meth:`RolloutRepository.events` lists them oldest first.
"""

from __future__ import annotations

import builtins
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy import func, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_controller.rollout_codec import record_from_json, record_to_json
from fleet_controller.rollout_core import HealthSample, RolloutRecord
from fleet_controller.store.database import Database
from fleet_controller.store.errors import (
    DuplicateRolloutError,
    RecordError,
    StoreError,
    UnknownRolloutError,
)
from fleet_controller.store.ingest import select_samples
from fleet_controller.store.leases import Fence, check_fence
from fleet_controller.store.nodes import select_nodes
from fleet_controller.store.records import (
    ACTIVE_ROLLOUT_STATES,
    NodeInfo,
    PendingStatus,
    RolloutEventInfo,
    RolloutInfo,
    model_ref,
)
from fleet_controller.store.tables import (
    NODES,
    ROLLOUT_EVENTS,
    ROLLOUT_NODES,
    ROLLOUTS,
    STATUSES,
    RolloutEventRow,
    RolloutNodeRow,
    RolloutRow,
)
from shared.errors import DecodeError
from shared.labels import Selector
from shared.messages import NodeRolloutState, RolloutState

__all__ = ["Decide", "RolloutReader", "RolloutRepository"]

T = TypeVar("T")

# What a node's row held when last saved: state, wave, attempts, code, reason.
_Stored = tuple[str, int, int, str | None, str | None]


class RolloutReader:
    """Reads for a rollout step, inside the step's transaction.

    Valid only while the ``decide`` it was handed to runs: the transaction ends
    when ``decide`` returns.
    """

    __slots__ = ("_s",)

    def __init__(self, s: Session) -> None:
        self._s = s

    def nodes(self, selector: Selector) -> list[NodeInfo]:
        """The nodes (revoked ones too) matching ``selector``, by id. Raises: StoreError."""
        return select_nodes(self._s, selector)

    def samples(self, node_ids: Iterable[str], since: float) -> dict[str, list[HealthSample]]:
        """Health samples at or after ``since`` per node, oldest first. Raises: StoreError."""
        return select_samples(self._s, node_ids, since)


Decide = Callable[[RolloutRecord, list[PendingStatus], RolloutReader], tuple[RolloutRecord, T]]
"""A pure step: (stored record, statuses to fold, reader) -> (new record, anything)."""


class RolloutRepository:
    """``store.rollouts``: create, step, save, load and list rollouts; their events.

    :meth:`force_state` is the way out for a rollout whose record cannot be
    stepped (corrupt, or the engine raised on it)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, record: RolloutRecord, created_by: str, now: float) -> RolloutInfo:
        """Store a new rollout (and its nodes, if any, each with a first event).

        Raises:
            DuplicateRolloutError: a rollout with that id exists.
            StoreError: the database failed or the record cannot be encoded.
        """
        spec = record.spec
        row = RolloutRow(
            rollout_id=spec.rollout_id,
            model_name=spec.model.name,
            model_version=spec.model.version,
            model_sha256=spec.model.sha256,
            state=record.state.value,
            wave=record.wave,
            record_json=_encode(record),
            created_by=created_by,
            created_at=now,
            updated_at=now,
            reason=record.reason,
        )
        duplicate = DuplicateRolloutError(f"rollout {spec.rollout_id} exists already")
        with self._db.session(write=True) as s:
            if s.get(RolloutRow, spec.rollout_id) is not None:
                raise duplicate
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise duplicate from None
            self._write_nodes(s, record, {}, now)
            counts: dict[str, int] = defaultdict(int)
            for progress in record.nodes.values():
                counts[progress.state.value] += 1
            return _rollout_info(row, counts)

    def save(self, record: RolloutRecord, now: float) -> None:
        """Persist ``record``: its JSON, state, wave and reason; upsert its per-node
        rows; append an event for each node whose state or code changed versus
        what was stored (all in one transaction).

        Raises:
            UnknownRolloutError: no rollout with that id (use :meth:`create`).
            StoreError: the database failed or the record cannot be encoded.
        """
        with self._db.session(write=True) as s:
            _lock(s, record.spec.rollout_id)
            self._save_locked(s, record, now)

    def step(
        self, rollout_id: str, decide: Decide[T], now: float, *, fence: Fence | None = None
    ) -> tuple[RolloutRecord, T]:
        """Advance one rollout atomically: lock it, load its record once with the
        node statuses not yet folded into it, let ``decide`` (pure, given a
        :class:`RolloutReader` on the same transaction) compute the new record,
        save it if it changed and mark those statuses applied, in one transaction.

        Statuses are handed over in ``(node, seq)`` order, only those at or below
        their node's contiguous ``acked_seq``. Returns what ``decide`` returned.
        ``fence``: the lease term the step is taken under (the ticker's steps),
        checked first; None for an operator's step.

        Raises:
            LeaseLostError: ``fence`` is no longer current (nothing is written).
            UnknownRolloutError: no rollout with that id.
            StoreError: the database failed or the stored record is unreadable.
            Whatever ``decide`` raises (nothing is saved then).
        """
        with self._db.session(write=True) as s:
            if fence is not None:
                check_fence(s, self._db, fence)
            _lock(s, rollout_id)
            stored = s.exec(
                select(col(RolloutRow.record_json)).where(col(RolloutRow.rollout_id) == rollout_id)
            ).one()
            record = _decode(rollout_id, stored)
            ids, pending = _pending(s, rollout_id)
            new, extra = decide(record, pending, RolloutReader(s))
            if new != record:
                self._save_locked(s, new, now)
            if ids:
                s.exec(update(STATUSES).where(STATUSES.c.id.in_(ids)).values(applied=True))
            return new, extra

    def force_state(
        self,
        rollout_id: str,
        state: RolloutState,
        reason: str,
        now: float,
        *,
        fence: Fence | None = None,
    ) -> None:
        """Set a rollout's state and reason outside the engine (a rollout that cannot tick).

        The columns are written without decoding the record, so this works on a
        corrupt one; a record that still decodes is rewritten with the same
        state and reason, so :meth:`load` agrees with :meth:`list`. ``fence``:
        as for :meth:`step`.

        Raises:
            LeaseLostError: ``fence`` is no longer current (nothing is written).
            UnknownRolloutError: no rollout with that id.
            StoreError: the database failed.
        """
        with self._db.session(write=True) as s:
            if fence is not None:
                check_fence(s, self._db, fence)
            _lock(s, rollout_id)
            stored = s.exec(
                select(col(RolloutRow.record_json)).where(col(RolloutRow.rollout_id) == rollout_id)
            ).one()
            values: dict[str, Any] = {"state": state.value, "reason": reason, "updated_at": now}
            try:
                record = replace(_decode(rollout_id, stored), state=state, reason=reason)
                values["record_json"] = _encode(record)
            except RecordError:
                pass  # unreadable: the columns alone say it failed
            s.exec(update(ROLLOUTS).where(ROLLOUTS.c.rollout_id == rollout_id).values(**values))

    def load(self, rollout_id: str) -> RolloutRecord | None:
        """Raises: StoreError (also when the stored record is unreadable)."""
        with self._db.session(write=False) as s:
            stored = s.exec(
                select(col(RolloutRow.record_json)).where(col(RolloutRow.rollout_id) == rollout_id)
            ).first()
        return None if stored is None else _decode(rollout_id, stored)

    def events(self, rollout_id: str) -> builtins.list[RolloutEventInfo]:
        """Per-node state changes of a rollout, oldest first. Raises: StoreError."""
        with self._db.session(write=False) as s:
            rows = s.exec(
                select(RolloutEventRow)
                .where(col(RolloutEventRow.rollout_id) == rollout_id)
                .order_by(col(RolloutEventRow.id))
            ).all()
            return [_event_info(row) for row in rows]

    def _save_locked(self, s: Session, record: RolloutRecord, now: float) -> None:
        rollout_id = record.spec.rollout_id
        s.exec(
            update(ROLLOUTS)
            .where(ROLLOUTS.c.rollout_id == rollout_id)
            .values(
                state=record.state.value,
                wave=record.wave,
                reason=record.reason,
                record_json=_encode(record),
                updated_at=now,
            )
        )
        stored = {
            node_id: (state, wave, attempts, code, reason)
            for node_id, state, wave, attempts, code, reason in s.connection()
            .execute(
                sa_select(
                    col(RolloutNodeRow.node_id),
                    col(RolloutNodeRow.state),
                    col(RolloutNodeRow.wave),
                    col(RolloutNodeRow.attempts),
                    col(RolloutNodeRow.code),
                    col(RolloutNodeRow.reason),
                ).where(col(RolloutNodeRow.rollout_id) == rollout_id)
            )
            .all()
        }
        self._write_nodes(s, record, stored, now)

    def _write_nodes(
        self, s: Session, record: RolloutRecord, stored: Mapping[str, _Stored], now: float
    ) -> None:
        """Upsert the node rows that changed; an event for each changed state or code."""
        rollout_id = record.spec.rollout_id
        rows: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for node_id in sorted(record.nodes):
            p = record.nodes[node_id]
            before = stored.get(node_id)
            if before == (p.state.value, p.wave, p.attempts, p.code, p.reason):
                continue
            key = {"rollout_id": rollout_id, "node_id": node_id}
            rows.append(
                {
                    **key,
                    "state": p.state.value,
                    "wave": p.wave,
                    "attempts": p.attempts,
                    "code": p.code,
                    "reason": p.reason,
                    "updated_at": now,
                }
            )
            if before is None or (before[0], before[3]) != (p.state.value, p.code):
                events.append(
                    {**key, "state": p.state.value, "code": p.code, "reason": p.reason, "ts": now}
                )
        if rows:
            insert = self._db.insert(ROLLOUT_NODES)
            s.exec(
                insert.on_conflict_do_update(
                    index_elements=["rollout_id", "node_id"],
                    set_={
                        name: insert.excluded[name]
                        for name in ("state", "wave", "attempts", "code", "reason", "updated_at")
                    },
                ),
                params=rows,
            )
        if events:
            s.exec(ROLLOUT_EVENTS.insert(), params=events)

    def fetchers(self, sha256: str) -> frozenset[str]:
        """Nodes taking part in an active rollout of blob ``sha256``: the only ones
        whose chunk requests for it are answered. Raises: StoreError."""
        active = sorted(s.value for s in ACTIVE_ROLLOUT_STATES)
        with self._db.session(write=False) as s:
            rows = s.exec(
                select(col(RolloutNodeRow.node_id))
                .join(RolloutRow, col(RolloutRow.rollout_id) == col(RolloutNodeRow.rollout_id))
                .where(col(RolloutRow.model_sha256) == sha256)
                .where(col(RolloutRow.state).in_(active))
            ).all()
            return frozenset(rows)

    def list(self, active_only: bool = False) -> builtins.list[RolloutInfo]:
        """Oldest first; ``active_only``: pending, running, paused or rolling back.

        Raises: StoreError.
        """
        query = select(RolloutRow).order_by(col(RolloutRow.created_at), col(RolloutRow.rollout_id))
        if active_only:
            query = query.where(
                col(RolloutRow.state).in_(sorted(s.value for s in ACTIVE_ROLLOUT_STATES))
            )
        with self._db.session(write=False) as s:
            rows = s.exec(query).all()
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            ids = [row.rollout_id for row in rows]
            if ids:
                for rollout_id, state, count in s.exec(
                    select(
                        col(RolloutNodeRow.rollout_id),
                        col(RolloutNodeRow.state),
                        func.count(),
                    )
                    .where(col(RolloutNodeRow.rollout_id).in_(ids))
                    .group_by(col(RolloutNodeRow.rollout_id), col(RolloutNodeRow.state))
                ).all():
                    counts[rollout_id][state] = count
            return [_rollout_info(row, counts[row.rollout_id]) for row in rows]


def _lock(s: Session, rollout_id: str) -> None:
    """Raises: UnknownRolloutError."""
    found = s.exec(
        select(col(RolloutRow.rollout_id))
        .where(col(RolloutRow.rollout_id) == rollout_id)
        .with_for_update()
    ).first()
    if found is None:
        raise UnknownRolloutError(f"unknown rollout {rollout_id}")


def _pending(s: Session, rollout_id: str) -> tuple[list[int], list[PendingStatus]]:
    """The statuses of ``rollout_id`` to fold now (their row ids, and themselves)."""
    rows = (
        s.connection()
        .execute(
            sa_select(
                STATUSES.c.id,
                STATUSES.c.node_id,
                STATUSES.c.seq,
                STATUSES.c.state,
                STATUSES.c.code,
                STATUSES.c.reason,
                STATUSES.c.duplicate,
                STATUSES.c.ts,
            )
            .join(NODES, NODES.c.node_id == STATUSES.c.node_id)
            .where(
                STATUSES.c.rollout_id == rollout_id,
                STATUSES.c.applied.is_(False),
                STATUSES.c.seq <= NODES.c.acked_seq,
            )
            .order_by(STATUSES.c.node_id, STATUSES.c.seq)
        )
        .all()
    )
    pending = [
        PendingStatus(
            node_id=r.node_id,
            seq=r.seq,
            state=NodeRolloutState(r.state),
            code=r.code,
            reason=r.reason,
            duplicate=bool(r.duplicate),
            ts=r.ts,
        )
        for r in rows
    ]
    return [r.id for r in rows], pending


def _encode(record: RolloutRecord) -> str:
    try:
        return record_to_json(record)
    except ValueError as exc:
        raise RecordError(
            f"rollout {record.spec.rollout_id}: cannot encode record: {exc}"
        ) from None


def _decode(rollout_id: str, stored: str) -> RolloutRecord:
    try:
        return record_from_json(stored)
    except DecodeError as exc:
        raise RecordError(f"rollout {rollout_id}: stored record unreadable: {exc}") from None


def _rollout_info(row: RolloutRow, counts: Mapping[str, int]) -> RolloutInfo:
    what = f"rollout {row.rollout_id}"
    model = model_ref(row.model_name, row.model_version, row.model_sha256, what)
    if model is None:  # pragma: no cover - the columns are NOT NULL
        raise StoreError(f"{what}: no model")
    try:
        state = RolloutState(row.state)
    except ValueError:
        raise StoreError(f"{what}: unknown state {row.state!r}") from None
    return RolloutInfo(
        rollout_id=row.rollout_id,
        model=model,
        state=state,
        wave=row.wave,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reason=row.reason,
        node_counts=dict(counts),
    )


def _event_info(row: RolloutEventRow) -> RolloutEventInfo:
    try:
        state = NodeRolloutState(row.state)
    except ValueError:
        raise StoreError(
            f"rollout {row.rollout_id}: event has unknown state {row.state!r}"
        ) from None
    return RolloutEventInfo(
        id=row.id or 0,
        rollout_id=row.rollout_id,
        node_id=row.node_id,
        state=state,
        code=row.code,
        reason=row.reason,
        ts=row.ts,
    )
