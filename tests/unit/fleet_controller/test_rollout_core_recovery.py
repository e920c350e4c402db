"""The rollout engine when things go wrong: retries, time-outs, halts, rollbacks, pauses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_controller.rollout_core import (
    DETERMINISTIC_FAILURES,
    NODE_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    ClearBroadcast,
    IllegalTransitionError,
    NodeView,
    RolloutAction,
    RolloutRecord,
    RolloutSpec,
    SendNode,
    apply_event,
    apply_node_status,
    start_rollback,
    tick,
)
from shared.messages import NodeRolloutState, RolloutState
from tests.support.shared_kit import NOW
from tests.unit.fleet_controller.rollout_kit import (
    IN_FLIGHT,
    NEW,
    OLD,
    OTHER,
    E,
    N,
    R,
    fleet_of,
    fold,
    gated,
    make_spec,
    node_sends,
    on_model,
    quiet,
    sample,
    view,
    with_node,
)

# ----- retries -----------------------------------------------------------------------------


def test_transient_failure_is_retried_with_back_off() -> None:
    spec = make_spec(max_retries=2, retry_backoff_s=10.0)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    t = NOW
    for attempt, delay in [(1, 10.0), (2, 20.0)]:
        record = apply_node_status(record, "a", N.FAILED, now=t + 1, code="download")
        record, actions = tick(record, fleet, now=t + 2)
        progress = record.nodes["a"]
        assert (record.state, actions) == (R.RUNNING, [])  # a pending retry is no failure
        assert (progress.state, progress.attempts, progress.retry_at) == (
            N.FAILED,
            attempt,
            t + 2 + delay,
        )
        record, actions = tick(record, fleet, now=t + 2 + delay - 0.5)
        assert actions == []
        t = t + 2 + delay
        record, actions = tick(record, fleet, now=t)
        assert actions == [SendNode("a", "deploy")]
        progress = record.nodes["a"]
        assert (progress.state, progress.attempts, progress.sent_at) == (N.QUEUED, attempt + 1, t)
        assert (progress.retry_at, progress.code) == (None, None)

    # The third attempt fails too: out of retries, a failure that halts the rollout.
    record = apply_node_status(record, "a", N.FAILED, now=t + 1, code="download")
    record, actions = tick(record, fleet, now=t + 2)
    assert record.state is R.FAILED
    assert node_sends(actions, "deploy") == []
    assert record.nodes["a"].attempts == 3


def test_exhausted_retries_settle_the_node() -> None:
    spec = make_spec(max_retries=0, max_failures=0.5)
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.FAILED, now=NOW + 1, code="download")
    record = apply_node_status(record, "b", N.SUCCEEDED, now=NOW + 1)
    record, actions = tick(record, fleet, now=NOW + 1000)
    assert node_sends(actions) == []
    assert record.state is R.SUCCEEDED  # one failure of two is within max_failures


@pytest.mark.parametrize("code", sorted(DETERMINISTIC_FAILURES))
def test_deterministic_failures_are_never_retried(code: str) -> None:
    spec = make_spec(max_failures=0.5)
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.FAILED, now=NOW + 1, code=code)
    for t in (2, 100, 10_000):
        record, actions = tick(record, fleet, now=NOW + t)
        assert node_sends(actions) == []
        assert record.nodes["a"].retry_at is None
    assert record.nodes["a"].attempts == 1


def test_unhealthy_verdict_is_never_retried() -> None:
    record, fleet, _ = gated(
        [sample(NOW + 20, NEW, 1100, 0), sample(NOW + 50, NEW, 1200, 50)], max_failures=1.0
    )
    record, _ = tick(record, fleet, now=NOW + 70)
    assert record.nodes["a"].code == "unhealthy"
    record, actions = tick(record, fleet, now=NOW + 10_000)
    assert node_sends(actions, "deploy") == []
    assert record.nodes["a"].attempts == 1


def test_rejected_is_never_retried() -> None:
    spec = make_spec(max_failures=0.5)
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.REJECTED, now=NOW + 1, code="download")
    for t in (2, 100, 10_000):
        record, actions = tick(record, fleet, now=NOW + t)
        assert node_sends(actions) == []
    assert (record.nodes["a"].state, record.nodes["a"].attempts) == (N.REJECTED, 1)


@pytest.mark.parametrize("state", IN_FLIGHT, ids=lambda s: s.value)
def test_silent_in_flight_node_times_out_then_is_retried(state: NodeRolloutState) -> None:
    spec = make_spec(wave_timeout_s=300.0, retry_backoff_s=10.0)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    if state is not N.QUEUED:
        record = apply_node_status(record, "a", state, now=NOW + 1)
    record, _ = tick(record, fleet, now=NOW + 299)
    assert record.nodes["a"].state is state
    record, actions = tick(record, fleet, now=NOW + 300)
    progress = record.nodes["a"]
    assert (progress.state, progress.code, actions) == (N.TIMED_OUT, "timeout", [])
    assert record.state is R.RUNNING
    record, _ = tick(record, fleet, now=NOW + 301)
    assert record.nodes["a"].retry_at == NOW + 311
    record, actions = tick(record, fleet, now=NOW + 311)
    assert actions == [SendNode("a", "deploy")]
    assert (record.nodes["a"].state, record.nodes["a"].attempts) == (N.QUEUED, 2)


def test_activated_node_is_not_timed_out_by_the_wave_timeout() -> None:
    spec = make_spec(wave_timeout_s=30.0, health_window_s=60.0)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.ACTIVATED, now=NOW + 20)
    record, _ = tick(record, fleet, now=NOW + 55)
    assert record.nodes["a"].state is N.ACTIVATED


def test_a_new_failure_gets_a_fresh_back_off() -> None:
    """A late status that revives a timed-out node drops the retry planned for the timeout."""
    spec = make_spec(wave_timeout_s=300.0, retry_backoff_s=10.0)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record, _ = tick(record, fleet, now=NOW + 300)
    record, _ = tick(record, fleet, now=NOW + 301)
    assert record.nodes["a"].retry_at == NOW + 311
    record = apply_node_status(record, "a", N.ACTIVATED, now=NOW + 305)
    assert record.nodes["a"].retry_at is None
    record = apply_node_status(record, "a", N.FAILED, now=NOW + 306, code="load")
    record, actions = tick(record, fleet, now=NOW + 307)
    assert actions == []
    assert record.nodes["a"].retry_at == NOW + 317


# ----- halting and rolling back ----------------------------------------------------------


def halting_fleet(
    spec: RolloutSpec, rejected: int
) -> tuple[RolloutRecord, dict[str, NodeView], list[RolloutAction]]:
    """Ten nodes: ``rejected`` rejected, r-act and r-ok activated (then on the new model),
    r-fresh activated with no previous model, r-dl downloading, the rest queued."""
    names = [f"r{k}" for k in range(rejected)] + ["r-act", "r-ok", "r-fresh", "r-dl"]
    names += [f"q{k}" for k in range(10 - len(names))]
    fleet = fleet_of(*names)
    fleet["r-fresh"] = view("r-fresh", model=None)
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = fold(record, ["r-act", "r-ok", "r-fresh"], N.SUCCEEDED, now=NOW + 1)
    record = apply_node_status(record, "r-dl", N.DOWNLOADING, now=NOW + 1)
    on_model(fleet, NEW, "r-act", "r-ok", "r-fresh")
    record = fold(record, [f"r{k}" for k in range(rejected)], N.REJECTED, now=NOW + 2)
    record, actions = tick(record, fleet, now=NOW + 3)
    return record, fleet, actions


def cancels_for_in_flight(record: RolloutRecord) -> list[SendNode]:
    return [SendNode(p.node_id, "cancel") for p in record.nodes.values() if p.state in IN_FLIGHT]


@pytest.mark.parametrize(
    ("spec", "rejected"),
    [
        pytest.param(make_spec(max_failures=0.1), 1, id="one-of-ten-at-10%"),
        pytest.param(make_spec(max_failures=0.1, auto_rollback=True), 1, id="auto-rollback"),
        pytest.param(make_spec(max_failures=0.2), 2, id="two-of-ten-at-20%"),
    ],
)
def test_failures_within_the_threshold_do_not_halt(spec: RolloutSpec, rejected: int) -> None:
    record, _, actions = halting_fleet(spec, rejected=rejected)
    assert record.state is R.RUNNING
    assert actions == []


def test_failures_beyond_the_threshold_halt() -> None:
    record, fleet, actions = halting_fleet(make_spec(max_failures=0.1), rejected=2)
    assert record.state is R.FAILED
    assert record.reason == "2 of 10 nodes failed in wave 1"
    assert actions[0] == ClearBroadcast()
    cancels = cancels_for_in_flight(record)
    assert {a.node_id for a in cancels} >= {"r-dl", "q0"}
    assert node_sends(actions) == cancels
    # Without auto-rollback it stays failed.
    assert tick(record, fleet, now=NOW + 10_000) == (record, [])


def test_halt_with_auto_rollback_rolls_activated_nodes_back() -> None:
    spec = make_spec(max_failures=0.1, auto_rollback=True)
    record, fleet, actions = halting_fleet(spec, rejected=2)
    assert record.state is R.ROLLING_BACK
    assert ClearBroadcast() in actions
    assert {a.node_id for a in node_sends(actions, "cancel")} == {
        a.node_id for a in cancels_for_in_flight(record)
    }
    assert node_sends(actions, "rollback") == [
        SendNode("r-act", "rollback", OLD),
        SendNode("r-ok", "rollback", OLD),
    ]  # r-fresh had no model before: nothing to roll back to
    assert record.nodes["r-act"].rollback_sent
    assert not record.nodes["r-fresh"].rollback_sent

    record, actions = tick(record, fleet, now=NOW + 4)
    assert record.state is R.ROLLING_BACK
    assert node_sends(actions) == []  # sent once

    on_model(fleet, OLD, "r-act")
    record, _ = tick(record, fleet, now=NOW + 5)
    assert record.state is R.ROLLING_BACK
    assert record.nodes["r-act"].state is N.ROLLED_BACK
    assert record.nodes["r-ok"].state is N.ACTIVATED

    on_model(fleet, OLD, "r-ok")
    record, actions = tick(record, fleet, now=NOW + 6)
    assert record.state is R.ROLLED_BACK
    assert node_sends(actions) == []
    assert record.nodes["r-ok"].state is N.ROLLED_BACK
    assert record.nodes["r-fresh"].state is N.ACTIVATED
    assert tick(record, fleet, now=NOW + 7) == (record, [])


def test_halt_with_nothing_to_roll_back_ends_rolled_back() -> None:
    spec = make_spec(max_failures=0.0, auto_rollback=True)
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.REJECTED, now=NOW + 1)
    record, actions = tick(record, fleet, now=NOW + 2)
    assert record.state is R.ROLLED_BACK
    assert node_sends(actions) == [SendNode("b", "cancel")]


def test_unconfirmed_rollback_is_resent() -> None:
    spec = make_spec(wave_timeout_s=30.0)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 1)
    on_model(fleet, NEW, "a")
    record, actions = tick(start_rollback(record), fleet, now=NOW + 2)
    assert node_sends(actions) == [SendNode("a", "rollback", OLD)]
    record, actions = tick(record, fleet, now=NOW + 32)  # no confirmation within the timeout
    assert record.state is R.ROLLING_BACK
    record, actions = tick(record, fleet, now=NOW + 33)
    assert node_sends(actions) == [SendNode("a", "rollback", OLD)]
    assert record.state is R.ROLLING_BACK
    on_model(fleet, OLD, "a")
    record, _ = tick(record, fleet, now=NOW + 34)
    assert record.state is R.ROLLED_BACK


def test_rollback_to_a_third_model_does_not_count() -> None:
    spec = make_spec()
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 1)
    on_model(fleet, NEW, "a")
    record, _ = tick(start_rollback(record), fleet, now=NOW + 2)
    on_model(fleet, OTHER, "a")
    record, _ = tick(record, fleet, now=NOW + 3)
    assert record.state is R.ROLLING_BACK
    assert record.nodes["a"].state is N.ACTIVATED


def test_operator_rollback_after_success() -> None:
    spec = make_spec(health_window_s=0.0)
    fleet = fleet_of("a", "b")
    fleet["fresh"] = view("fresh", model=None)
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = fold(record, ["a", "b", "fresh"], N.SUCCEEDED, now=NOW + 1)
    on_model(fleet, NEW, "a", "b", "fresh")
    record, _ = tick(record, fleet, now=NOW + 2)
    assert record.state is R.SUCCEEDED

    record = start_rollback(record)
    assert (record.state, record.reason) == (R.ROLLING_BACK, "rollback requested")
    record, actions = tick(record, fleet, now=NOW + 3)
    assert node_sends(actions) == [SendNode("a", "rollback", OLD), SendNode("b", "rollback", OLD)]
    on_model(fleet, OLD, "a", "b")
    record, _ = tick(record, fleet, now=NOW + 4)
    assert record.state is R.ROLLED_BACK
    assert {n: p.state for n, p in record.nodes.items()} == {
        "a": N.ROLLED_BACK,
        "b": N.ROLLED_BACK,
        "fresh": N.SUCCEEDED,
    }


def test_rollback_reaches_a_node_whose_status_is_behind() -> None:
    """The view shows the new model before the node's "activated" status arrives."""
    assert N.ROLLED_BACK in NODE_TRANSITIONS[N.LOADING]
    spec = make_spec()
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.LOADING, now=NOW + 1)
    on_model(fleet, NEW, "a")
    record, actions = tick(start_rollback(record), fleet, now=NOW + 2)
    assert node_sends(actions) == [SendNode("a", "rollback", OLD)]
    on_model(fleet, OLD, "a")
    record, _ = tick(record, fleet, now=NOW + 3)
    assert record.nodes["a"].state is N.ROLLED_BACK
    assert record.state is R.ROLLED_BACK


