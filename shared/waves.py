"""Wave membership and label selectors, identical on the controller and the nodes.

A node belongs to a wave of ``percent`` percent of a rollout when its bucket
``bucket(rollout_id, node_id)`` (0..9999, from SHA-256) is below ``percent * 100``.
Waves are cumulative, so a node in wave 1 is in every later wave, and both
sides compute the same set from the rollout id alone: a broadcast wave command
is O(1) in fleet size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from shared.errors import DecodeError
from shared.topics import check_id

__all__ = [
    "BUCKETS",
    "bucket",
    "buckets_for_percent",
    "format_selector",
    "in_wave",
    "matches",
    "parse_selector",
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


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` (empty text selects everything).

    Raises:
        DecodeError: a term is not ``key=value`` or a key repeats.
    """
    selector: dict[str, str] = {}
    for raw_term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = raw_term.partition("=")
        if not sep:
            raise DecodeError(f"selector term {raw_term!r} is not key=value")
        check_id(key.strip(), "label key")
        check_id(value.strip(), "label value")
        if key.strip() in selector:
            raise DecodeError(f"selector repeats key {key.strip()!r}")
        selector[key.strip()] = value.strip()
    return selector


def format_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every ``key=value`` of ``selector`` is among ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())
