"""The protocol rules of shared/rules.py, as tables."""

from __future__ import annotations

import pytest

from shared.errors import DecodeError
from shared.messages import NodeState
from shared.rules import SlotLedger, accept_node_state, require_topic_node


def state(*, online: bool, session: int) -> NodeState:
    return NodeState(node="n1", online=online, session=session, ts=1.0)


@pytest.mark.parametrize(
    ("stored", "online", "session", "accepted"),
    [
        (None, True, 1, True),  # first birth
        (None, False, 1, True),  # first thing heard is a death
        (5, True, 6, True),  # next connect
        (5, True, 1, True),  # reinstalled node counts from 1 again: a birth always wins
        (5, False, 5, True),  # death of the current session
        (5, False, 6, True),  # death of a newer session
        (5, False, 4, False),  # late Last Will of a replaced connection
    ],
)
def test_birth_always_wins_and_a_stale_death_is_ignored(
    stored: int | None, online: bool, session: int, accepted: bool
) -> None:
    assert accept_node_state(stored, state(online=online, session=session)) is accepted


def test_payload_must_name_its_topics_node() -> None:
    require_topic_node("n1", "n1")
    with pytest.raises(DecodeError, match="payload names node 'n2', topic 'n1'"):
        require_topic_node("n1", "n2")
    with pytest.raises(DecodeError):
        require_topic_node(None, "n1")


@pytest.mark.parametrize(
    ("acked", "held", "offered", "fresh", "mark", "held_after", "ack"),
    [
        (0, [], [1, 2, 3], [1, 2, 3], 3, [], 3),  # contiguous from the start
        (0, [], [2, 3], [2, 3], 0, [2, 3], None),  # a gap at 1: nothing acked yet
        (0, [2, 3], [1], [1], 3, [], 3),  # the gap fills: the mark jumps over held slots
        (3, [], [2, 3], [], 3, [], 3),  # re-sent settled slots: skipped, acked again
        (3, [5], [5, 5], [], 3, [5], None),  # held already: skipped, no ack due
        (3, [], [4, 4], [4], 4, [], 4),  # a duplicate inside one batch is stored once
        (3, [6], [5], [5], 3, [5, 6], None),  # still a gap at 4
    ],
)
def test_slot_ledger_acks_the_highest_contiguous_stored_slot(
    acked: int,
    held: list[int],
    offered: list[int],
    fresh: list[int],
    mark: int,
    held_after: list[int],
    ack: int | None,
) -> None:
    ledger = SlotLedger(acked, held)
    kept = [slot for slot in offered if ledger.offer(slot)]
    assert kept == fresh
    assert ledger.advance() == mark
    assert sorted(ledger.held) == held_after
    assert ledger.ack_due() == ack


def test_a_births_outbox_floor_settles_the_slots_below_it() -> None:
    ledger = SlotLedger(3, [7, 9])
    ledger.settle_floor(8)  # the node holds nothing below 8
    assert ledger.acked == 7
    assert ledger.held == {9}
    assert ledger.advanced
    ledger.settle_floor(2)  # never lowers the mark
    assert ledger.acked == 7
    assert ledger.advance() == 7
    assert ledger.offer(8)
    assert ledger.advance() == 9
    assert ledger.fresh_above() == []


def test_fresh_slots_above_a_gap_are_what_must_be_remembered() -> None:
    ledger = SlotLedger(10, [])
    for slot in (13, 11, 14):
        assert ledger.offer(slot)
    assert ledger.advance() == 11
    assert ledger.fresh_above() == [13, 14]
    assert ledger.ack_due() == 11


def test_nothing_is_due_for_a_node_never_acked() -> None:
    ledger = SlotLedger(0, [])
    assert not ledger.offer(0)  # slot 0 does not exist: seq starts at 1
    assert ledger.ack_due() is None
