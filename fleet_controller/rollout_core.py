"""The rollout engine's decisions: pure, synchronous, table-driven.

Nothing here touches MQTT, SQL or the clock: every function takes the rollout's
record and an explicit ``now`` and returns the new record plus the actions the
service must carry out (publish a wave command, send a per-node command, clear
the retained broadcast). The service persists the record *before* it carries
out the actions, so a restarted controller resumes where it was and never sends
a node the same step twice.

Rules:

* Rollout states move only along :data:`ROLLOUT_TRANSITIONS`; per-node states
  only along :data:`NODE_TRANSITIONS`. An illegal move raises
  :class:`IllegalTransitionError` naming the state and the event.
* Wave ``i`` holds every selected node whose bucket (:func:`shared.waves.bucket`)
  is below ``buckets_for_percent(waves[i])``: waves are cumulative, and node and
  controller compute the same sets.
* A node counts as ``succeeded`` only once it has been activated, its health
  window has passed and the health gate (:mod:`fleet_controller.health`) last
  found it no worse than its reference. The gate judges the node again on each
  new telemetry period; ``breach_evaluations`` consecutive breaches make it
  ``failed`` with code ``unhealthy``, and it is then rolled back on its own
  (with ``auto_rollback``), whatever the rest of the rollout does. A node with
  no runs passes on liveness at the end of its window; one with too few runs
  for a verdict waits up to ``wave_timeout_s`` more. The window and the
  verdict are the controller's: a node's own ``succeeded`` counts as ``activated``.
* ``failed`` (transient) and ``timed_out`` nodes are retried with exponential
  back-off up to ``max_retries``; ``rejected`` nodes and deterministic failures
  (a model that does not load, a digest mismatch, unhealthy) are never retried.
* A wave passes when every member is settled and failures (rolled-back
  unhealthy nodes included) stay within
  ``max_failures``; the rollout halts as soon as failures exceed it, and then
  rolls the activated nodes back to their previous model when ``auto_rollback``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from enum import StrEnum
from itertools import pairwise

from fleet_controller.health import FleetSamples, HealthSample, judge
from fleet_controller.rollout_records import (
    ClearBroadcast,
    NodeProgress,
    NodeView,
    RolloutAction,
    RolloutRecord,
    RolloutSpec,
    SendNode,
    SendWave,
)
from shared.errors import EdgeFleetError
from shared.labels import matches
from shared.messages import NodeRolloutState, RolloutState
from shared.waves import bucket, buckets_for_percent

__all__ = [
    "DETERMINISTIC_FAILURES",
    "NODE_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "ClearBroadcast",
    "HealthSample",
    "IllegalTransitionError",
    "NodeProgress",
    "NodeView",
    "RolloutAction",
    "RolloutEvent",
    "RolloutRecord",
    "RolloutSpec",
    "SendNode",
    "SendWave",
    "apply_event",
    "apply_node_status",
    "node_transition",
    "start_rollback",
    "tick",
    "wave_limits",
    "wave_of",
]

N = NodeRolloutState
R = RolloutState

DETERMINISTIC_FAILURES = frozenset(
    {"model_invalid", "model_mismatch", "digest_mismatch", "unhealthy", "downgrade"}
)
SETTLED = frozenset({N.SUCCEEDED, N.FAILED, N.REJECTED, N.TIMED_OUT, N.CANCELED, N.ROLLED_BACK})
IN_FLIGHT = frozenset({N.QUEUED, N.DOWNLOADING, N.DOWNLOADED, N.VERIFYING, N.LOADING})


class IllegalTransitionError(EdgeFleetError):
    """A state machine was asked to make a move its table does not allow."""


class RolloutEvent(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    HALT = "halt"
    ABORT = "abort"
    ROLLBACK = "rollback"
    ROLLBACK_DONE = "rollback_done"


E = RolloutEvent

ROLLOUT_TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.PENDING, E.START): R.RUNNING,
    (R.PENDING, E.ABORT): R.ABORTED,
    (R.RUNNING, E.PAUSE): R.PAUSED,
    (R.PAUSED, E.RESUME): R.RUNNING,
    (R.RUNNING, E.COMPLETE): R.SUCCEEDED,
    (R.RUNNING, E.HALT): R.FAILED,
    (R.PAUSED, E.HALT): R.FAILED,
    (R.RUNNING, E.ABORT): R.ABORTED,
    (R.PAUSED, E.ABORT): R.ABORTED,
    (R.RUNNING, E.ROLLBACK): R.ROLLING_BACK,
    (R.PAUSED, E.ROLLBACK): R.ROLLING_BACK,
    (R.SUCCEEDED, E.ROLLBACK): R.ROLLING_BACK,
    (R.FAILED, E.ROLLBACK): R.ROLLING_BACK,
    (R.ABORTED, E.ROLLBACK): R.ROLLING_BACK,
    (R.ROLLING_BACK, E.ROLLBACK_DONE): R.ROLLED_BACK,
}

# Per-node moves. Progress may skip steps (a node that already holds the blob
# goes from queued to verifying), statuses of a retried node start again at
# queued, and a late status may revive a node that timed out. A rollback goes
# by what the node is seen running, not by its last status (which may lag, or
# say canceled when the cancel came too late): any state but rolled_back may
# end there.
_PROGRESS = (N.DOWNLOADING, N.DOWNLOADED, N.VERIFYING, N.LOADING, N.ACTIVATED)
_ENDINGS = (N.FAILED, N.REJECTED, N.TIMED_OUT, N.CANCELED, N.ROLLED_BACK)
NODE_TRANSITIONS: Mapping[NodeRolloutState, frozenset[NodeRolloutState]] = {
    N.QUEUED: frozenset({N.QUEUED, *_PROGRESS, N.SUCCEEDED, *_ENDINGS}),
    N.DOWNLOADING: frozenset({*_PROGRESS, *_ENDINGS}),
    N.DOWNLOADED: frozenset({N.VERIFYING, N.LOADING, N.ACTIVATED, *_ENDINGS}),
    N.VERIFYING: frozenset({N.LOADING, N.ACTIVATED, *_ENDINGS}),
    N.LOADING: frozenset({N.ACTIVATED, *_ENDINGS}),
    N.ACTIVATED: frozenset({N.ACTIVATED, N.SUCCEEDED, N.FAILED, N.TIMED_OUT, N.ROLLED_BACK}),
    N.SUCCEEDED: frozenset({N.ROLLED_BACK, N.FAILED}),
    N.FAILED: frozenset({N.QUEUED, N.ROLLED_BACK}),
    N.TIMED_OUT: frozenset({N.QUEUED, *_PROGRESS, N.SUCCEEDED, N.FAILED, N.ROLLED_BACK}),
    N.REJECTED: frozenset({N.ROLLED_BACK}),
    N.CANCELED: frozenset({N.ROLLED_BACK}),
    N.ROLLED_BACK: frozenset(),
}


def apply_event(state: RolloutState, event: RolloutEvent) -> RolloutState:
    """Raises: IllegalTransitionError when ``event`` is not allowed in ``state``."""
    try:
        return ROLLOUT_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(f"rollout cannot {event.value} while {state.value}") from None


def node_transition(current: NodeRolloutState, new: NodeRolloutState) -> NodeRolloutState:
    """Raises: IllegalTransitionError when a node may not move from ``current`` to ``new``."""
    if new not in NODE_TRANSITIONS[current]:
        raise IllegalTransitionError(f"node cannot go from {current.value} to {new.value}")
    return new


# ----- waves ------------------------------------------------------------------------


def wave_limits(waves: Iterable[float]) -> tuple[int, ...]:
    """Bucket limits of cumulative waves; they must strictly grow and end at or below 100%."""
    limits = tuple(buckets_for_percent(p) for p in waves)
    if not limits or any(b <= a for a, b in pairwise(limits)):
        raise IllegalTransitionError("waves must be increasing percentages, e.g. 1,10,50,100")
    return limits


def wave_of(spec: RolloutSpec, node_id: str) -> int | None:
    """The first wave that includes ``node_id`` (None when no wave reaches it)."""
    node_bucket = bucket(spec.rollout_id, node_id)
    for index, limit in enumerate(wave_limits(spec.waves)):
        if node_bucket < limit:
            return index
    return None


# ----- node statuses ------------------------------------------------------------------


def apply_node_status(
    record: RolloutRecord,
    node_id: str,
    state: NodeRolloutState,
    *,
    now: float,
    code: str | None = None,
    reason: str | None = None,
    duplicate: bool = False,
    reported_at: float | None = None,
) -> RolloutRecord:
    """Fold one node status into the record. Unknown nodes and illegal moves are ignored
    (a late or repeated status must never corrupt the record); the service logs them.

    A node's own ``succeeded`` means "activated"; the controller's health window
    decides when it is ``succeeded`` here. ``reported_at`` is when the node sent
    the status, by its own clock (the clock of its telemetry): an activation's
    health window starts there, whenever the status arrives.
    """
    progress = record.nodes.get(node_id)
    if progress is None:
        return record
    if state is N.CANCELED and record.state is R.RUNNING:
        # The controller cancels only when a rollout halts or ends; while it runs,
        # "canceled" is a node superseding its old job with a retry of this step.
        return record
    if duplicate and state is N.FAILED and progress.state is not N.FAILED:
        return record  # "already attempted" echo of an earlier failure: not news
    if progress.rollback_sent:
        # From here on the node reports the rollback command (queued, loading,
        # activated, ...), which is no retry of this rollout: only its end counts,
        # and the node keeps the code and reason of why it was rolled back.
        if state is not N.ROLLED_BACK or progress.state is N.ROLLED_BACK:
            return record
        updated = replace(progress, state=N.ROLLED_BACK, retry_at=None)
        return replace(record, nodes={**record.nodes, node_id: updated})
    if state is N.SUCCEEDED and progress.state is not N.SUCCEEDED:
        state = N.ACTIVATED
    if state is N.ACTIVATED and progress.state is N.ACTIVATED:
        return record
    if state is N.ROLLED_BACK and not progress.rollback_sent:
        return record
    try:
        node_transition(progress.state, state)
    except IllegalTransitionError:
        return record
    updated = replace(progress, state=state, code=code, reason=reason, retry_at=None)
    if state is N.ACTIVATED:
        updated = replace(
            updated, activated_at=now, activated_ts=now if reported_at is None else reported_at
        )
    return replace(record, nodes={**record.nodes, node_id: updated})


# ----- the tick ------------------------------------------------------------------------


def _failures(nodes: Iterable[NodeProgress], spec: RolloutSpec) -> int:
    count = 0
    for p in nodes:
        if p.state is N.REJECTED or (
            p.state in (N.FAILED, N.TIMED_OUT, N.ROLLED_BACK)
            and (p.code in DETERMINISTIC_FAILURES or p.attempts > spec.max_retries)
        ):
            count += 1
    return count


def _allowed_failures(spec: RolloutSpec, members: int) -> int:
    return math.floor(spec.max_failures * members + 1e-9)


def tick(
    record: RolloutRecord,
    fleet: Mapping[str, NodeView],
    *,
    now: float,
    excluded: tuple[str, ...] = (),
) -> tuple[RolloutRecord, list[RolloutAction]]:
    """Advance ``record`` to ``now``: enrol nodes, time out, gate health, retry,
    pass waves, halt, roll back, finish. Returns the new record and the actions.

    ``fleet`` holds the selected nodes (by their effective labels); ``excluded``
    names the nodes whose own labels match the selector but whose effective
    ones do not, which a wave's broadcast must tell to stay out.
    """
    if record.state is R.PENDING:
        record = replace(record, state=apply_event(record.state, E.START))
    if record.state is R.ROLLING_BACK:
        return _tick_rollback(record, fleet, now)
    if record.state is not R.RUNNING:
        return record, []
    actions: list[RolloutAction] = []
    spec = record.spec
    limits = wave_limits(spec.waves)
    if record.wave_started_at is None:
        record = replace(record, wave_started_at=now)
        actions.extend(_broadcast(spec, record.wave, limits, excluded))
    record, enrol = _enrol(record, fleet, now)
    actions.extend(enrol)
    nodes = dict(record.nodes)
    samples = FleetSamples({node_id: view.samples for node_id, view in fleet.items()})
    for node_id, progress in record.nodes.items():
        view = fleet.get(node_id)
        if view is None and progress.state in IN_FLIGHT and not progress.rollback_sent:
            # Revoked, forgotten or relabelled out of the selection while working.
            reason = "no longer selected (relabelled, revoked or forgotten)"
            nodes[node_id] = replace(progress, state=N.CANCELED, code="deselected", reason=reason)
            actions.append(SendNode(node_id, "cancel"))
            continue
        updated, action = _advance_node(spec, progress, view, samples, now)
        nodes[node_id] = updated
        if action is not None:
            actions.append(action)
    record = replace(record, nodes=nodes)
    members = [p for p in nodes.values() if p.wave <= record.wave]
    failures = _failures(members, spec)
    if failures > _allowed_failures(spec, len(members)):
        reason = f"{failures} of {len(members)} nodes failed in wave {record.wave + 1}"
        return _halt(record, reason, fleet, now, actions)
    if not all(_settled(p, spec) and not _rolling_back(p, fleet) for p in members):
        return record, actions  # an empty wave passes at once
    if record.wave + 1 < len(limits):
        record = replace(record, wave=record.wave + 1, wave_started_at=now)
        actions.extend(_broadcast(spec, record.wave, limits, excluded))
        # Enrol its members now: they get the broadcast, not a per-node command.
        record, enrol = _enrol(record, fleet, now)
        return record, actions + enrol
    record = replace(record, state=apply_event(record.state, E.COMPLETE), reason="all waves passed")
    actions.append(ClearBroadcast())
    return record, actions


def _broadcast(
    spec: RolloutSpec, wave: int, limits: tuple[int, ...], excluded: tuple[str, ...]
) -> list[RolloutAction]:
    """The broadcast of ``wave`` (none for a rollout to listed nodes: each gets its own)."""
    if spec.nodes:
        return []
    return [SendWave(wave, limits[wave], tuple(sorted(excluded)))]


def _settled(progress: NodeProgress, spec: RolloutSpec) -> bool:
    if progress.state in (N.SUCCEEDED, N.REJECTED, N.CANCELED, N.ROLLED_BACK):
        return True
    if progress.state in (N.FAILED, N.TIMED_OUT):
        return progress.code in DETERMINISTIC_FAILURES or progress.attempts > spec.max_retries
    return False


def _rolling_back(progress: NodeProgress, fleet: Mapping[str, NodeView]) -> bool:
    """An unhealthy node's own rollback is on its way and the node is there to take it."""
    if not progress.rollback_sent or progress.state is N.ROLLED_BACK:
        return False
    view = fleet.get(progress.node_id)
    return view is not None and view.online


