"""The outbox's best-effort telemetry table, and the room it leaves for results.

A base of :class:`edge_node.outbox.Outbox`, which owns the connection, the lock
and the counters these methods read and move (the module docstring there
states the policy: telemetry is unsequenced, dropped oldest first, and never
takes room that results need).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from edge_node.outbox_db import (
    TelemetryEntry,
    count_dropped_telemetry,
    delete_telemetry,
    drop_oldest_telemetry,
    transaction,
)

__all__ = ["TelemetryTable"]

_log = logging.getLogger("edge_node.outbox")


class TelemetryTable:
    """Telemetry methods and room arithmetic of :class:`edge_node.outbox.Outbox`."""

    _path: Path
    _lock: threading.Lock
    _clock: Callable[[], float]
    _max_bytes: int
    _max_entries: int
    _n_entries: int
    _entry_bytes: int
    _n_tel: int
    _tel_bytes: int
    _dropped: int

    if TYPE_CHECKING:

        def _db(self, what: str) -> AbstractContextManager[sqlite3.Connection]: ...

    def _room_needed(self, size: int) -> tuple[int, int]:
        """(bytes, rows) that must be freed to add one row of ``size`` bytes."""
        over_bytes = self._entry_bytes + self._tel_bytes + size - self._max_bytes
        over_rows = self._n_entries + self._n_tel + 1 - self._max_entries
        return over_bytes, over_rows

    def _fits_without_telemetry(self, size: int) -> bool:
        return (
            self._entry_bytes + size <= self._max_bytes and self._n_entries + 1 <= self._max_entries
        )

    def _drop_oldest_telemetry(self, conn: sqlite3.Connection, size: int) -> tuple[int, int]:
        """Delete the oldest telemetry until a row of ``size`` fits; (rows, bytes) freed.

        The caller has checked that dropping all telemetry is enough.
        """
        over_bytes, over_rows = self._room_needed(size)
        freed = drop_oldest_telemetry(conn, over_bytes, over_rows)
        if freed[0]:
            _log.debug("outbox %s full: dropped %d oldest telemetry", self._path, freed[0])
        return freed

    def put_telemetry(self, topic: str, payload: bytes) -> bool:
        """Store a telemetry message, best effort; return False if it was dropped.

        When the cap is reached the oldest telemetry is dropped to make room; if
        results alone leave no room, the new message is dropped instead. Either
        way the drop is counted in ``dropped_telemetry``.

        Raises:
            OutboxDiskFullError: the disk is full (nothing stored).
            OutboxError: the outbox is closed or the database failed.
        """
        size = len(payload) + len(topic.encode("utf-8"))
        with self._db("put_telemetry") as conn:
            if not self._fits_without_telemetry(size):
                with transaction(conn):
                    count_dropped_telemetry(conn, 1)
                self._dropped += 1
                _log.debug("outbox %s full of results: telemetry dropped", self._path)
                return False
            with transaction(conn):
                dropped_rows, dropped_bytes = self._drop_oldest_telemetry(conn, size)
                conn.execute(
                    "INSERT INTO telemetry (size, created_at, topic, payload) VALUES (?, ?, ?, ?)",
                    (size, self._clock(), topic, bytes(payload)),
                )
            self._n_tel += 1 - dropped_rows
            self._tel_bytes += size - dropped_bytes
            self._dropped += dropped_rows
            return True

    def drop_telemetry(self) -> int:
        """Delete all stored telemetry (counted as dropped) to make room; return how many.

        Raises:
            OutboxDiskFullError: the disk is too full even to delete.
            OutboxError: the outbox is closed or the database failed.
        """
        with self._db("drop_telemetry") as conn:
            if not self._n_tel:
                return 0
            with transaction(conn):
                n = int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
                conn.execute("DELETE FROM telemetry")
                count_dropped_telemetry(conn, n)
            self._n_tel = self._tel_bytes = 0
            self._dropped += n
        _log.warning("outbox %s: disk full, dropped %d telemetry message(s)", self._path, n)
        return n

    def telemetry_due(self, limit: int) -> list[TelemetryEntry]:
        """Up to ``limit`` stored telemetry messages, oldest first.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        if limit <= 0:
            return []
        with self._db("telemetry_due") as conn:
            rows = conn.execute(
                "SELECT id, topic, payload FROM telemetry ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            return [
                TelemetryEntry(id=int(tel_id), topic=str(topic), payload=bytes(payload))
                for tel_id, topic, payload in rows
            ]

    def telemetry_sent(self, ids: Iterable[int]) -> int:
        """Delete the telemetry messages ``ids`` (sent); return how many existed.

        Raises:
            OutboxError: the outbox is closed or the database failed.
        """
        wanted = [int(tel_id) for tel_id in ids]
        if not wanted:
            return 0
        with self._db("telemetry_sent") as conn:
            with transaction(conn):
                removed_rows, removed_bytes = delete_telemetry(conn, wanted)
            self._n_tel -= removed_rows
            self._tel_bytes -= removed_bytes
        return removed_rows

    def telemetry_depth(self) -> int:
        with self._lock:
            return self._n_tel
