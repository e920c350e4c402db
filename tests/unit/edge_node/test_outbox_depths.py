"""``read_depths``: what ``edge-node status`` shows of the outbox, read without taking it over."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from edge_node.outbox import Outbox, OutboxError, read_depths


def test_a_missing_outbox_holds_nothing(tmp_path: Path) -> None:
    assert read_depths(tmp_path / "outbox.db") == (0, 0)


def test_depths_are_read_while_the_node_holds_the_outbox_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.put("status", "t/status", lambda seq: f'{{"seq": {seq}}}'.encode())
        outbox.put_telemetry("t/telemetry", b"{}")
        assert read_depths(path) == (3, 1)
        outbox.mark_sent([1, 2], 1.0)
        outbox.ack(2)
        assert read_depths(path) == (1, 1)
        outbox.put("results", "t/results", lambda seq: b"[]")  # still writable
    assert read_depths(path) == (2, 1)


def test_reading_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        outbox.put("status", "t/status", lambda seq: b"{}")
    before = path.read_bytes()
    read_depths(path)
    assert path.read_bytes() == before


def test_a_file_that_is_no_outbox_is_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE other (x INTEGER)")
        db.commit()
    with pytest.raises(OutboxError, match="cannot read outbox"):
        read_depths(path)
