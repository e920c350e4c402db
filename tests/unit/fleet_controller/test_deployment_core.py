"""Deployments' decisions (fleet_controller.deployment_core): who is held, who is
brought to the target, when nothing moves, and where a group stands."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_controller.deployment_core import (
    Reconcile,
    busy_nodes,
    claimed_by_others,
    membership,
    reconcile,
)
from fleet_controller.rollout_core import NodeProgress, RolloutRecord, RolloutSpec
from shared.labels import parse_selector
from shared.messages import Capabilities, ModelRef, NodeRolloutState, RolloutState
from tests.support.shared_kit import manifest

N = NodeRolloutState
R = RolloutState
OLD = ModelRef(name="det", version="1.0.0", sha256="a" * 64)
TARGET = ModelRef(name="det", version="2.0.0", sha256="b" * 64)
NEW_MANIFEST = manifest(name="det", version="2.0.0", sha256="b" * 64, size=1000)
GROUP = parse_selector("site=a")


@dataclass(frozen=True)
class Node:
    node_id: str
    online: bool = True
    labels: Mapping[str, str] = field(default_factory=lambda: {"site": "a"})
    model: ModelRef | None = None
    capabilities: Capabilities | None = None
    revoked: bool = False


def rollout(
    state: RolloutState,
    *,
    nodes: Mapping[str, NodeProgress] | None = None,
    listed: tuple[str, ...] = (),
    model: ModelRef = TARGET,
    rollout_id: str = "r1",
) -> RolloutRecord:
    spec = RolloutSpec(
        rollout_id=rollout_id, model=model, selector=GROUP, nodes=listed, deployment="cams"
    )
    return RolloutRecord(spec=spec, state=state, nodes=nodes or {})


def progress(node_id: str, state: NodeRolloutState, code: str | None = None) -> NodeProgress:
    return NodeProgress(node_id=node_id, wave=0, state=state, code=code, reason="why")


def decide(
    nodes: list[Node],
    *,
    last: RolloutRecord | None = None,
    held: Mapping[str, str] | None = None,
    busy: frozenset[str] = frozenset(),
    claimed: Mapping[str, str] | None = None,
) -> Reconcile:
    return reconcile(
        claimed=claimed,
        selector=GROUP,
        target=TARGET,
        manifest=NEW_MANIFEST,
        held=held or {},
        last=last,
        nodes=nodes,
        running={},
        busy=busy,
    )


@pytest.mark.parametrize(
    ("nodes", "kwargs", "start"),
    [
        pytest.param([Node("n1")], {}, ("n1",), id="first-install"),
        pytest.param([Node("n1", model=OLD)], {}, ("n1",), id="upgrade"),
        pytest.param([Node("n1", model=TARGET)], {}, (), id="on-target"),
        pytest.param([Node("n1", online=False)], {}, (), id="offline-waits"),
        pytest.param([Node("n1", revoked=True)], {}, (), id="revoked"),
        pytest.param([Node("n1", labels={"site": "b"})], {}, (), id="not-in-group"),
        pytest.param([Node("n1")], {"held": {"n1": "failed"}}, (), id="held"),
        pytest.param([Node("n1")], {"busy": frozenset({"n1"})}, (), id="in-an-active-rollout"),
        pytest.param(
            [Node("n2"), Node("n1"), Node("n3", model=TARGET)], {}, ("n1", "n2"), id="sorted"
        ),
        pytest.param(
            [Node("n1")],
            {"last": rollout(R.SUCCEEDED, nodes={"n0": progress("n0", N.SUCCEEDED)})},
            ("n1",),
            id="after-the-group-rollout-succeeded",
        ),
        pytest.param(
            [Node("n1")],
            {"last": rollout(R.RUNNING)},
            (),
            id="latest-rollout-active",
        ),
        pytest.param(
            [Node("n1")],
            {"last": rollout(R.ROLLED_BACK, listed=("n9",))},
            ("n1",),
            id="a-failed-catch-up-stops-nobody-else",
        ),
    ],
)
def test_who_is_brought_to_the_target(
    nodes: list[Node], kwargs: dict[str, object], start: tuple[str, ...]
) -> None:
    assert decide(nodes, **kwargs).start == start


@pytest.mark.parametrize("ended", [R.FAILED, R.ABORTED, R.ROLLED_BACK])
def test_a_group_rollout_that_did_not_succeed_stops_late_joiners(ended: RolloutState) -> None:
    step = decide([Node("n1")], last=rollout(ended))
    assert step.start == ()
    assert step.waiting is not None
    assert step.waiting.startswith(f"its rollout r1 ended {ended.value}")


def test_nodes_the_latest_rollout_failed_on_are_held_with_why() -> None:
    last = rollout(
        R.ROLLED_BACK,
        listed=("n1", "n2", "n3", "n4", "n5"),
        nodes={
            "n1": progress("n1", N.REJECTED, "downgrade"),
            "n2": progress("n2", N.ROLLED_BACK, "unhealthy"),
            "n3": progress("n3", N.FAILED, "model_invalid"),
            "n4": progress("n4", N.TIMED_OUT, "timeout"),
            "n5": progress("n5", N.CANCELED, "deselected"),
        },
    )
    nodes = [Node(f"n{i}") for i in range(1, 6)]
    step = decide(nodes, last=last, held={"n3": "held before"})
    assert step.hold == {
        "n1": "rejected in r1 (downgrade): why",
        "n2": "rolled_back in r1 (unhealthy): why",
    }
    assert step.start == ("n4", "n5")  # timed out or canceled: tried again


def test_failures_of_an_older_target_are_not_held() -> None:
    last = rollout(R.FAILED, listed=("n1",), model=OLD, nodes={"n1": progress("n1", N.REJECTED)})
    step = decide([Node("n1")], last=last)
    assert (step.hold, step.start) == ({}, ("n1",))


def test_a_node_that_would_refuse_is_held_without_a_command() -> None:
    newer = ModelRef(name="det", version="3.0.0", sha256="c" * 64)
    step = decide([Node("n1", model=newer), Node("n2")])
    assert step.start == ("n2",)
    assert step.hold["n1"].startswith("would refuse: downgrade")


def test_busy_nodes_are_tracked_listed_or_selected_by_active_rollouts() -> None:
    nodes = [Node("n1"), Node("n2", labels={"site": "b"}), Node("n3", labels={"site": "c"})]
    tracked = rollout(R.RUNNING, nodes={"n9": progress("n9", N.QUEUED)}, rollout_id="t")
    listed = RolloutRecord(
        spec=RolloutSpec(rollout_id="l", model=TARGET, nodes=("n3",)), state=R.RUNNING
    )
    assert busy_nodes([tracked, listed], nodes) == {"n1", "n9", "n3"}
    assert busy_nodes([], nodes) == frozenset()


def test_membership_says_where_the_group_stands() -> None:
    nodes = [
        Node("on", model=TARGET),
        Node("old", model=OLD),
        Node("away", online=False),
        Node("held"),
        Node("other", labels={"site": "b"}),
        Node("gone", revoked=True),
    ]
    group = membership(GROUP, TARGET, {"held": "failed"}, nodes)
    assert group.members == ("on", "old", "away", "held")
    assert (group.on_target, group.drifted, group.offline, group.held) == (
        ("on",),
        ("old",),
        ("away",),
        ("held",),
    )
    assert group.to_dict() == {
        "members": 4,
        "on_target": 1,
        "drifted": ["old"],
        "offline": ["away"],
    }


@given(
    st.lists(
        st.tuples(
            st.booleans(), st.booleans(), st.sampled_from(["a", "b"]), st.sampled_from([0, 1, 2])
        ),
        max_size=12,
    ),
    st.frozensets(st.integers(0, 11)),
    st.frozensets(st.integers(0, 11)),
)
def test_never_sends_to_nodes_it_must_leave_alone(
    spec: list[tuple[bool, bool, str, int]], held_ix: frozenset[int], busy_ix: frozenset[int]
) -> None:
    models = [None, OLD, TARGET]
    nodes = [
        Node(f"n{i}", online=online, revoked=revoked, labels={"site": site}, model=models[m])
        for i, (online, revoked, site, m) in enumerate(spec)
    ]
    held = {f"n{i}": "held" for i in held_ix}
    busy = frozenset(f"n{i}" for i in busy_ix)
    step = decide(nodes, held=held, busy=busy)
    by_id = {n.node_id: n for n in nodes}
    for node_id in step.start:
        node = by_id[node_id]
        assert node.online
        assert not node.revoked
        assert node.labels["site"] == "a"
        assert node.model != TARGET
        assert node_id not in held
        assert node_id not in busy
    assert set(step.start).isdisjoint(step.hold)


def test_nodes_another_deployment_claims_with_another_model_are_left_alone() -> None:
    nodes = [Node("n1"), Node("n2", labels={"site": "a", "hw": "jetson"}), Node("n3")]
    others = [
        ("jetsons", parse_selector("hw=jetson"), OLD),
        ("same", parse_selector("site=a"), TARGET),  # the same model: no conflict
        ("cams", GROUP, OLD),  # this deployment itself
    ]
    claimed = claimed_by_others("cams", TARGET, others, nodes)
    assert claimed == {"n2": "jetsons"}
    step = decide(nodes, claimed=claimed)
    assert (step.start, dict(step.conflicts)) == (("n1", "n3"), {"n2": "jetsons"})
    # Also while its rollout runs, the conflict is said.
    running = decide(nodes, claimed=claimed, last=rollout(R.RUNNING))
    assert (running.start, dict(running.conflicts)) == ((), {"n2": "jetsons"})
