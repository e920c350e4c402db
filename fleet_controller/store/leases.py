"""Leases: which replica may drive rollouts, with a fencing token every rollout write checks.

A lease is one row of ``leases`` (holder, expiry, token). Invariants:

* **Timed by the database's clock.** Expiries are written and compared with
  the database's own clock (:meth:`Database.now`), in the transaction that
  decides, so replicas whose clocks disagree still agree on who holds a lease.
* **One holder, one term per acquisition.** :meth:`LeaseRepository.acquire`
  locks the row (``SELECT ... FOR UPDATE``; ``BEGIN IMMEDIATE`` on SQLite): the
  holder of an unexpired lease renews it (same token); anyone takes an expired
  or released one, and the token grows by one; otherwise nothing changes and
  the current holder is returned.
* **A fence is checked where it is used.** :func:`check_fence` runs inside the
  writer's transaction and keeps the lease row share-locked until it commits,
  so no acquisition can commit between the check and the write: a replica
  that lost its lease (stalled, paused, partitioned) writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlmodel import Session

from fleet_controller.store.database import Database
from fleet_controller.store.errors import LeaseLostError, StoreError
from fleet_controller.store.tables import LEASES

__all__ = ["Fence", "LeaseInfo", "LeaseRepository", "check_fence"]


@dataclass(frozen=True, slots=True)
class Fence:
    """A held lease as its holder knows it: what every fenced write presents."""

    name: str
    holder: str
    token: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as the database has it. ``remaining_s``: until it expires (<= 0: it has)."""

    name: str
    holder: str
    token: int
    remaining_s: float

    def held_by(self, holder: str) -> bool:
        return self.holder == holder and self.remaining_s > 0

    @property
    def fence(self) -> Fence:
        return Fence(self.name, self.holder, self.token)


class LeaseRepository:
    """``store.leases``: acquire or renew, release, read."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(self, name: str, holder: str, duration_s: float) -> LeaseInfo:
        """Renew ``name`` for ``holder``, or take it if it is free or expired.

        Returns the lease as it stands after the call: ``held_by(holder)`` says
        whether ``holder`` has it (a new ``token`` means a new term).

        Raises: StoreError.
        """
        if not duration_s > 0:
            raise StoreError(f"lease duration must be positive, not {duration_s!r}")
        now_sql = self._db.now()
        with self._db.session(write=True) as s:
            now = float(s.connection().execute(select(now_sql)).scalar_one())
            row = (
                s.connection()
                .execute(
                    select(LEASES.c.holder, LEASES.c.token, LEASES.c.expires_at)
                    .where(LEASES.c.name == name)
                    .with_for_update()
                )
                .first()
            )
            expires = now + duration_s
            if row is None:
                s.connection().execute(
                    self._db.insert(LEASES)
                    .values(name=name, holder=holder, token=1, expires_at=expires, acquired_at=now)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
                # Lost a race to insert it (PostgreSQL: no row to lock): read the winner.
                row = (
                    s.connection()
                    .execute(
                        select(LEASES.c.holder, LEASES.c.token, LEASES.c.expires_at).where(
                            LEASES.c.name == name
                        )
                    )
                    .one()
                )
                return LeaseInfo(name, row.holder, row.token, row.expires_at - now)
            if row.holder == holder and row.expires_at > now:
                s.connection().execute(
                    update(LEASES).where(LEASES.c.name == name).values(expires_at=expires)
                )
                return LeaseInfo(name, holder, row.token, duration_s)
            if row.expires_at <= now:
                token = row.token + 1
                s.connection().execute(
                    update(LEASES)
                    .where(LEASES.c.name == name)
                    .values(holder=holder, token=token, expires_at=expires, acquired_at=now)
                )
                return LeaseInfo(name, holder, token, duration_s)
            return LeaseInfo(name, row.holder, row.token, row.expires_at - now)

    def release(self, fence: Fence) -> bool:
        """End ``fence``'s term now, if it is still current (a clean stop: a successor
        need not wait for the expiry). Returns whether it was. Raises: StoreError."""
        with self._db.session(write=True) as s:
            done = s.exec(
                update(LEASES)
                .where(
                    LEASES.c.name == fence.name,
                    LEASES.c.holder == fence.holder,
                    LEASES.c.token == fence.token,
                    LEASES.c.expires_at > self._db.now(),
                )
                .values(expires_at=0.0)
            )
            return bool(done.rowcount)

    def get(self, name: str) -> LeaseInfo | None:
        """The lease ``name`` (None: never taken). Raises: StoreError."""
        with self._db.session(write=False) as s:
            row = (
                s.connection()
                .execute(
                    select(
                        LEASES.c.holder,
                        LEASES.c.token,
                        LEASES.c.expires_at - self._db.now(),
                    ).where(LEASES.c.name == name)
                )
                .first()
            )
        return None if row is None else LeaseInfo(name, row[0], row[1], float(row[2]))


def check_fence(s: Session, db: Database, fence: Fence) -> None:
    """Inside a write transaction: ``fence`` is still the current, unexpired term of
    its lease. The row stays share-locked until the transaction ends.

    Raises: LeaseLostError (nothing may be written then: roll back).
    """
    row = (
        s.connection()
        .execute(
            select(LEASES.c.holder, LEASES.c.token, LEASES.c.expires_at > db.now())
            .where(LEASES.c.name == fence.name)
            .with_for_update(read=True)
        )
        .first()
    )
    if row is None or (row[0], row[1]) != (fence.holder, fence.token):
        holder = "nobody" if row is None else f"{row[0]} (term {row[1]})"
        raise LeaseLostError(
            f"lease {fence.name}: term {fence.token} of {fence.holder} is over; {holder} holds it"
        )
    if not row[2]:
        raise LeaseLostError(f"lease {fence.name}: term {fence.token} of {fence.holder} expired")
