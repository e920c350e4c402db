"""A real node, a real broker, real ONNX files: deploys, tampering, resume.

Every test runs its own Mosquitto (fixtures), a :class:`Harness` playing the
controller and one or two :class:`NodeAgent` s in the test's event loop. Waits
are on messages the harness records (``wait_for``/``wait_state``), each with a
deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_node.state import NodeStore
from fleet_controller.registry import sign_manifest
from fleet_controller.signing import sign_command
from shared import topics
from shared.envelope import Envelope
from shared.messages import DeployAction, NodeStatus, NodeTarget
from tests.support.broker import Broker
from tests.support.harness import Harness, Registered, RunningNode, node_config
from tests.support.models import make_classifier, make_failing_warmup_model

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0
CHUNK_BYTES = 16 * 1024
WINDOW = 4  # chunk requests a node keeps in flight (AgentConfig.chunk_window)


# ----- helpers ----------------------------------------------------------------


def statuses(harness: Harness, node: str, command_id: str | None = None) -> list[NodeStatus]:
    """Statuses ``node`` sent (for ``command_id`` when given), in arrival order."""
    return [
        s
        for s in harness.statuses
        if s.node == node and (command_id is None or s.command_id == command_id)
    ]


def states(harness: Harness, node: str, command_id: str) -> list[str]:
    return [s.state.value for s in statuses(harness, node, command_id)]


async def wait_node_state(harness: Harness, node: str, command_id: str, state: str) -> None:
    await harness.wait_for(
        lambda: state in states(harness, node, command_id),
        timeout_s=DEADLINE_S,
        what=f"{node} to report {state} for {command_id} "
        f"(seen {states(harness, node, command_id)})",
    )


async def wait_status(
    harness: Harness, node: str, predicate: Callable[[NodeStatus], bool], *, after: int, what: str
) -> NodeStatus:
    """The first status of ``node`` past ``harness.statuses[after]`` matching ``predicate``."""

    def found() -> NodeStatus | None:
        return next((s for s in harness.statuses[after:] if s.node == node and predicate(s)), None)

    await harness.wait_for(lambda: found() is not None, timeout_s=DEADLINE_S, what=what)
    status = found()
    assert status is not None
    return status


def requests_for(harness: Harness, sha256: str, *, after: int = 0) -> list[int]:
    """Offsets of the chunk requests for ``sha256`` past ``harness.chunk_requests[after]``."""
    return [r.offset for r in harness.chunk_requests[after:] if r.sha256 == sha256]


def store_files(data: Path) -> set[str]:
    return {p.name for p in (data / "models").iterdir()}


async def deploy_and_wait(harness: Harness, node: str, model: Registered, rollout: str) -> str:
    command = await harness.deploy(node, model, rollout_id=rollout)
    await wait_node_state(harness, node, command, "succeeded")
    return command


@pytest.fixture
def big_model(models_dir: Path) -> Path:
    """About 1.5 MB (a 4096x96 float32 weight): some 96 chunks of 16 KiB."""
    return make_classifier(models_dir / "big.onnx", n_in=4096, n_classes=96, seed=3)


# ----- deploys ----------------------------------------------------------------


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


def test_tampered_chunk_fails_and_keeps_the_active_model(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with RunningNode(node_config(harness, "n1", data)) as node:
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
            async with RunningNode(config) as node:
                harness.pause_after_chunks = answered
                command = await harness.deploy("n1", model)
                # The node asks for the next chunk only once it has written the
                # previous one, so this many requests mean `answered` chunks on disk.
                await harness.wait_for(
                    lambda: len(harness.chunk_requests) >= answered + WINDOW,
                    timeout_s=DEADLINE_S,
                    what="the node to consume the chunks answered before the pause",
                )
                had = answered * CHUNK_BYTES
                assert (data / "models" / f"{sha}.part").stat().st_size == had
                before = len(harness.chunk_requests)

                persistent_broker.kill()
                persistent_broker.start()
                harness.serving.set()

                await wait_node_state(harness, "n1", command, "succeeded")
                resumed = requests_for(harness, sha, after=before)
                assert resumed[0] == had, resumed[:WINDOW]
                assert min(resumed) == had  # nothing before the offset asked for again
                assert node.agent.active == model.manifest.ref
        assert store_files(data) >= {sha}
        assert f"{sha}.part" not in store_files(data)

    asyncio.run(scenario())


def test_node_restarted_mid_download_resumes_the_job(
    broker: Broker, fleet_id: str, tmp_path: Path, big_model: Path
) -> None:
    data = tmp_path / "n1"
    answered = 8

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(big_model, "big", "1.0.0")
            sha = model.manifest.sha256
            config = node_config(harness, "n1", data, chunk_bytes=CHUNK_BYTES, chunk_window=WINDOW)
            async with RunningNode(config) as first:
                harness.pause_after_chunks = answered
                command = await harness.deploy("n1", model)
                await harness.wait_for(
                    lambda: len(harness.chunk_requests) >= answered + WINDOW,
                    timeout_s=DEADLINE_S,
                    what="the node to consume the chunks answered before the pause",
                )
                await first.stop()
            had = answered * CHUNK_BYTES
            assert (data / "models" / f"{sha}.part").stat().st_size == had
            pending = NodeStore(data).load().pending
            assert pending is not None
            assert pending.command_id == command
            before = len(harness.chunk_requests)

            async with RunningNode(config) as second:
                harness.serving.set()
                await wait_node_state(harness, "n1", command, "succeeded")
                resumed = requests_for(harness, sha, after=before)
                assert resumed[0] == had, resumed[:WINDOW]
                assert min(resumed) == had
                assert second.agent.active == model.manifest.ref
            # The job is finished: a third start has nothing to resume.
            assert NodeStore(data).load().pending is None
            assert states(harness, "n1", command).count("queued") == 1

    asyncio.run(scenario())


def test_node_restarted_in_its_health_window_finishes_the_job(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    data = tmp_path / "n1"
    window_s = 2.0

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, "n1", data)
            async with RunningNode(config) as first:
                command = await harness.deploy("n1", model, health_window_s=window_s)
                await wait_node_state(harness, "n1", command, "activated")
                await first.stop()
            # Stopping is no proof of health: the job stays pending, not succeeded.
            pending = NodeStore(data).load().pending
            assert pending is not None
            assert pending.command_id == command
            before_restart = states(harness, "n1", command)
            requested = len(harness.chunk_requests)

            async with RunningNode(config) as second:
                await wait_node_state(harness, "n1", command, "succeeded")
                assert second.agent.active == model.manifest.ref
            after_restart = states(harness, "n1", command)[len(before_restart) :]
            assert "succeeded" not in before_restart
            assert after_restart == ["activated", "succeeded"]  # the window ran again
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
    broker: Broker,
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
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with RunningNode(node_config(harness, "n1", data)) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
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
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with RunningNode(node_config(harness, "n1", tmp_path / "n1")) as node:
                old = await deploy_and_wait(harness, "n1", v1, "r1")
                new = await deploy_and_wait(harness, "n1", v2, "r2")
                requested = len(harness.chunk_requests)
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
                assert statuses(harness, "n1", new)[-1].state.value == "succeeded"
                assert len(harness.chunk_requests) == requested
                assert node.agent.active == v2.manifest.ref

    asyncio.run(scenario())


def test_node_without_trust_file_rejects_every_command(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, "n1", tmp_path / "n1", trust_file=tmp_path / "nope.json")
            async with RunningNode(config) as node:
                await harness.deploy("n1", model)
                status = await wait_status(
                    harness, "n1", lambda s: True, after=0, what="an answer to the deploy"
                )
                assert (status.state.value, status.code) == ("rejected", "no_trust")
                assert status.command_id is None  # nothing unverified is believed
                assert node.agent.active is None
                assert not harness.chunk_requests

    asyncio.run(scenario())


# ----- models that fail, rollback -------------------------------------------------


def test_model_failing_its_warm_up_leaves_the_old_one_serving(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, models_dir: Path
) -> None:
    bad_file = make_failing_warmup_model(models_dir / "failing-warmup.onnx", seed=5)

    def results_of(harness: Harness) -> list[str]:
        by_seq = harness.results.get("n1", {})
        return [by_seq[seq].model.sha256 for seq in harness.result_order.get("n1", [])]

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            bad = harness.register(bad_file, "clf", "2.0.0")
            config = node_config(harness, "n1", tmp_path / "n1", source="synthetic", rate_hz=50.0)
            async with RunningNode(config) as node:
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
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path, classifier_v2: Path
) -> None:
    data = tmp_path / "n1"

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            v1 = harness.register(classifier_v1, "clf", "1.0.0")
            v2 = harness.register(classifier_v2, "clf", "2.0.0")
            async with RunningNode(node_config(harness, "n1", data)) as node:
                await deploy_and_wait(harness, "n1", v1, "r1")
                await deploy_and_wait(harness, "n1", v2, "r2")
                assert NodeStore(data).load().previous == v1.manifest.ref
                before = len(harness.chunk_requests)
                command = await harness.rollback("n1", v1)
                await wait_node_state(harness, "n1", command, "rolled_back")
                assert node.agent.active == v1.manifest.ref
                assert not requests_for(harness, v1.manifest.sha256, after=before)
                assert "downloading" not in states(harness, "n1", command)
                persisted = NodeStore(data).load()
                assert (persisted.active, persisted.previous) == (v1.manifest.ref, v2.manifest.ref)

    asyncio.run(scenario())


# ----- waves ------------------------------------------------------------------------


def test_wave_broadcast_reaches_every_member_once(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    nodes = ("n1", "n2")

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with (
                RunningNode(node_config(harness, "n1", tmp_path / "n1")) as first,
                RunningNode(node_config(harness, "n2", tmp_path / "n2")) as second,
            ):
                wave0 = await harness.broadcast(model, rollout_id="w", bucket_limit=10_000)
                for node in nodes:
                    await wait_node_state(harness, node, wave0, "succeeded")
                requested = len(harness.chunk_requests)
                assert {r.node for r in harness.chunk_requests} == set(nodes)

                wave1 = await harness.broadcast(model, rollout_id="w", bucket_limit=10_000, wave=1)
                for node in nodes:
                    await wait_node_state(harness, node, wave1, "succeeded")
                    answers = statuses(harness, node, wave1)
                    assert all(s.duplicate for s in answers), answers
                    assert {s.state.value for s in answers} == {"succeeded"}
                assert len(harness.chunk_requests) == requested
                assert first.agent.active == second.agent.active == model.manifest.ref

    asyncio.run(scenario())
