"""Random statuses, ticks and operator events never leave the rollout engine's tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from fleet_controller import rollout_core as core
from fleet_controller.rollout_core import (
    NODE_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    NodeView,
    RolloutRecord,
    RolloutSpec,
    apply_node_status,
    start_rollback,
    tick,
)
from shared.labels import parse_selector
from shared.messages import ModelRef
from tests.support.shared_kit import NOW, PROPERTY
from tests.unit.fleet_controller.rollout_kit import (
    NEW,
    OLD,
    OTHER,
    E,
    N,
    R,
    fleet_of,
    make_spec,
    node_sends,
    sample,
    view,
)

# ----- property: random statuses and ticks follow the tables ----------------------------

NODES = ("p0", "p1", "p2", "p3")
LABELS = {n: {"site": "a" if k % 2 else "b"} for k, n in enumerate(NODES)}
CODES = (None, "download", "timeout", "model_invalid", "digest_mismatch", "unhealthy")
OPERATOR = (E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK)

SPECS = st.builds(
    make_spec,
    waves=st.sampled_from([(100.0,), (34.0, 67.0, 100.0), (1.0, 50.0)]),
    selector=st.sampled_from(["", "site=a", "site notin (b)"]).map(parse_selector),
    max_failures=st.sampled_from([0.0, 0.34, 1.0]),
    auto_rollback=st.booleans(),
    max_retries=st.integers(0, 2),
    health_window_s=st.sampled_from([0.0, 30.0]),
    wave_timeout_s=st.sampled_from([20.0, 300.0]),
    retry_backoff_s=st.sampled_from([0.0, 10.0]),
)
STEPS = st.one_of(
    st.tuples(
        st.just("status"),
        st.sampled_from((*NODES, "ghost")),
        st.sampled_from(list(N)),
        st.sampled_from(CODES),
        st.booleans(),
    ),
    st.tuples(st.just("tick"), st.sampled_from([0, 1, 10, 25, 70, 400])),
    st.tuples(st.just("model"), st.sampled_from(NODES), st.sampled_from([OLD, NEW, OTHER, None])),
    st.tuples(
        st.just("telemetry"),
        st.sampled_from(NODES),
        st.booleans(),
        st.integers(0, 100),
        st.integers(0, 10),
        st.integers(0, 40),
    ),
    st.tuples(st.just("obey"), st.sampled_from(NODES)),
    st.tuples(st.just("leave"), st.sampled_from(NODES)),
    st.tuples(st.just("operator"), st.sampled_from(OPERATOR)),
)


def assert_follows_tables(
    before: RolloutRecord, after: RolloutRecord, calls: list[Any], spec: RolloutSpec
) -> None:
    state = before.state
    for call in calls:
        from_state, event = call.args
        assert from_state is state
        state = ROLLOUT_TRANSITIONS[(from_state, event)]
    assert after.state is state, (before.state, after.state, calls)
    for node_id, old in before.nodes.items():
        new = after.nodes[node_id]
        assert new.state is old.state or new.state in NODE_TRANSITIONS[old.state], (old, new)
    for progress in after.nodes.values():
        assert 1 <= progress.attempts <= spec.max_retries + 1


@PROPERTY
@given(spec=SPECS, steps=st.lists(STEPS, min_size=10, max_size=60))
@example(  # the view shows the new model before the node's status does, then a rollback
    spec=make_spec(),
    steps=[
        ("tick", 0),
        ("model", "p0", NEW),
        ("operator", E.ROLLBACK),
        ("tick", 1),
        ("model", "p0", OLD),
        ("tick", 1),
    ],
)
def test_random_statuses_and_ticks_follow_the_tables(
    spec: RolloutSpec, steps: list[tuple[Any, ...]]
) -> None:
    fleet = {n: view(n, labels=LABELS[n], samples=[sample(NOW - 1, OLD, 10)]) for n in NODES}
    record = RolloutRecord(spec=spec)
    clock = [NOW]
    rollbacks: dict[str, ModelRef | None] = {}  # the last rollback each node was sent
    with mock.patch.object(core, "apply_event", wraps=core.apply_event) as spy:
        for step in steps:
            spy.reset_mock()
            before = record
            if step[0] in ("status", "tick", "operator"):
                record = _engine_step(record, step, fleet, clock, rollbacks)
            else:
                _fleet_step(step, fleet, clock[0], rollbacks)
            assert_follows_tables(before, record, spy.call_args_list, spec)


def _engine_step(
    record: RolloutRecord,
    step: tuple[Any, ...],
    fleet: Mapping[str, NodeView],
    clock: list[float],
    rollbacks: dict[str, ModelRef | None],
) -> RolloutRecord:
    """What the controller does: fold a status, tick, or apply an operator's event."""
    match step:
        case ("status", node_id, state, code, duplicate):
            return apply_node_status(
                record, node_id, state, now=clock[0], code=code, duplicate=duplicate
            )
        case ("tick", dt):
            clock[0] += dt
            stopped = record.state not in (R.PENDING, R.RUNNING, R.ROLLING_BACK)
            new, actions = tick(record, fleet, now=clock[0])
            if stopped:
                assert (new, actions) == (record, [])
            rollbacks.update((a.node_id, a.target) for a in node_sends(actions, "rollback"))
            return new
        case ("operator", E.ROLLBACK):
            if (record.state, E.ROLLBACK) in ROLLOUT_TRANSITIONS:
                return start_rollback(record)
            return record
        case ("operator", event):
            if (record.state, event) in ROLLOUT_TRANSITIONS:
                return replace(record, state=core.apply_event(record.state, event))
            return record
    raise AssertionError(step)


