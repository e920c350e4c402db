"""A real node, a real broker, real ONNX files: deploys, tampering, resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.harness import Harness, RunningNode, node_config

pytestmark = pytest.mark.integration


def test_deploy_goes_from_queued_to_activated(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with RunningNode(node_config(harness, "n1", tmp_path / "n1")) as node:
                command = await harness.deploy("n1", model)
                await harness.wait_state(command, "succeeded")
                assert node.agent.active == model.manifest.ref
        states = harness.states_of(command)
        assert states[0] == "queued"
        for expected in ("downloading", "downloaded", "verifying", "loading", "activated"):
            assert expected in states
        assert states.index("activated") < states.index("succeeded")

    asyncio.run(scenario())
