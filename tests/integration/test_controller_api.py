"""A real controller service with real agents over a real Mosquitto.

The operator API and ingest are tested in milliseconds on the in-memory broker
(tests/unit/fleet_controller/); these keep the whole path honest end to end.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from edge_node.agent import AgentConfig, NodeAgent
from edge_node.state import NodeStore
from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperationError, OperatorIdentity
from fleet_controller.keys import init_keys, load_key, rotate_key
from fleet_controller.publish import publish, sign_release
from fleet_controller.registry import describe_model
from fleet_controller.service import ControllerConfig, ControllerService
from shared.broker import parse_broker_url
from shared.trust import Role
from tests.support.broker import Broker

pytestmark = pytest.mark.integration


async def wait_online(ctl: CtlClient, node_id: str, *, online: bool = True) -> None:
    """Until the controller has stored ``node_id``'s birth (or, ``online=False``, its death)."""
    deadline = time.monotonic() + 20
    while not any(
        n["node_id"] == node_id and n["online"] is online for n in await ctl.call("nodes.list")
    ):
        assert time.monotonic() < deadline, f"the controller never saw {node_id} {online=}"
        await asyncio.sleep(0.05)  # polling the controller against the deadline


def test_trust_push_reaches_nodes_over_the_air(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    """`fleetctl keys push`: a rotated trust list goes to every node, retained."""

    async def scenario() -> None:
        address = parse_broker_url(broker.url)
        keys = tmp_path / "keys"
        init_keys(keys, now=time.time())
        shipped = tmp_path / "shipped-trust.json"
        shipped.write_bytes((keys / "trust.json").read_bytes())
        service = ControllerService(
            ControllerConfig(
                broker=address, db_url=str(tmp_path / "fleet.db"), keys_dir=keys, fleet=fleet_id
            )
        )
        node = NodeAgent(
            AgentConfig(
                node_id="n1",
                data_dir=tmp_path / "n1",
                trust_file=shipped,
                broker=address,
                fleet=fleet_id,
                source="none",
            )
        )
        tasks = [asyncio.get_running_loop().create_task(x.run()) for x in (service, node)]
        try:
            async with asyncio.timeout(20):
                await service.connected.wait()
                await node.connected.wait()
            rotate_key(keys, Role.RELEASE, now=time.time())
            async with CtlClient(
                MqttTransport(address), fleet=fleet_id, identity=OperatorIdentity.load(keys)
            ) as ctl:
                pushed = await ctl.call("trust.push", {"trust": (keys / "trust.json").read_text()})
                assert pushed == {"version": 2, "rollout_id": "trust-v2"}
                with pytest.raises(OperationError):  # the same list again is no rotation
                    await ctl.call("trust.push", {"trust": (keys / "trust.json").read_text()})
            written = NodeStore(tmp_path / "n1")
            deadline = time.monotonic() + 20
            while not written.chain_path.exists():
                assert time.monotonic() < deadline, "the node never took trust v2"
                await asyncio.sleep(0.05)  # polling the node's data directory
            assert written.load_trust(shipped, now=time.time()).version == 2
        finally:
            service.stop()
            node.stop()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_wiped_node_loses_nothing_it_sends_afterwards(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    """A node reinstalled with an empty data directory numbers its outbox and results
    from its clock; its birth tells the controller where its outbox starts."""

    async def scenario() -> None:
        address = parse_broker_url(broker.url)
        keys = tmp_path / "keys"
        init_keys(keys, now=time.time())
        service = ControllerService(
            ControllerConfig(
                broker=address, db_url=str(tmp_path / "fleet.db"), keys_dir=keys, fleet=fleet_id
            )
        )
        running = asyncio.get_running_loop().create_task(service.run())

        def node() -> NodeAgent:
            return NodeAgent(
                AgentConfig(
                    node_id="n1",
                    data_dir=tmp_path / "n1",
                    trust_file=keys / "trust.json",
                    broker=address,
                    fleet=fleet_id,
                    source="synthetic",
                    rate_hz=50.0,
                    batch_interval_s=0.1,
                    resend_after_s=1.0,
                )
            )

        async def run_until_drained(agent: NodeAgent, results_at_least: int) -> None:
            task = asyncio.get_running_loop().create_task(agent.run())
            deadline = time.monotonic() + 30
            while not (
                stored_results() >= results_at_least
                and agent.stats()["inferences"] > 0
                and agent.outbox_stats().depth == 0
            ):
                assert time.monotonic() < deadline, f"stuck at {agent.outbox_stats()}"
                await asyncio.sleep(0.05)  # polling the store against the deadline
            agent.stop()
            async with asyncio.timeout(30):
                await task

        def stored_results() -> int:
            return int(service.store.results.report()["totals"]["results"])

        try:
            async with asyncio.timeout(20):
                await service.connected.wait()
            async with CtlClient(
                MqttTransport(address), fleet=fleet_id, identity=OperatorIdentity.load(keys)
            ) as ctl:
                release = load_key(keys, Role.RELEASE, None)
                manifest = describe_model(classifier_v1, name="clf", version="1.0.0", now=0.0)
                await publish(ctl, sign_release(classifier_v1, manifest, release))
                first = node()
                first_task = asyncio.get_running_loop().create_task(first.run())
                async with asyncio.timeout(20):
                    await first.connected.wait()
                # A rollout selects the nodes the controller knows: wait for the birth.
                await wait_online(ctl, "n1")
                started = await ctl.call(
                    "rollout.start",
                    {"model": "clf@1.0.0", "waves": [100], "health_window_s": 0.5},
                )
                status = {"rollout_id": started["rollout_id"]}
                deadline = time.monotonic() + 30
                while (await ctl.call("rollout.status", status))["state"] != "succeeded":
                    assert time.monotonic() < deadline, "first rollout did not finish"
                    await asyncio.sleep(0.1)  # polling the rollout against the deadline
                first.stop()
                async with asyncio.timeout(30):
                    await first_task
            await run_until_drained(node(), results_at_least=1)  # drains what was left
            async with CtlClient(
                MqttTransport(address), fleet=fleet_id, identity=OperatorIdentity.load(keys)
            ) as ctl:
                await wait_online(ctl, "n1", online=False)  # its death is stored
            before = stored_results()
            # Reinstall: the data directory is gone, the model comes back with a rollout.
            shutil.rmtree(tmp_path / "n1")
            again = node()
            again_task = asyncio.get_running_loop().create_task(again.run())
            async with (
                asyncio.timeout(20),
                CtlClient(
                    MqttTransport(address), fleet=fleet_id, identity=OperatorIdentity.load(keys)
                ) as ctl,
            ):
                await again.connected.wait()
                await wait_online(ctl, "n1")  # the birth with its outbox floor is stored
                await ctl.call(
                    "rollout.start",
                    {
                        "model": "clf@1.0.0",
                        "waves": [100],
                        "health_window_s": 0.5,
                        "rollout_id": "r2",
                    },
                )
            again.stop()
            async with asyncio.timeout(30):
                await again_task
            await run_until_drained(node(), results_at_least=before + 20)
            assert stored_results() >= before + 20
        finally:
            service.stop()
            async with asyncio.timeout(30):
                await running

    asyncio.run(scenario())
