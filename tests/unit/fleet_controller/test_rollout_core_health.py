"""The rollout engine's health gate: a node succeeds only healthy through its window."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_controller.rollout_core import (
    ClearBroadcast,
    HealthSample,
    evaluate_health,
    tick,
)
from shared.messages import NodeRolloutState
from tests.support.shared_kit import NOW
from tests.unit.fleet_controller.rollout_kit import (
    BASELINE,
    GOOD_WINDOW,
    NEW,
    OLD,
    N,
    R,
    gated,
    make_spec,
    sample,
)

# ----- health gating --------------------------------------------------------------------


def test_activated_node_waits_for_its_health_window() -> None:
    record, fleet, _ = gated(GOOD_WINDOW)
    record, actions = tick(record, fleet, now=NOW + 69)
    assert record.nodes["a"].state is N.ACTIVATED
    assert (record.state, actions) == (R.RUNNING, [])
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert record.state is R.SUCCEEDED


@pytest.mark.parametrize(
    ("window", "state", "code"),
    [
        pytest.param(GOOD_WINDOW, N.SUCCEEDED, None, id="healthy"),
        pytest.param([], N.SUCCEEDED, None, id="no-telemetry-liveness"),
        pytest.param(
            [sample(NOW + 20, NEW, 1100, 0, 15.0), sample(NOW + 50, NEW, 1200, 0, 15.0)],
            N.SUCCEEDED,
            None,
            id="p95-at-limit",
        ),
        pytest.param(
            [sample(NOW + 20, NEW, 1100, 0, 16.0), sample(NOW + 50, NEW, 1200, 0, 15.5)],
            N.FAILED,
            "unhealthy",
            id="p95-regression",
        ),
        pytest.param(
            [
                sample(NOW + 20, NEW, 1100, 0, 11.0),
                sample(NOW + 35, NEW, 1150, 0, 40.0),
                sample(NOW + 50, NEW, 1200, 0, 11.5),
            ],
            N.SUCCEEDED,
            None,
            id="one-noisy-p95-reading-is-not-a-verdict",
        ),
        pytest.param(
            [sample(NOW + 20, NEW, 1100, 0), sample(NOW + 50, NEW, 1200, 3)],
            N.FAILED,
            "unhealthy",
            id="error-rate-rise",
        ),
        pytest.param(
            [sample(NOW + 20, NEW, 1100, 0), sample(NOW + 50, NEW, 1200, 1)],
            N.SUCCEEDED,
            None,
            id="error-rate-within-limit",
        ),
        pytest.param(
            [sample(NOW + 20, NEW, 1010, 5)],
            N.FAILED,
            "unhealthy",
            id="one-sample-counts-from-baseline",
        ),
        pytest.param(
            [sample(NOW + 20, OLD, 1100, 500, 90.0)],
            N.SUCCEEDED,
            None,
            id="old-model-telemetry-ignored",
        ),
    ],
)
def test_health_gating(
    window: list[HealthSample], state: NodeRolloutState, code: str | None
) -> None:
    record, fleet, _ = gated(window)
    record, actions = tick(record, fleet, now=NOW + 70)
    progress = record.nodes["a"]
    assert (progress.state, progress.code) == (state, code)
    assert progress.reason
    if state is N.FAILED:
        assert record.state is R.FAILED  # one node of one: beyond max_failures
        assert ClearBroadcast() in actions


def test_no_telemetry_passes_on_liveness() -> None:
    record, fleet, _ = gated([])
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert "liveness" in (record.nodes["a"].reason or "")


def test_offline_node_is_not_healthy_on_liveness() -> None:
    record, fleet, spec = gated([], online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.ACTIVATED  # undecided while it is away
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s - 1)
    assert record.nodes["a"].state is N.ACTIVATED
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s)
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.TIMED_OUT, "timeout")


def test_offline_node_is_judged_when_it_returns() -> None:
    record, fleet, _ = gated([], online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    fleet["a"] = replace(fleet["a"], online=True)
    record, _ = tick(record, fleet, now=NOW + 80)
    assert record.nodes["a"].state is N.SUCCEEDED


def test_unhealthy_offline_node_fails_at_once() -> None:
    bad = [sample(NOW + 20, NEW, 1100, 0), sample(NOW + 50, NEW, 1200, 50)]
    record, fleet, _ = gated(bad, online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.FAILED, "unhealthy")


HEALTH_SPEC = make_spec(max_latency_regression=0.5, max_error_increase=0.01)
ACTIVATED_AT = NOW


@pytest.mark.parametrize(
    ("baseline", "samples", "healthy"),
    [
        pytest.param(BASELINE, [], True, id="no-samples"),
        pytest.param(None, [], True, id="no-samples-no-baseline"),
        pytest.param(BASELINE, [sample(NOW - 1, NEW, 1100, 900, 99.0)], True, id="before-window"),
        pytest.param(BASELINE, [sample(NOW + 1, OLD, 1100, 900, 99.0)], True, id="other-model"),
        pytest.param(BASELINE, [sample(NOW + 1, None, 1100, 900, 99.0)], True, id="no-model"),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0, 9.0), sample(NOW + 2, NEW, 1200, 0, 14.9)],
            True,
            id="p95-within",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0, 15.2), sample(NOW + 2, NEW, 1200, 0, 15.1)],
            False,
            id="p95-over",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 2, NEW, 1200, 0, 15.1), sample(NOW + 1, NEW, 1100, 0, 15.3)],
            False,
            id="p95-over-unsorted",
        ),
        pytest.param(
            sample(NOW - 5, OLD, inferences=1000, errors=0, p95_ms=0.02),
            [sample(NOW + 1, NEW, 1100, 0, 0.05), sample(NOW + 2, NEW, 1200, 0, 0.06)],
            True,
            id="tiny-latencies-within-absolute-floor",
        ),
        pytest.param(None, [sample(NOW + 1, NEW, 10, 0, 500.0)], True, id="p95-no-baseline"),
        pytest.param(
            sample(NOW - 5, OLD, 1000, 0, 0.0),
            [sample(NOW + 1, NEW, 1100, 0, 500.0)],
            True,
            id="p95-baseline-zero",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0), sample(NOW + 2, NEW, 1200, 1)],
            True,
            id="errors-within",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0), sample(NOW + 2, NEW, 1200, 2)],
            False,
            id="errors-over",
        ),
        pytest.param(
            sample(NOW - 5, OLD, 900, 100),
            [sample(NOW + 1, NEW, 1000, 100), sample(NOW + 2, NEW, 1090, 110)],
            True,
            id="errors-as-before",
        ),
        pytest.param(
            sample(NOW - 5, OLD, 900, 100),
            [sample(NOW + 1, NEW, 1000, 100), sample(NOW + 2, NEW, 1070, 130)],
            False,
            id="errors-above-before",
        ),
        pytest.param(
            None,
            [sample(NOW + 1, NEW, 100, 0), sample(NOW + 2, NEW, 200, 2)],
            False,
            id="errors-no-baseline",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0), sample(NOW + 2, NEW, 1100, 0)],
            True,
            id="no-traffic-in-window",
        ),
        pytest.param(
            sample(NOW - 5, OLD, 100_000, 0),
            [sample(NOW + 1, NEW, 100_010, 5)],
            False,
            id="one-sample-not-diluted-by-history",
        ),
        pytest.param(
            sample(NOW - 5, OLD, 100_000, 0),
            [sample(NOW + 1, NEW, 100_100, 0)],
            True,
            id="one-sample-clean",
        ),
        pytest.param(
            sample(NOW - 5, OLD, 100_000, 0),
            [sample(NOW + 1, NEW, 20, 5)],
            False,
            id="one-sample-after-agent-restart",
        ),
        pytest.param(
            BASELINE,
            [sample(NOW + 1, NEW, 1100, 0), sample(NOW + 2, NEW, 50, 0)],
            True,
            id="counters-reset-in-window",
        ),
    ],
)
def test_evaluate_health(
    baseline: HealthSample | None, samples: list[HealthSample], healthy: bool
) -> None:
    health = evaluate_health(HEALTH_SPEC, baseline, samples, ACTIVATED_AT)
    assert health.healthy is healthy, health.reason
    assert health.reason
