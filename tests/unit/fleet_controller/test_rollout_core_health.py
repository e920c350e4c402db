"""The rollout engine's health gate: a node succeeds only healthy through its window,
judged against the weather, and an unhealthy node is rolled back on its own."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_controller.rollout_core import (
    ClearBroadcast,
    HealthSample,
    RolloutRecord,
    apply_node_status,
    tick,
)
from shared.messages import NodeRolloutState
from tests.support.shared_kit import NOW
from tests.unit.fleet_controller.rollout_kit import (
    BEFORE,
    GOOD_WINDOW,
    NEW,
    OLD,
    N,
    R,
    gated,
    make_spec,
    node_sends,
    sample,
    view,
)


def window(ms: float, errors: int = 0, runs: int = 100) -> list[HealthSample]:
    """Six periods of the new model after activation (NOW + 10), ``runs`` each: the
    last one covers the end of the window (NOW + 70)."""
    return [sample(NOW + 20 + k, NEW, runs, errors, ms) for k in range(0, 60, 10)]


def test_activated_node_waits_for_its_health_window() -> None:
    record, fleet, _ = gated(GOOD_WINDOW)
    record, actions = tick(record, fleet, now=NOW + 69)
    assert record.nodes["a"].state is N.ACTIVATED
    assert (record.state, actions) == (R.RUNNING, [])
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert record.state is R.SUCCEEDED


@pytest.mark.parametrize(
    ("samples", "gates", "state"),
    [
        pytest.param(GOOD_WINDOW, ("errors", "latency"), N.SUCCEEDED, id="healthy"),
        pytest.param(window(10.0, runs=0), ("errors", "latency"), N.SUCCEEDED, id="no-runs"),
        pytest.param(window(13.0), ("errors", "latency"), N.SUCCEEDED, id="1.3x-within-50%"),
        pytest.param(window(20.0), ("errors", "latency"), N.FAILED, id="2x-slower"),
        pytest.param(window(30.0), ("errors", "latency"), N.FAILED, id="3x-slower"),
        pytest.param(window(10.0, errors=1), ("errors", "latency"), N.SUCCEEDED, id="1%-errors"),
        pytest.param(window(10.0, errors=5), ("errors", "latency"), N.FAILED, id="5%-errors"),
        pytest.param(window(10.0, errors=11), ("errors", "latency"), N.FAILED, id="10%-errors"),
        pytest.param(window(30.0), ("errors",), N.SUCCEEDED, id="slow-but-errors-gate-only"),
        pytest.param(window(10.0, errors=11), ("latency",), N.SUCCEEDED, id="errors-latency-gate"),
        pytest.param(
            [sample(NOW + 20, OLD, 400, 100, 90.0), sample(NOW + 70, NEW, 0)],
            ("errors", "latency"),
            N.SUCCEEDED,
            id="old-model-telemetry-ignored",
        ),
    ],
)
def test_gate_against_the_nodes_own_runs_before(
    samples: list[HealthSample], gates: tuple[str, ...], state: NodeRolloutState
) -> None:
    record, fleet, _ = gated(samples, gates=gates)
    record, actions = tick(record, fleet, now=NOW + 70)
    progress = record.nodes["a"]
    assert progress.state is state, progress.reason
    assert progress.reason
    if state is N.FAILED:
        assert progress.code == "unhealthy"
        assert record.state is R.FAILED  # one node of one: beyond max_failures
        assert ClearBroadcast() in actions


@pytest.mark.parametrize(
    ("treated_ms", "control_ms", "state"),
    [
        pytest.param(30.0, 30.0, N.SUCCEEDED, id="both-slowed-by-load"),
        pytest.param(33.0, 30.0, N.SUCCEEDED, id="noise-under-load"),
        pytest.param(60.0, 30.0, N.FAILED, id="2x-the-control-under-load"),
        pytest.param(20.0, 10.0, N.FAILED, id="2x-the-control"),
    ],
)
def test_gate_against_the_control_group_over_the_same_window(
    treated_ms: float, control_ms: float, state: NodeRolloutState
) -> None:
    control = [*BEFORE, *(sample(NOW + 20 + k, OLD, 100, 0, control_ms) for k in range(0, 40, 5))]
    record, fleet, _ = gated(window(treated_ms), control=control, max_failures=1.0)
    record, _ = tick(record, fleet, now=NOW + 70)
    progress = record.nodes["a"]
    assert progress.state is state, progress.reason
    assert "control group of 1 nodes" in (progress.reason or "")


@pytest.mark.parametrize(
    ("treated_ms", "state"),
    [
        pytest.param(30.0, N.SUCCEEDED, id="slowed-like-the-fleet"),
        pytest.param(60.0, N.FAILED, id="2x-beyond-the-fleet"),
    ],
)
def test_without_a_control_group_the_fleets_change_adjusts_the_baseline(
    treated_ms: float, state: NodeRolloutState
) -> None:
    """Node "s" already runs the new model (an earlier wave) and slows 3x with the
    machine: node "a"'s own runs before its update are scaled by that change."""
    steady = [sample(NOW - 30 + k, NEW, 100, 0, 10.0) for k in range(0, 40, 5)]
    steady += [sample(NOW + 20 + k, NEW, 100, 0, 30.0) for k in range(0, 40, 5)]
    record, fleet, _ = gated(window(treated_ms), max_failures=1.0)
    fleet["s"] = view("s", model=NEW, samples=steady)
    record, _ = tick(record, fleet, now=NOW + 70)
    progress = record.nodes["a"]
    assert progress.state is state, progress.reason
    assert "adjusted by the fleet's change" in (progress.reason or "")


