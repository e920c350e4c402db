"""A node whose data disk fills up: a real small filesystem, a real Mosquitto,
real onnxruntime.

The node's ``--data`` is a tmpfs mounted for the test (skipped, with the
reason, where mounting is not permitted). A download is paused by the
harness, the disk is filled to the last byte, and the download goes on: the
node must fail that deploy with ``disk_full``, delete the partial file, keep
serving its model, and take the deploy once space is back. A node started on
a full disk must run, and produce results once space returns. Waits are on
recorded messages or polled with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.broker import BrokerFactory
from tests.support.disk import fill
from tests.support.harness import Harness, start_node
from tests.support.models import make_classifier
from tests.support.node_checks import DEADLINE_S, poll_until, statuses, store_files

pytestmark = pytest.mark.integration

ANSWERED = 40  # chunks broadcast before the pause that lets the test fill the disk


@pytest.fixture
def big_model(models_dir: Path) -> Path:
    """About 1.5 MB: some 96 chunks of the harness's 16 KiB."""
    return make_classifier(models_dir / "big.onnx", n_in=4096, n_classes=96, seed=3)


def test_a_download_that_fills_the_disk_fails_and_the_node_keeps_serving(
    broker_factory: BrokerFactory,
    fleet_id: str,
    tmp_path: Path,
    small_disk: Path,
    classifier_v1: Path,
    big_model: Path,
) -> None:
    data = small_disk / "n1"

    async def scenario() -> None:
        async with Harness(broker_factory().url, fleet_id, tmp_path / "harness") as harness:
            old = harness.register(classifier_v1, "clf", "1.0.0")
            big = harness.register(big_model, "clf", "2.0.0")
            async with start_node(harness, "n1", data, source="synthetic", rate_hz=50.0) as node:
                first = await harness.deploy("n1", old, rollout_id="r1")
                await harness.wait_state(first, "activated")

                harness.pause_after_chunks = ANSWERED
                command = await harness.deploy("n1", big, rollout_id="r2")
                await poll_until(
                    lambda: not harness.serving.is_set(), what="the broadcast to pause"
                )
                part = data / "models" / f"{big.manifest.sha256}.part"
                await poll_until(part.exists, what="the partial file")
                filler = fill(small_disk)
                harness.serving.set()

                await harness.wait_state(command, "failed", timeout_s=DEADLINE_S)
                failed = [s for s in statuses(harness, "n1", command) if s.state.value == "failed"]
                assert failed[-1].code == "disk_full", failed[-1]
                assert "disk full" in (failed[-1].reason or "")
                assert not part.exists()
                assert f"{big.manifest.sha256}.part" not in store_files(data)
                assert node.agent.serving == old.manifest.ref

                # Still serving the old model: results keep reaching the controller.
                seen = len(harness.results.get("n1", {}))
                await harness.wait_for(
                    lambda: len(harness.results.get("n1", {})) > seen + 20,
                    what="results after the failed download",
                )
                assert not node.task.done()
                newest = max(harness.results["n1"].values(), key=lambda r: r.seq)
                assert newest.model.sha256 == old.manifest.sha256

                # Space back: the same model, deployed again, is taken.
                filler.unlink()
                again = await harness.deploy("n1", big, rollout_id="r3")
                await harness.wait_state(again, "activated", timeout_s=DEADLINE_S)
                assert node.agent.serving == big.manifest.ref
                assert node.agent.stats()["task_restarts"] == 0

    asyncio.run(scenario())


def test_a_node_started_on_a_full_disk_runs_and_recovers_when_space_returns(
    broker_factory: BrokerFactory,
    fleet_id: str,
    tmp_path: Path,
    small_disk: Path,
    classifier_v1: Path,
) -> None:
    data = small_disk / "n1"

    async def scenario() -> None:
        async with Harness(broker_factory().url, fleet_id, tmp_path / "harness") as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(harness, "n1", data, source="synthetic", rate_hz=50.0):
                first = await harness.deploy("n1", model, rollout_id="r1")
                await harness.wait_state(first, "activated")
            filler = fill(small_disk)
            births = len(harness.states)
            async with start_node(harness, "n1", data, source="synthetic", rate_hz=50.0) as node:
                # Connected and announced (the async with waits for it) on a full disk.
                await harness.wait_for(
                    lambda: any(s.online for s in harness.states[births:]),
                    what="a birth from the node on a full disk",
                )
                assert node.agent.serving == model.manifest.ref
                assert not node.task.done()
                # A full disk is not counted against the model (a health gate reads errors).
                assert node.agent.stats()["errors"] == 0
                seen = len(harness.results.get("n1", {}))
                filler.unlink()
                await harness.wait_for(
                    lambda: len(harness.results.get("n1", {})) > seen + 20,
                    what="results once space returned",
                )
                assert not node.task.done()

    asyncio.run(scenario())
