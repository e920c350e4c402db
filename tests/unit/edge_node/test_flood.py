"""A node under a flood of junk commands: no answers to junk, a real command still runs.

A real :class:`~edge_node.agent.NodeAgent` (real signatures, real onnxruntime)
and a :class:`~tests.support.harness.Harness` playing the controller on the
in-memory broker, which hands the node's connection its inbox as a real client
does (see :mod:`edgefleet_io.memory`).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

from edgefleet_io.memory import MemoryBroker
from shared import topics
from tests.support.harness import Harness, start_node
from tests.support.node_checks import statuses

JUNK_COUNT = 600


def forged(envelope: bytes) -> bytes:
    """A well-formed envelope whose signature does not cover its payload."""
    fields = json.loads(envelope)
    fields["payload"] = base64.b64encode(b'{"type":"command"}').decode()
    return json.dumps(fields).encode()


def test_junk_commands_are_refused_unanswered_and_a_signed_one_still_runs(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(harness, "n1", tmp_path / "n1") as node:
                # A real command's envelope, forged: its signature no longer verifies.
                first = await harness.deploy("n1", model, rollout_id="r0")
                await harness.wait_state(first, "activated")
                junk = [
                    b"x",
                    b"{}",
                    b"[" * 5_000,
                    b'{"payloadType": 1}',
                    forged(harness.commands[first].to_bytes()),
                ]
                topic = topics.node_cmd(fleet_id, "n1")
                for n in range(JUNK_COUNT):
                    await harness.publish(topic, junk[n % len(junk)])
                model2 = harness.register(classifier_v1, "clf", "1.0.1")
                command = await harness.deploy("n1", model2)
                await harness.wait_state(command, "activated")
                stats = node.agent.stats()
            unattributed = [s for s in statuses(harness, "n1") if s.command_id is None]
            # One forged command is answered (its reason shows a key mismatch), no more.
            assert [s.state.value for s in unattributed] == ["rejected"]
            assert unattributed[0].code == "bad_signature"
            refused = stats["refused_commands"]
            assert refused > 0
            assert refused + stats.get("inbox_dropped_junk", 0) == JUNK_COUNT

    asyncio.run(scenario())