def test_telemetry_of_the_window_is_waited_for() -> None:
    """The window has passed by the controller's clock, but the node's telemetry of
    it lags behind: no verdict until it arrives (or the wave timeout passes)."""
    late = window(10.0)
    record, fleet, _ = gated(late[:2])
    record, _ = tick(record, fleet, now=NOW + 75)
    assert record.nodes["a"].state is N.ACTIVATED
    fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *late])
    record, _ = tick(record, fleet, now=NOW + 90)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert (record.nodes["a"].reason or "").startswith("healthy")


def test_no_telemetry_at_all_passes_on_liveness_after_the_wave_timeout() -> None:
    record, fleet, spec = gated([])
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s - 1)
    assert record.nodes["a"].state is N.ACTIVATED
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert record.nodes["a"].reason == "no telemetry of the new model: healthy on liveness"


def test_the_window_starts_at_the_nodes_own_activation_time() -> None:
    """A status that arrives late still starts the window when the node activated."""
    spec = make_spec(health_window_s=60.0, breach_evaluations=1)
    fleet = {"a": view("a", samples=BEFORE)}
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.ACTIVATED, now=NOW + 40, reported_at=NOW + 10)
    assert (record.nodes["a"].activated_at, record.nodes["a"].activated_ts) == (NOW + 40, NOW + 10)
    fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *window(10.0)])
    record, _ = tick(record, fleet, now=NOW + 100)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert record.nodes["a"].runs == 600  # every period since NOW + 10


def test_a_breach_must_persist_across_evaluations() -> None:
    """With breach_evaluations=3, two breaching periods then a good one is no verdict."""
    bad = window(30.0)[:2]
    record, fleet, _ = gated(bad, breach_evaluations=3)
    for t, samples in ((21, bad[:1]), (31, bad)):
        fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *samples])
        record, _ = tick(record, fleet, now=NOW + t)
    assert (record.nodes["a"].state, record.nodes["a"].breaches) == (N.ACTIVATED, 2)
    recovered = [*bad, *(sample(NOW + 40 + k, NEW, 400, 0, 10.0) for k in range(0, 40, 10))]
    fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *recovered])
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.SUCCEEDED, record.nodes["a"].reason


def test_a_persistent_breach_fails_before_the_window_ends() -> None:
    slow = window(30.0)[:3]
    record, fleet, _ = gated(slow, breach_evaluations=3)
    for count in (1, 2, 3):
        fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *slow[:count]])
        record, _ = tick(record, fleet, now=NOW + 20 + 10 * count)
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.FAILED, "unhealthy")


def test_too_few_runs_wait_for_more_then_pass_on_liveness() -> None:
    record, fleet, spec = gated(window(30.0, runs=10))
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.ACTIVATED
    assert "fewer than 100" in (record.nodes["a"].reason or "")
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s)
    assert record.nodes["a"].state is N.SUCCEEDED
    assert "too few for a verdict: healthy on liveness" in (record.nodes["a"].reason or "")


def test_an_unhealthy_node_is_rolled_back_on_its_own_while_the_rollout_goes_on() -> None:
    spec = make_spec(health_window_s=60.0, breach_evaluations=1, max_failures=0.5)
    spec = replace(spec, auto_rollback=True)
    fleet = {n: view(n, samples=BEFORE) for n in ("a", "b")}
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    for n in ("a", "b"):
        record = apply_node_status(record, n, N.SUCCEEDED, now=NOW + 10)
    fleet["a"] = view("a", model=NEW, samples=[*BEFORE, *window(30.0)])
    fleet["b"] = view("b", model=NEW, samples=[*BEFORE, *window(10.0)])
    record, actions = tick(record, fleet, now=NOW + 70)
    assert [(s.node_id, s.target) for s in node_sends(actions, "rollback")] == [("a", OLD)]
    assert record.state is R.RUNNING  # waits for the rollback to land
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.FAILED, "unhealthy")
    fleet["a"] = replace(fleet["a"], model=OLD)
    record, actions = tick(record, fleet, now=NOW + 71)
    assert record.state is R.SUCCEEDED
    a = record.nodes["a"]
    assert (a.state, a.code) == (N.ROLLED_BACK, "unhealthy")
    assert "median latency" in (a.reason or "")
    assert record.nodes["b"].state is N.SUCCEEDED


def test_an_unconfirmed_rollback_is_sent_again_after_the_wave_timeout() -> None:
    record, fleet, spec = gated(window(30.0), max_failures=1.0, auto_rollback=True)
    record, actions = tick(record, fleet, now=NOW + 70)
    assert len(node_sends(actions, "rollback")) == 1
    record, actions = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s - 1)
    assert node_sends(actions, "rollback") == []
    record, actions = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s)
    assert [s.target for s in node_sends(actions, "rollback")] == [OLD]


def test_offline_node_is_not_healthy_on_liveness() -> None:
    record, fleet, spec = gated([], online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].state is N.ACTIVATED  # undecided while it is away
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s - 1)
    assert record.nodes["a"].state is N.ACTIVATED
    record, _ = tick(record, fleet, now=NOW + 70 + spec.wave_timeout_s)
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.TIMED_OUT, "timeout")


def test_offline_node_is_judged_when_it_returns() -> None:
    record, fleet, _ = gated(GOOD_WINDOW, online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    fleet["a"] = replace(fleet["a"], online=True)
    record, _ = tick(record, fleet, now=NOW + 80)
    assert record.nodes["a"].state is N.SUCCEEDED


def test_unhealthy_offline_node_fails_at_once() -> None:
    record, fleet, _ = gated(window(10.0, errors=50), online=False)
    record, _ = tick(record, fleet, now=NOW + 70)
    assert (record.nodes["a"].state, record.nodes["a"].code) == (N.FAILED, "unhealthy")
