"""Token buckets per key."""

from __future__ import annotations

from shared.rates import RateLimiter


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(2.0, 3.0)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # another key, another bucket
    assert limiter.allow("a", 0.5)  # one token back after 0.5 s at 2/s
    assert not limiter.allow("a", 0.5)


def test_made_up_keys_cannot_grow_the_buckets_beyond_the_bound() -> None:
    limiter = RateLimiter(1.0, 1.0, max_keys=100)
    for n in range(10_000):
        limiter.allow(f"key-{n}", 0.0)
        assert len(limiter) <= 101
