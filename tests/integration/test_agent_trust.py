"""Trust rotation over the air, and a node that restarts after its release key rotated."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fleet_controller.signing import sign_command
from shared import topics
from shared.envelope import SigningKey
from shared.messages import NodeTarget, TrustUpdateAction
from shared.trust import Role, TrustList, TrustStore, sign_trust_list
from tests.support.broker import Broker
from tests.support.harness import Harness, RunningNode, node_config

pytestmark = pytest.mark.integration


def test_node_keeps_its_model_across_a_release_key_rotation_and_restart(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            data = tmp_path / "n1"
            async with RunningNode(node_config(harness, "n1", data)) as node:
                await harness.wait_state(await harness.deploy("n1", model), "succeeded")
                new_release = SigningKey.generate()
                trust = TrustList.build(
                    version=2,
                    expires_at=time.time() + 86_400,
                    roles={
                        Role.ROOT: [harness.root],
                        Role.RELEASE: [new_release],
                        Role.ROLLOUT: [harness.rollout],
                    },
                )
                command, envelope = sign_command(
                    harness.rollout,
                    fleet=fleet_id,
                    seq=harness.next_seq(),
                    target=NodeTarget(node="n1"),
                    body=TrustUpdateAction(trust=sign_trust_list(trust, [harness.root])),
                    now=time.time(),
                )
                await harness.publish_command(topics.node_cmd(fleet_id, "n1"), envelope)
                await harness.wait_state(command.command_id, "succeeded")
                await node.stop()
            stored = TrustStore.bootstrap((data / "trust.json").read_bytes(), now=time.time())
            assert stored.version == 2
            births_before = len([s for s in harness.states if s.online])
            async with RunningNode(node_config(harness, "n1", data)) as again:
                await harness.wait_for(
                    lambda: len([s for s in harness.states if s.online]) > births_before,
                    what="the restarted node's birth",
                )
                assert again.agent.serving == model.manifest.ref
            birth = [s for s in harness.states if s.online][-1]
            assert birth.model == model.manifest.ref  # still serving, announced honestly

    asyncio.run(scenario())