@pytest.mark.parametrize("state", list(R), ids=lambda s: s.value)
def test_start_rollback(state: RolloutState) -> None:
    record = RolloutRecord(spec=make_spec(), state=state)
    if (state, E.ROLLBACK) in ROLLOUT_TRANSITIONS:
        assert start_rollback(record).state is R.ROLLING_BACK
    else:
        with pytest.raises(IllegalTransitionError, match=state.value):
            start_rollback(record)


# ----- pause and resume ----------------------------------------------------------------


def test_paused_rollout_does_nothing_until_resumed() -> None:
    spec = make_spec(wave_timeout_s=30.0, health_window_s=10.0)
    fleet = quiet(fleet_of("a", "b"))
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 1)
    paused = replace(record, state=apply_event(record.state, E.PAUSE))
    fleet.update(quiet({"late": view("late")}))
    assert tick(paused, fleet, now=NOW + 10_000) == (paused, [])

    resumed = replace(paused, state=apply_event(paused.state, E.RESUME))
    record, actions = tick(resumed, fleet, now=NOW + 20)
    assert record.state is R.RUNNING
    assert actions == [SendNode("late", "deploy")]
    assert record.nodes["a"].state is N.SUCCEEDED
    record = fold(record, ["b", "late"], N.SUCCEEDED, now=NOW + 21)
    record, actions = tick(record, fleet, now=NOW + 31)
    assert (record.state, actions) == (R.SUCCEEDED, [ClearBroadcast()])


@pytest.mark.parametrize("state", [R.SUCCEEDED, R.FAILED, R.ABORTED, R.ROLLED_BACK, R.PAUSED])
def test_tick_leaves_a_stopped_rollout_alone(state: RolloutState) -> None:
    record = replace(with_node(N.QUEUED), state=state)
    assert tick(record, fleet_of("a", "b"), now=NOW + 10_000) == (record, [])
