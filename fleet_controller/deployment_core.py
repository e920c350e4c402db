"""Deployments' decisions: which nodes of a group still need its model, and when
the controller may send it. Pure: no I/O, no clock.

A deployment says what the nodes its selector matches should run. A new or
changed target starts a staged rollout over the whole group (the operator
handler does that); from then on :func:`reconcile` runs every few seconds and
decides, from the deployment, its latest rollout, the fleet and the active
rollouts:

* while its latest rollout is active, nothing (that rollout enrols the
  group's newcomers of its current waves itself);
* once it has ended, the nodes it failed on (failed, rejected, rolled back)
  are *held*: the same model is not sent to them again until the target
  changes;
* when the group's staged rollout did not succeed (halted, aborted, rolled
  back), the release did not pass for this group: nobody else gets it;
* a member that another deployment with another model also selects is in
  *conflict*: neither sends it anything (they would take turns replacing
  each other's model) until operators relabel it or change a selector;
* otherwise every online, unrevoked member that runs another model, is not
  held and is not part of an active rollout is *drifted*, and one rollout to
  exactly those nodes brings them to the target, with the deployment's policy
  (waves among them, the same verification and health gate). A node the plan
  already knows would refuse the model (:func:`fleet_controller.plan_core.refusal`)
  is held at once with that reason instead of being sent it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleet_controller.plan_core import NodeFacts, refusal
from fleet_controller.rollout_records import RolloutRecord
from shared.labels import Selector, matches
from shared.messages import ModelManifest, ModelRef, NodeRolloutState, RolloutState

__all__ = [
    "ACTIVE",
    "Member",
    "Membership",
    "Reconcile",
    "busy_nodes",
    "claimed_by_others",
    "membership",
    "reconcile",
]

N = NodeRolloutState
R = RolloutState
ACTIVE = frozenset({R.PENDING, R.RUNNING, R.PAUSED, R.ROLLING_BACK})
_HELD_STATES = frozenset({N.FAILED, N.REJECTED, N.ROLLED_BACK})


class Member(NodeFacts, Protocol):
    """What the reconciler reads of a node, beyond the plan's facts."""

    @property
    def revoked(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Reconcile:
    """What to do now: nodes to hold (node -> why) and nodes to bring to the target."""

    hold: Mapping[str, str] = field(default_factory=dict)
    start: tuple[str, ...] = ()
    waiting: str | None = None  # why nothing is sent now, when that is not the normal case
    conflicts: Mapping[str, str] = field(default_factory=dict)  # node -> the other deployment


@dataclass(frozen=True, slots=True)
class Membership:
    """Where a deployment's group stands (``deployment show``, ``deployment list``)."""

    members: tuple[str, ...]  # unrevoked nodes the selector matches
    on_target: tuple[str, ...]
    drifted: tuple[str, ...]  # online members on another model, not held
    offline: tuple[str, ...]  # offline members not on the target
    held: tuple[str, ...]  # members held with a reason

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; the held nodes are the deployment's own ``held`` map."""
        return {
            "members": len(self.members),
            "on_target": len(self.on_target),
            "drifted": list(self.drifted),
            "offline": list(self.offline),
        }


def membership(
    selector: Selector, target: ModelRef, held: Mapping[str, str], nodes: Sequence[Member]
) -> Membership:
    """The group's members by where they stand against ``target``."""
    members = [n for n in nodes if not n.revoked and matches(selector, n.labels)]
    on = [n for n in members if n.model is not None and n.model.sha256 == target.sha256]
    on_ids = {n.node_id for n in on}
    off = [n for n in members if n.node_id not in on_ids]
    return Membership(
        members=tuple(n.node_id for n in members),
        on_target=tuple(n.node_id for n in on),
        drifted=tuple(n.node_id for n in off if n.online and n.node_id not in held),
        offline=tuple(n.node_id for n in off if not n.online and n.node_id not in held),
        held=tuple(n.node_id for n in off if n.node_id in held),
    )


def busy_nodes(active: Sequence[RolloutRecord], nodes: Sequence[Member]) -> frozenset[str]:
    """Nodes an active rollout tracks or may still enrol (its selector matches them)."""
    busy: set[str] = set()
    for record in active:
        busy.update(record.nodes)
        if record.spec.nodes:
            busy.update(record.spec.nodes)
        else:
            busy.update(n.node_id for n in nodes if matches(record.spec.selector, n.labels))
    return frozenset(busy)


def _failed_on_target(last: RolloutRecord, target: ModelRef) -> dict[str, str]:
    """The nodes ``last`` failed on, with why, when it carried ``target``."""
    if last.spec.model.sha256 != target.sha256:
        return {}
    held: dict[str, str] = {}
    for node_id, progress in last.nodes.items():
        if progress.state in _HELD_STATES:
            why = progress.code or progress.state.value
            detail = f": {progress.reason}" if progress.reason else ""
            held[node_id] = f"{progress.state.value} in {last.spec.rollout_id} ({why}){detail}"
    return held


def reconcile(
    *,
    selector: Selector,
    target: ModelRef,
    manifest: ModelManifest,
    held: Mapping[str, str],
    last: RolloutRecord | None,
    nodes: Sequence[Member],
    running: Mapping[str, ModelManifest],
    busy: frozenset[str],
    claimed: Mapping[str, str] | None = None,
) -> Reconcile:
    """What the deployment does now (see the module docstring).

    ``last`` is its latest rollout (None: none, or no longer stored);
    ``running`` maps the sha256 of models nodes run to their manifests, for
    the plan's refusal rules; ``busy`` are the nodes of active rollouts;
    ``claimed`` maps nodes other deployments with other models select to the
    name of one of them.
    """
    claimed = claimed or {}
    conflicts = {
        n.node_id: claimed[n.node_id]
        for n in nodes
        if n.node_id in claimed and not n.revoked and matches(selector, n.labels)
    }
    if last is not None and last.state in ACTIVE:
        return Reconcile(conflicts=conflicts)
    hold = {} if last is None else _failed_on_target(last, target)
    hold = {k: v for k, v in hold.items() if k not in held}
    if last is not None and not last.spec.nodes and last.state is not R.SUCCEEDED:
        return Reconcile(
            hold=hold,
            waiting=f"its rollout {last.spec.rollout_id} ended {last.state.value}: "
            "no node gets this model until the target changes",
            conflicts=conflicts,
        )
    start: list[str] = []
    for node in nodes:
        if (
            node.revoked
            or not node.online
            or node.node_id in held
            or node.node_id in hold
            or node.node_id in busy
            or node.node_id in conflicts
            or not matches(selector, node.labels)
            or (node.model is not None and node.model.sha256 == target.sha256)
        ):
            continue
        current = running.get(node.model.sha256) if node.model is not None else None
        why = refusal(manifest, node, current)
        if why is not None:
            hold[node.node_id] = f"would refuse: {why}"
        else:
            start.append(node.node_id)
    return Reconcile(hold=hold, start=tuple(sorted(start)), conflicts=conflicts)


def claimed_by_others(
    name: str,
    target: ModelRef,
    others: Sequence[tuple[str, Selector, ModelRef]],
    nodes: Sequence[Member],
) -> dict[str, str]:
    """Nodes that deployments other than ``name``, with a model other than
    ``target``, select: node -> the first such deployment's name."""
    claimed: dict[str, str] = {}
    for other, selector, model in sorted(others, key=lambda o: o[0]):
        if other == name or model.sha256 == target.sha256:
            continue
        for node in nodes:
            if not node.revoked and matches(selector, node.labels):
                claimed.setdefault(node.node_id, other)
    return claimed
