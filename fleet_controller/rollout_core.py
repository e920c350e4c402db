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
* A node counts as ``succeeded`` only once it has been activated and its health
  window has passed without its error rate rising or its p95 latency
  regressing beyond the limit versus its previous model
  (:mod:`fleet_controller.health`). The window and the verdict are the
  controller's: a node's own ``succeeded`` counts as ``activated``.
* ``failed`` (transient) and ``timed_out`` nodes are retried with exponential
  back-off up to ``max_retries``; ``rejected`` nodes and deterministic failures
  (a model that does not load, a digest mismatch, unhealthy) are never retried.
* A wave passes when every member is settled and failures stay within
  ``max_failures``; the rollout halts as soon as failures exceed it, and then
  rolls the activated nodes back to their previous model when ``auto_rollback``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import pairwise

from fleet_controller.health import Health, HealthSample, evaluate_health
from shared.errors import EdgeFleetError
from shared.messages import ModelRef, NodeRolloutState, RolloutState
from shared.operations import DEFAULT_POLICY, RolloutPolicy
from shared.waves import bucket, buckets_for_percent, matches

__all__ = [
    "DETERMINISTIC_FAILURES",
    "NODE_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "ClearBroadcast",
    "Health",
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
    "evaluate_health",
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


# ----- the record ---------------------------------------------------------------


_P = DEFAULT_POLICY  # the defaults, stated once in the operator API's RolloutPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutSpec:
    """What the operator asked for. Fractions are 0..1; durations in seconds.

    The tunables and their meaning are those of :class:`shared.operations.RolloutPolicy`.
    """

    rollout_id: str
    model: ModelRef
    selector: Mapping[str, str] = field(default_factory=dict)
    waves: tuple[float, ...] = _P.waves
    max_failures: float = _P.max_failures
    wave_timeout_s: float = _P.wave_timeout_s
    health_window_s: float = _P.health_window_s
    max_latency_regression: float = _P.max_latency_regression
    min_latency_regression_ms: float = _P.min_latency_regression_ms
    max_error_increase: float = _P.max_error_increase
    auto_rollback: bool = _P.auto_rollback
    activate_at: float | None = _P.activate_at
    max_retries: int = _P.max_retries
    retry_backoff_s: float = _P.retry_backoff_s

    @classmethod
    def from_policy(
        cls,
        policy: RolloutPolicy,
        *,
        rollout_id: str,
        model: ModelRef,
        selector: Mapping[str, str],
    ) -> RolloutSpec:
        """The spec of a rollout started with ``policy``'s tunables."""
        return cls(
            rollout_id=rollout_id,
            model=model,
            selector=dict(selector),
            waves=policy.waves,
            max_failures=policy.max_failures,
            wave_timeout_s=policy.wave_timeout_s,
            health_window_s=policy.health_window_s,
            max_latency_regression=policy.max_latency_regression,
            min_latency_regression_ms=policy.min_latency_regression_ms,
            max_error_increase=policy.max_error_increase,
            auto_rollback=policy.auto_rollback,
            activate_at=policy.activate_at,
            max_retries=policy.max_retries,
            retry_backoff_s=policy.retry_backoff_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeProgress:
    node_id: str
    wave: int
    state: NodeRolloutState = N.QUEUED
    attempts: int = 1
    sent_at: float | None = None
    activated_at: float | None = None
    retry_at: float | None = None
    from_model: ModelRef | None = None
    code: str | None = None
    reason: str | None = None
    baseline: HealthSample | None = None
    rollback_sent: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutRecord:
    spec: RolloutSpec
    state: RolloutState = R.PENDING
    wave: int = 0
    wave_started_at: float | None = None
    nodes: Mapping[str, NodeProgress] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the controller knows of a node when it decides."""

    node_id: str
    labels: Mapping[str, str]
    online: bool
    model: ModelRef | None
    samples: tuple[HealthSample, ...] = ()


# ----- actions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendWave:
    """Publish (retained) the broadcast deploy for wave ``wave`` covering ``bucket_limit``."""

    wave: int
    bucket_limit: int


@dataclass(frozen=True, slots=True)
class SendNode:
    """Send ``node`` a per-node command: a deploy (retry, late joiner) or a rollback."""

    node_id: str
    kind: str  # "deploy" | "rollback" | "cancel"
    target: ModelRef | None = None


@dataclass(frozen=True, slots=True)
class ClearBroadcast:
    """The rollout ended: clear its retained broadcast command."""


RolloutAction = SendWave | SendNode | ClearBroadcast


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
) -> RolloutRecord:
    """Fold one node status into the record. Unknown nodes and illegal moves are ignored
    (a late or repeated status must never corrupt the record); the service logs them.

    A node's own ``succeeded`` means "activated"; the controller's health window
    decides when it is ``succeeded`` here.
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
        updated = replace(updated, activated_at=now)
    return replace(record, nodes={**record.nodes, node_id: updated})


# ----- the tick ------------------------------------------------------------------------


def _failures(nodes: Iterable[NodeProgress], spec: RolloutSpec) -> int:
    count = 0
    for p in nodes:
        if p.state is N.REJECTED or (
            p.state in (N.FAILED, N.TIMED_OUT)
            and (p.code in DETERMINISTIC_FAILURES or p.attempts > spec.max_retries)
        ):
            count += 1
    return count


def _allowed_failures(spec: RolloutSpec, members: int) -> int:
    return math.floor(spec.max_failures * members + 1e-9)


def tick(
    record: RolloutRecord, fleet: Mapping[str, NodeView], *, now: float
) -> tuple[RolloutRecord, list[RolloutAction]]:
    """Advance ``record`` to ``now``: enrol nodes, time out, gate health, retry,
    pass waves, halt, roll back, finish. Returns the new record and the actions."""
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
        actions.append(SendWave(record.wave, limits[record.wave]))
    record, enrol = _enrol(record, fleet, now)
    actions.extend(enrol)
    nodes = dict(record.nodes)
    for node_id, progress in record.nodes.items():
        updated, action = _advance_node(spec, progress, fleet.get(node_id), now)
        nodes[node_id] = updated
        if action is not None:
            actions.append(action)
    record = replace(record, nodes=nodes)
    members = [p for p in nodes.values() if p.wave <= record.wave]
    failures = _failures(members, spec)
    if failures > _allowed_failures(spec, len(members)):
        reason = f"{failures} of {len(members)} nodes failed in wave {record.wave + 1}"
        return _halt(record, reason, fleet, now, actions)
    if not all(_settled(p, spec) for p in members):
        return record, actions  # an empty wave passes at once
    if record.wave + 1 < len(limits):
        record = replace(record, wave=record.wave + 1, wave_started_at=now)
        actions.append(SendWave(record.wave, limits[record.wave]))
        # Enrol its members now: they get the broadcast, not a per-node command.
        record, enrol = _enrol(record, fleet, now)
        return record, actions + enrol
    record = replace(record, state=apply_event(record.state, E.COMPLETE), reason="all waves passed")
    actions.append(ClearBroadcast())
    return record, actions


def _settled(progress: NodeProgress, spec: RolloutSpec) -> bool:
    if progress.state in (N.SUCCEEDED, N.REJECTED, N.CANCELED, N.ROLLED_BACK):
        return True
    if progress.state in (N.FAILED, N.TIMED_OUT):
        return progress.code in DETERMINISTIC_FAILURES or progress.attempts > spec.max_retries
    return False


def _enrol(
    record: RolloutRecord, fleet: Mapping[str, NodeView], now: float
) -> tuple[RolloutRecord, list[RolloutAction]]:
    """Add selected nodes of the current (cumulative) waves that are not tracked yet.

    Nodes already in the wave when its broadcast goes out get it from the
    retained command; a node that appears later gets a per-node command.
    """
    spec = record.spec
    nodes = dict(record.nodes)
    actions: list[RolloutAction] = []
    for node_id, view in sorted(fleet.items()):
        if node_id in nodes or not matches(spec.selector, view.labels):
            continue
        wave = wave_of(spec, node_id)
        if wave is None or wave > record.wave:
            continue
        late = record.wave_started_at is not None and record.wave_started_at < now
        baseline = view.samples[-1] if view.samples else None
        nodes[node_id] = NodeProgress(
            node_id=node_id,
            wave=wave,
            sent_at=now,
            from_model=view.model,
            baseline=baseline,
        )
        if late:
            actions.append(SendNode(node_id, "deploy"))
    return replace(record, nodes=nodes), actions


def _advance_node(
    spec: RolloutSpec, progress: NodeProgress, view: NodeView | None, now: float
) -> tuple[NodeProgress, RolloutAction | None]:
    state = progress.state
    if state is N.ACTIVATED and progress.activated_at is not None:
        if now - progress.activated_at < spec.health_window_s:
            return progress, None
        samples = view.samples if view is not None else ()
        health = evaluate_health(spec, progress.baseline, samples, progress.activated_at)
        if not health.healthy:
            return replace(progress, state=N.FAILED, code="unhealthy", reason=health.reason), None
        if view is not None and view.online:
            return replace(progress, state=N.SUCCEEDED, reason=health.reason), None
        # Healthy only while live: wait for a node that is away, for at most the wave timeout.
        if now - progress.activated_at >= spec.health_window_s + spec.wave_timeout_s:
            reason = "offline since its health window ended"
            return replace(progress, state=N.TIMED_OUT, code="timeout", reason=reason), None
        return progress, None
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
