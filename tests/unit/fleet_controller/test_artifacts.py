"""Artifacts (fleet_controller.artifacts, fleet_controller.blobs): chunks out, uploads in."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgefleet_io.transport import Session
from fleet_controller.blobs import BlobStore
from shared import topics
from shared.envelope import b64decode
from shared.errors import DigestMismatchError
from shared.messages import ArtifactChunk, ArtifactRequest, decode, encode
from tests.unit.fleet_controller.kit import FLEET, Controller, blob, controller, eventually, run


async def fetching(ctl: Controller, data: bytes, node: str = "n1") -> str:
    """Register ``data`` as a model and roll it out to ``node``: ``node`` may fetch it."""
    sha = hashlib.sha256(data).hexdigest()
    ctl.register(data)
    async with ctl.node(node) as fake, ctl.operator() as op:
        await fake.birth()
        await eventually("the node is known", lambda: ctl.store.nodes.get(node) is not None)
        await op.call("rollout.start", {"model": "clf@1.0.0", "waves": [100]})
    await eventually("the node is in the rollout", lambda: node in ctl.store.rollouts.fetchers(sha))
    return sha


async def ask(node_id: str, ctl: Controller, sha: str, request_id: str, offset: int = 0) -> None:
    async with ctl.broker.transport().connect(Session(client_id=f"{node_id}-asks")) as node:
        request = ArtifactRequest(
            node=node_id, sha256=sha, request_id=request_id, offset=offset, length=2000
        )
        await node.publish(topics.artifact_request(FLEET, sha, node_id), encode(request))


def test_chunks_go_to_commanded_nodes_only(tmp_path: Path, keys: Path) -> None:
    data = blob(size=5000)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = await fetching(ctl, data)
            stranger_blob = ctl.service.blobs.add_bytes(blob(seed=2))
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                await node.subscribe([(f"{topics.PREFIX}/{FLEET}/artifact/+/data/n1", 1)])
                messages = aiter(node.messages())
                await ask("n1", ctl, stranger_blob, "q0")  # stored, but nobody commanded it
                await ask("n2", ctl, sha, "q1")  # n2 takes no part in the rollout
                await eventually("two refusals", lambda: ctl.service.metrics["chunks_refused"] == 2)
                await ask("n1", ctl, sha, "q2", offset=1000)
                got = await anext(messages)
            chunk = decode(ArtifactChunk, got.payload)
            assert got.topic == topics.artifact_data(FLEET, sha, "n1")
            assert (chunk.request_id, chunk.size, chunk.offset, chunk.error) == (
                "q2",
                5000,
                1000,
                None,
            )
            assert b64decode(chunk.data, "data") == data[1000:3000]
            assert ctl.service.metrics["chunks_served"] == 1

    run(scenario)


def test_a_chunk_that_cannot_be_read_is_logged_and_the_controller_goes_on(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = await fetching(ctl, blob())

            def unreadable(*_: object) -> bytes:
                raise PermissionError("no")

            monkeypatch.setattr(ctl.service.blobs, "read", unreadable)
            await ask("n1", ctl, sha, "q1")
            await eventually("the error is counted", lambda: ctl.service.metrics["chunk_errors"])
            async with ctl.operator() as op:
                assert [n["node_id"] for n in await op.call("nodes.list")] == ["n1"]

    run(scenario)


def test_parts_grow_only_at_their_end_and_commit_atomically(tmp_path: Path) -> None:
    data = blob(size=3000)
    sha = hashlib.sha256(data).hexdigest()
    store = BlobStore(tmp_path / "blobs")
    assert store.part_size(sha) == 0
    assert store.append_part(sha, 0, data[:1000]) == 1000
    assert store.append_part(sha, 0, data[:1000]) == 1000  # resent: not written again
    assert store.append_part(sha, 2000, data[2000:]) == 1000  # past a gap: not written
    # A restarted controller hashes the part it finds, then goes on incrementally.
    again = BlobStore(tmp_path / "blobs")
    assert again.append_part(sha, 1000, data[1000:]) == 3000
    again.commit_part(sha)
    assert again.path(sha).read_bytes() == data
    assert again.part_size(sha) == 0
    again.commit_part(sha)  # installed already (a concurrent upload): nothing to do


def test_a_part_that_hashes_wrong_is_deleted(tmp_path: Path) -> None:
    data = blob(size=100)
    sha = hashlib.sha256(data).hexdigest()
    store = BlobStore(tmp_path / "blobs")
    store.append_part(sha, 0, data[::-1])
    with pytest.raises(DigestMismatchError, match="uploaded blob hashes to"):
        store.commit_part(sha)
    assert store.part_size(sha) == 0
    assert not store.has(sha)
