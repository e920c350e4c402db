"""Token buckets per key: how often one node, topic or operator may cost us something.

:class:`RateLimiter` is pure: the caller passes ``now`` (seconds, any monotonic
origin). Buckets are kept per key; past ``max_keys`` keys, idle (full) buckets
are forgotten (all of them, when most are busy), so a flood of made-up keys
cannot grow memory without bound. A forgotten key starts again with a full
bucket: forgetting never makes a limit stricter.
"""

from __future__ import annotations

__all__ = ["MAX_KEYS", "RateLimiter"]

MAX_KEYS = 100_000


class RateLimiter:
    """A token bucket per key: ``rate`` per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_KEYS) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (tokens, at)

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them."""
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)
        if len(self._buckets) > self._max_keys:
            self._forget_idle(now)
        return allowed

    def __len__(self) -> int:
        """Keys with a bucket right now."""
        return len(self._buckets)

    def _forget_idle(self, now: float) -> None:
        """Drop full buckets; when that frees less than half, drop them all (each
        key starts with a full bucket again), so the scan runs once per
        ``max_keys / 2`` new keys at most."""
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
