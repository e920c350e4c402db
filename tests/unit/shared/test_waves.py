"""Wave membership (shared.waves)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import DecodeError
from shared.waves import BUCKETS, bucket, buckets_for_percent, in_wave
from tests.support.shared_kit import PROPERTY

# ----- waves --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rollout", "node", "expected"),
    [("r1", "n1", 2903), ("rollout-42", "node-0007", 2874), ("", "", 3192)],
)
def test_bucket_is_pinned(rollout: str, node: str, expected: int) -> None:
    # Controller and nodes must agree forever: a changed hash would split the fleet.
    assert bucket(rollout, node) == expected


@PROPERTY
@given(st.text(max_size=64), st.text(max_size=64))
def test_bucket_is_deterministic_and_in_range(rollout: str, node: str) -> None:
    value = bucket(rollout, node)
    assert 0 <= value < BUCKETS
    assert bucket(rollout, node) == value


def test_bucket_separator_prevents_collisions() -> None:
    assert bucket("ab", "c") != bucket("a", "bc")


NODES = [f"node-{i:04d}" for i in range(2000)]


@pytest.mark.parametrize("rollout", ["r1", "rollout-2024-06", "x"])
def test_ten_percent_wave_is_about_ten_percent(rollout: str) -> None:
    limit = buckets_for_percent(10)
    members = [n for n in NODES if in_wave(rollout, n, limit)]
    assert 0.08 * len(NODES) <= len(members) <= 0.12 * len(NODES)


def test_waves_of_different_rollouts_differ() -> None:
    limit = buckets_for_percent(10)
    first = {n for n in NODES if in_wave("r1", n, limit)}
    second = {n for n in NODES if in_wave("r2", n, limit)}
    assert first != second
    assert len(first & second) < len(first) / 2  # independent draws overlap ~10%


@PROPERTY
@given(
    st.floats(min_value=0.01, max_value=100),
    st.floats(min_value=0.01, max_value=100),
    st.sampled_from(NODES),
    st.text(max_size=16),
)
def test_waves_are_cumulative(p: float, q: float, node: str, rollout: str) -> None:
    small, large = sorted((p, q))
    if in_wave(rollout, node, buckets_for_percent(small)):
        assert in_wave(rollout, node, buckets_for_percent(large))


def test_every_node_is_in_the_full_wave() -> None:
    assert all(in_wave("r1", n, buckets_for_percent(100)) for n in NODES)
    assert not any(in_wave("r1", n, 0) for n in NODES)


@pytest.mark.parametrize(
    ("percent", "buckets"),
    [(100, BUCKETS), (50, 5000), (10, 1000), (12.5, 1250), (0.01, 1), (0.001, 0)],
)
def test_buckets_for_percent(percent: float, buckets: int) -> None:
    assert buckets_for_percent(percent) == buckets


@pytest.mark.parametrize("percent", [0, -1, 100.01, 1000, math.nan, math.inf, -math.inf])
def test_buckets_for_percent_rejects(percent: float) -> None:
    with pytest.raises(DecodeError):
        buckets_for_percent(percent)