def _enrol(
    record: RolloutRecord, fleet: Mapping[str, NodeView], now: float
) -> tuple[RolloutRecord, list[RolloutAction]]:
    """Add selected nodes of the current (cumulative) waves that are not tracked yet.

    Nodes already in the wave when its broadcast goes out get it from the
    retained command; a node that appears later, one that matches only by the
    labels operators gave it (its own do not match the broadcast), and every
    node of a rollout to listed nodes get a per-node command.
    """
    spec = record.spec
    nodes = dict(record.nodes)
    actions: list[RolloutAction] = []
    listed = frozenset(spec.nodes)
    for node_id, view in sorted(fleet.items()):
        if node_id in nodes or not matches(spec.selector, view.labels):
            continue
        if listed and node_id not in listed:
            continue
        wave = wave_of(spec, node_id)
        if wave is None or wave > record.wave:
            continue
        late = record.wave_started_at is not None and record.wave_started_at < now
        relabelled = view.announced is not None and not matches(spec.selector, view.announced)
        nodes[node_id] = NodeProgress(
            node_id=node_id, wave=wave, sent_at=now, from_model=view.model
        )
        if late or relabelled or listed:
            actions.append(SendNode(node_id, "deploy"))
    return replace(record, nodes=nodes), actions


def _advance_node(
    spec: RolloutSpec,
    progress: NodeProgress,
    view: NodeView | None,
    samples: FleetSamples,
    now: float,
) -> tuple[NodeProgress, RolloutAction | None]:
    state = progress.state
    if progress.rollback_sent:
        return _advance_rollback(spec, progress, view, now)
    if state is N.ACTIVATED and progress.activated_at is not None:
        return _gate(spec, _judged(spec, progress, view, samples, now), view, now)
    if state in IN_FLIGHT and progress.sent_at is not None:
        # A node holding the model until its activation window is not silent:
        # its clock starts at the later of sending and the activation time.
        started = max(progress.sent_at, spec.activate_at or 0.0)
        if now - started >= spec.wave_timeout_s:
            return replace(progress, state=N.TIMED_OUT, code="timeout", reason="no progress"), None
        return progress, None
    if state in (N.FAILED, N.TIMED_OUT) and not _settled(progress, spec):
        if progress.retry_at is None:
            delay = spec.retry_backoff_s * 2 ** (progress.attempts - 1)
            return replace(progress, retry_at=now + delay), None
        if now >= progress.retry_at:
            retried = replace(
                progress,
                state=N.QUEUED,
                attempts=progress.attempts + 1,
                sent_at=now,
                retry_at=None,
                code=None,
                reason=None,
            )
            return retried, SendNode(progress.node_id, "deploy")
    return progress, None


