"""The pure ``decide`` functions the service hands to ``store.rollouts.step``.

``store.rollouts.step(rollout_id, decide, now)`` locks a rollout, loads its
record once with the node statuses not yet folded into it, and saves what
``decide`` returns, in one transaction. The functions here build those
``decide`` callables: they fold statuses, read the fleet through the step's
:class:`~fleet_controller.store.RolloutReader` and call the rollout engine.
No clock, no broker: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from fleet_controller import rollout_core as core
from fleet_controller.rollout_log import rollout_log_lines
from fleet_controller.store import NodeInfo, PendingStatus, RolloutReader
from fleet_controller.store.rollouts import Decide
from shared.labels import matches

T = TypeVar("T")

__all__ = [
    "FLEET_LOOKBACK_S",
    "TickOutcome",
    "event_step",
    "fleet_view",
    "fold_statuses",
    "logged",
    "tick_step",
]

FLEET_LOOKBACK_S = 600.0  # health samples read from this long before the first command

TickOutcome = list[core.RolloutAction]
"""The actions to carry out."""


def fold_statuses(
    record: core.RolloutRecord, pending: Sequence[PendingStatus], now: float
) -> core.RolloutRecord:
    """``record`` with the node statuses ``pending`` applied in order."""
    for status in pending:
        record = core.apply_node_status(
            record,
            status.node_id,
            status.state,
            now=now,
            code=status.code,
            reason=status.reason,
            duplicate=status.duplicate,
            reported_at=status.ts,
        )
    return record


def fleet_view(
    reader: RolloutReader, spec: core.RolloutSpec, since: float
) -> tuple[dict[str, core.NodeView], tuple[str, ...]]:
    """The selected, unrevoked nodes with their health samples since ``since``,
    and the unrevoked nodes that match the selector only by their own labels
    (operators relabelled them out: a broadcast must exclude them)."""
    listed = frozenset(spec.nodes)
    nodes: list[NodeInfo] = []
    excluded: list[str] = []
    for n in reader.nodes(()):
        if n.revoked:
            continue
        if matches(spec.selector, n.labels):
            if not listed or n.node_id in listed:
                nodes.append(n)
        elif spec.selector and matches(spec.selector, n.announced):
            excluded.append(n.node_id)
    samples = reader.samples([n.node_id for n in nodes], since)
    fleet = {
        n.node_id: core.NodeView(
            node_id=n.node_id,
            labels=n.labels,
            online=n.online,
            model=n.model,
            samples=tuple(samples.get(n.node_id, ())),
            announced=n.announced,
        )
        for n in nodes
    }
    return fleet, tuple(excluded)


def tick_step(now: float) -> Decide[TickOutcome]:
    """Fold new statuses, then advance the rollout to ``now`` (:func:`rollout_core.tick`)."""

    def decide(
        current: core.RolloutRecord, pending: list[PendingStatus], reader: RolloutReader
    ) -> tuple[core.RolloutRecord, TickOutcome]:
        sent = [p.sent_at or now for p in current.nodes.values()]
        since = min(sent, default=now) - FLEET_LOOKBACK_S
        fleet, excluded = fleet_view(reader, current.spec, since)
        return core.tick(fold_statuses(current, pending, now), fleet, now=now, excluded=excluded)

    return decide


def event_step(event: core.RolloutEvent, now: float) -> Decide[None]:
    """Fold new statuses, then apply an operator's ``event`` (pause, resume, abort, rollback).

    The ``decide`` raises IllegalTransitionError when the event is not allowed.
    """

    def decide(
        current: core.RolloutRecord, pending: list[PendingStatus], _reader: RolloutReader
    ) -> tuple[core.RolloutRecord, None]:
        record = fold_statuses(current, pending, now)
        if event is core.RolloutEvent.ROLLBACK:
            new = core.start_rollback(record)
        else:
            new = replace(record, state=core.apply_event(record.state, event))
        return replace(new, reason=f"{event.value} by operator"), None

    return decide


def logged(decide: Decide[T], lines: list[str], *, operator: str | None = None) -> Decide[T]:
    """``decide``, also leaving in ``lines`` what the step changed, for the log
    (:func:`~fleet_controller.rollout_log.rollout_log_lines`; ``operator``: whose
    action the step is, None for a tick)."""

    def wrapped(
        current: core.RolloutRecord, pending: list[PendingStatus], reader: RolloutReader
    ) -> tuple[core.RolloutRecord, T]:
        new, outcome = decide(current, pending, reader)
        lines[:] = rollout_log_lines(current, new, operator=operator)
        return new, outcome

    return wrapped