def _fleet_step(
    step: tuple[Any, ...],
    fleet: dict[str, NodeView],
    now: float,
    rollbacks: Mapping[str, ModelRef | None],
) -> None:
    """What the world does: nodes obey, change model, report telemetry, leave."""
    match step:
        case ("obey", node_id):  # the node carries out the rollback it was sent
            if node_id in rollbacks and node_id in fleet:
                fleet[node_id] = replace(fleet[node_id], model=rollbacks[node_id])
        case ("model", node_id, model):
            old = fleet.get(node_id) or view(node_id, labels=LABELS[node_id])
            fleet[node_id] = replace(old, model=model)
        case ("telemetry", node_id, online, runs, errors, p95):
            old = fleet.get(node_id) or view(node_id, labels=LABELS[node_id])
            last = old.samples[-1] if old.samples else sample(now, None, 0)
            added = sample(now, old.model, last.inferences + runs, last.errors + errors, p95)
            fleet[node_id] = replace(old, online=online, samples=(*old.samples, added))
        case ("leave", node_id):
            fleet.pop(node_id, None)
        case _:
            raise AssertionError(step)


def test_a_node_waiting_for_its_activation_window_does_not_time_out() -> None:
    spec = make_spec(wave_timeout_s=60.0, activate_at=NOW + 600)
    fleet = fleet_of("a")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.DOWNLOADED, now=NOW + 5)
    record, _ = tick(record, fleet, now=NOW + 300)  # past sent_at + timeout
    assert record.nodes["a"].state is N.DOWNLOADED
    record, _ = tick(record, fleet, now=NOW + 600 + 60)  # past activation + timeout
    assert record.nodes["a"].state is N.TIMED_OUT


def test_a_superseded_job_reported_canceled_does_not_settle_the_node() -> None:
    """A retry replaces the node's old job, which reports canceled: not news."""
    spec = make_spec()
    record, _ = tick(RolloutRecord(spec=spec), fleet_of("a"), now=NOW)
    record = apply_node_status(record, "a", N.DOWNLOADING, now=NOW + 1)
    record = apply_node_status(record, "a", N.CANCELED, now=NOW + 2)
    assert record.nodes["a"].state is N.DOWNLOADING
    assert record.state is R.RUNNING
