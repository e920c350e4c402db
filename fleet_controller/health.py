"""Health gating: the controller's verdict on a node's new model, from its telemetry.

The controller owns the health window and the verdict: a node reports
``activated`` (an older agent's ``succeeded`` counts the same), and only once
:attr:`~fleet_controller.rollout_core.RolloutSpec.health_window_s` has passed
does :func:`evaluate_health` compare the new model's error rate and p95
latency with the node's last sample before the rollout (its baseline). Pure:
samples and the activation time in, a verdict out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet_controller.rollout_core import RolloutSpec

__all__ = ["Health", "HealthSample", "evaluate_health"]


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One telemetry message reduced to what health gating needs."""

    ts: float
    model_sha256: str | None
    inferences: int
    errors: int
    p95_ms: float


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str


def evaluate_health(
    spec: RolloutSpec,
    baseline: HealthSample | None,
    samples: Iterable[HealthSample],
    activated_at: float,
) -> Health:
    """Judge the health window from telemetry of the new model after ``activated_at``.

    Without traffic there is nothing to compare and the node passes on liveness.
    """
    window = sorted(
        (s for s in samples if s.ts >= activated_at and s.model_sha256 == spec.model.sha256),
        key=lambda s: s.ts,
    )
    if not window:
        return Health(healthy=True, reason="no telemetry of the new model: healthy on liveness")
    last = window[-1]
    # Counters are totals since the agent started. With one sample, count from
    # the baseline (the node's last sample before the rollout), not from zero,
    # which would dilute the new model's errors with the old model's history.
    origin = window[0] if len(window) > 1 else baseline
    if origin is None or origin.inferences > last.inferences or origin.errors > last.errors:
        origin_runs, origin_errors = 0, 0  # no origin, or the agent restarted: from zero
    else:
        origin_runs, origin_errors = origin.inferences, origin.errors
    new_errors = last.errors - origin_errors
    runs = last.inferences - origin_runs + new_errors
    error_rate = new_errors / runs if runs else 0.0
    base_rate = (
        baseline.errors / (baseline.inferences + baseline.errors)
        if baseline is not None and baseline.inferences + baseline.errors
        else 0.0
    )
    if runs and error_rate > base_rate + spec.max_error_increase:
        return Health(
            healthy=False, reason=f"error rate {error_rate:.1%} vs {base_rate:.1%} before"
        )
    # The median of the window's p95 readings: one noisy telemetry sample is not a verdict.
    p95 = statistics.median(s.p95_ms for s in window)
    if baseline is not None and baseline.p95_ms > 0 and p95 > 0:
        limit = max(
            baseline.p95_ms * (1 + spec.max_latency_regression),
            baseline.p95_ms + spec.min_latency_regression_ms,
        )
        if p95 > limit:
            return Health(
                healthy=False,
                reason=f"p95 latency {p95:.2f} ms exceeds {limit:.2f} ms "
                f"({baseline.p95_ms:.2f} ms before, +{spec.max_latency_regression:.0%} allowed)",
            )
    return Health(healthy=True, reason=f"healthy: {runs} runs, p95 {p95:.2f} ms")
