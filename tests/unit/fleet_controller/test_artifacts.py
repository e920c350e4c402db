"""Artifacts (fleet_controller.artifacts, fleet_controller.blobs): broadcasts out, uploads in."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from edgefleet_io.transport import Session
from fleet_controller.artifacts import Artifacts
from fleet_controller.blobs import BlobStore
from fleet_controller.quotas import RateLimiter
from shared import topics
from shared.chunks import Chunk, Refusal, decode_frame
from shared.errors import DigestMismatchError, TransportError
from shared.messages import ArtifactRequest, encode
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


def request(node: str, sha: str, *ranges: tuple[int, int]) -> ArtifactRequest:
    return ArtifactRequest(node=node, sha256=sha, ranges=ranges or ((0, 2**40),), ts=time.time())


async def ask(node_id: str, ctl: Controller, sha: str, *ranges: tuple[int, int]) -> None:
    async with ctl.broker.transport().connect(Session(client_id=f"{node_id}-asks")) as node:
        message = encode(request(node_id, sha, *ranges))
        await node.publish(topics.artifact_request(FLEET, sha, node_id), message)


def test_chunks_are_broadcast_for_commanded_nodes_only(tmp_path: Path, keys: Path) -> None:
    data = blob(size=5000)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = await fetching(ctl, data)
            stranger_blob = ctl.service.blobs.add_bytes(blob(seed=2))
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                await node.subscribe([(topics.artifact_broadcast(FLEET, sha), 0)])
                messages = aiter(node.messages())
                await ask("n1", ctl, stranger_blob)  # stored, but nobody commanded it
                await ask("n2", ctl, sha)  # n2 takes no part in the rollout
                await eventually("two refusals", lambda: ctl.service.metrics["chunks_refused"] == 2)
                await ask("n1", ctl, sha, (1000, 2000))
                got = await anext(messages)
            chunk = decode_frame(got.payload)
            assert got.topic == topics.artifact_broadcast(FLEET, sha)
            # One 256 KiB chunk holds the whole blob: it is the pass's last, flagged final.
            assert chunk == Chunk(sha, 0, 5000, data, final=True)
            assert ctl.service.metrics["chunks_sent"] == 1

    run(scenario)


def test_an_unknown_blob_is_refused_to_the_asking_node_alone(tmp_path: Path, keys: Path) -> None:
    data = blob(size=500)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            sha = await fetching(ctl, data)
            ctl.service.blobs.path(sha).unlink()  # lost from the store
            async with ctl.broker.transport().connect(Session(client_id="n1")) as node:
                await node.subscribe([(topics.artifact_data(FLEET, sha, "n1"), 1)])
                messages = aiter(node.messages())
                await ask("n1", ctl, sha)
                got = await anext(messages)
            refusal = decode_frame(got.payload)
            assert isinstance(refusal, Refusal)
            assert refusal.sha256 == sha
            assert "no blob" in refusal.reason

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
            await ask("n1", ctl, sha)
            await eventually("the error is counted", lambda: ctl.service.metrics["chunk_errors"])
            async with ctl.operator() as op:
                assert [n["node_id"] for n in await op.call("nodes.list")] == ["n1"]

    run(scenario)


# ----- the broadcaster alone, with a recording link -------------------------------------


class RecordingLink:
    """Records what the broadcaster publishes; ``on_publish`` runs after each chunk."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self.on_publish: list[asyncio.Event] = []

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        assert qos == 1
        self.frames.append((topic, payload))
        if len(self.on_publish) >= len(self.frames):
            self.on_publish[len(self.frames) - 1].set()

    def offsets(self) -> list[int]:
        return [frame.offset for frame in self.chunks()]

    def chunks(self) -> list[Chunk]:
        decoded = [decode_frame(payload) for _, payload in self.frames]
        return [frame for frame in decoded if isinstance(frame, Chunk)]


def broadcaster(
    tmp_path: Path, nodes: Iterable[str], *, bytes_per_s: float = 1e9, hold_s: float = 0.0
) -> tuple[Artifacts, RecordingLink, str, Counter[str]]:
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.add_bytes(blob(size=5000))
    link = RecordingLink()
    metrics: Counter[str] = Counter()
    allowed = frozenset(nodes)
    artifacts = Artifacts(
        blobs,
        link,  # type: ignore[arg-type]
        fleet=FLEET,
        metrics=metrics,
        fetchers=lambda _sha: allowed,
        clock=time.monotonic,
        chunk_bytes=1000,
        broadcast_bytes_per_s=bytes_per_s,
        gather_quiet_s=0.05,
        gather_max_s=0.5,
        repair_hold_s=hold_s,
    )
    return artifacts, link, sha, metrics


