"""Protocol rules every party applies the same way: pure, synchronous, no clock.

Each rule lives here once; the controller's store, ``fleetctl top`` and the
test harness call these functions instead of restating them.

* **Birth and death** (:func:`accept_node_state`, Sparkplug's bdSeq rule): a
  birth always wins, because a reinstalled node counts its sessions from 1
  again; a death counts unless its ``session`` is older than the newest one
  seen, because it is then the late Last Will of a connection that has since
  been replaced.
* **Sender matches topic** (:func:`require_topic_node`): a payload naming
  another node than the topic it came on is malformed. The broker ACL decides
  who may publish on a topic; the payload cannot override that.
* **Contiguous acks** (:class:`SlotLedger`): every status and result batch a
  node sends occupies one outbox slot. A receiver stores each slot once, and
  acknowledges the highest slot ``acked`` such that every slot up to it is
  stored; slots stored above a gap are *held* until the gap fills. A slot at or
  below ``acked`` is a re-send whose ack was lost: it is skipped, and the ack
  is sent again. A birth's ``outbox_floor`` settles every slot below it (the
  node holds nothing lower, so nothing lower can ever arrive).
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import DecodeError
from shared.messages import NodeState

__all__ = ["SlotLedger", "accept_node_state", "require_topic_node"]


def accept_node_state(stored_session: int | None, state: NodeState) -> bool:
    """Whether ``state`` (a birth or a death) replaces what is known of its node.

    ``stored_session`` is the session of the newest state accepted so far
    (``None``: nothing known yet).
    """
    if state.online or stored_session is None:
        return True
    return state.session >= stored_session


def require_topic_node(topic_node: str | None, payload_node: str) -> None:
    """Raises: DecodeError when the payload names another node than its topic."""
    if payload_node != topic_node:
        raise DecodeError(f"payload names node {payload_node!r}, topic {topic_node!r}")


class SlotLedger:
    """One node's stored outbox slots: the contiguous mark and the slots held above it.

    Pure bookkeeping; the caller loads ``acked`` and ``held`` from its storage,
    offers the slots of what arrived, stores exactly the slots :meth:`offer`
    called fresh, then calls :meth:`advance` and writes back :attr:`acked` and
    :attr:`held`.
    """

    __slots__ = ("_start", "acked", "fresh", "held", "resent")

    def __init__(self, acked: int = 0, held: Iterable[int] = ()) -> None:
        self.acked = acked
        self.held = {slot for slot in held if slot > acked}
        self.fresh: set[int] = set()
        """Slots offered and found new since this ledger was made."""
        self.resent = False
        """A slot at or below :attr:`acked` was offered again: its ack was lost."""
        self._start = acked

    def offer(self, slot: int) -> bool:
        """Whether ``slot`` is new (store it) rather than stored before or settled."""
        if slot <= self.acked:
            self.resent = True
            return False
        if slot in self.held:
            return False
        self.held.add(slot)
        self.fresh.add(slot)
        return True

    def settle_floor(self, floor: int) -> None:
        """A birth's ``outbox_floor``: every slot below it is settled (never lowers the mark)."""
        self._raise_to(floor - 1)

    def advance(self) -> int:
        """Move the mark through contiguous held slots; returns the new mark."""
        top = self.acked
        while top + 1 in self.held:
            top += 1
        self._raise_to(top)
        return self.acked

    def _raise_to(self, mark: int) -> None:
        if mark > self.acked:
            self.acked = mark
            self.held = {slot for slot in self.held if slot > mark}

    @property
    def advanced(self) -> bool:
        """The mark moved since this ledger was made."""
        return self.acked > self._start

    def ack_due(self) -> int | None:
        """The ack to publish now: the mark when it moved or a settled slot came again."""
        if self.acked > 0 and (self.advanced or self.resent):
            return self.acked
        return None

    def fresh_above(self) -> list[int]:
        """Fresh slots still above the mark (to remember as held), in order."""
        return sorted(slot for slot in self.fresh if slot > self.acked)
