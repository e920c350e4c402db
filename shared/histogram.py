"""The latency bucket scheme nodes report and the controller's health gate reads.

Bucket ``i`` holds latencies from ``2**(i/4)`` µs up to ``2**((i+1)/4)`` µs: four
buckets per doubling, each about 19% wide, from 1 µs (bucket 0 also takes
anything faster) to about an hour (bucket 127 also takes anything slower). A
node sends a telemetry period's histogram as sparse ``(bucket, count)`` pairs;
the scheme is fixed, so histograms from different nodes and periods add up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "BUCKETS_PER_DOUBLING",
    "NUM_BUCKETS",
    "bucket_of",
    "bucket_value_ms",
    "quantile_ms",
]

BUCKETS_PER_DOUBLING = 4
NUM_BUCKETS = 128


def bucket_of(ms: float) -> int:
    """The bucket of a latency of ``ms`` milliseconds (clamped to the scheme's range)."""
    us = ms * 1000.0
    if not us > 1.0:  # also NaN
        return 0
    return min(NUM_BUCKETS - 1, int(math.log2(us) * BUCKETS_PER_DOUBLING))


def bucket_value_ms(index: int) -> float:
    """A bucket's representative latency: the geometric middle of its bounds, in ms."""
    return math.pow(2.0, (index + 0.5) / BUCKETS_PER_DOUBLING) / 1000.0


def quantile_ms(histogram: Iterable[tuple[int, int]], q: float) -> float:
    """The ``q`` quantile (0..1) of a histogram, as its bucket's value; 0 when empty."""
    pairs = sorted(histogram)
    total = sum(count for _, count in pairs)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in pairs:
        seen += count
        if seen >= rank:
            return bucket_value_ms(index)
    return bucket_value_ms(pairs[-1][0])
