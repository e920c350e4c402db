"""The incoming-message inbox: lanes by priority, bounds, rate limits, drop counts."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from edgefleet_io.inbox import Inbox, InboxPolicy, Lane

Item = tuple[str, bytes]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sort(topic: str) -> tuple[int, str | None]:
    """``ctl`` -> 0, ``data/{key}`` -> 1 and ``junk/{key}`` -> 2 limited per key,
    anything else -> 2 unlimited."""
    if topic == "ctl":
        return 0, None
    if topic.startswith("data/"):
        return 1, topic
    return 2, topic if topic.startswith("junk/") else None


def make(
    *,
    messages: int = 10,
    max_bytes: int = 1000,
    rate: float | None = None,
    burst: float = 0.0,
    junk_rate: float | None = None,
) -> tuple[Inbox[Item], Counter[str], Clock]:
    clock = Clock()
    policy = InboxPolicy(
        lanes=(
            Lane(name="ctl", max_messages=messages, max_bytes=max_bytes),
            Lane(
                name="data",
                max_messages=messages,
                max_bytes=max_bytes,
                rate_per_s=rate,
                burst=burst,
            ),
            Lane(
                name="junk",
                max_messages=messages,
                max_bytes=max_bytes,
                rate_per_s=junk_rate,
                burst=1,
            ),
        ),
        sort=sort,
        clock=clock,
    )
    return Inbox(policy, lambda item: (item[0], len(item[1]))), policy.counters, clock


def drain(inbox: Inbox[Item]) -> list[Item]:
    out = []
    while not inbox.empty():
        out.append(inbox.get_nowait())
    return out


def test_the_highest_lane_is_read_first_and_order_kept_within_a_lane() -> None:
    inbox, counters, _ = make()
    for item in [("junk", b"1"), ("data/a", b"2"), ("ctl", b"3"), ("data/b", b"4"), ("ctl", b"5")]:
        inbox.put_nowait(item)
    assert inbox.qsize() == 5
    assert [payload for _, payload in drain(inbox)] == [b"3", b"5", b"2", b"4", b"1"]
    assert not counters


@pytest.mark.parametrize(
    ("messages", "max_bytes", "payloads", "kept"),
    [
        (3, 1000, [b"a", b"b", b"c", b"d", b"e"], [b"c", b"d", b"e"]),  # by count
        (10, 5, [b"aa", b"bb", b"cc", b"d"], [b"bb", b"cc", b"d"]),  # by bytes
        (10, 5, [b"aa", b"toolarge", b"b"], [b"aa", b"b"]),  # larger than the lane
    ],
)
def test_a_full_lane_drops_its_oldest_and_counts(
    messages: int, max_bytes: int, payloads: list[bytes], kept: list[bytes]
) -> None:
    inbox, counters, _ = make(messages=messages, max_bytes=max_bytes)
    for payload in payloads:
        inbox.put_nowait(("ctl", payload))
    assert [payload for _, payload in drain(inbox)] == kept
    assert counters == Counter({"inbox_dropped_ctl": len(payloads) - len(kept)})
    assert inbox.held_bytes() == 0


def test_a_light_sender_is_served_in_turn_and_a_heavy_one_loses_its_own_first() -> None:
    inbox, counters, _ = make(messages=10)
    for n in range(100):
        inbox.put_nowait(("data/heavy", b"%d" % n))
        if n == 95:
            inbox.put_nowait(("data/light", b"light"))
    got = drain(inbox)
    # The heavy sender's newest nine are kept, the light one's message too, served second.
    assert got[:2] == [("data/heavy", b"91"), ("data/light", b"light")]
    assert [payload for _, payload in got[2:]] == [b"%d" % n for n in range(92, 100)]
    assert counters == Counter({"inbox_dropped_data": 91})


def test_a_flood_holds_no_more_than_the_bounds() -> None:
    inbox, counters, _ = make(messages=100, max_bytes=500)
    for n in range(10_000):
        topic = ["ctl", f"data/{n % 50}", "junk/x", f"junk/{n}"][n % 4]
        inbox.put_nowait((topic, b"x" * (n % 7)))
        assert inbox.qsize() <= 300
        assert inbox.held_bytes() <= 1500
    assert sum(counters.values()) == 10_000 - inbox.qsize()


def test_a_key_over_its_rate_is_demoted_to_the_junk_lane_until_its_bucket_refills() -> None:
    inbox, counters, clock = make(rate=1.0, burst=2)
    for payload in [b"1", b"2", b"3"]:
        inbox.put_nowait(("data/a", payload))
    inbox.put_nowait(("data/b", b"4"))  # its own bucket
    inbox.put_nowait(("ctl", b"5"))  # unlimited
    clock.now = 1.0
    inbox.put_nowait(("data/a", b"6"))  # one token back
    # Keys in turn within the data lane (a, b, a, a), the over-rate one in the junk lane.
    assert [payload for _, payload in drain(inbox)] == [b"5", b"1", b"4", b"2", b"6", b"3"]
    assert counters == Counter({"inbox_over_rate_data": 1})


def test_the_junk_lane_over_its_own_rate_drops() -> None:
    inbox, counters, _ = make(junk_rate=1.0)
    for payload in [b"1", b"2"]:
        inbox.put_nowait(("junk/a", payload))
        inbox.put_nowait(("junk", payload))  # no key: never limited
    assert [payload for _, payload in drain(inbox)] == [b"1", b"1", b"2"]
    assert counters == Counter({"inbox_over_rate_junk": 1, "inbox_dropped_junk": 1})


def test_a_waiting_reader_wakes_for_a_message_and_skips_dropped_ones() -> None:
    inbox, counters, _ = make(messages=1)

    def arrive() -> None:  # scheduled after the reader's first step: it waits by then
        assert inbox.empty()
        inbox.put_nowait(("junk", b"1"))
        inbox.put_nowait(("junk", b"2"))  # drops b"1" before the reader runs

    async def scenario() -> Item:
        reader = asyncio.ensure_future(inbox.get())
        asyncio.get_running_loop().call_soon(arrive)
        return await asyncio.wait_for(reader, 5)

    assert asyncio.run(scenario()) == ("junk", b"2")
    assert counters == Counter({"inbox_dropped_junk": 1})
