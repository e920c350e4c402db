"""Rate limits: what one node or one operator may cost the controller.

* :class:`RateLimiter` is a token bucket per key (pure: the caller passes ``now``).
* :class:`NodeQuotas` admits what a node sends for storing: at most
  ``results_per_s`` results and ``bytes_per_s`` bytes a second, with
  :data:`BURST_S` seconds' worth at once (an outbox flushing after an outage).
  What exceeds it is dropped *unacknowledged* and counted, so the node keeps
  it and sends it again later: a quota slows a node down, it loses nothing.
* Chunk requests are limited per node by :class:`RateLimiter` as well
  (:data:`CHUNKS_PER_S`), in :mod:`fleet_controller.artifacts`.

Buckets are kept per key; past :data:`MAX_KEYS` keys, idle (full) buckets are
forgotten (all of them, when most are busy), so a flood of made-up ids cannot
grow memory without bound.
"""

from __future__ import annotations

from collections import Counter

__all__ = [
    "BURST_S",
    "CHUNKS_PER_S",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_NODE_BYTES_PER_S",
    "DEFAULT_NODE_RESULTS_PER_S",
    "MAX_KEYS",
    "NodeQuotas",
    "RateLimiter",
]

BURST_S = 30.0
DEFAULT_NODE_RESULTS_PER_S = 5_000.0
DEFAULT_NODE_BYTES_PER_S = 4 * 1024 * 1024.0
DEFAULT_MAX_UPLOAD_BYTES = 4 * 2**30  # the largest model file an operator may upload
CHUNKS_PER_S = 64.0  # 16 MiB/s of 256 KiB chunks per node
MAX_KEYS = 100_000


class RateLimiter:
    """A token bucket per key: ``rate`` per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (tokens, at)

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them."""
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)
        if len(self._buckets) > MAX_KEYS:
            self._forget_idle(now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        """Drop full buckets; when that frees less than half, drop them all (each
        key starts with a full bucket again), so the scan runs once per
        :data:`MAX_KEYS` / 2 new keys at most."""
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rate >= self._burst
        ]
        if len(full) < len(self._buckets) // 2:
            self._buckets.clear()
            return
        for key in full:
            del self._buckets[key]


class NodeQuotas:
    """Per-node ingest limits (see the module docstring)."""

    def __init__(self, *, results_per_s: float, bytes_per_s: float, metrics: Counter[str]) -> None:
        self._results = RateLimiter(results_per_s, results_per_s * BURST_S)
        self._bytes = RateLimiter(bytes_per_s, bytes_per_s * BURST_S)
        self._metrics = metrics

    def admit(self, node: str, size: int, now: float) -> bool:
        """Whether a message of ``size`` bytes on the wire from ``node`` may be stored now."""
        if self._bytes.allow(node, now, float(size)):
            return True
        self._metrics["quota_refused_bytes"] += 1
        return False

    def admit_results(self, node: str, count: int, now: float) -> bool:
        """Whether ``count`` more results from ``node`` may be stored now.

        Called by the ingest writer (one thread at a time), once a batch is
        decoded; the caller counts a refusal (``quota_refused_results``).
        """
        return self._results.allow(node, now, float(count))
