"""A real node against a real Mosquitto: what a broker process adds to the job tests.

Commands, refusals, resume and waves run on the in-memory broker in
``tests/unit/edge_node/test_jobs.py`` (milliseconds each). Here: the deploy
path on both brokers side by side (the in-memory one must not hide anything
Mosquitto does to it), and a download resumed after the broker process is
killed. Waits are on messages the harness records, each with a deadline;
nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgefleet_io.memory import MemoryBroker
from tests.support.broker import Broker, BrokerFactory
from tests.support.harness import Harness, RunningNode, node_config, start_node
from tests.support.models import make_classifier
from tests.support.node_checks import (
    DEADLINE_S,
    poll_until,
    requests_for,
    store_files,
    wait_node_state,
)

pytestmark = pytest.mark.integration

CHUNK_BYTES = 16 * 1024  # the harness broadcasts chunks of this size
WINDOW = 4  # the node buffers WINDOW x CHUNK_BYTES ahead of its write position


@pytest.fixture
def big_model(models_dir: Path) -> Path:
    """About 1.5 MB (a 4096x96 float32 weight): some 96 chunks of 16 KiB."""
    return make_classifier(models_dir / "big.onnx", n_in=4096, n_classes=96, seed=3)


@pytest.fixture(params=["memory", "mosquitto"])
def any_broker(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> str | MemoryBroker:
    """The in-memory broker, or a real Mosquitto's URL."""
    if request.param == "memory":
        return MemoryBroker()
    return broker_factory().url


def test_deploy_goes_from_queued_to_activated_on_either_broker(
    any_broker: str | MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(any_broker, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(harness, "n1", tmp_path / "n1") as node:
                command = await harness.deploy("n1", model)
                await harness.wait_state(command, "activated")
                assert node.agent.active == model.manifest.ref
                # Acknowledged: the node's outbox holds none of the job's statuses.
                await harness.wait_for(
                    lambda: harness.acked.get("n1", 0) >= harness.statuses[-1].seq,
                    what="the statuses acknowledged",
                )
        states = harness.states_of(command)
        assert states[0] == "queued"
        for expected in ("downloading", "downloaded", "verifying", "loading"):
            assert expected in states
        assert states[-1] == "activated"  # the node's last word: health is the controller's

    asyncio.run(scenario())


def test_download_resumes_from_its_offset_after_a_broker_crash(
    persistent_broker: Broker, fleet_id: str, tmp_path: Path, big_model: Path
) -> None:
    data = tmp_path / "n1"
    answered = 8

    async def scenario() -> None:
        async with Harness(persistent_broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(big_model, "big", "1.0.0")
            sha, size = model.manifest.sha256, model.manifest.size
            assert size > 60 * CHUNK_BYTES
            config = node_config(harness, "n1", data, chunk_bytes=CHUNK_BYTES, chunk_window=WINDOW)
            async with RunningNode(config, transport=harness.transport) as node:
                harness.pause_after_chunks = answered
                command = await harness.deploy("n1", model)
                had = answered * CHUNK_BYTES
                part = data / "models" / f"{sha}.part"
                await poll_until(
                    lambda: part.exists() and part.stat().st_size >= had,
                    timeout_s=DEADLINE_S,
                    what="the node to write the chunks broadcast before the pause",
                )
                assert part.stat().st_size == had
                before = len(harness.chunk_requests)

                persistent_broker.kill()
                persistent_broker.start()
                harness.serving.set()

                await wait_node_state(harness, "n1", command, "activated")
                resumed = requests_for(harness, sha, after=before)
                assert resumed[0] == had, resumed
                assert min(resumed) == had  # nothing before the offset asked for again
                assert node.agent.active == model.manifest.ref
        assert store_files(data) >= {sha}
        assert f"{sha}.part" not in store_files(data)

    asyncio.run(scenario())
