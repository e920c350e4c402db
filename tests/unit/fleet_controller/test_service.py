"""The composition root (fleet_controller.service): wiring, lifecycle, last-resort isolation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from fleet_controller import service as service_module
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.broker import BrokerAddress
from shared.messages import ArtifactRequest, NodeState, encode
from tests.unit.fleet_controller.kit import (
    FLEET,
    NOW,
    Clock,
    controller,
    eventually,
    make_service,
    result_batch,
    run,
    running,
)


def test_a_real_broker_is_the_default_transport(tmp_path: Path, keys: Path) -> None:
    address = BrokerAddress(host="127.0.0.1", port=1, tls=False)
    service = ControllerService(
        ControllerConfig(broker=address, db_url=str(tmp_path / "fleet.db"), keys_dir=keys),
        clock=lambda: NOW,
    )
    try:
        transport = service.link._transport  # what the seam was given
        assert isinstance(transport, MqttTransport)
        assert transport.address == address
        assert service.blobs.root == tmp_path / "blobs"
    finally:
        service.store.close()


def test_a_loop_that_crashes_is_logged_and_started_again(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service_module, "RESTART_PAUSE_S", 0.0)

    async def scenario() -> None:
        broker = MemoryBroker()
        service = make_service(tmp_path, keys, broker, Clock())
        real_run = service.ingest.run
        crashes = [1]

        async def crashing() -> None:
            if crashes:
                crashes.pop()
                raise RuntimeError("writer broke")
            await real_run()

        monkeypatch.setattr(service.ingest, "run", crashing)
        async with running(service):
            await eventually("it restarts", lambda: service.metrics["loop_restarts"] == 1)
            async with broker.transport().connect(Session(client_id="n1")) as node:
                await node.subscribe([(topics.ack(FLEET, "n1"), 1)])
                await node.publish(topics.results(FLEET, "n1"), result_batch("n1", 1, [1]).payload)
                ack = await anext(aiter(node.messages()))
                assert ack.topic == topics.ack(FLEET, "n1")
        assert any("controller loop ingest crashed" in r.getMessage() for r in caplog.records)

    run(scenario)


def test_a_background_task_that_raises_is_logged(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:

            async def broken(request: ArtifactRequest) -> None:
                raise RuntimeError(f"cannot serve {request.sha256[:12]}")

            monkeypatch.setattr(ctl.service.artifacts, "serve_chunk", broken)
            sha = "ab" * 32
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                request = ArtifactRequest(node="n1", sha256=sha, ranges=((0, 10),), ts=0.0)
                await node.publish(topics.artifact_request(FLEET, sha, "n1"), encode(request))
            await eventually("it is counted", lambda: ctl.service.metrics["background_errors"])
            async with ctl.operator() as op:
                assert await op.call("nodes.list") == []
        failed = [r for r in caplog.records if "background task chunk-n1 failed" in r.getMessage()]
        assert failed
        assert failed[0].exc_info is not None

    run(scenario)


def test_stop_stores_what_is_queued_and_says_offline(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            ctl.service.ingest.offer(result_batch("n1", 1, [1, 2]))
        assert ctl.service.metrics["stored"] == 1
        assert b'"online":false' in (ctl.broker.retained(topics.controller_state(FLEET)) or b"")

    run(scenario)


def test_nodes_learned_from_retained_states_at_start_keep_their_time_and_version(
    tmp_path: Path, keys: Path
) -> None:
    """A controller that starts after the nodes did learns them from the births and
    deaths the broker retained: as last seen then, running the agent they named."""

    async def scenario() -> None:
        broker = MemoryBroker()
        async with broker.transport().connect(Session(client_id="old-news")) as link:
            for node, online, ts in (("n1", True, NOW - 3600), ("n2", False, NOW - 7200)):
                state = NodeState(node=node, online=online, session=3, agent_version="0.9.1", ts=ts)
                await link.publish(topics.state(FLEET, node), encode(state), retain=True)
        service = make_service(tmp_path, keys, broker, Clock())
        async with running(service):
            await eventually(
                "both nodes stored",
                lambda: len(service.store.nodes.list()) == 2,
            )
            n1, n2 = service.store.nodes.list()
        assert (n1.node_id, n1.online, n1.agent_version, n1.last_seen) == (
            "n1", True, "0.9.1", NOW - 3600,
        )  # fmt: skip
        assert (n2.node_id, n2.online, n2.agent_version, n2.last_seen) == (
            "n2", False, "0.9.1", NOW - 7200,
        )  # fmt: skip

    run(scenario)
