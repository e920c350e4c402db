"""The operator API of a real controller service over a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiomqtt
import pytest

from edge_node.agent import AgentConfig, NodeAgent
from fleet_controller.api import CtlClient, OperationError
from fleet_controller.keys import init_keys, rotate_key
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.broker import parse_broker_url
from shared.messages import ControllerState, decode
from shared.trust import Role, TrustStore
from tests.support.broker import Broker

pytestmark = pytest.mark.integration


def test_operator_api_answers_audits_and_survives_junk(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        address = parse_broker_url(broker.url)
        init_keys(tmp_path / "keys", now=time.time())
        service = ControllerService(
            ControllerConfig(
                broker=address,
                db_url=str(tmp_path / "db" / "fleet.db"),
                keys_dir=tmp_path / "keys",
                fleet=fleet_id,
            )
        )
        running = asyncio.get_running_loop().create_task(service.run())
        try:
            async with asyncio.timeout(20):
                await service.connected.wait()
            async with (
                aiomqtt.Client(address.host, address.port) as raw,
                CtlClient(address, fleet=fleet_id, operator="alice", timeout_s=10) as ctl,
            ):
                await raw.subscribe(topics.controller_state(fleet_id), qos=1)
                async with asyncio.timeout(10):
                    async for message in raw.messages:
                        assert isinstance(message.payload, bytes)
                        assert decode(ControllerState, message.payload).online
                        break
                # Junk on the request topic is dropped; the controller keeps answering.
                await raw.publish(topics.ctl_request(fleet_id), b'{"v":1,"v":2}', qos=1)
                assert await ctl.call("nodes.list") == []
                assert await ctl.call("node.revoke", {"node_id": "cam-9"}) == {
                    "node_id": "cam-9",
                    "revoked": True,
                }
                nodes = await ctl.call("nodes.list")
                assert [(n["node_id"], n["revoked"]) for n in nodes] == [("cam-9", True)]
                with pytest.raises(OperationError) as unknown:
                    await ctl.call("rollout.explode")
                assert unknown.value.code == 2
                with pytest.raises(OperationError) as bad:
                    await ctl.call("rollout.start", {"model": "no-version"})
                assert bad.value.code == 2
                with pytest.raises(OperationError) as missing:
                    await ctl.call("rollout.start", {"model": "ghost@1.0.0"})
                assert missing.value.code == 1
                audit = await ctl.call("audit.list")
                assert [(a["operator"], a["action"], a["outcome"]) for a in audit] == [
                    ("alice", "rollout.start", "failed"),
                    ("alice", "rollout.start", "refused"),
                    ("alice", "node.revoke", "ok"),
                ]
            assert service.metrics["malformed"] >= 1
        finally:
            service.stop()
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(20):
                    await running

    asyncio.run(scenario())


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
            async with CtlClient(address, fleet=fleet_id, operator="alice") as ctl:
                pushed = await ctl.call("trust.push", {"trust": (keys / "trust.json").read_text()})
                assert pushed == {"version": 2, "rollout_id": "trust-v2"}
                with pytest.raises(OperationError):  # the same list again is no rotation
                    await ctl.call("trust.push", {"trust": (keys / "trust.json").read_text()})
            written = tmp_path / "n1" / "trust.json"
            deadline = time.monotonic() + 20
            while not written.exists():
                assert time.monotonic() < deadline, "the node never took trust v2"
                await asyncio.sleep(0.05)  # polling the node's data directory
            assert TrustStore.bootstrap(written.read_bytes(), now=time.time()).version == 2
        finally:
            service.stop()
            node.stop()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
