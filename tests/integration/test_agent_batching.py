"""Micro-batching: queued inputs of a dynamic-batch model run as one session.run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.harness import Harness, RunningNode, node_config

pytestmark = pytest.mark.integration


def test_micro_batches_run_together_and_every_result_arrives(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(
                harness, "n1", tmp_path / "n1", source="synthetic", rate_hz=None, micro_batch=8
            )
            async with RunningNode(config) as node:
                command = await harness.deploy("n1", model)
                await harness.wait_state(command, "activated")
                await harness.wait_for(
                    lambda: len(harness.results.get("n1", {})) >= 400, what="400 results"
                )
                await node.stop()
            stats = node.agent.stats()
            assert stats["errors"] == 0
            assert stats["stacked_runs"] > 0
            results = harness.results["n1"]
            assert all(r.model == model.manifest.ref for r in results.values())
            seqs = sorted(results)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    asyncio.run(scenario())
