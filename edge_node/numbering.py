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
    """The next result number, and the reservation to save before using it."""

    seq: int
    reserve_through: int | None
    """Save this as the reserved mark first; ``None``: ``seq`` is already reserved."""


def next_result_seq(last: int, reserved: int, *, block: int = RESULT_SEQ_BLOCK) -> Allocation:
    """The number after ``last`` given the saved mark ``reserved``.

    Raises:
        ValueError: ``block`` is below 1.
    """
    if block < 1:
        raise ValueError("a reservation block holds at least one number")
    seq = last + 1
    if seq <= reserved:
        return Allocation(seq, None)
    return Allocation(seq, seq + block - 1)
