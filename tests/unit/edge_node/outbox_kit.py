"""Helpers for the outbox tests: topics and payloads that carry their seq."""

from __future__ import annotations

import json
from pathlib import Path

from edge_node.outbox import OutboxEntry

REPO = Path(__file__).resolve().parents[3]
TOPIC = "fleet/v1/default/node/n1/results"
STATUS_TOPIC = "fleet/v1/default/node/n1/status"
TEL_TOPIC = "fleet/v1/default/node/n1/telemetry"


def payload_for(seq: int) -> bytes:
    return json.dumps({"type": "results", "node": "n1", "seq": seq}).encode()


def seq_of(entry: OutboxEntry) -> int:
    value = json.loads(entry.payload)["seq"]
    assert isinstance(value, int)
    return value


def sized(n: int) -> bytes:
    """A payload of exactly ``n`` bytes."""
    return b"x" * n