def _judged(
    spec: RolloutSpec,
    progress: NodeProgress,
    view: NodeView | None,
    samples: FleetSamples,
    now: float,
) -> NodeProgress:
    """``progress`` after judging the node's newest telemetry of the new model, if new."""
    start = _window_start(progress)
    newest = max(
        (
            s.ts
            for s in (view.samples if view is not None else ())
            if s.model_sha256 == spec.model.sha256 and s.ts > start
        ),
        default=None,
    )
    if newest is None or (progress.evaluated_ts is not None and newest <= progress.evaluated_ts):
        return progress
    old_sha = progress.from_model.sha256 if progress.from_model is not None else None
    verdict = judge(
        spec,
        samples,
        progress.node_id,
        old_sha=old_sha,
        activated_at=start,
        now=newest,
    )
    progress = replace(progress, evaluated_ts=newest, runs=verdict.runs, reason=verdict.reason)
    if not verdict.enough:
        return progress
    if verdict.breach:
        return replace(progress, breaches=progress.breaches + 1, passes=0)
    return replace(progress, breaches=0, passes=progress.passes + 1)


def _window_start(progress: NodeProgress) -> float:
    """When the node activated, by its own clock (the clock of its telemetry)."""
    start = progress.activated_ts if progress.activated_ts is not None else progress.activated_at
    assert start is not None
    return start


