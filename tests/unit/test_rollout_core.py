"""The rollout engine (fleet_controller.rollout_core): waves, state tables, tick, health, halt.

Everything runs on a fake fleet (a dict of ``NodeView``) and an explicit ``now``:
no broker, no clock, no database.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fleet_controller import rollout_core as core
from fleet_controller.rollout_core import (
    DETERMINISTIC_FAILURES,
    NODE_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    ClearBroadcast,
    HealthSample,
    IllegalTransitionError,
    NodeProgress,
    NodeView,
    RolloutAction,
    RolloutEvent,
    RolloutRecord,
    RolloutSpec,
    SendNode,
    SendWave,
    apply_event,
    apply_node_status,
    evaluate_health,
    node_transition,
    start_rollback,
    tick,
    wave_limits,
    wave_of,
)
from shared.errors import DecodeError
from shared.messages import ModelRef, NodeRolloutState, RolloutState
from shared.waves import BUCKETS, in_wave
from tests.unit._shared_kit import NOW, PROPERTY

N = NodeRolloutState
R = RolloutState
E = RolloutEvent

OLD = ModelRef(name="detector", version="1.0.0", sha256="a" * 64)
NEW = ModelRef(name="detector", version="2.0.0", sha256="b" * 64)
OTHER = ModelRef(name="detector", version="0.9.0", sha256="c" * 64)
IN_FLIGHT = (N.QUEUED, N.DOWNLOADING, N.DOWNLOADED, N.VERIFYING, N.LOADING)


# ----- helpers ----------------------------------------------------------------------


def make_spec(**changes: Any) -> RolloutSpec:
    """One wave of 100%, no auto-rollback, unless a test says otherwise."""
    fields: dict[str, Any] = {
        "rollout_id": "r-1",
        "model": NEW,
        "waves": (100.0,),
        "auto_rollback": False,
    }
    fields.update(changes)
    return RolloutSpec(**fields)


def sample(
    ts: float, model: ModelRef | None, inferences: int, errors: int = 0, p95_ms: float = 10.0
) -> HealthSample:
    return HealthSample(
        ts=ts,
        model_sha256=model.sha256 if model is not None else None,
        inferences=inferences,
        errors=errors,
        p95_ms=p95_ms,
    )


def view(
    node_id: str,
    *,
    model: ModelRef | None = OLD,
    labels: Mapping[str, str] | None = None,
    online: bool = True,
    samples: Iterable[HealthSample] = (),
) -> NodeView:
    return NodeView(node_id, dict(labels or {}), online, model, tuple(samples))


def fleet_of(*node_ids: str, model: ModelRef | None = OLD) -> dict[str, NodeView]:
    return {node_id: view(node_id, model=model) for node_id in node_ids}


def ids_in_wave(spec: RolloutSpec, wave: int, count: int) -> list[str]:
    """The first ``count`` ids ``n0, n1, ...`` whose first wave is ``wave``."""
    found: list[str] = []
    for k in range(100_000):
        if wave_of(spec, f"n{k}") == wave:
            found.append(f"n{k}")
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} ids in wave {wave}")


def fold(
    record: RolloutRecord,
    node_ids: Iterable[str],
    state: NodeRolloutState,
    *,
    now: float,
    **kw: Any,
) -> RolloutRecord:
    for node_id in node_ids:
        record = apply_node_status(record, node_id, state, now=now, **kw)
    return record


def node_sends(actions: Iterable[RolloutAction], kind: str | None = None) -> list[SendNode]:
    return [a for a in actions if isinstance(a, SendNode) and (kind is None or a.kind == kind)]


def on_model(fleet: dict[str, NodeView], model: ModelRef | None, *node_ids: str) -> None:
    for node_id in node_ids:
        fleet[node_id] = replace(fleet[node_id], model=model)


# ----- wave planning -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("waves", "limits"),
    [
        pytest.param((1.0, 10.0, 50.0, 100.0), (100, 1000, 5000, 10_000), id="1,10,50,100"),
        pytest.param((100.0,), (BUCKETS,), id="100"),
        pytest.param((0.5, 100.0), (50, BUCKETS), id="0.5,100"),
        pytest.param((25.0, 50.0), (2500, 5000), id="ends-below-100"),
    ],
)
def test_wave_limits(waves: tuple[float, ...], limits: tuple[int, ...]) -> None:
    assert wave_limits(waves) == limits


@pytest.mark.parametrize(
    ("waves", "error"),
    [
        pytest.param((10.0, 10.0), IllegalTransitionError, id="repeated"),
        pytest.param((50.0, 10.0, 100.0), IllegalTransitionError, id="decreasing"),
        pytest.param((0.004, 0.005), IllegalTransitionError, id="same-bucket-count"),
        pytest.param((), IllegalTransitionError, id="empty"),
        pytest.param((10.0, 101.0), DecodeError, id="over-100"),
        pytest.param((0.0, 100.0), DecodeError, id="zero"),
        pytest.param((-5.0, 100.0), DecodeError, id="negative"),
        pytest.param((math.nan,), DecodeError, id="nan"),
    ],
)
def test_wave_limits_rejects(waves: tuple[float, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        wave_limits(waves)


WAVE_SPEC = make_spec(rollout_id="r-waves", waves=(1.0, 10.0, 50.0, 100.0))
NODE_IDS_500 = [f"node-{k:03d}" for k in range(500)]


def test_wave_of_is_deterministic() -> None:
    again = make_spec(rollout_id="r-waves", waves=(1.0, 10.0, 50.0, 100.0))
    first = [wave_of(WAVE_SPEC, n) for n in NODE_IDS_500]
    assert first == [wave_of(again, n) for n in NODE_IDS_500]
    assert set(first) == {0, 1, 2, 3}
    other = [wave_of(replace(WAVE_SPEC, rollout_id="r-other"), n) for n in NODE_IDS_500]
    assert other != first  # membership is per rollout, not per node


@pytest.mark.parametrize("wave", range(4), ids=lambda w: f"wave{w}")
def test_controller_and_node_agree_on_membership(wave: int) -> None:
    """The node decides with in_wave(rollout_id, node_id, bucket_limit) from the broadcast."""
    limit = wave_limits(WAVE_SPEC.waves)[wave]
    for node_id in NODE_IDS_500:
        first = wave_of(WAVE_SPEC, node_id)
        controller = first is not None and first <= wave
        assert controller == in_wave(WAVE_SPEC.rollout_id, node_id, limit), node_id


def test_wave_of_is_none_beyond_the_last_wave() -> None:
    spec = make_spec(waves=(1.0, 10.0))
    firsts = [wave_of(spec, n) for n in NODE_IDS_500]
    assert None in firsts
    for node_id, first in zip(NODE_IDS_500, firsts, strict=True):
        assert (first is None) == (not in_wave(spec.rollout_id, node_id, 1000))


@pytest.mark.parametrize("percent", [1.0, 10.0, 50.0, 100.0], ids=lambda p: f"{p:g}%")
def test_cumulative_wave_sizes_are_close_to_the_percentages(percent: float) -> None:
    spec = make_spec(rollout_id="r-sizes", waves=(1.0, 10.0, 50.0, 100.0))
    wave = spec.waves.index(percent)
    ids = [f"edge-{k:04d}" for k in range(1000)]
    size = sum(1 for n in ids if (w := wave_of(spec, n)) is not None and w <= wave)
    p = percent / 100
    sigma = math.sqrt(len(ids) * p * (1 - p))
    assert abs(size - p * len(ids)) <= 4 * sigma + 1, size


# ----- state tables -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "event", "new"),
    [
        pytest.param(s, e, n, id=f"{s.value}-{e.value}->{n.value}")
        for (s, e), n in ROLLOUT_TRANSITIONS.items()
    ],
)
def test_rollout_transition(state: RolloutState, event: RolloutEvent, new: RolloutState) -> None:
    assert apply_event(state, event) is new


ILLEGAL_ROLLOUT = [(s, e) for s in R for e in E if (s, e) not in ROLLOUT_TRANSITIONS]


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.value}-{e.value}") for s, e in ILLEGAL_ROLLOUT],
)
def test_illegal_rollout_transition(state: RolloutState, event: RolloutEvent) -> None:
    pattern = rf"\b{re.escape(event.value)}\b.*\b{re.escape(state.value)}\b"
    with pytest.raises(IllegalTransitionError, match=pattern):
        apply_event(state, event)


def test_rolled_back_is_final() -> None:
    assert not [e for (s, e) in ROLLOUT_TRANSITIONS if s is R.ROLLED_BACK]
    assert ILLEGAL_ROLLOUT  # the table is not "everything goes"


@pytest.mark.parametrize(
    ("current", "new"),
    [
        pytest.param(c, n, id=f"{c.value}->{n.value}")
        for c, allowed in NODE_TRANSITIONS.items()
        for n in sorted(allowed)
    ],
)
def test_node_transition(current: NodeRolloutState, new: NodeRolloutState) -> None:
    assert node_transition(current, new) is new


ILLEGAL_NODE = [
    pytest.param(N.LOADING, N.QUEUED, id="loading->queued"),
    pytest.param(N.ACTIVATED, N.DOWNLOADING, id="activated->downloading"),
    pytest.param(N.ACTIVATED, N.QUEUED, id="activated->queued"),
    pytest.param(N.SUCCEEDED, N.ACTIVATED, id="succeeded->activated"),
    pytest.param(N.SUCCEEDED, N.QUEUED, id="succeeded->queued"),
    pytest.param(N.REJECTED, N.QUEUED, id="rejected->queued"),
    pytest.param(N.REJECTED, N.ACTIVATED, id="rejected->activated"),
    pytest.param(N.FAILED, N.SUCCEEDED, id="failed->succeeded"),
    pytest.param(N.FAILED, N.FAILED, id="failed->failed"),
    pytest.param(N.CANCELED, N.QUEUED, id="canceled->queued"),
    pytest.param(N.CANCELED, N.ACTIVATED, id="canceled->activated"),
    pytest.param(N.ROLLED_BACK, N.QUEUED, id="rolled_back->queued"),
    pytest.param(N.ROLLED_BACK, N.ACTIVATED, id="rolled_back->activated"),
    pytest.param(N.DOWNLOADING, N.QUEUED, id="downloading->queued"),
    pytest.param(N.VERIFYING, N.DOWNLOADED, id="verifying->downloaded"),
]


@pytest.mark.parametrize(("current", "new"), ILLEGAL_NODE)
def test_illegal_node_transition(current: NodeRolloutState, new: NodeRolloutState) -> None:
    assert new not in NODE_TRANSITIONS[current]
    pattern = rf"\b{re.escape(current.value)}\b.*\b{re.escape(new.value)}\b"
    with pytest.raises(IllegalTransitionError, match=pattern):
        node_transition(current, new)


def test_node_table_covers_every_state() -> None:
    assert set(NODE_TRANSITIONS) == set(N)
    assert NODE_TRANSITIONS[N.ROLLED_BACK] == frozenset()


# ----- tick: starting, enrolling, passing waves ---------------------------------------


def test_first_tick_starts_the_rollout_and_sends_wave_zero() -> None:
    spec = make_spec(waves=(1.0, 10.0, 50.0, 100.0))
    record, actions = tick(RolloutRecord(spec=spec), fleet_of(*ids_in_wave(spec, 0, 1)), now=NOW)
    assert record.state is R.RUNNING
    assert record.wave == 0
    assert record.wave_started_at == NOW
    assert actions == [SendWave(0, 100)]


def test_enrols_selected_nodes_only() -> None:
    spec = make_spec(selector={"site": "berlin"})
    fleet = {
        "a": view("a", labels={"site": "berlin", "tier": "edge"}),
        "b": view("b", labels={"site": "paris"}),
        "c": view("c", labels={}),
        "d": view("d", labels={"site": "berlin"}, model=None),
    }
    record, actions = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    assert set(record.nodes) == {"a", "d"}
    assert record.nodes["a"] == NodeProgress(
        node_id="a", wave=0, state=N.QUEUED, attempts=1, sent_at=NOW, from_model=OLD
    )
    assert record.nodes["d"].from_model is None
    assert actions == [SendWave(0, BUCKETS)]  # they get the broadcast: no per-node command


def test_nodes_of_later_waves_wait_for_their_wave() -> None:
    spec = make_spec(waves=(1.0, 10.0, 50.0, 100.0))
    by_wave = {w: ids_in_wave(spec, w, 2) for w in range(4)}
    fleet = fleet_of(*(n for ids in by_wave.values() for n in ids))
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record, _ = tick(record, fleet, now=NOW + 5)
    assert set(record.nodes) == set(by_wave[0])
    assert {p.wave for p in record.nodes.values()} == {0}


def test_wave_passes_only_when_every_member_is_settled() -> None:
    spec = make_spec(waves=(1.0, 10.0, 50.0, 100.0), health_window_s=60.0)
    first, second = ids_in_wave(spec, 0, 2), ids_in_wave(spec, 1, 2)
    fleet = fleet_of(*first, *second)
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = fold(record, first[:1], N.SUCCEEDED, now=NOW + 10)
    record = fold(record, first[1:], N.SUCCEEDED, now=NOW + 40)

    record, actions = tick(record, fleet, now=NOW + 70)  # first is healthy, second in window
    assert record.nodes[first[0]].state is N.SUCCEEDED
    assert record.nodes[first[1]].state is N.ACTIVATED
    assert (record.wave, actions) == (0, [])
    assert not set(second) & set(record.nodes)

    record, actions = tick(record, fleet, now=NOW + 100)
    assert record.wave == 1
    assert record.wave_started_at == NOW + 100
    assert actions == [SendWave(1, 1000)]
    # Members of the new wave were online when its broadcast went out: tracked now, and
    # never sent a per-node deploy on top of the retained broadcast.
    assert {n: record.nodes[n].wave for n in second} == dict.fromkeys(second, 1)
    record, actions = tick(record, fleet, now=NOW + 101)
    assert actions == []


def test_last_wave_succeeds_and_clears_the_broadcast() -> None:
    spec = make_spec(health_window_s=30.0)
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = fold(record, ["a", "b"], N.SUCCEEDED, now=NOW + 1)
    record, actions = tick(record, fleet, now=NOW + 31)
    assert record.state is R.SUCCEEDED
    assert record.reason == "all waves passed"
    assert actions == [ClearBroadcast()]
    assert {p.state for p in record.nodes.values()} == {N.SUCCEEDED}
    assert tick(record, fleet, now=NOW + 1000) == (record, [])


def test_empty_first_wave_passes_at_once() -> None:
    spec = make_spec(waves=(1.0, 10.0, 50.0, 100.0))
    later = ids_in_wave(spec, 1, 3)
    record, actions = tick(RolloutRecord(spec=spec), fleet_of(*later), now=NOW)
    assert actions == [SendWave(0, 100), SendWave(1, 1000)]
    assert record.wave == 1
    assert set(record.nodes) == set(later)


def test_empty_fleet_runs_through_every_wave() -> None:
    spec = make_spec(waves=(10.0, 100.0))
    record, actions = tick(RolloutRecord(spec=spec), {}, now=NOW)
    record, more = tick(record, {}, now=NOW + 1)
    assert actions + more == [SendWave(0, 1000), SendWave(1, BUCKETS), ClearBroadcast()]
    assert record.state is R.SUCCEEDED


def test_late_joiner_gets_a_per_node_deploy() -> None:
    spec = make_spec(selector={"site": "berlin"})
    berlin = {"site": "berlin"}
    fleet = {"a": view("a", labels=berlin)}
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    fleet["late"] = view("late", labels=berlin)
    fleet["elsewhere"] = view("elsewhere", labels={"site": "paris"})
    record, actions = tick(record, fleet, now=NOW + 5)
    assert actions == [SendNode("late", "deploy")]
    assert record.nodes["late"].sent_at == NOW + 5
    assert "elsewhere" not in record.nodes
    record, actions = tick(record, fleet, now=NOW + 6)
    assert actions == []  # sent once


def test_late_joiner_of_an_earlier_wave_is_enrolled_in_that_wave() -> None:
    spec = make_spec(waves=(1.0, 100.0))
    first, late = ids_in_wave(spec, 0, 2)
    record, _ = tick(RolloutRecord(spec=spec), fleet_of(first), now=NOW)
    record = fold(record, [first], N.SUCCEEDED, now=NOW + 1)
    record, actions = tick(record, fleet_of(first), now=NOW + 100)
    assert actions == [SendWave(1, BUCKETS)]
    record, actions = tick(record, fleet_of(first, late), now=NOW + 101)
    assert actions == [SendNode(late, "deploy")]
    assert record.nodes[late].wave == 0


# ----- health gating --------------------------------------------------------------------


BASELINE = sample(NOW - 5, OLD, inferences=1000, errors=0, p95_ms=10.0)


def gated(
    window_samples: Iterable[HealthSample], *, online: bool = True, **spec_changes: Any
) -> tuple[RolloutRecord, dict[str, NodeView], RolloutSpec]:
    """Node "a" enrolled with BASELINE, activated at NOW + 10; its view then carries
    ``window_samples`` of the new model."""
    spec = make_spec(health_window_s=60.0, **spec_changes)
    fleet = {"a": view("a", samples=[BASELINE])}
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    assert record.nodes["a"].baseline == BASELINE
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 10)
    assert record.nodes["a"].state is N.ACTIVATED
    assert record.nodes["a"].activated_at == NOW + 10
    fleet["a"] = view("a", model=NEW, online=online, samples=[BASELINE, *window_samples])
    return record, fleet, spec


GOOD_WINDOW = [
    sample(NOW + 20, NEW, 1100, 0, 11.0),
    sample(NOW + 50, NEW, 1400, 1, 12.0),
]


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


# ----- node statuses ---------------------------------------------------------------------


def with_node(state: NodeRolloutState, **changes: Any) -> RolloutRecord:
    progress = NodeProgress(node_id="a", wave=0, state=state, sent_at=NOW, from_model=OLD)
    return RolloutRecord(
        spec=make_spec(),
        state=R.RUNNING,
        wave_started_at=NOW,
        nodes={"a": replace(progress, **changes)},
    )


@pytest.mark.parametrize(
    ("before", "status", "duplicate", "after"),
    [
        pytest.param(N.QUEUED, N.DOWNLOADING, False, N.DOWNLOADING, id="progress"),
        pytest.param(N.QUEUED, N.VERIFYING, False, N.VERIFYING, id="skip-steps"),
        pytest.param(N.LOADING, N.SUCCEEDED, False, N.ACTIVATED, id="own-succeeded-activates"),
        pytest.param(N.QUEUED, N.SUCCEEDED, False, N.ACTIVATED, id="already-running"),
        pytest.param(N.DOWNLOADING, N.FAILED, False, N.FAILED, id="failed"),
        pytest.param(N.VERIFYING, N.REJECTED, False, N.REJECTED, id="rejected"),
        pytest.param(N.TIMED_OUT, N.ACTIVATED, False, N.ACTIVATED, id="late-revives"),
        pytest.param(N.LOADING, N.QUEUED, False, N.LOADING, id="illegal-ignored"),
        pytest.param(N.SUCCEEDED, N.DOWNLOADING, False, N.SUCCEEDED, id="late-progress"),
        pytest.param(N.SUCCEEDED, N.SUCCEEDED, False, N.SUCCEEDED, id="succeeded-again"),
        pytest.param(N.ROLLED_BACK, N.ACTIVATED, False, N.ROLLED_BACK, id="after-rollback"),
        pytest.param(N.CANCELED, N.FAILED, False, N.CANCELED, id="after-cancel"),
        pytest.param(N.REJECTED, N.QUEUED, False, N.REJECTED, id="rejected-stays"),
        pytest.param(N.DOWNLOADING, N.FAILED, True, N.DOWNLOADING, id="duplicate-echo"),
        pytest.param(N.QUEUED, N.FAILED, True, N.QUEUED, id="duplicate-echo-of-retry"),
        pytest.param(N.FAILED, N.FAILED, True, N.FAILED, id="duplicate-while-failed"),
        pytest.param(N.ACTIVATED, N.ROLLED_BACK, False, N.ACTIVATED, id="unasked-rollback"),
    ],
)
def test_apply_node_status(
    before: NodeRolloutState, status: NodeRolloutState, duplicate: bool, after: NodeRolloutState
) -> None:
    record = with_node(before, activated_at=NOW - 1 if before is N.ACTIVATED else None)
    new = apply_node_status(
        record, "a", status, now=NOW + 1, code="c", reason="r", duplicate=duplicate
    )
    assert new.nodes["a"].state is after
    if after is before:
        assert new == record  # ignored: nothing else moved either
    else:
        assert (new.nodes["a"].code, new.nodes["a"].reason) == ("c", "r")
    if after is N.ACTIVATED and before is not N.ACTIVATED:
        assert new.nodes["a"].activated_at == NOW + 1


def test_repeated_activation_keeps_the_window_start() -> None:
    record = apply_node_status(with_node(N.LOADING), "a", N.ACTIVATED, now=NOW + 1)
    again = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 30)
    again = apply_node_status(again, "a", N.ACTIVATED, now=NOW + 40)
    assert again == record
    assert again.nodes["a"].activated_at == NOW + 1


def test_unknown_node_is_ignored() -> None:
    record = with_node(N.QUEUED)
    assert apply_node_status(record, "ghost", N.SUCCEEDED, now=NOW) is record


def test_asked_rollback_is_folded() -> None:
    record = with_node(N.ACTIVATED, rollback_sent=True)
    new = apply_node_status(record, "a", N.ROLLED_BACK, now=NOW + 1)
    assert new.nodes["a"].state is N.ROLLED_BACK


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
    fleet = fleet_of("a", "b")
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 1)
    paused = replace(record, state=apply_event(record.state, E.PAUSE))
    fleet["late"] = view("late")
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


# ----- property: random statuses and ticks follow the tables ----------------------------

NODES = ("p0", "p1", "p2", "p3")
LABELS = {n: {"site": "a" if k % 2 else "b"} for k, n in enumerate(NODES)}
CODES = (None, "download", "timeout", "model_invalid", "digest_mismatch", "unhealthy")
OPERATOR = (E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK)

SPECS = st.builds(
    make_spec,
    waves=st.sampled_from([(100.0,), (34.0, 67.0, 100.0), (1.0, 50.0)]),
    selector=st.sampled_from([{}, {"site": "a"}]),
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
