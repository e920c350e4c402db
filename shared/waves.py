"""Wave membership, identical on the controller and the nodes.

A node belongs to a wave of ``percent`` percent of a rollout when its bucket
``bucket(rollout_id, node_id)`` (0..9999, from SHA-256) is below ``percent * 100``.
Waves are cumulative, so a node in wave 1 is in every later wave, and both
sides compute the same set from the rollout id alone: a broadcast wave command
is O(1) in fleet size. Which nodes a rollout selects at all is
:mod:`shared.labels`' business.
"""

from __future__ import annotations

import hashlib

from shared.errors import DecodeError

__all__ = [
    "BUCKETS",
    "bucket",
    "buckets_for_percent",
    "in_wave",
]

BUCKETS = 10_000


def bucket(rollout_id: str, node_id: str) -> int:
    digest = hashlib.sha256(f"{rollout_id}\x00{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def buckets_for_percent(percent: float) -> int:
    """Number of buckets (of :data:`BUCKETS`) a cumulative wave of ``percent`` covers."""
    if not 0 < percent <= 100:
        raise DecodeError(f"wave percent {percent} must be in (0, 100]")
    return round(percent * BUCKETS / 100)


def in_wave(rollout_id: str, node_id: str, bucket_limit: int) -> bool:
    return bucket(rollout_id, node_id) < bucket_limit