def _gate(
    spec: RolloutSpec, progress: NodeProgress, view: NodeView | None, now: float
) -> tuple[NodeProgress, RolloutAction | None]:
    """The verdict on an activated node, once its window has passed (or it breached).

    The window is over when ``health_window_s`` has passed here *and* telemetry
    covering it has arrived: a node whose telemetry lags is waited for (up to the
    wave timeout after the window), never passed for want of runs it did send.
    """
    assert progress.activated_at is not None
    if progress.breaches >= spec.breach_evaluations:
        return _unhealthy(spec, progress, now)
    elapsed = now - progress.activated_at
    if elapsed < spec.health_window_s:
        return progress, None
    overdue = elapsed >= spec.health_window_s + spec.wave_timeout_s
    covered = spec.health_window_s == 0 or (  # no window: activation is enough
        progress.evaluated_ts is not None
        and progress.evaluated_ts >= _window_start(progress) + spec.health_window_s
    )
    undecided = progress.breaches or (progress.passes == 0 and progress.runs > 0)
    if not overdue and (undecided or not covered):
        # A breach not confirmed yet, traffic too thin for a verdict, or telemetry
        # of the window still on its way: wait, up to the wave timeout after it.
        return progress, None
    if progress.breaches:
        return _unhealthy(spec, progress, now)
    reason = progress.reason if progress.passes else _liveness(progress, covered=covered)
    if view is not None and view.online:
        return replace(progress, state=N.SUCCEEDED, reason=reason), None
    # Healthy only while live: wait for a node that is away, for at most the wave timeout.
    if overdue:
        reason = "offline since its health window ended"
        return replace(progress, state=N.TIMED_OUT, code="timeout", reason=reason), None
    return progress, None


