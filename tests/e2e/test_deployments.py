"""Deployments end to end, with every part a real process: a group's staged
rollout, then a node that comes online after it ended, and one that gains the
group's label from an operator, each running the group's model within a minute.

Real Mosquitto, ``fleetctl serve`` on a SQLite file, ``edge-node simulate`` for
the group and ``edge-node run`` for the newcomers; driven as an operator does
(``fleetctl ... --json``), waiting by polling against deadlines.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import ModelFiles
from tests.e2e.rollout_kit import (
    QUICK_GATE,
    RATE_HZ,
    ROLLOUT_DEADLINE_S,
    assert_all_on,
    bring_up,
    sqlite_url,
)
from tests.support.fleet import Fleet

pytestmark = pytest.mark.e2e

V1 = "classifier@1.0.0"
JOIN_DEADLINE_S = 60.0  # the promise: a newcomer runs its group's model within a minute


def test_late_joiner_and_relabelled_node_get_the_group_model(
    fleet: Fleet, e2e_models: ModelFiles
) -> None:
    sims = bring_up(fleet, sqlite_url(fleet), 3, [(e2e_models.v1, V1)], labels={"site": "a"})
    answer = fleet.fleetctl(
        "deployment", "set", "cams", V1, "--select", "site=a",
        "--waves", "50,100", "--health-window", "1s", "--wave-timeout", "60s", *QUICK_GATE,
    )  # fmt: skip
    staged = answer["started"]["rollout_id"]
    done = fleet.wait_rollout(staged, timeout_s=ROLLOUT_DEADLINE_S)
    assert done["state"] == "succeeded", f"{done}\n{fleet.diagnostics()}"
    assert_all_on(fleet, sims, V1)

    # A node of the group that comes online after the rollout ended.
    fleet.node("late-1", rate_hz=RATE_HZ, labels={"site": "a"})
    fleet.wait_nodes(["late-1"], timeout_s=60.0)
    online_at = time.monotonic()
    fleet.wait_nodes(["late-1"], model=V1, timeout_s=JOIN_DEADLINE_S, what="late-1 on the model")
    late_s = time.monotonic() - online_at

    # A node outside the group gets nothing until an operator gives it the label.
    fleet.node("other-1", rate_hz=RATE_HZ, labels={"site": "b"})
    fleet.wait_nodes(["other-1"], timeout_s=60.0)
    shown = fleet.fleetctl("deployment", "show", "cams")
    assert (shown["members"], shown["on_target"]) == (4, 4), shown
    relabelled = fleet.fleetctl("node", "label", "other-1", "site=a")
    assert (relabelled["labels"], relabelled["announced_labels"]) == ({"site": "a"}, {"site": "b"})
    labelled_at = time.monotonic()
    fleet.wait_nodes(["other-1"], model=V1, timeout_s=JOIN_DEADLINE_S, what="other-1 on the model")
    relabelled_s = time.monotonic() - labelled_at

    shown = fleet.fleetctl("deployment", "show", "cams")
    assert (shown["members"], shown["on_target"], shown["held"]) == (5, 5, {}), shown
    listed = fleet.fleetctl("deployment", "list")
    assert [(d["name"], d["on_target"], d["drifted"]) for d in listed] == [("cams", 5, 0)]
    rollouts = {r["rollout_id"] for r in fleet.fleetctl("rollout", "list")}
    assert len(rollouts) == 3, rollouts  # the staged one and one per newcomer
    # For benchmarks/README.md: how long each newcomer waited for its model.
    print(
        f"late joiner on the model after {late_s:.1f} s, relabelled node after {relabelled_s:.1f} s"
    )
