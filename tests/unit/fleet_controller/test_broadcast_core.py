"""The broadcast carousel (fleet_controller.broadcast_core): pure, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_controller.broadcast_core import Carousel


def drain(carousel: Carousel, now: float = 0.0) -> list[int]:
    sent = []
    while (index := carousel.next(now)) is not None:
        sent.append(index)
    return sent


def test_chunks_cover_the_blob_and_the_last_is_short() -> None:
    carousel = Carousel(size=2_500, chunk_bytes=1_000)
    assert carousel.count == 3
    assert [carousel.span(i) for i in range(3)] == [(0, 1_000), (1_000, 1_000), (2_000, 500)]


def test_a_chunk_is_held_for_hold_s_after_it_went_then_sent_once_for_all_askers() -> None:
    carousel = Carousel(size=3_000, chunk_bytes=1_000, hold_s=2.0)
    carousel.schedule([0, 1, 2])
    assert drain(carousel, now=10.0) == [0, 1, 2]
    assert carousel.ready_at() is None
    carousel.schedule(carousel.wanted([(0, 1_500)]))  # a late node
    carousel.schedule(carousel.wanted([(0, 3_000)]))  # another, a moment later
    assert carousel.next(11.9) is None  # held: 0, 1 and 2 went at 10.0
    assert carousel.ready_at() == 12.0
    assert drain(carousel, now=12.0) == [0, 1, 2]  # once each, for both
    assert carousel.idle


def test_a_held_chunk_does_not_hold_back_one_that_may_go() -> None:
    carousel = Carousel(size=3_000, chunk_bytes=1_000, hold_s=2.0)
    carousel.schedule([0])
    assert drain(carousel, now=10.0) == [0]
    carousel.schedule([0, 2])
    assert drain(carousel, now=10.5) == [2]
    assert carousel.ready_at() == 12.0
    assert drain(carousel, now=12.0) == [0]


def test_ranges_map_to_the_chunks_holding_them_and_past_the_end_asks_nothing() -> None:
    carousel = Carousel(size=2_500, chunk_bytes=1_000)
    assert carousel.wanted([(999, 2)]) == [0, 1]
    assert carousel.wanted([(2_400, 1_000)]) == [2]
    assert carousel.wanted([(2_500, 1)]) == []
    assert carousel.wanted([(0, 10), (20, 10)]) == [0]


def test_many_asks_for_the_same_chunks_schedule_them_once() -> None:
    carousel = Carousel(size=10_000, chunk_bytes=1_000)
    for _ in range(1_000):  # a thousand nodes asking for the whole blob
        carousel.schedule(carousel.wanted([(0, 10_000)]))
    assert carousel.pending == 10
    assert carousel.wanted([(0, 10_000)]) == []
    assert drain(carousel) == list(range(10))
    assert carousel.idle


def test_a_late_ask_is_served_after_the_rest_of_the_pass() -> None:
    carousel = Carousel(size=10_000, chunk_bytes=1_000)
    carousel.schedule(carousel.wanted([(0, 10_000)]))
    sent = [carousel.next(0.0), carousel.next(0.0), carousel.next(0.0)]
    carousel.schedule(carousel.wanted([(0, 10_000)]))  # a node joins after chunk 2
    assert carousel.wanted([(0, 10_000)]) == []
    assert [*sent, *drain(carousel)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


def test_gaps_wrap_around_from_the_cursor() -> None:
    carousel = Carousel(size=10_000, chunk_bytes=1_000)
    carousel.schedule([7])
    assert carousel.next(0.0) == 7
    carousel.schedule([2, 8])
    assert drain(carousel) == [8, 2]


@given(st.lists(st.tuples(st.integers(0, 12_000), st.integers(1, 5_000)), max_size=20))
def test_every_scheduled_chunk_is_sent_exactly_once(ranges: list[tuple[int, int]]) -> None:
    carousel = Carousel(size=10_000, chunk_bytes=1_000)
    wanted = carousel.wanted(ranges)
    carousel.schedule(wanted)
    assert sorted(drain(carousel)) == wanted


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Carousel(size=0, chunk_bytes=1)
    with pytest.raises(ValueError, match="hold_s"):
        Carousel(size=1, chunk_bytes=1, hold_s=-1.0)
    with pytest.raises(ValueError, match="positive"):
        Carousel(size=1, chunk_bytes=0)


def test_chunks_sent_while_the_node_was_listening_are_not_sent_again() -> None:
    carousel = Carousel(size=4_000, chunk_bytes=1_000)
    carousel.schedule(carousel.wanted([(0, 4_000)]))
    assert [carousel.next(10.0), carousel.next(11.0)] == [0, 1]
    # A request the node sent at 10.5, read only now: chunk 0 left before it was
    # subscribed, chunk 1 after; 2 and 3 are scheduled already.
    wanted = carousel.wanted([(0, 4_000)], heard_since=10.5)
    assert wanted == [0]
    carousel.schedule(wanted)
    assert drain(carousel, 12.0) == [2, 3, 0]
    assert carousel.wanted([(0, 4_000)], heard_since=10.5) == []
    assert carousel.wanted([(0, 4_000)]) == [0, 1, 2, 3]  # a repair asked after the pass
