"""Topic matching and reconnect back-off of the transport seam."""

from __future__ import annotations

import random
from itertools import islice

import pytest

from edgefleet_io.transport import reconnect_delays, topic_matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/b", "a/b", True),
        ("#", "$SYS/x", False),  # wildcards do not reach $-topics
        ("+/x", "$share/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matches_follows_mqtt_wildcards(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_reconnect_delays_grow_to_their_ceiling_with_jitter() -> None:
    delays = list(islice(reconnect_delays(initial_s=0.5, maximum_s=4.0, rng=random.Random(7)), 12))
    ceilings = [0.5, 1.0, 2.0, 4.0] + [4.0] * 8
    assert all(0.25 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[6:]) > 1.0  # it does grow
