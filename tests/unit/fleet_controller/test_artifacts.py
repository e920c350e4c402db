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
from tests.unit.fleet_controller.kit import FLEET, blob, controller, eventually, run


def test_chunk_requests_are_answered_to_the_asking_node_only(tmp_path: Path, keys: Path) -> None:
    data = blob(size=5000)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = ctl.service.blobs.add_bytes(data)
            unknown = "cd" * 32
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                await node.subscribe([(f"{topics.PREFIX}/{FLEET}/artifact/+/data/n1", 1)])
                messages = aiter(node.messages())
                for request_id, digest, offset in (("q1", sha, 1000), ("q2", unknown, 0)):
                    request = ArtifactRequest(
                        node="n1", sha256=digest, request_id=request_id, offset=offset, length=2000
                    )
                    await node.publish(
                        topics.artifact_request(FLEET, digest, "n1"), encode(request)
                    )
                got = [await anext(messages) for _ in range(2)]
            chunks = {decode(ArtifactChunk, m.payload).request_id: m for m in got}
            first = decode(ArtifactChunk, chunks["q1"].payload)
            assert chunks["q1"].topic == topics.artifact_data(FLEET, sha, "n1")
            assert (first.size, first.offset, first.error) == (5000, 1000, None)
            assert b64decode(first.data, "data") == data[1000:3000]
            missing = decode(ArtifactChunk, chunks["q2"].payload)
            assert (missing.size, missing.error) == (0, f"no blob {unknown[:12]}")
            assert ctl.service.metrics["chunks_served"] == 2

    run(scenario)


def test_a_chunk_that_cannot_be_read_is_logged_and_the_controller_goes_on(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = ctl.service.blobs.add_bytes(blob())

            def unreadable(*_: object) -> bytes:
                raise PermissionError("no")

            monkeypatch.setattr(ctl.service.blobs, "read", unreadable)
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                request = ArtifactRequest(
                    node="n1", sha256=sha, request_id="q1", offset=0, length=10
                )
                await node.publish(topics.artifact_request(FLEET, sha, "n1"), encode(request))
            await eventually("the error is counted", lambda: ctl.service.metrics["chunk_errors"])
            async with ctl.operator() as op:
                assert await op.call("nodes.list") == []

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
