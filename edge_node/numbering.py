"""Result sequence numbers: which number comes next, and when to reserve on disk.

Pure: the caller holds the numbers and persists the reservation.

Every inference result carries a ``seq`` unique per node, across restarts, so
``(node, seq)`` identifies it in the controller's store. Numbers are reserved
in blocks of :data:`RESULT_SEQ_BLOCK`: ``reserved`` is the highest number the
node's ``state.json`` allows it to use. A number above it may be handed out
only after a new block (up to :attr:`Allocation.reserve_through`) has been
saved, so a node restarted at any moment resumes above every number it ever
used, at the cost of skipping the rest of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RESULT_SEQ_BLOCK", "Allocation", "next_result_seq"]

RESULT_SEQ_BLOCK = 10_000


@dataclass(frozen=True, slots=True)
class Allocation:
    """The next result number(s), and the reservation to save before using them."""

    seq: int
    """The first number allocated."""
    reserve_through: int | None
    """Save this as the reserved mark first; ``None``: ``seq`` is already reserved."""


def next_result_seq(
    last: int, reserved: int, *, count: int = 1, block: int = RESULT_SEQ_BLOCK
) -> Allocation:
    """The first of ``count`` numbers after ``last`` given the saved mark ``reserved``.

    When the last of them is above ``reserved``, the new mark covers them all
    and ``block - 1`` more (a block starts at the last number allocated).

    Raises:
        ValueError: ``block`` or ``count`` is below 1.
    """
    if block < 1:
        raise ValueError("a reservation block holds at least one number")
    if count < 1:
        raise ValueError("allocate at least one number")
    seq = last + 1
    end = last + count
    if end <= reserved:
        return Allocation(seq, None)
    return Allocation(seq, end + block - 1)
