"""The node's disk-backed outbox: statuses and result batches wait here until acked.

Storage is one SQLite file in the node's data directory (WAL journal,
``synchronous=FULL``; see :func:`edge_node.outbox_db.configure`). One process owns the file; the
:class:`Outbox` object is used from one thread at a time (an asyncio agent calls
it through :func:`asyncio.to_thread`), and a lock serializes calls anyway.

Invariants
----------
* **One sequence.** Statuses and result batches share a per-node sequence
  ``seq`` = 1, 2, 3, ... The last assigned value lives in the database, so it
  survives restarts and keeps counting after every entry has been acked and
  deleted: a ``seq`` is never assigned twice and never skipped. :meth:`put`
  assigns it, calls ``make_payload(seq)`` (the caller embeds it in the JSON),
  stores the entry and commits in ONE transaction; a ``put`` that fails for any
  reason (payload callback raised, outbox full, I/O error) stores nothing and
  consumes no ``seq``, so the controller never waits for a gap.
* **Durable on return.** Once :meth:`put` returns, the entry survives a process
  crash and a power loss (the WAL is fsynced at every commit).
* **Leaves only on ack.** A broker PUBACK proves nothing (Mosquitto drops queued
  messages for slow consumers), so entries are deleted only by :meth:`ack`,
  which the controller sends with the highest *contiguous* ``seq`` it has
  durably stored. Acking is idempotent; an ack above the last assigned ``seq``
  is clamped to it and logged, so a future ``seq`` can never count as acked.
* **Resent in order, backing off.** :meth:`due` lists, in ``seq`` order, the
  entries never sent plus those still unacked whose last send is older than
  their re-send delay: ``resend_after_s`` after the first send, doubling with
  each further send, ``RESEND_DOUBLINGS`` times at most (a controller that is
  slow to ack, not gone, is not flooded with copies; an entry is never
  dropped), or up to a caller's ``max_resend_s`` (the sender's longer cap while
  the controller is silent). :meth:`mark_sent` records a send (time, attempt
  count); :meth:`requeue_all` (call it after every reconnect) marks everything
  unsent so all unacked entries go out again at once, in order. Delivery is
  at-least-once; the controller dedups by ``seq``.
* **Telemetry is best-effort and unsequenced.** It lives in its own table with
  its own ids, so dropping it never opens a gap in the acked sequence.
* **Bounded, results never dropped.** ``max_bytes`` caps the stored payload and
  topic bytes of both tables together (SQLite's own overhead comes on top) and
  ``max_entries`` their row count. When a ``put`` would go over either cap the
  OLDEST telemetry is dropped first; if dropping all of it would not make
  room, ``put`` raises :class:`OutboxFullError` and changes nothing: the caller
  applies back-pressure until acks free space. :meth:`put_telemetry` never
  raises for the cap: it drops the oldest telemetry, or the new entry when
  results alone fill the cap. Every dropped telemetry entry is counted in
  ``dropped_telemetry``, which is persisted.
* **No silent data loss on a bad file.** A corrupt, foreign or unreadable
  database raises :class:`OutboxError` naming the path; nothing is deleted or
  recreated.
* **A full disk is back-pressure, not breakage.** Any call that the disk is
  too full to serve raises :class:`OutboxDiskFullError` (an
  :class:`OutboxFullError`, not an :class:`OutboxError`) and changes nothing. A
  ``put`` that hits it first drops all stored telemetry (counted) and
  truncates the WAL (a checkpoint), then tries once more: results before
  telemetry. An outbox whose file cannot even be opened because the disk is
  full (SQLite's index file cannot be created) is opened at the next call that
  finds room; until then :meth:`floor` is ``None`` and every call raises
  :class:`OutboxDiskFullError`.

"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from edge_node.disk import DiskFullError, is_disk_full
from edge_node.outbox_db import (
    KINDS,
    Kind,
    OutboxDiskFullError,
    OutboxEntry,
    OutboxError,
    OutboxFullError,
    OutboxStats,
    TelemetryEntry,
    as_kind,
    meta,
    open_database,
    read_depths,
    transaction,
)
from edge_node.outbox_telemetry import TelemetryTable

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "RESEND_DOUBLINGS",
    "Kind",
    "Outbox",
    "OutboxDiskFullError",
    "OutboxEntry",
    "OutboxError",
    "OutboxFullError",
    "OutboxStats",
    "TelemetryEntry",
    "read_depths",
]

_log = logging.getLogger(__name__)


DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # payload + topic bytes, both tables together
DEFAULT_MAX_ENTRIES = 1_000_000  # rows, both tables together
RESEND_DOUBLINGS = 3  # an unacked entry's re-send delay grows to 8 x resend_after_s
_MAX_DOUBLINGS = 40  # keeps the SQL shift in range; max_resend_s caps the delay long before


class Outbox(TelemetryTable):
    """Disk-backed queue of sequenced statuses/results and best-effort telemetry.

    ``path`` is the SQLite file (created if missing; its directory must exist).
    ``max_bytes`` and ``max_entries`` cap both tables together (see the module
    docstring for the policy). ``clock`` stamps ``created_at`` (seconds).

    Raises:
        OutboxError: the file cannot be opened, is not an outbox database, is
            from a newer schema, or is corrupt. (A disk too full to open it is no
            error: the outbox opens at the first call that finds room.)
        ValueError: a cap is below 1.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        first_seq: int = 1,
    ) -> None:
        """``first_seq`` numbers the first entry of a *new* database (the agent
        passes its clock in microseconds, so a node whose data directory was
        wiped never reuses numbers the controller has already acknowledged)."""
        if first_seq < 1:
            raise ValueError("outbox first_seq must be at least 1")
        if max_bytes < 1 or max_entries < 1:
            raise ValueError("outbox max_bytes and max_entries must be at least 1")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # Counters mirror the database (loaded at open, updated after each
        # successful commit) so depth/bytes checks cost no query.
        self._n_entries = 0
        self._entry_bytes = 0
        self._n_tel = 0
        self._tel_bytes = 0
        self._last_seq = 0
        self._dropped = 0
        self._first_seq = first_seq
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._open()
        except DiskFullError as exc:
            _log.error("outbox %s cannot be opened yet: %s; retrying as space returns", path, exc)

    # ----- opening -----------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn, counters = open_database(self._path, first_seq=self._first_seq)
        self._n_entries, self._entry_bytes = counters.entries, counters.entry_bytes
        self._n_tel, self._tel_bytes = counters.telemetry, counters.telemetry_bytes
        self._last_seq = counters.last_seq
        self._dropped = counters.dropped_telemetry
        return conn

    # ----- plumbing ----------------------------------------------------------

    @contextmanager
    def _db(self, what: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock, yield the connection (opening it if a full disk kept it
        shut), translate sqlite3 errors."""
        with self._lock:
            if self._closed:
                raise OutboxError(f"outbox {self._path} is closed ({what})")
            if self._conn is None:
                try:
                    self._conn = self._open()
                except DiskFullError as exc:
                    raise OutboxDiskFullError(f"outbox {self._path}: {what}: {exc}") from exc
                _log.info("outbox %s opened: the disk has room again", self._path)
            try:
                yield self._conn
            except sqlite3.Error as exc:
                if is_disk_full(exc, self._path.parent):
                    raise OutboxDiskFullError(
                        f"disk full: outbox {self._path}: {what} failed: {exc}"
                    ) from exc
                raise OutboxError(f"outbox {self._path}: {what} failed: {exc}") from exc

    # ----- sequenced entries -------------------------------------------------

    def put(self, kind: Kind, topic: str, make_payload: Callable[[int], bytes]) -> int:
        """Assign the next ``seq``, store ``make_payload(seq)`` durably, return ``seq``.

        ``make_payload`` runs inside the transaction and must not call back into
        this outbox. If it raises, the exception propagates and nothing is stored.

        Raises:
            OutboxFullError: results fill the cap; nothing was stored and no
                ``seq`` was consumed.
            OutboxDiskFullError: the disk is full even without telemetry (the
                stored telemetry was dropped); nothing was stored.
            ValueError: ``kind`` is unknown, or the entry alone exceeds ``max_bytes``.
            TypeError: ``make_payload`` did not return bytes.
            OutboxError: the outbox is closed or the database failed.
        """
        return self.put_many(kind, topic, [make_payload])[0]

    def put_many(
        self, kind: Kind, topic: str, make_payloads: list[Callable[[int], bytes]]
    ) -> list[int]:
        """:meth:`put` each of ``make_payloads`` in order, all in ONE transaction.

        One commit (one fsync) for the whole group: either every entry is
        stored, with consecutive ``seq`` numbers (returned), or none is.

        Raises:
            The same as :meth:`put`, for the group as a whole.
        """
        if kind not in KINDS:
            raise ValueError(f"outbox entry kind must be 'status' or 'results', not {kind!r}")
        if not make_payloads:
            return []
        try:
            return self._put_many(kind, topic, make_payloads)
        except OutboxDiskFullError:
            if not self._make_room():
                raise
        return self._put_many(kind, topic, make_payloads)

    def _make_room(self) -> bool:
        """After a full disk refused a put: drop all telemetry and give the WAL's
        space back (a checkpoint that truncates it); True when either happened."""
        dropped = 0
        with contextlib.suppress(OutboxDiskFullError):
            dropped = self.drop_telemetry() if self.telemetry_depth() else 0
        try:
            with self._db("checkpoint") as conn:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except OutboxDiskFullError:
            return bool(dropped)
        return bool(dropped) or not busy

    def _put_many(
        self, kind: Kind, topic: str, make_payloads: list[Callable[[int], bytes]]
    ) -> list[int]:
        topic_bytes = len(topic.encode("utf-8"))
        seqs: list[int] = []
        n_entries, entry_bytes = self._n_entries, self._entry_bytes
        n_tel, tel_bytes, dropped = self._n_tel, self._tel_bytes, self._dropped
        with self._db("put") as conn:
            try:
                with transaction(conn):
                    seqs.extend(
                        self._insert(conn, kind, topic, topic_bytes, make) for make in make_payloads
                    )
            except BaseException:
                # Rolled back: the counters moved per row go back with it.
                self._n_entries, self._entry_bytes = n_entries, entry_bytes
                self._n_tel, self._tel_bytes, self._dropped = n_tel, tel_bytes, dropped
                raise
            # Committed: only now does the sequence move.
            self._last_seq = seqs[-1]
        return seqs

    def _insert(
        self,
        conn: sqlite3.Connection,
        kind: Kind,
        topic: str,
        topic_bytes: int,
        make_payload: Callable[[int], bytes],
    ) -> int:
        """One row of :meth:`_put_many`; moves the counters (reset if the transaction fails)."""
        seq = meta(conn, "last_seq") + 1
        payload = make_payload(seq)
        if not isinstance(payload, bytes):
            raise TypeError(f"make_payload returned {type(payload).__name__}, not bytes")
        size = len(payload) + topic_bytes
        if size > self._max_bytes:
            raise ValueError(
                f"outbox entry of {size} bytes can never fit max_bytes={self._max_bytes}"
            )
        if not self._fits_without_telemetry(size):
            raise OutboxFullError(
                f"outbox {self._path} is full: {self._n_entries} unacked entries, "
                f"{self._entry_bytes} bytes (caps: {self._max_entries} entries, "
                f"{self._max_bytes} bytes); wait for acks"
            )
        dropped_rows, dropped_bytes = self._drop_oldest_telemetry(conn, size)
        conn.execute(
            "INSERT INTO entries (seq, kind, size, created_at, sent_at, attempts, "
            "topic, payload) VALUES (?, ?, ?, ?, NULL, 0, ?, ?)",
            (seq, kind, size, self._clock(), topic, payload),
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
        self._n_entries += 1
        self._entry_bytes += size
        self._n_tel -= dropped_rows
        self._tel_bytes -= dropped_bytes
        self._dropped += dropped_rows
        return seq

    def due(
        self,
        now: float,
        *,
        resend_after_s: float,
        limit: int,
        max_resend_s: float | None = None,
    ) -> list[OutboxEntry]:
        """Up to ``limit`` entries, in ``seq`` order, to (re)send at ``now``.

        That is every entry never sent (or requeued) and every entry whose last send is
        older than min(``resend_after_s`` x 2 ** (sends - 1), ``max_resend_s``);
        ``max_resend_s`` defaults to ``resend_after_s`` x 2 ** ``RESEND_DOUBLINGS``.
        ``limit`` <= 0 returns nothing.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        if limit <= 0:
            return []
        if max_resend_s is None:
            max_resend_s = resend_after_s * 2**RESEND_DOUBLINGS
        with self._db("due") as conn:
            rows = conn.execute(
                "SELECT seq, kind, topic, payload, attempts, created_at FROM entries "
                "WHERE sent_at IS NULL "
                "OR sent_at + MIN(? * (1 << MIN(MAX(attempts - 1, 0), ?)), ?) < ? "
                "ORDER BY seq LIMIT ?",
                (resend_after_s, _MAX_DOUBLINGS, max_resend_s, now, limit),
            ).fetchall()
            return [
                OutboxEntry(
                    seq=int(seq),
                    kind=as_kind(kind),
                    topic=str(topic),
                    payload=bytes(payload),
                    attempts=int(attempts),
                    created_at=float(created_at),
                )
                for seq, kind, topic, payload, attempts, created_at in rows
            ]

    def mark_sent(self, seqs: Iterable[int], now: float) -> None:
        """Record that ``seqs`` were published at ``now``; unknown (acked) seqs are ignored.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        params = [(now, int(seq)) for seq in seqs]
        if not params:
            return
        with self._db("mark_sent") as conn, transaction(conn):
            conn.executemany(
                "UPDATE entries SET sent_at = ?, attempts = attempts + 1 WHERE seq = ?", params
            )

    def requeue_all(self) -> int:
        """Mark every pending entry unsent (after a reconnect); return how many changed.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        with self._db("requeue_all") as conn:
            with transaction(conn):
                cursor = conn.execute("UPDATE entries SET sent_at = NULL WHERE sent_at IS NOT NULL")
            return cursor.rowcount

    def ack(self, seq: int) -> int:
        """Delete every entry with ``seq`` at or below the given one; return how many.

        ``seq`` is the controller's highest contiguous durably stored slot. An ack
        above the last assigned ``seq``, or reaching an entry never sent, is
        clamped to just below it (and logged): nothing can acknowledge an entry
        the controller has not been sent, so a forged ack cannot free results
        still waiting to go out. Idempotent.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        if seq < 1:
            return 0
        with self._db("ack") as conn:
            with transaction(conn):
                last_seq = meta(conn, "last_seq")
                if seq > last_seq:
                    _log.warning(
                        "outbox %s: ack for seq %d above last assigned seq %d; clamped",
                        self._path,
                        seq,
                        last_seq,
                    )
                    seq = last_seq
                unsent = conn.execute(
                    "SELECT MIN(seq) FROM entries WHERE attempts = 0 AND seq <= ?", (seq,)
                ).fetchone()[0]
                if unsent is not None:
                    _log.warning(
                        "outbox %s: ack for seq %d reaches seq %d, never sent; clamped",
                        self._path,
                        seq,
                        unsent,
                    )
                    seq = int(unsent) - 1
                n, size = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE seq <= ?", (seq,)
                ).fetchone()
                if n:
                    conn.execute("DELETE FROM entries WHERE seq <= ?", (seq,))
            self._n_entries -= int(n)
            self._entry_bytes -= int(size)
            return int(n)

    # ----- introspection -----------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    def depth(self) -> int:
        """Sequenced entries pending (stored, not yet acked)."""
        with self._lock:
            return self._n_entries

    def last_seq(self) -> int:
        """The last ``seq`` assigned (``first_seq - 1`` before the first :meth:`put`)."""
        with self._lock:
            return self._last_seq

    def floor(self) -> int | None:
        """The lowest ``seq`` still held (the next one to assign when empty).

        Every lower slot was acknowledged or never existed, so a controller may
        treat everything below it as settled. ``None`` while a full disk keeps
        the file shut (nothing is known, so nothing may be settled).
        """
        try:
            with self._db("floor") as conn:
                lowest = conn.execute("SELECT MIN(seq) FROM entries").fetchone()[0]
        except OutboxDiskFullError:
            return None  # not open yet: nothing known to settle
        with self._lock:
            return int(lowest) if lowest is not None else self._last_seq + 1

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                depth=self._n_entries,
                telemetry_depth=self._n_tel,
                bytes=self._entry_bytes + self._tel_bytes,
                last_seq=self._last_seq,
                dropped_telemetry=self._dropped,
            )

    # ----- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Close the database; idempotent. Later calls raise :class:`OutboxError`."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