def test_a_wave_asking_at_once_gets_each_chunk_once(tmp_path: Path) -> None:
    nodes = [f"n{i}" for i in range(20)]
    artifacts, link, sha, metrics = broadcaster(tmp_path, nodes)

    async def scenario() -> None:
        await asyncio.gather(*(artifacts.serve_chunk(request(n, sha)) for n in nodes))

    run(scenario)
    assert {topic for topic, _ in link.frames} == {topics.artifact_broadcast(FLEET, sha)}
    assert link.offsets() == [0, 1000, 2000, 3000, 4000]
    assert [c.final for c in link.chunks()] == [False] * 4 + [True]
    assert b"".join(c.data for c in link.chunks()) == blob(size=5000)
    assert (metrics["chunks_sent"], metrics["chunks_scheduled"]) == (5, 5)


def test_a_late_node_gets_the_rest_of_the_pass_then_only_what_it_missed(tmp_path: Path) -> None:
    # Paced to a chunk every 0.2 s: the late ask lands while chunk 2 is due.
    artifacts, link, sha, _ = broadcaster(tmp_path, ["early", "late"], bytes_per_s=5_000)

    async def scenario() -> None:
        link.on_publish = [asyncio.Event() for _ in range(8)]
        first = asyncio.create_task(artifacts.serve_chunk(request("early", sha)))
        await link.on_publish[1].wait()  # chunks 0 and 1 are out
        await artifacts.serve_chunk(request("late", sha))
        await first

    run(scenario)
    assert link.offsets() == [0, 1000, 2000, 3000, 4000, 0, 1000]
    assert [c.final for c in link.chunks()] == [False] * 6 + [True]


def test_late_asks_within_the_hold_share_one_re_send(tmp_path: Path) -> None:
    # Three nodes join one after another just after the first pass: each lacks
    # it all, and the three get one re-send once the hold is over, not three.
    nodes = ["early", "late1", "late2", "late3"]
    artifacts, link, sha, _ = broadcaster(tmp_path, nodes, hold_s=0.3)

    async def scenario() -> None:
        link.on_publish = [asyncio.Event() for _ in range(10)]
        first = asyncio.create_task(artifacts.serve_chunk(request("early", sha)))
        await link.on_publish[4].wait()  # the first pass is out
        for late in nodes[1:]:
            await artifacts.serve_chunk(request(late, sha))
        await first

    started = time.monotonic()
    run(scenario)
    assert link.offsets() == [0, 1000, 2000, 3000, 4000] * 2
    assert [c.final for c in link.chunks()] == ([False] * 4 + [True]) * 2
    assert time.monotonic() - started >= 0.3  # the re-send waited for the hold


def test_repairs_asked_by_several_nodes_together_are_sent_once(tmp_path: Path) -> None:
    nodes = ["a", "b", "c"]
    artifacts, link, sha, _ = broadcaster(tmp_path, nodes)

    async def scenario() -> None:
        gaps = ((1000, 1000), (3500, 10))
        await asyncio.gather(*(artifacts.serve_chunk(request(n, sha, *gaps)) for n in nodes))

    run(scenario)
    assert link.offsets() == [1000, 3000]


def test_a_node_over_its_rate_gets_what_its_tokens_cover_and_asks_again_later(
    tmp_path: Path,
) -> None:
    artifacts, link, sha, metrics = broadcaster(tmp_path, ["greedy"])
    artifacts._rate = RateLimiter(1.0, 3.0)  # a request and two chunks

    async def scenario() -> None:
        await artifacts.serve_chunk(request("greedy", sha))
        await artifacts.serve_chunk(request("greedy", sha))  # no token left at all

    run(scenario)
    assert link.offsets() == [0, 1000]
    assert metrics["chunks_rate_limited"] == 3 + 1


def test_a_broadcast_cut_by_the_broker_ends_and_the_next_ask_starts_another(
    tmp_path: Path,
) -> None:
    artifacts, link, sha, _ = broadcaster(tmp_path, ["n1"])
    sent = link.publish

    async def broken(topic: str, payload: bytes, *, qos: int = 1) -> None:
        raise TransportError("broker gone")

    async def scenario() -> None:
        link.publish = broken  # type: ignore[method-assign]
        await artifacts.serve_chunk(request("n1", sha))
        link.publish = sent  # type: ignore[method-assign]
        await artifacts.serve_chunk(request("n1", sha, (4000, 1000)))

    run(scenario)
    assert link.offsets() == [4000]


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
