"""The rollout engine (fleet_controller.rollout_core): waves, state tables, tick, statuses.

Everything runs on a fake fleet (a dict of ``NodeView``) and an explicit ``now``:
no broker, no clock, no database.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from fleet_controller.rollout_core import (
    NODE_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    ClearBroadcast,
    IllegalTransitionError,
    NodeProgress,
    RolloutEvent,
    RolloutRecord,
    SendNode,
    SendWave,
    apply_event,
    apply_node_status,
    node_transition,
    tick,
    wave_limits,
    wave_of,
)
from shared.errors import DecodeError
from shared.labels import parse_selector
from shared.messages import NodeRolloutState, RolloutState
from shared.waves import BUCKETS, in_wave
from tests.support.shared_kit import NOW
from tests.unit.fleet_controller.rollout_kit import (
    OLD,
    E,
    N,
    R,
    fleet_of,
    fold,
    ids_in_wave,
    make_spec,
    quiet,
    view,
    with_node,
)

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
    spec = make_spec(selector=parse_selector("site=berlin"))
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
    fleet = quiet(fleet_of(*first, *second))
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
    fleet = quiet(fleet_of("a", "b"))
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
    spec = make_spec(selector=parse_selector("site=berlin"))
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
    record, actions = tick(record, quiet(fleet_of(first)), now=NOW + 100)
    assert actions == [SendWave(1, BUCKETS)]
    record, actions = tick(record, quiet(fleet_of(first, late)), now=NOW + 101)
    assert actions == [SendNode(late, "deploy")]
    assert record.nodes[late].wave == 0


# ----- node statuses ---------------------------------------------------------------------


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
