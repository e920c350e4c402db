"""Result sequence numbers: the next one, and when a block must be reserved first."""

from __future__ import annotations

import pytest

from edge_node.numbering import RESULT_SEQ_BLOCK, Allocation, next_result_seq

# (last used, reserved mark, block, allocation)
CASES = [
    pytest.param(0, 0, 10, Allocation(1, 10), id="first-number-reserves-a-block"),
    pytest.param(1, 10, 10, Allocation(2, None), id="inside-the-block"),
    pytest.param(9, 10, 10, Allocation(10, None), id="last-of-the-block"),
    pytest.param(10, 10, 10, Allocation(11, 20), id="next-block"),
    pytest.param(5, 1_000, 10, Allocation(6, None), id="reserved-far-ahead"),
    pytest.param(7, 7, 1, Allocation(8, 8), id="block-of-one"),
    # A restarted node continues from its reserved mark: the rest of the old
    # block is skipped, never reused.
    pytest.param(20, 20, 10, Allocation(21, 30), id="after-a-restart"),
    pytest.param(
        1_700_000_000_000_000,
        1_700_000_000_000_000,
        RESULT_SEQ_BLOCK,
        Allocation(1_700_000_000_000_001, 1_700_000_000_000_000 + RESULT_SEQ_BLOCK),
        id="numbers-from-the-clock",
    ),
]


@pytest.mark.parametrize(("last", "reserved", "block", "allocation"), CASES)
def test_next_result_seq(last: int, reserved: int, block: int, allocation: Allocation) -> None:
    assert next_result_seq(last, reserved, block=block) == allocation


def test_numbers_stay_unique_and_reserved_across_restarts() -> None:
    """Allocate, 'restart' (resume from the saved mark) at every step: never a repeat."""
    saved = last = 0
    seen: list[int] = []
    for step in range(200):
        allocation = next_result_seq(last, saved, block=7)
        if allocation.reserve_through is not None:
            saved = allocation.reserve_through  # saved before use
        assert allocation.seq <= saved
        seen.append(allocation.seq)
        last = allocation.seq
        if step % 13 == 0:
            last = saved  # a restart resumes above everything reserved
    assert seen == sorted(set(seen))


def test_a_block_holds_at_least_one_number() -> None:
    with pytest.raises(ValueError, match="at least one"):
        next_result_seq(0, 0, block=0)


@pytest.mark.parametrize(
    ("last", "reserved", "count", "allocation"),
    [
        pytest.param(0, 10, 10, Allocation(1, None), id="fills-the-block"),
        pytest.param(5, 10, 6, Allocation(6, 10 + 10), id="crosses-the-mark"),
        pytest.param(0, 0, 25, Allocation(1, 25 + 9), id="more-than-a-block"),
    ],
)
def test_a_run_of_numbers_is_reserved_whole(
    last: int, reserved: int, count: int, allocation: Allocation
) -> None:
    assert next_result_seq(last, reserved, count=count, block=10) == allocation
    with pytest.raises(ValueError, match="at least one"):
        next_result_seq(last, reserved, count=0)
