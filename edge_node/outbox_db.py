"""The outbox's SQLite file: schema, connection settings, transactions, opening and checking.

Plumbing for :class:`edge_node.outbox.Outbox`, which keeps the invariants; this
module only makes sure the file it hands over is an outbox of a schema this
agent understands, configured for durability (see :func:`configure`), with its
counters read back. A corrupt, foreign or unreadable file raises
:class:`OutboxError` naming the path: nothing is deleted or recreated.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_node.disk import DiskFullError, is_disk_full
from shared.errors import EdgeFleetError

__all__ = [
    "KINDS",
    "SCHEMA_VERSION",
    "Counters",
    "Kind",
    "OutboxDiskFullError",
    "OutboxEntry",
    "OutboxError",
    "OutboxFullError",
    "OutboxStats",
    "TelemetryEntry",
    "as_kind",
    "configure",
    "count_dropped_telemetry",
    "delete_telemetry",
    "drop_oldest_telemetry",
    "meta",
    "open_database",
    "read_depths",
    "transaction",
]

_log = logging.getLogger(__name__)

Kind = Literal["status", "results"]
KINDS: dict[str, Kind] = {"status": "status", "results": "results"}

SCHEMA_VERSION = 1  # kept in PRAGMA user_version
# Columns are ordered so the small ones come before ``payload``: summing ``size``
# at open then never reads a payload's overflow pages.
SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('last_seq', 0), ('dropped_telemetry', 0);
CREATE TABLE entries (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    kind       TEXT    NOT NULL CHECK (kind IN ('status', 'results')),
    size       INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    sent_at    REAL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL
);
-- AUTOINCREMENT: an id handed out by telemetry_due() is never reused by a later
-- row, so telemetry_sent() cannot delete an entry that was never sent.
CREATE TABLE telemetry (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    size       INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL
);
"""
TABLES = frozenset({"meta", "entries", "telemetry"})


class OutboxError(EdgeFleetError):
    """The outbox database is corrupt, foreign, unreadable, closed, or I/O failed."""


class OutboxFullError(EdgeFleetError):
    """No room for a sequenced entry (cap reached or disk full); retry after acks.

    Deliberately not an :class:`OutboxError`: "wait and retry" and "storage is
    broken" must not be caught by the same ``except``.
    """


class OutboxDiskFullError(OutboxFullError, DiskFullError):
    """The disk holding the outbox is full: acks may not free room, retry after a delay."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A sequenced entry waiting for the controller's ack."""

    seq: int
    kind: Kind
    topic: str
    payload: bytes
    attempts: int  # sends recorded by mark_sent()
    created_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class TelemetryEntry:
    """A best-effort telemetry message; ``id`` is not a sequence number."""

    id: int
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int  # sequenced entries pending (not yet acked)
    telemetry_depth: int
    bytes: int  # payload + topic bytes stored, both tables
    last_seq: int  # 0 before the first put
    dropped_telemetry: int  # since the database was created


@dataclass(frozen=True, slots=True)
class Counters:
    """What an opened outbox holds (rows and payload + topic bytes per table)."""

    entries: int
    entry_bytes: int
    telemetry: int
    telemetry_bytes: int
    last_seq: int
    dropped_telemetry: int


