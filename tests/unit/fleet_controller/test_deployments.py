"""Operators' labels, node forget and deployments (fleet_controller.deployments,
fleet_controller.handlers) end to end on the in-memory broker."""

from __future__ import annotations

from pathlib import Path

from shared import topics
from shared.envelope import Envelope
from shared.messages import (
    Command,
    DeployAction,
    NodeRolloutState,
    NodeState,
    NodeTarget,
    WaveTarget,
    decode,
    encode,
)
from tests.unit.fleet_controller.kit import (
    FLEET,
    Controller,
    FakeNode,
    blob,
    controller,
    eventually,
    run,
)
from tests.unit.fleet_controller.test_handlers import known

N = NodeRolloutState


async def next_command(node: FakeNode) -> Command:
    """The next command on the node's own topic (acks skipped)."""
    while True:
        message = await node.next_message()
        if message.topic == topics.node_cmd(FLEET, node.node_id):
            return decode(Command, Envelope.from_bytes(message.payload).payload_bytes())


def test_node_label_sets_hides_resets_and_selections_follow(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op, ctl.node("n1") as n1:
            await known(ctl, n1, labels={"site": "a", "gpu": "yes"})
            node = await op.call(
                "node.label", {"node_id": "n1", "set": {"site": "b", "tier": "gold"}}
            )
            assert node["labels"] == {"site": "b", "gpu": "yes", "tier": "gold"}
            assert node["announced_labels"] == {"site": "a", "gpu": "yes"}
            assert [n["node_id"] for n in await op.call("nodes.list", {"select": "site=b"})] == [
                "n1"
            ]
            assert await op.call("nodes.list", {"select": "site=a"}) == []
            node = await op.call(
                "node.label", {"node_id": "n1", "hide": ["gpu"], "reset": ["site"]}
            )
            assert node["labels"] == {"site": "a", "tier": "gold"}
            assert node["central_labels"] == {"gpu": None, "tier": "gold"}
            # A new birth replaces what the node announces, never the operators' labels.
            await n1.birth(session=2, labels={"site": "c", "gpu": "no"})
            await eventually(
                "the second birth is stored",
                lambda: ctl.store.nodes.get("n1").session == 2,
            )
            listed = await op.call("nodes.list")
            assert listed[0]["labels"] == {"site": "c", "tier": "gold"}
            unknown = await op.request("node.label", {"node_id": "zz", "set": {"a": "b"}})
            assert (unknown.code, unknown.error) == (1, "unknown node zz")

    run(scenario)


def test_node_forget_removes_an_offline_node_and_its_retained_birth(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op, ctl.node("n1") as n1:
            await known(ctl, n1)
            online = await op.request("node.forget", {"node_id": "n1"})
            assert online.code == 1
            assert online.error.startswith("node n1 is online: only a node that is gone")
            assert ctl.store.nodes.get("n1") is not None
            state = topics.state(FLEET, "n1")
            death = NodeState(node="n1", online=False, session=1, ts=ctl.clock())
            await n1.link.publish(state, encode(death), retain=True)  # as its Will would
            await eventually("n1 is offline", lambda: not ctl.store.nodes.get("n1").online)
            assert await op.call("node.forget", {"node_id": "n1"}) == {
                "node_id": "n1",
                "forgotten": True,
            }
            assert ctl.store.nodes.get("n1") is None
            assert ctl.broker.retained(state) is None
            assert await op.call("nodes.list") == []
            again = await op.request("node.forget", {"node_id": "n1"})
            assert (again.code, again.error) == (1, "unknown node n1")

    run(scenario)


def rollouts_of(ctl: Controller, deployment: str) -> set[str]:
    """Ids of the rollouts ``deployment`` started."""
    return {
        i.rollout_id
        for i in ctl.store.rollouts.list()
        if (record := ctl.store.rollouts.load(i.rollout_id)) is not None
        and record.spec.deployment == deployment
    }


def latest(ctl: Controller, deployment: str) -> str:
    """The latest rollout ``deployment`` started."""
    rollout_id = ctl.store.deployments.get(deployment).rollout_id
    assert rollout_id is not None
    return str(rollout_id)


def test_late_joiners_get_the_group_model_and_failures_are_held(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys, tick_s=3600, reconcile_s=3600) as ctl,
            ctl.operator() as op,
            ctl.node("n1") as n1,
            ctl.node("n2") as n2,
        ):
            v1 = ctl.register(blob(1))
            answer = await op.call(
                "deployment.set",
                {"deployment": "cams", "model": "clf@1.0.0", "select": "site=a", "waves": [100]},
            )
            assert (answer["started"], answer["rollout_id"]) == (None, None)  # no node yet
            deployments = ctl.service.deployments

            await known(ctl, n1, labels={"site": "a"})  # a late joiner
            await known(ctl, n2, labels={"site": "b"})  # not in the group
            await deployments.reconcile_all()
            [first] = rollouts_of(ctl, "cams")
            assert latest(ctl, "cams") == first
            record = ctl.store.rollouts.load(first)
            assert (record.spec.nodes, record.spec.model, record.spec.waves) == (
                ("n1",),
                v1,
                (100.0,),
            )
            await ctl.service.ticker.tick_all()
            command = await next_command(n1)
            assert command.target == NodeTarget(node="n1")
            assert isinstance(command.body, DeployAction)
            assert command.body.manifest.payload_bytes()  # the release-signed manifest
            await deployments.reconcile_all()  # its rollout is active: nothing new
            assert rollouts_of(ctl, "cams") == {first}

            # n2 joins the group by an operator's label; n1 refuses the model.
            await op.call("node.label", {"node_id": "n2", "set": {"site": "a"}})
            await n1.status(1, N.REJECTED, rollout_id=first)
            await eventually("the status is stored", lambda: n1_acked(ctl))
            await ctl.service.ticker.tick_all()
            assert ctl.store.rollouts.load(first).state.value == "rolled_back"  # halted
            await deployments.reconcile_all()
            second = latest(ctl, "cams")
            assert rollouts_of(ctl, "cams") == {first, second}
            assert ctl.store.rollouts.load(second).spec.nodes == ("n2",)
            shown = await op.call("deployment.show", {"deployment": "cams"})
            assert list(shown["held"]) == ["n1"]
            assert shown["held"]["n1"].startswith(f"rejected in {first}")
            assert (shown["members"], shown["rollout_id"]) == (2, second)
            await ctl.service.ticker.tick_all()
            assert (await next_command(n2)).target == NodeTarget(node="n2")
            # Rollouts end; the held node is not sent the same model again.
            await op.call("rollout.abort", {"rollout_id": second})
            await deployments.reconcile_all()
            third = latest(ctl, "cams")
            assert rollouts_of(ctl, "cams") == {first, second, third}
            assert ctl.store.rollouts.load(third).spec.nodes == (
                "n2",
            )  # aborted is no failure of n2's: it is tried again

    run(scenario)


def n1_acked(ctl: Controller) -> bool:
    node = ctl.store.nodes.get("n1")
    return node is not None and node.acked_seq >= 1


def test_a_new_target_starts_a_staged_rollout_and_supersedes_the_old(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys, tick_s=3600, reconcile_s=3600) as ctl,
            ctl.operator() as op,
            ctl.node("n1") as n1,
            ctl.node("n2") as n2,
            ctl.node("n3") as n3,
        ):
            v1 = ctl.register(blob(1))
            ctl.register(blob(2), version="2.0.0")
            await known(ctl, n1, labels={"site": "a"}, model=v1)
            await known(ctl, n2, labels={"site": "a"}, model=v1)
            group = {"deployment": "cams", "model": "clf@2.0.0", "select": "site=a"}
            answer = await op.call("deployment.set", group)
            staged = answer["started"]["rollout_id"]
            record = ctl.store.rollouts.load(staged)
            assert (record.spec.deployment, record.spec.nodes) == ("cams", ())
            await ctl.service.ticker.tick_all()
            assert ctl.broker.retained(topics.rollout_cmd(FLEET, staged)) is not None
            command = decode(
                Command,
                Envelope.from_bytes(
                    ctl.broker.retained(topics.rollout_cmd(FLEET, staged))
                ).payload_bytes(),
            )
            assert isinstance(command.target, WaveTarget)

            # The same target with another policy: no new rollout, the policy is kept.
            same = await op.call("deployment.set", {**group, "max_failures": 0.5})
            assert (same["started"], same["rollout_id"]) == (None, staged)
            assert same["policy"]["max_failures"] == 0.5

            # An aborted group rollout: the release did not pass, late joiners wait.
            await op.call("rollout.abort", {"rollout_id": staged})
            await known(ctl, n3, labels={"site": "a"})
            await ctl.service.deployments.reconcile_all()
            assert rollouts_of(ctl, "cams") == {staged}
            shown = await op.call("deployment.show", {"deployment": "cams"})
            assert shown["waiting"].startswith(f"its rollout {staged} ended aborted")
            assert sorted(shown["drifted"]) == ["n1", "n2", "n3"]

            # A new selector is a new target: a new staged rollout over the group.
            moved = await op.call("deployment.set", {**group, "select": "site=a,!canary"})
            assert moved["started"]["rollout_id"] != staged
            listed = await op.call("deployment.list")
            assert [(d["name"], d["nodes"], d["on_target"]) for d in listed] == [("cams", 3, 0)]
            assert await op.call("deployment.delete", {"deployment": "cams"}) == {
                "name": "cams",
                "deleted": True,
            }
            assert await op.call("deployment.list") == []
            gone = await op.request("deployment.show", {"deployment": "cams"})
            assert (gone.code, gone.error) == (1, "unknown deployment cams")
            unknown = await op.request("deployment.set", {**group, "model": "clf@9.0.0"})
            assert unknown.code == 1
            # Two deployments with other models may not share nodes.
            await op.call("deployment.set", {**group, "model": "clf@1.0.0", "force": True})
            other = {"deployment": "n3-only", "model": "clf@2.0.0", "select": "site=a"}
            clash = await op.request("deployment.set", other)
            assert clash.code == 1
            assert clash.error == (
                "deployment not set: 3 of its nodes (e.g. n1) are in deployment cams too, "
                "with another model; a node follows one deployment"
            )
            assert [d["name"] for d in await op.call("deployment.list")] == ["cams"]

    run(scenario)
