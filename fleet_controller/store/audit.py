"""The audit log: who asked the controller to change what, when, and how it ended.

Invariants:

* Append-only: entries are never updated or deleted here.
* A request nonce is claimed once: :meth:`AuditRepository.claim_nonce` is an
  insert that does nothing on a conflict, so two replicas handed the same
  request cannot both claim it.
* Arguments are stored as canonical JSON; a value JSON cannot hold is stored
  as its text, and an entry whose stored arguments are unreadable is still
  listed (under ``_unreadable``), never dropped.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from typing import Any

from sqlmodel import col, delete, select

from fleet_controller.store.database import Database
from fleet_controller.store.records import AuditInfo
from fleet_controller.store.tables import AUDIT, NONCES, AuditRow, RequestNonceRow

__all__ = ["AuditRepository"]


class AuditRepository:
    """``store.audit``: append to and read the audit log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def append(  # noqa: PLR0917 - positional, as the service calls it
        self,
        operator: str,
        action: str,
        args: Mapping[str, Any],
        outcome: str,
        detail: str | None,
        now: float,
    ) -> None:
        """Append an entry (``args`` as JSON; values JSON cannot hold as text).

        Raises: StoreError.
        """
        row = {
            "ts": now,
            "operator": operator,
            "action": action,
            "args_json": json.dumps(
                dict(args), separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str
            ),
            "outcome": outcome,
            "detail": detail,
        }
        with self._db.session(write=True) as s:
            s.exec(AUDIT.insert(), params=[row])

    def claim_nonce(self, nonce: str, operator: str, *, expires_at: float, now: float) -> bool:
        """Record ``nonce`` until ``expires_at``; False when it is already recorded
        (a replay). Forgets nonces whose requests expired before ``now``.

        Raises: StoreError.
        """
        row = {"nonce": nonce, "operator": operator, "expires_at": expires_at}
        with self._db.session(write=True) as s:
            s.exec(delete(RequestNonceRow).where(col(RequestNonceRow.expires_at) < now))
            result = s.exec(
                self._db.insert(NONCES).on_conflict_do_nothing(index_elements=["nonce"]),
                params=row,
            )
            return bool(result.rowcount)

    def list(self, limit: int = 100) -> builtins.list[AuditInfo]:
        """The ``limit`` newest entries, newest first. Raises: StoreError."""
        with self._db.session(write=False) as s:
            rows = s.exec(
                select(AuditRow)
                .order_by(col(AuditRow.ts).desc(), col(AuditRow.id).desc())
                .limit(max(0, limit))
            ).all()
            return [_audit_info(row) for row in rows]


def _audit_info(row: AuditRow) -> AuditInfo:
    try:
        args = json.loads(row.args_json)
    except ValueError:
        args = {"_unreadable": row.args_json}
    return AuditInfo(
        id=row.id or 0,
        ts=row.ts,
        operator=row.operator,
        action=row.action,
        args=args,
        outcome=row.outcome,
        detail=row.detail,
    )