def configure(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        # Durability still holds (FULL syncs the rollback journal too); only
        # concurrency and write speed suffer, e.g. on a filesystem without mmap.
        _log.warning("outbox %s: WAL unavailable, using journal_mode=%s", path, mode)
    # FULL, not NORMAL: in WAL mode NORMAL fsyncs only at checkpoints, so a power
    # loss can roll back transactions that had already committed -- i.e. a put()
    # that returned. The contract is "accepted means survives power loss", so
    # every commit fsyncs the WAL. Cost: one fsync per put(), which is why the
    # agent batches many results into one ResultBatch entry.
    conn.execute("PRAGMA synchronous=FULL")
    # macOS fsync() does not flush the drive cache; F_FULLFSYNC does. No-op elsewhere.
    conn.execute("PRAGMA fullfsync=ON")
    # Bound the WAL file left after a checkpoint (bytes); the cap above is logical.
    conn.execute("PRAGMA journal_size_limit=16777216")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception, then re-raise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise sqlite3.DatabaseError(f"meta row {key!r} is missing")
    return int(row[0])


def as_kind(value: object) -> Kind:
    kind = KINDS.get(str(value))
    if kind is None:
        raise sqlite3.DatabaseError(f"unknown entry kind {value!r}")
    return kind


def open_database(path: Path, *, first_seq: int) -> tuple[sqlite3.Connection, Counters]:
    """Open (creating if new, numbering from ``first_seq``) and check the outbox at ``path``.

    Raises:
        DiskFullError: the disk is too full to open it (nothing was changed).
        OutboxError: the file cannot be opened, is not an outbox database, is
            from a newer schema, or is corrupt.
    """
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
    except sqlite3.Error as exc:
        if is_disk_full(exc, path.parent):
            raise DiskFullError(f"disk full creating outbox database {path}: {exc}") from exc
        raise OutboxError(f"cannot open outbox database {path}: {exc}") from exc
    try:
        configure(conn, path)
        _ensure_schema(conn, path, first_seq)
        counters = _read_counters(conn, path)
    except OutboxError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        if is_disk_full(exc, path.parent):
            raise DiskFullError(f"disk full opening outbox database {path}: {exc}") from exc
        raise OutboxError(f"outbox database {path} is corrupt or unreadable: {exc}") from exc
    return conn, counters


def _ensure_schema(conn: sqlite3.Connection, path: Path, first_seq: int) -> None:
    with transaction(conn):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        } - {"sqlite_sequence"}
        if version == 0 and not tables:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (first_seq - 1,))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
    if version == 0:
        raise OutboxError(
            f"{path} is an SQLite database but not an outbox "
            f"(tables: {', '.join(sorted(tables))}); refusing to touch it"
        )
    if version != SCHEMA_VERSION:
        raise OutboxError(
            f"outbox database {path} has schema version {version}; "
            f"this agent understands {SCHEMA_VERSION}"
        )
    if missing := TABLES - tables:
        raise OutboxError(
            f"outbox database {path} is damaged: missing tables {', '.join(sorted(missing))}"
        )


def _read_counters(conn: sqlite3.Connection, path: Path) -> Counters:
    # A full scan of the small columns: a cheap integrity probe that also
    # rebuilds the in-memory counters. (PRAGMA quick_check would read every
    # payload page too, seconds on a full outbox on an SD card.)
    n, size, top = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM entries"
    ).fetchone()
    n_tel, tel_size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM telemetry"
    ).fetchone()
    last_seq = meta(conn, "last_seq")
    if int(top) > last_seq:
        raise OutboxError(
            f"outbox database {path} is damaged: entry seq {top} is above "
            f"the stored sequence counter {last_seq}"
        )
    return Counters(
        entries=int(n),
        entry_bytes=int(size),
        telemetry=int(n_tel),
        telemetry_bytes=int(tel_size),
        last_seq=last_seq,
        dropped_telemetry=meta(conn, "dropped_telemetry"),
    )


def drop_oldest_telemetry(
    conn: sqlite3.Connection, over_bytes: int, over_rows: int
) -> tuple[int, int]:
    """In a transaction: delete the oldest telemetry until ``over_bytes`` bytes and
    ``over_rows`` rows are freed (counted as dropped); (rows, bytes) freed."""
    if over_bytes <= 0 and over_rows <= 0:
        return 0, 0
    freed_rows = freed_bytes = last_id = 0
    cursor = conn.execute("SELECT id, size FROM telemetry ORDER BY id")
    try:
        for tel_id, tel_size in cursor:
            freed_rows += 1
            freed_bytes += int(tel_size)
            last_id = int(tel_id)
            if freed_bytes >= over_bytes and freed_rows >= over_rows:
                break
    finally:
        cursor.close()
    conn.execute("DELETE FROM telemetry WHERE id <= ?", (last_id,))
    count_dropped_telemetry(conn, freed_rows)
    return freed_rows, freed_bytes


def count_dropped_telemetry(conn: sqlite3.Connection, n: int) -> None:
    """In a transaction: add ``n`` to the persisted count of dropped telemetry."""
    conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_telemetry'", (n,))


def delete_telemetry(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, int]:
    """In a transaction: delete the telemetry rows ``ids`` (sent); (rows, bytes) that existed."""
    removed_rows = removed_bytes = 0
    for tel_id in ids:
        row = conn.execute("SELECT size FROM telemetry WHERE id = ?", (tel_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM telemetry WHERE id = ?", (tel_id,))
            removed_rows += 1
            removed_bytes += int(row[0])
    return removed_rows, removed_bytes


def read_depths(path: Path) -> tuple[int, int]:
    """``(entries, telemetry)`` waiting in the outbox at ``path``, read-only.

    Opens the file read-only and writes nothing, so it is safe while a running
    node owns the outbox. A missing file holds nothing.

    Raises:
        OutboxError: the file exists but cannot be read as an outbox.
    """
    if not path.exists():
        return 0, 0
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            depth = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            telemetry = db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read outbox {path}: {exc}") from None
    return int(depth), int(telemetry)
