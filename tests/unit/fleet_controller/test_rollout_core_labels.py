"""The rollout engine and operators' labels: who gets the broadcast, who a command
of their own, who is told to stay out; rollouts to listed nodes; nodes that
leave the selection while they work."""

from __future__ import annotations

from dataclasses import replace

from fleet_controller.rollout_core import (
    NodeView,
    RolloutRecord,
    SendNode,
    SendWave,
    tick,
)
from shared.labels import parse_selector
from tests.support.shared_kit import NOW
from tests.unit.fleet_controller.rollout_kit import IN_FLIGHT, N, R, make_spec, view

SITE_A = parse_selector("site=a")


def relabelled(node_id: str, announced: dict[str, str]) -> NodeView:
    """A node operators moved into site a; it announces ``announced`` itself."""
    return replace(view(node_id, labels={"site": "a"}), announced=announced)


def test_a_node_in_the_selection_only_by_operators_labels_gets_its_own_command() -> None:
    record = RolloutRecord(spec=make_spec(selector=SITE_A))
    fleet = {
        "own": replace(view("own", labels={"site": "a"}), announced={"site": "a"}),
        "moved": relabelled("moved", {"site": "b"}),
    }
    record, actions = tick(record, fleet, now=NOW, excluded=("out2", "out1"))
    assert actions == [SendWave(0, 10_000, ("out1", "out2")), SendNode("moved", "deploy")]
    assert set(record.nodes) == {"own", "moved"}


def test_later_waves_carry_the_exclusions_too() -> None:
    spec = make_spec(selector=SITE_A, waves=(0.01, 100.0))
    _, actions = tick(RolloutRecord(spec=spec), {}, now=NOW, excluded=("out",))
    # The first wave is empty and passes at once: both broadcasts in one tick.
    assert actions[:2] == [SendWave(0, 1, ("out",)), SendWave(1, 10_000, ("out",))]


def test_a_rollout_to_listed_nodes_sends_no_broadcast() -> None:
    spec = make_spec(nodes=("n2", "n3"))
    fleet = {n: view(n) for n in ("n1", "n2", "n3")}
    record, actions = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    assert actions == [SendNode("n2", "deploy"), SendNode("n3", "deploy")]
    assert set(record.nodes) == {"n2", "n3"}
    assert record.state is R.RUNNING


def test_a_working_node_that_leaves_the_selection_is_canceled() -> None:
    fleet = {"n1": view("n1"), "n2": view("n2")}
    record, _ = tick(RolloutRecord(spec=make_spec()), fleet, now=NOW)
    for state in IN_FLIGHT:
        moved = replace(
            record, nodes={**record.nodes, "n1": replace(record.nodes["n1"], state=state)}
        )
        after, actions = tick(moved, {"n2": fleet["n2"]}, now=NOW + 1)
        gone = after.nodes["n1"]
        assert (gone.state, gone.code) == (N.CANCELED, "deselected")
        assert SendNode("n1", "cancel") in actions
        assert after.state is R.RUNNING  # a canceled node is no failure
