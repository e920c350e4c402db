"""Rate limits: what one node or one operator may cost the controller.

* :class:`RateLimiter` (from :mod:`shared.rates`) is a token bucket per key
  (pure: the caller passes ``now``).
* :class:`NodeQuotas` admits what a node sends for storing: at most
  ``results_per_s`` results and ``bytes_per_s`` bytes a second, with
  :data:`BURST_S` seconds' worth at once (an outbox flushing after an outage).
  What exceeds it is dropped *unacknowledged* and counted, so the node keeps
  it and sends it again later: a quota slows a node down, it loses nothing.
* Chunk requests are limited per node by :class:`RateLimiter` as well
  (:data:`CHUNKS_PER_S`), in :mod:`fleet_controller.artifacts`.

Buckets are kept per key and bounded in number (see :mod:`shared.rates`), so
a flood of made-up ids cannot grow memory without bound.
"""

from __future__ import annotations

from collections import Counter

from shared.rates import MAX_KEYS, RateLimiter

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
