"""The rollout engine's records and actions: what an operator asked for
(:class:`RolloutSpec`), where each node stands (:class:`NodeProgress`), the whole
rollout (:class:`RolloutRecord`), what the engine knows of a node when it decides
(:class:`NodeView`), and the actions it returns. Plain frozen data; the decisions
are in :mod:`fleet_controller.rollout_core`, the JSON form in
:mod:`fleet_controller.rollout_codec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet_controller.health import HealthSample
from shared.labels import Selector
from shared.messages import ModelRef, NodeRolloutState, RolloutState
from shared.operations import DEFAULT_POLICY, RolloutPolicy

__all__ = [
    "ClearBroadcast",
    "NodeProgress",
    "NodeView",
    "RolloutAction",
    "RolloutRecord",
    "RolloutSpec",
    "SendNode",
    "SendWave",
]

N = NodeRolloutState
R = RolloutState


# ----- the record ---------------------------------------------------------------


_P = DEFAULT_POLICY  # the defaults, stated once in the operator API's RolloutPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutSpec:
    """What the operator asked for. Fractions are 0..1; durations in seconds.

    The tunables and their meaning are those of :class:`shared.operations.RolloutPolicy`.
    ``nodes``, when not empty, narrows the selection to those nodes, and each
    gets a command of its own instead of the broadcast (a deployment catching
    up with nodes that joined its group late). ``deployment`` names the
    deployment that started the rollout, if one did.
    """

    rollout_id: str
    model: ModelRef
    selector: Selector = ()
    nodes: tuple[str, ...] = ()
    deployment: str | None = None
    waves: tuple[float, ...] = _P.waves
    max_failures: float = _P.max_failures
    wave_timeout_s: float = _P.wave_timeout_s
    health_window_s: float = _P.health_window_s
    max_latency_regression: float = _P.max_latency_regression
    min_latency_regression_ms: float = _P.min_latency_regression_ms
    max_error_increase: float = _P.max_error_increase
    gates: tuple[str, ...] = _P.gates
    confidence: float = _P.confidence
    min_samples: int = _P.min_samples
    breach_evaluations: int = _P.breach_evaluations
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
        selector: Selector,
        nodes: tuple[str, ...] = (),
        deployment: str | None = None,
    ) -> RolloutSpec:
        """The spec of a rollout started with ``policy``'s tunables."""
        return cls(
            rollout_id=rollout_id,
            model=model,
            selector=selector,
            nodes=nodes,
            deployment=deployment,
            waves=policy.waves,
            max_failures=policy.max_failures,
            wave_timeout_s=policy.wave_timeout_s,
            health_window_s=policy.health_window_s,
            max_latency_regression=policy.max_latency_regression,
            min_latency_regression_ms=policy.min_latency_regression_ms,
            max_error_increase=policy.max_error_increase,
            gates=policy.gates,
            confidence=policy.confidence,
            min_samples=policy.min_samples,
            breach_evaluations=policy.breach_evaluations,
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
    activated_at: float | None = None  # when the controller learnt it, by its clock
    activated_ts: float | None = None  # when the node activated, by the node's clock
    retry_at: float | None = None
    from_model: ModelRef | None = None
    code: str | None = None
    reason: str | None = None
    rollback_sent: bool = False
    evaluated_ts: float | None = None  # the newest telemetry the health gate has judged
    runs: int = 0  # runs of the new model in that judgement
    breaches: int = 0  # consecutive breaching judgements
    passes: int = 0  # consecutive judgements with enough runs and no breach


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
    labels: Mapping[str, str]  # effective: what selections go by
    online: bool
    model: ModelRef | None
    samples: tuple[HealthSample, ...] = ()
    announced: Mapping[str, str] | None = None  # its own labels (None: the same)


# ----- actions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendWave:
    """Publish (retained) the broadcast deploy for wave ``wave`` covering
    ``bucket_limit``, naming the nodes operators relabelled out (``exclude``)."""

    wave: int
    bucket_limit: int
    exclude: tuple[str, ...] = ()


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