def _liveness(progress: NodeProgress, *, covered: bool) -> str:
    if progress.runs:
        return f"{progress.runs} runs, too few for a verdict: healthy on liveness"
    if covered:
        return "no runs of the new model: healthy on liveness"
    return "no telemetry of the new model: healthy on liveness"


def _unhealthy(
    spec: RolloutSpec, progress: NodeProgress, now: float
) -> tuple[NodeProgress, RolloutAction | None]:
    """Fail the node as unhealthy and, with ``auto_rollback``, roll it back on its own."""
    failed = replace(progress, state=N.FAILED, code="unhealthy")
    previous = progress.from_model
    if not spec.auto_rollback or previous is None or previous.sha256 == spec.model.sha256:
        return failed, None
    sent = replace(failed, rollback_sent=True, sent_at=now)
    return sent, SendNode(progress.node_id, "rollback", previous)


def _advance_rollback(
    spec: RolloutSpec, progress: NodeProgress, view: NodeView | None, now: float
) -> tuple[NodeProgress, RolloutAction | None]:
    """A node rolled back on its own: confirm it runs its previous model, or resend."""
    if progress.state is N.ROLLED_BACK:
        return progress, None
    previous = progress.from_model
    running = view.model if view is not None else None
    if running is not None and previous is not None and running.sha256 == previous.sha256:
        return replace(progress, state=N.ROLLED_BACK), None
    if progress.sent_at is not None and now - progress.sent_at >= spec.wave_timeout_s:
        return replace(progress, sent_at=now), SendNode(progress.node_id, "rollback", previous)
    return progress, None


