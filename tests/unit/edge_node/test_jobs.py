"""A real node's commands and jobs, on the in-memory broker: deploys, refusals, resume.

Each test runs one or two :class:`~edge_node.agent.NodeAgent` s with real
onnxruntime, real files and real signatures, and a
:class:`~tests.support.harness.Harness` playing the controller, all talking
through a :class:`~edgefleet_io.memory.MemoryBroker` (which the transport
contract tests hold to Mosquitto's behaviour). Outages are the broker's
``stop()``/``start()`` and ``drop(client_id)``. Waits are on messages the
harness records, each with a deadline; nothing sleeps to synchronise.

What needs a real Mosquitto (a broker killed mid-download) stays in
``tests/integration/test_agent_deploy.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_node.agent import NodeAgent
from edge_node.state import NodeStore, PendingCommand
from edgefleet_io.memory import MemoryBroker
from fleet_controller.registry import sign_manifest
from fleet_controller.signing import sign_command
from shared import topics
from shared.envelope import Envelope
from shared.errors import TrustFileError
from shared.messages import DeployAction, NodeTarget
from tests.support.harness import Harness, Registered, node_config, start_node
from tests.support.models import make_classifier, make_failing_warmup_model
from tests.support.node_checks import (
    DEADLINE_S,
    deploy_and_wait,
    poll_until,
    requests_for,
    states,
    statuses,
    store_files,
    wait_node_state,
    wait_status,
)

CHUNK_BYTES = 16 * 1024  # the harness broadcasts chunks of this size
WINDOW = 4  # the node buffers WINDOW x CHUNK_BYTES ahead of its write position
ANSWERED = 8  # chunks broadcast before the harness pauses serving


@pytest.fixture
def big_model(models_dir: Path) -> Path:
    """About 1.5 MB (a 4096x96 float32 weight): some 96 chunks of 16 KiB."""
    return make_classifier(models_dir / "big.onnx", n_in=4096, n_classes=96, seed=3)


@pytest.fixture
def memory() -> MemoryBroker:
    return MemoryBroker()


async def consume_until_paused(data: Path, sha256: str) -> None:
    """Wait until the node has written the chunks broadcast before the pause."""
    part = data / "models" / f"{sha256}.part"
    await poll_until(
        lambda: part.exists() and part.stat().st_size >= ANSWERED * CHUNK_BYTES,
        what="the node to write the chunks broadcast before the pause",
    )


# ----- deploys ----------------------------------------------------------------


def test_deploy_goes_from_queued_to_activated_and_ends_there(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(harness, "n1", data) as node:
                command = await harness.deploy("n1", model)
                await harness.wait_state(command, "activated")
                assert node.agent.active == model.manifest.ref
            assert harness.states_of(command) == [
                "queued",
                "downloading",
                "downloading",  # the store's final progress report (100 %)
                "downloaded",
                "verifying",
                "loading",
                "activated",
            ]
            assert NodeStore(data).load().pending is None  # the job has ended

    asyncio.run(scenario())


def test_tampered_chunk_fails_and_keeps_the_active_model(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with start_node(harness, "n1", data) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
                harness.corrupt_chunks = True
                command = await harness.deploy("n1", v2, rollout_id="r2")
                await wait_node_state(harness, "n1", command, "failed")
                failed = statuses(harness, "n1", command)[-1]
                assert failed.code == "digest_mismatch"
                assert "activated" not in states(harness, "n1", command)
                assert node.agent.active == v1.manifest.ref
                assert requests_for(harness, v2.manifest.sha256)  # it did try
        files = store_files(data)
        assert not any(name.startswith(v2.manifest.sha256) for name in files), files
        assert v1.manifest.sha256 in files

    asyncio.run(scenario())


# ----- outages and restarts ---------------------------------------------------------


@pytest.mark.parametrize("outage", ["broker-restart", "connection-dropped"])
def test_download_resumes_from_its_offset_after_an_outage(
    outage: str, fleet_id: str, tmp_path: Path, big_model: Path
) -> None:
    data = tmp_path / "n1"
    memory = MemoryBroker(persistence=True)

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            model = harness.register(big_model, "big", "1.0.0")
            sha = model.manifest.sha256
            overrides = {"chunk_bytes": CHUNK_BYTES, "chunk_window": WINDOW}
            async with start_node(harness, "n1", data, **overrides) as node:
                harness.pause_after_chunks = ANSWERED
                command = await harness.deploy("n1", model)
                await consume_until_paused(data, sha)
                had = ANSWERED * CHUNK_BYTES
                assert (data / "models" / f"{sha}.part").stat().st_size == had
                before = len(harness.chunk_requests)
                births = len([s for s in harness.states if s.online])

                if outage == "broker-restart":
                    memory.stop()
                    memory.start()
                else:
                    assert memory.drop("n1")
                await harness.wait_for(
                    lambda: len([s for s in harness.states if s.online]) > births,
                    what="the node to connect again",
                )
                harness.serving.set()

                await wait_node_state(harness, "n1", command, "activated")
                resumed = requests_for(harness, sha, after=before)
                assert resumed[0] == had, resumed
                assert min(resumed) == had  # nothing before the offset asked for again
                assert node.agent.active == model.manifest.ref
                assert states(harness, "n1", command).count("queued") == 1
        assert store_files(data) >= {sha}
        assert f"{sha}.part" not in store_files(data)

    asyncio.run(scenario())


def test_node_restarted_mid_download_resumes_the_job(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, big_model: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            model = harness.register(big_model, "big", "1.0.0")
            sha = model.manifest.sha256
            overrides = {"chunk_bytes": CHUNK_BYTES, "chunk_window": WINDOW}
            async with start_node(harness, "n1", data, **overrides) as first:
                harness.pause_after_chunks = ANSWERED
                command = await harness.deploy("n1", model)
                await consume_until_paused(data, sha)
                await first.stop()
            had = ANSWERED * CHUNK_BYTES
            assert (data / "models" / f"{sha}.part").stat().st_size == had
            pending = NodeStore(data).load().pending
            assert pending is not None
            assert pending.command_id == command
            before = len(harness.chunk_requests)

            async with start_node(harness, "n1", data, **overrides) as second:
                harness.serving.set()
                await wait_node_state(harness, "n1", command, "activated")
                resumed = requests_for(harness, sha, after=before)
                assert resumed[0] == had, resumed
                assert min(resumed) == had
                assert second.agent.active == model.manifest.ref
            # The job is finished: a third start has nothing to resume.
            assert NodeStore(data).load().pending is None
            assert states(harness, "n1", command).count("queued") == 1

    asyncio.run(scenario())


def test_node_restarted_right_after_activating_ends_its_job_without_redoing_it(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(harness, "n1", data) as first:
                command = await deploy_and_wait(harness, "n1", model, "r1")
                await poll_until(
                    lambda: NodeStore(data).load().pending is None, what="the job to end"
                )
                await first.stop()
            store = NodeStore(data)
            state = store.load()
            assert (state.active, state.pending) == (model.manifest.ref, None)
            # A crash between the swap and closing the job leaves exactly this:
            # the new model active on disk, its command still pending.
            envelope = harness.commands[command].to_bytes().decode()
            store.save(
                state.model_copy(
                    update={"pending": PendingCommand(command_id=command, envelope=envelope)}
                )
            )
            before_restart = states(harness, "n1", command)
            requested = len(harness.chunk_requests)

            async with start_node(harness, "n1", data) as second:
                await harness.wait_for(
                    lambda: len(states(harness, "n1", command)) > len(before_restart),
                    timeout_s=DEADLINE_S,
                    what="the resumed job's report",
                )
                assert second.agent.active == model.manifest.ref
                assert second.agent.serving == model.manifest.ref
            after_restart = states(harness, "n1", command)[len(before_restart) :]
            assert after_restart == ["activated"]  # no queued, no download, no succeeded
            assert len(harness.chunk_requests) == requested
            assert NodeStore(data).load().pending is None

    asyncio.run(scenario())


# ----- refusals -----------------------------------------------------------------


def _command_signed_by_release(harness: Harness, model: Registered) -> Envelope:
    return sign_command(
        harness.release,
        fleet=harness.fleet,
        seq=harness.next_seq(),
        target=NodeTarget(node="n1"),
        body=DeployAction(manifest=model.envelope),
        now=time.time(),
        rollout_id="bad",
    )[1]


def _manifest_signed_by_rollout(harness: Harness, model: Registered) -> Envelope:
    return sign_command(
        harness.rollout,
        fleet=harness.fleet,
        seq=harness.next_seq(),
        target=NodeTarget(node="n1"),
        body=DeployAction(manifest=sign_manifest(model.manifest, harness.rollout)),
        now=time.time(),
        rollout_id="bad",
    )[1]


def _expired(harness: Harness, model: Registered) -> Envelope:
    return sign_command(
        harness.rollout,
        fleet=harness.fleet,
        seq=harness.next_seq(),
        target=NodeTarget(node="n1"),
        body=DeployAction(manifest=model.envelope),
        now=time.time() - 120,
        ttl_s=60,
        rollout_id="bad",
    )[1]


def _for_another_node(harness: Harness, model: Registered) -> Envelope:
    return sign_command(
        harness.rollout,
        fleet=harness.fleet,
        seq=harness.next_seq(),
        target=NodeTarget(node="n2"),
        body=DeployAction(manifest=model.envelope),
        now=time.time(),
        rollout_id="bad",
    )[1]


# (builder, expected code, whether the status may name the command: only once
# the command's own signature has been verified)
REJECTIONS = [
    pytest.param(_command_signed_by_release, "wrong_role", False, id="command-by-release-key"),
    pytest.param(_manifest_signed_by_rollout, "wrong_role", True, id="manifest-by-rollout-key"),
    pytest.param(_expired, "expired", True, id="expired"),
    pytest.param(_for_another_node, "not_addressed", True, id="other-node"),
]


@pytest.mark.parametrize(("build", "code", "names_command"), REJECTIONS)
def test_rejected_commands_change_nothing(
    memory: MemoryBroker,
    fleet_id: str,
    tmp_path: Path,
    classifier_v1: Path,
    classifier_v2: Path,
    build: Callable[[Harness, Registered], Envelope],
    code: str,
    names_command: bool,
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with start_node(harness, "n1", data) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
                await poll_until(
                    lambda: NodeStore(data).load().pending is None, what="the deploy to end"
                )
                persisted = NodeStore(data).load()
                envelope = build(harness, v2)
                after = len(harness.statuses)
                await harness.publish_command(topics.node_cmd(fleet_id, "n1"), envelope)
                status = await wait_status(
                    harness,
                    "n1",
                    lambda s: s.state.value == "rejected",
                    after=after,
                    what=f"a rejection ({code})",
                )
                assert status.code == code
                assert (status.command_id is not None) == names_command
                assert node.agent.active == v1.manifest.ref
                assert not requests_for(harness, v2.manifest.sha256)
                now = NodeStore(data).load()
                assert (now.last_seq, now.attempted, now.active, now.pending) == (
                    persisted.last_seq,
                    persisted.attempted,
                    persisted.active,
                    None,
                )
                assert {s.state.value for s in harness.statuses[after:]} == {"rejected"}

    asyncio.run(scenario())


def test_replayed_commands_are_answered_as_duplicates(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with start_node(harness, "n1", tmp_path / "n1") as node:
                old = await deploy_and_wait(harness, "n1", v1, "r1")
                new = await deploy_and_wait(harness, "n1", v2, "r2")
                requested = len(harness.chunk_requests)
                answers = {}
                for command in (old, new):  # the very bytes published before
                    after = len(harness.statuses)
                    await harness.publish_command(
                        topics.node_cmd(fleet_id, "n1"), harness.commands[command]
                    )
                    status = await wait_status(
                        harness,
                        "n1",
                        lambda s, c=command: s.command_id == c,
                        after=after,
                        what=f"an answer to the replay of {command}",
                    )
                    assert status.duplicate
                    assert status.state.value not in ("queued", "downloading", "rejected")
                    answers[command] = status.state.value
                # The active model's step is answered as it ended on the node; the
                # one it replaced did not leave its model active.
                assert answers == {old: "failed", new: "activated"}
                assert statuses(harness, "n1", new)[-1].state.value == "activated"
                assert len(harness.chunk_requests) == requested
                assert node.agent.active == v2.manifest.ref

    asyncio.run(scenario())


def test_node_without_a_usable_trust_list_does_not_start(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path
) -> None:
    """Fail closed by not starting: no birth, so no rollout ever counts the node."""

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            agent = NodeAgent(
                node_config(harness, "n1", tmp_path / "n1", trust_file=tmp_path / "nope.json"),
                transport=harness.transport,
            )
            with pytest.raises(TrustFileError, match=r"nope\.json does not exist"):
                await asyncio.wait_for(agent.run(), DEADLINE_S)
            assert not agent.ready.is_set()
            assert not memory.connected("n1")  # it never dialled the broker
            assert memory.retained(topics.state(fleet_id, "n1")) is None  # no birth
            assert not [s for s in harness.states if s.node == "n1"]
            assert not (tmp_path / "n1" / "state.json").exists()

    asyncio.run(scenario())


# ----- models that fail, rollback -------------------------------------------------


def test_model_failing_its_warm_up_leaves_the_old_one_serving(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path, models_dir: Path
) -> None:
    bad_file = make_failing_warmup_model(models_dir / "failing-warmup.onnx", seed=5)

    def results_of(harness: Harness) -> list[str]:
        by_seq = harness.results.get("n1", {})
        return [by_seq[seq].model.sha256 for seq in harness.result_order.get("n1", [])]

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            bad = harness.register(bad_file, "clf", "2.0.0")
            data = tmp_path / "n1"
            async with start_node(harness, "n1", data, source="synthetic", rate_hz=50.0) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
                command = await harness.deploy("n1", bad, rollout_id="r2")
                await wait_node_state(harness, "n1", command, "failed")
                failed = statuses(harness, "n1", command)[-1]
                assert failed.code == "model_invalid"
                assert "activated" not in states(harness, "n1", command)
                assert node.agent.active == v1.manifest.ref
                seen = len(results_of(harness))
                await harness.wait_for(
                    lambda: len(results_of(harness)) >= seen + 5,
                    timeout_s=DEADLINE_S,
                    what="results after the failed deploy",
                )
                assert set(results_of(harness)) == {v1.manifest.sha256}
                assert node.agent.stats()["errors"] == 0

    asyncio.run(scenario())


def test_rollback_reactivates_the_kept_previous_model(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with start_node(harness, "n1", data) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
                await deploy_and_wait(harness, "n1", v2, "r2")
                assert NodeStore(data).load().previous == v1.manifest.ref
                before = len(harness.chunk_requests)
                command = await harness.rollback("n1", v1)
                await wait_node_state(harness, "n1", command, "rolled_back")
                assert node.agent.active == v1.manifest.ref
                assert not requests_for(harness, v1.manifest.sha256, after=before)
                assert states(harness, "n1", command) == [
                    "queued",
                    "verifying",
                    "loading",
                    "activated",
                    "rolled_back",
                ]
                persisted = NodeStore(data).load()
                assert (persisted.active, persisted.previous) == (v1.manifest.ref, v2.manifest.ref)

    asyncio.run(scenario())


# ----- waves ------------------------------------------------------------------------


def test_wave_broadcast_reaches_every_member_once(
    memory: MemoryBroker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    nodes = ("n1", "n2")

    async def scenario() -> None:
        async with Harness(memory, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with (
                start_node(harness, "n1", tmp_path / "n1") as first,
                start_node(harness, "n2", tmp_path / "n2") as second,
            ):
                wave0 = await harness.broadcast(model, rollout_id="w", bucket_limit=10_000)
                for node in nodes:
                    await wait_node_state(harness, node, wave0, "activated")
                requested = len(harness.chunk_requests)
                assert {r.node for r in harness.chunk_requests} == set(nodes)

                wave1 = await harness.broadcast(model, rollout_id="w", bucket_limit=10_000, wave=1)
                for node in nodes:
                    await wait_node_state(harness, node, wave1, "activated")
                    answers = statuses(harness, node, wave1)
                    assert all(s.duplicate for s in answers), answers
                    assert {s.state.value for s in answers} == {"activated"}
                assert len(harness.chunk_requests) == requested
                assert first.agent.active == second.agent.active == model.manifest.ref

    asyncio.run(scenario())
