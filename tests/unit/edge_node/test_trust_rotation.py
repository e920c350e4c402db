"""Trust rotation over the air, and a node that restarts after its release key rotated.

On the in-memory broker, with real keys, files and onnxruntime.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edge_node.state import NodeStore
from edgefleet_io.memory import MemoryBroker
from fleet_controller.signing import sign_command
from shared import topics
from shared.envelope import SigningKey
from shared.messages import NodeTarget, TrustUpdateAction
from shared.trust import Role, TrustList, sign_trust_list
from tests.support.harness import Harness, start_node


def test_node_keeps_its_model_across_a_release_key_rotation_and_restart(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            data = tmp_path / "n1"
            async with start_node(harness, "n1", data) as node:
                await harness.wait_state(await harness.deploy("n1", model), "activated")
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
            stored = NodeStore(data).load_trust(harness.trust_file, now=time.time())
            assert stored.version == 2
            births_before = len([s for s in harness.states if s.online])
            async with start_node(harness, "n1", data) as again:
                await harness.wait_for(
                    lambda: len([s for s in harness.states if s.online]) > births_before,
                    what="the restarted node's birth",
                )
                assert again.agent.serving == model.manifest.ref
            birth = [s for s in harness.states if s.online][-1]
            assert birth.model == model.manifest.ref  # still serving, announced honestly

    asyncio.run(scenario())