def _halt(
    record: RolloutRecord,
    reason: str,
    fleet: Mapping[str, NodeView],
    now: float,
    actions: list[RolloutAction],
) -> tuple[RolloutRecord, list[RolloutAction]]:
    record = replace(record, state=apply_event(record.state, E.HALT), reason=reason)
    actions.append(ClearBroadcast())
    actions.extend(
        SendNode(p.node_id, "cancel") for p in record.nodes.values() if p.state in IN_FLIGHT
    )
    if not record.spec.auto_rollback:
        return record, actions
    record = replace(record, state=apply_event(record.state, E.ROLLBACK))
    rolled, more = _tick_rollback(record, fleet, now)
    return rolled, actions + more


def start_rollback(record: RolloutRecord) -> RolloutRecord:
    """The operator's ``rollback``. Raises: IllegalTransitionError."""
    return replace(record, state=apply_event(record.state, E.ROLLBACK), reason="rollback requested")


def _needs_rollback(progress: NodeProgress, spec: RolloutSpec, view: NodeView | None) -> bool:
    """The node runs (or may run) the rollout's model and had a model before."""
    if progress.from_model is None or progress.from_model.sha256 == spec.model.sha256:
        return False
    if view is not None and view.model is not None:
        return view.model.sha256 == spec.model.sha256
    return progress.state in (N.ACTIVATED, N.SUCCEEDED) or (
        progress.state is N.FAILED and progress.code == "unhealthy"
    )


def _tick_rollback(
    record: RolloutRecord, fleet: Mapping[str, NodeView], now: float
) -> tuple[RolloutRecord, list[RolloutAction]]:
    spec = record.spec
    nodes = dict(record.nodes)
    actions: list[RolloutAction] = [ClearBroadcast()] if record.state is R.ROLLING_BACK else []
    waiting = False
    for node_id, progress in record.nodes.items():
        view = fleet.get(node_id)
        if progress.state is N.ROLLED_BACK:
            continue
        if progress.rollback_sent:
            on_previous = (
                view is not None
                and view.model is not None
                and progress.from_model is not None
                and view.model.sha256 == progress.from_model.sha256
            )
            if on_previous:
                nodes[node_id] = replace(progress, state=N.ROLLED_BACK)
                continue
            waiting = True  # also while a resend is due: the node is not back yet
            if progress.sent_at is not None and now - progress.sent_at >= spec.wave_timeout_s:
                nodes[node_id] = replace(progress, rollback_sent=False)  # resend next tick
            continue
        if _needs_rollback(progress, spec, view):
            nodes[node_id] = replace(progress, rollback_sent=True, sent_at=now)
            actions.append(SendNode(node_id, "rollback", progress.from_model))
            waiting = True
    record = replace(record, nodes=nodes)
    if not waiting:
        record = replace(record, state=apply_event(record.state, E.ROLLBACK_DONE))
    return record, actions
