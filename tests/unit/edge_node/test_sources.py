"""Input sources of a real node: requests over MQTT, a directory of files, change gating.

On the in-memory broker, with real onnxruntime; waits are on harness messages,
each with a deadline.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.transport import Session
from shared import topics
from shared.messages import InferReply, InferRequest, TensorData, decode, encode
from tests.support.harness import Harness, RunningNode, node_config
from tests.support.node_checks import NODE, deploy_and_wait, results_of, write_bytes, write_npy

# ----- requests over MQTT ---------------------------------------------------------


def test_mqtt_source_replies_and_survives_malformed_requests(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    client_id = "app1"

    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            spec = model.manifest.inputs[0]
            config = node_config(harness, NODE, tmp_path / NODE, source="mqtt")
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, NODE, model, "r1")
                app_session = Session(client_id=f"{client_id}-{fleet_id}")
                async with harness.transport.connect(app_session) as app:
                    await app.subscribe([(topics.infer_reply(fleet_id, NODE, client_id), 1)])
                    request_topic = topics.infer_request(fleet_id, NODE)

                    async def ask(tensor: TensorData) -> InferReply:
                        request = InferRequest(
                            id=uuid.uuid4().hex, client=client_id, inputs=(tensor,)
                        )
                        await app.publish(request_topic, encode(request), qos=1)
                        async with asyncio.timeout(20):
                            async for message in app.messages():
                                reply = decode(InferReply, message.payload)
                                if reply.id == request.id:
                                    return reply
                        raise AssertionError("reply stream ended")

                    good = TensorData(name=spec.name, shape=(1, 8), data=tuple(range(8)))
                    reply = await ask(good)
                    assert reply.ok, reply.error
                    assert reply.result is not None
                    assert reply.result.model == model.manifest.ref
                    assert reply.result.source == f"mqtt:{client_id}"
                    assert reply.result.topk

                    await app.publish(request_topic, b"{not json", qos=1)
                    await app.publish(request_topic, b'{"v": 1, "type": "infer_request"}', qos=1)
                    # Well-formed JSON whose tensor cannot run: answered with an error.
                    short = TensorData(name=spec.name, shape=(1, 8), data=(1.0, 2.0))
                    bad = await ask(short)
                    assert not bad.ok
                    assert bad.error
                    assert bad.result is None
                    unknown = TensorData(name="nope", shape=(1, 8), data=(0.0,) * 8)
                    bad = await ask(unknown)
                    assert not bad.ok
                    assert bad.error

                    again = await ask(good)
                    assert again.ok
                    assert again.result is not None
                    assert not node.task.done()
                await node.stop()

    asyncio.run(scenario())


# ----- a directory of input files -------------------------------------------------


def test_directory_source_infers_each_file_and_skips_garbage(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def sources(harness: Harness) -> set[str | None]:
        return {r.source for r in results_of(harness).values()}

    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(harness, NODE, tmp_path / NODE, source="dir", source_dir=inbox)
            rng = np.random.default_rng(7)
            write_npy(inbox / "a.npy", rng.standard_normal((1, 8)).astype(np.float32))
            write_npy(inbox / "b.npy", rng.standard_normal(8).astype(np.float32))  # no batch axis
            write_bytes(inbox / "c.npy", b"\x93NUMPY garbage, not an array" * 3)
            write_bytes(inbox / "d.txt", b"not an input type")
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, NODE, model, "r1")
                await harness.wait_for(
                    lambda: {"dir:a.npy", "dir:b.npy"} <= sources(harness), what="a and b"
                )
                write_npy(inbox / "e.npy", rng.standard_normal((1, 8)).astype(np.float32))
                await harness.wait_for(lambda: "dir:e.npy" in sources(harness), what="e")
                await node.stop()
                assert node.agent.stats()["errors"] == 0

        assert sources(harness) == {"dir:a.npy", "dir:b.npy", "dir:e.npy"}
        assert len(results_of(harness)) == 3
        assert all(r.model == model.manifest.ref for r in results_of(harness).values())

    asyncio.run(scenario())


# ----- change gating ----------------------------------------------------------------


def test_change_gating_skips_unchanged_inputs(
    fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frame = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)
    for index in range(5):
        write_npy(inbox / f"f{index}.npy", frame)
    write_npy(inbox / "f5.npy", frame + 1.0)  # a real change

    async def scenario() -> None:
        async with Harness(MemoryBroker(), fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            config = node_config(
                harness,
                NODE,
                tmp_path / NODE,
                source="dir",
                source_dir=inbox,
                change_threshold=0.01,
            )
            async with RunningNode(config, transport=harness.transport) as node:
                await deploy_and_wait(harness, NODE, model, "r1")
                await harness.wait_for(
                    lambda: (
                        {r.source for r in results_of(harness).values()}
                        >= {"dir:f0.npy", "dir:f5.npy"}
                    ),
                    what="the first frame and the changed one",
                )
                await node.stop()
                stats = node.agent.stats()

        assert stats["skips"] == 4, stats
        assert sorted(r.source or "" for r in results_of(harness).values()) == [
            "dir:f0.npy",
            "dir:f5.npy",
        ]

    asyncio.run(scenario())
