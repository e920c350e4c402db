"""Gap tracking and repair timing on a node (edge_node.chunk_core): pure, no I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_node.chunk_core import Assembly, Offer, RepairClock
from shared.chunks import Chunk
from shared.errors import TransferError
from shared.messages import MAX_REQUEST_RANGES

SHA = "cd" * 32
BLOB = bytes(range(256)) * 40  # 10,240 bytes


def piece(offset: int, length: int, total: int = len(BLOB)) -> Chunk:
    return Chunk(SHA, offset, total, BLOB[offset : offset + length])


def drain(assembly: Assembly) -> bytes:
    return b"".join(assembly.take())


# ----- Assembly -------------------------------------------------------------------------


def test_in_order_chunks_stream_straight_through() -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=0)
    out = b""
    for offset in range(0, len(BLOB), 1_024):
        assert assembly.offer(piece(offset, 1_024)) is Offer.USED
        out += drain(assembly)
    assert out == BLOB
    assert assembly.done
    assert assembly.missing() == []


def test_out_of_order_chunks_wait_in_the_buffer_and_gaps_are_listed() -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=4_096)
    assert assembly.offer(piece(3_072, 1_024)) is Offer.USED
    assert assembly.offer(piece(6_144, 1_024)) is Offer.USED
    assert drain(assembly) == b""
    assert assembly.buffered == 2_048
    assert assembly.missing() == [(0, 3_072), (4_096, 2_048), (7_168, 3_072)]
    assert assembly.offer(piece(0, 3_072)) is Offer.USED
    assert drain(assembly) == BLOB[:4_096]
    assert assembly.missing() == [(4_096, 2_048), (7_168, 3_072)]


def test_duplicates_and_bytes_before_the_position_are_ignored() -> None:
    assembly = Assembly(declared=len(BLOB), position=2_048, buffer_bytes=4_096)
    assert assembly.offer(piece(0, 1_024)) is Offer.DUPLICATE
    assert assembly.offer(piece(4_096, 1_024)) is Offer.USED
    assert assembly.offer(piece(4_096, 1_024)) is Offer.DUPLICATE
    # A chunk straddling the position gives only its new part.
    assert assembly.offer(piece(1_024, 2_048)) is Offer.USED
    assert drain(assembly) == BLOB[2_048:3_072]


def test_overlapping_pieces_are_trimmed_to_the_gaps() -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=10_000)
    assembly.offer(piece(1_000, 500))
    assembly.offer(piece(2_000, 500))
    assert assembly.offer(piece(800, 2_000)) is Offer.USED  # fills 800-1000, 1500-2000, 2500-2800
    assert assembly.missing() == [(0, 800), (2_800, len(BLOB) - 2_800)]
    assembly.offer(piece(0, 800))
    assert drain(assembly) == BLOB[:2_800]


def test_a_full_buffer_drops_pieces_ahead_but_never_the_next_one() -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=1_024)
    assert assembly.offer(piece(2_048, 1_024)) is Offer.USED
    assert assembly.offer(piece(4_096, 1_024)) is Offer.NO_ROOM
    assert assembly.offer(piece(0, 2_048)) is Offer.USED  # at the position: always taken
    assert drain(assembly) == BLOB[:3_072]
    assert assembly.buffered == 0
    assert assembly.missing() == [(3_072, len(BLOB) - 3_072)]


def test_the_first_chunk_tells_the_size_and_an_oversize_blob_gives_one_byte_more() -> None:
    declared = 4_096
    assembly = Assembly(declared=declared, position=0, buffer_bytes=8_192)
    assert assembly.missing() == [(0, declared)]
    assembly.offer(piece(0, 4_096, total=len(BLOB)))
    assert assembly.end == declared + 1
    assert drain(assembly) == BLOB[:4_096]
    assert assembly.missing() == [(4_096, 1)]
    assembly.offer(piece(4_096, 1_024, total=len(BLOB)))
    assert drain(assembly) == BLOB[4_096:4_097]  # never more than one byte past
    assert assembly.done


def test_a_smaller_source_ends_the_stream_early_and_forgets_what_lies_past_it() -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=8_192)
    assembly.offer(piece(2_000, 100, total=len(BLOB)))
    with pytest.raises(TransferError, match="changed the blob size"):
        assembly.offer(piece(0, 100, total=1_000))
    small = Assembly(declared=len(BLOB), position=0, buffer_bytes=8_192)
    small.offer(piece(500, 500, total=1_000))
    assert small.end == 1_000
    small.offer(piece(0, 500, total=1_000))
    assert drain(small) == BLOB[:1_000]
    assert small.done


def test_missing_ranges_are_capped_and_the_last_one_runs_to_the_end() -> None:
    size = 4 * MAX_REQUEST_RANGES * 10
    blob = bytes(size)
    assembly = Assembly(declared=size, position=0, buffer_bytes=size)
    for offset in range(10, size, 20):  # every other 10 bytes arrives
        assembly.offer(Chunk(SHA, offset, size, blob[offset : offset + 10]))
    ranges = assembly.missing()
    assert len(ranges) == MAX_REQUEST_RANGES
    assert ranges[0] == (0, 10)
    assert ranges[-1][0] + ranges[-1][1] == size


@given(st.permutations(range(10)), st.integers(0, 10_240))
def test_any_arrival_order_yields_the_blob_exactly_once(order: list[int], buffer: int) -> None:
    assembly = Assembly(declared=len(BLOB), position=0, buffer_bytes=buffer)
    out = b""
    for _ in range(20):  # passes until done: what did not fit comes again
        for index in order:
            assembly.offer(piece(index * 1_024, 1_024))
            out += drain(assembly)
        if assembly.done:
            break
    assert out == BLOB
    assert assembly.buffered == 0


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid"):
        Assembly(declared=0, position=0, buffer_bytes=0)
    with pytest.raises(ValueError, match="invalid"):
        Assembly(declared=10, position=11, buffer_bytes=0)


# ----- RepairClock -------------------------------------------------------------------------


def clock(**overrides: float) -> RepairClock:
    settings = {"base_s": 1.0, "max_s": 8.0, "max_requests": 5}
    settings.update(overrides)
    return RepairClock(
        base_s=settings["base_s"],
        max_s=settings["max_s"],
        max_requests=int(settings["max_requests"]),
        rng=random.Random(7),
    )


def test_the_first_request_goes_at_once_and_the_next_waits_a_jittered_pause() -> None:
    repair = clock()
    assert repair.due_at() == 0.0
    repair.requested(100.0)
    repair.progressed(100.2)
    assert 100.75 <= repair.due_at() <= 101.25 + 0.2


def test_no_request_while_bytes_keep_arriving() -> None:
    repair = clock()
    repair.requested(0.0)
    for now in (0.5, 1.0, 1.5, 2.0):
        repair.progressed(now)
        assert repair.due_at() >= now + 1.0  # always a whole pause after the last byte


def test_a_final_chunk_lets_the_node_ask_as_soon_as_its_pause_allows() -> None:
    repair = clock()
    repair.requested(0.0)
    repair.progressed(0.9)
    repair.saw_final()
    assert repair.due_at() <= 1.25  # not held back by the bytes that just came


def test_fruitless_requests_back_off_to_the_cap_then_give_up() -> None:
    repair = clock()
    gaps = []
    now = 0.0
    repair.requested(now)
    for _ in range(5):
        due = repair.due_at()
        gaps.append(round(due - now, 2))
        now = due
        repair.requested(now)
    waits = (1.0, 1.0, 2.0, 4.0, 8.0)  # doubling from the second fruitless request, capped
    assert all(0.75 * w <= g <= 1.25 * w for g, w in zip(gaps, waits, strict=True)), gaps
    with pytest.raises(TransferError, match="no new bytes after 5 requests"):
        repair.requested(repair.due_at())


def test_progress_resets_the_back_off() -> None:
    repair = clock()
    repair.requested(0.0)
    repair.requested(1.0)
    repair.requested(2.0)
    assert repair.wait_s() == 2.0
    repair.progressed(2.5)
    assert repair.wait_s() == 1.0
    repair.requested(4.0)
    assert repair.fruitless == 1


def test_a_restart_asks_at_once_and_starts_the_back_off_and_the_count_over() -> None:
    """The controller came back: requests sent into its empty group were dropped, not refused."""
    repair = clock(max_requests=3)
    for now in (0.0, 1.0, 2.0, 4.0):
        repair.requested(now)
    assert repair.fruitless == 3
    repair.saw_final()
    repair.restart()
    assert repair.due_at() == 0.0
    repair.requested(5.0)
    assert repair.fruitless == 0
    assert repair.wait_s() == 1.0
    repair.requested(repair.due_at())  # counted again from the start: no stall yet
    assert repair.fruitless == 1


def test_invalid_timing_is_refused() -> None:
    with pytest.raises(ValueError, match="repair timing"):
        clock(base_s=0)
    with pytest.raises(ValueError, match="repair timing"):
        clock(max_s=0.5)
    with pytest.raises(ValueError, match="repair timing"):
        clock(max_requests=0)
