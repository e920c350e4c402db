"""ArtifactStore and BroadcastFetcher against honest in-memory fakes (no network, no broker).

The fakes serve real bytes: ``FakeFetcher`` plays any Fetcher (cut off, corrupt,
oversize), ``FakeBroadcaster`` plays the controller's side of the MQTT
broadcast by decoding each ArtifactRequest and delivering binary frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest

from edge_node.artifacts import PROGRESS_INTERVAL_S, ArtifactStore, InsufficientSpaceError
from edge_node.fetchers import BroadcastFetcher
from fleet_controller.broadcast_core import Carousel
from shared import topics
from shared.chunks import decode_frame, encode_chunk, encode_refusal
from shared.errors import DecodeError, DigestMismatchError, TransferError
from shared.messages import ArtifactRequest, ModelManifest, TensorSpec, decode

T = TypeVar("T")
FLEET = "f1"
NODE = "n1"


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
    """Run one test coroutine with a deadline, so a hang fails instead of blocking."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def blob_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def manifest_for(blob: bytes, *, size: int | None = None) -> ModelManifest:
    spec = TensorSpec(name="x", dtype="float32", shape=(1, 4))
    return ModelManifest(
        name="m",
        version="1.0.0",
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob) if size is None else size,
        inputs=(spec,),
        outputs=(spec,),
        created_at=0,
    )


class FakeFetcher:
    """Serves ``blob`` from any offset in ``chunk``-byte pieces; counts what it served.

    ``cut_after``: the next stream raises TransferError after that many bytes
    (once). ``corrupt_at``: flips that byte. ``extra``: bytes appended past the
    blob. ``on_chunk``: called before each piece is yielded.
    """

    def __init__(
        self,
        blob: bytes,
        *,
        chunk: int = 1000,
        cut_after: int | None = None,
        corrupt_at: int | None = None,
        extra: bytes = b"",
        on_chunk: Callable[[], None] | None = None,
    ) -> None:
        data = bytearray(blob + extra)
        if corrupt_at is not None:
            data[corrupt_at] ^= 0xFF
        self.data = bytes(data)
        self.chunk = chunk
        self.cut_after = cut_after
        self.on_chunk = on_chunk
        self.offsets: list[int] = []
        self.served = 0

    async def stream(self, sha256: str, size: int, offset: int) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        cut, self.cut_after = self.cut_after, None
        position, sent = offset, 0
        while position < len(self.data):
            if cut is not None and sent >= cut:
                raise TransferError("connection lost")
            n = min(self.chunk, len(self.data) - position)
            if cut is not None:
                n = min(n, cut - sent)
            piece = self.data[position : position + n]
            position += n
            sent += n
            self.served += n
            if self.on_chunk is not None:
                self.on_chunk()
            yield piece


# ----- ArtifactStore --------------------------------------------------------


def test_download_stores_blob_atomically_and_is_idempotent(tmp_path: Path) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    fake = FakeFetcher(blob)

    path = run(store.download(manifest, fake))

    assert path == store.path(manifest.sha256) == tmp_path / "models" / manifest.sha256
    assert path.read_bytes() == blob
    assert store.has(manifest.sha256, len(blob))
    assert store.partial_bytes(manifest.sha256) == 0
    assert fake.offsets == [0]
    assert run(store.download(manifest, fake)) == path
    assert fake.offsets == [0]  # already present: nothing requested
    assert run(store.verify(manifest.sha256))


def test_resume_continues_from_part_length(tmp_path: Path) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    fake = FakeFetcher(blob, chunk=700, cut_after=3_000)

    with pytest.raises(TransferError):
        run(store.download(manifest, fake))
    assert store.partial_bytes(manifest.sha256) == 3_000
    assert not store.has(manifest.sha256)

    path = run(store.download(manifest, fake))
    assert fake.offsets == [0, 3_000]
    assert path.read_bytes() == blob
    assert store.partial_bytes(manifest.sha256) == 0


def test_stream_ending_early_keeps_part_for_resume(tmp_path: Path) -> None:
    blob = blob_of(5_000)
    manifest = manifest_for(blob, size=6_000)
    store = ArtifactStore(tmp_path)

    with pytest.raises(TransferError, match="ended at 5000 of 6000"):
        run(store.download(manifest, FakeFetcher(blob)))
    assert store.partial_bytes(manifest.sha256) == 5_000


def test_part_larger_than_declared_is_discarded(tmp_path: Path) -> None:
    blob = blob_of(4_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    (tmp_path / "models" / f"{manifest.sha256}.part").write_bytes(b"\0" * 4_001)
    fake = FakeFetcher(blob)

    assert run(store.download(manifest, fake)).read_bytes() == blob
    assert fake.offsets == [0]


def test_corrupt_part_prefix_is_caught_by_final_digest(tmp_path: Path) -> None:
    blob = blob_of(4_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    (tmp_path / "models" / f"{manifest.sha256}.part").write_bytes(b"\0" * 1_000)
    fake = FakeFetcher(blob)

    with pytest.raises(DigestMismatchError):
        run(store.download(manifest, fake))
    assert fake.offsets == [1_000]
    assert store.partial_bytes(manifest.sha256) == 0
    assert not store.has(manifest.sha256)


def test_tampered_byte_is_rejected_and_nothing_kept(tmp_path: Path) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)

    with pytest.raises(DigestMismatchError, match="does not match manifest"):
        run(store.download(manifest, FakeFetcher(blob, corrupt_at=4_321)))
    assert not store.has(manifest.sha256)
    assert store.partial_bytes(manifest.sha256) == 0
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("chunk", [1, 7, 4_096])
def test_oversize_source_stops_at_size_plus_one(tmp_path: Path, chunk: int) -> None:
    blob = blob_of(3_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    fake = FakeFetcher(blob, chunk=chunk, extra=b"x" * 1_000_000)

    with pytest.raises(DigestMismatchError, match="larger than declared size"):
        run(store.download(manifest, fake))
    # The store pulled no piece beyond the one that carried byte size+1.
    assert len(blob) + 1 <= fake.served < len(blob) + 1 + chunk
    if chunk == 1:
        assert fake.served == len(blob) + 1
    assert list((tmp_path / "models").iterdir()) == []


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


@pytest.mark.parametrize(
    ("part_bytes", "free", "ok"),
    [
        (0, 10_000 + 500 - 1, False),
        (0, 10_000 + 500, True),
        (4_000, 6_000 + 500, True),  # only the remaining bytes count
        (4_000, 6_000 + 499, False),
    ],
)
def test_free_space_is_checked_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part_bytes: int, free: int, ok: bool
) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    (tmp_path / "models" / f"{manifest.sha256}.part").write_bytes(blob[:part_bytes])
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: _Usage(10**9, 0, free))
    fake = FakeFetcher(blob)

    if ok:
        run(store.download(manifest, fake, min_free_bytes=500))
        assert fake.offsets == [part_bytes]
    else:
        with pytest.raises(InsufficientSpaceError, match="reserve"):
            run(store.download(manifest, fake, min_free_bytes=500))
        assert fake.offsets == []
        assert store.partial_bytes(manifest.sha256) == part_bytes


def test_progress_is_throttled_to_once_per_interval_plus_final(tmp_path: Path) -> None:
    blob = blob_of(20_000)
    manifest = manifest_for(blob)
    now = [100.0]

    def tick() -> None:
        now[0] += 1.5  # each chunk "takes" 1.5 s

    store = ArtifactStore(tmp_path, monotonic=lambda: now[0])
    calls: list[tuple[float, int, int]] = []
    run(
        store.download(
            manifest,
            FakeFetcher(blob, chunk=1_000, on_chunk=tick),
            progress=lambda done, total: calls.append((now[0], done, total)),
        )
    )

    assert calls[-1][1:] == (20_000, 20_000)
    periodic = calls[:-1]
    assert 5 <= len(periodic) <= 7  # 20 chunks over 30 s, one report per 5 s
    assert all(total == 20_000 and 0 < done < total for _, done, total in periodic)
    times = [t for t, _, _ in periodic]
    assert all(b - a >= PROGRESS_INTERVAL_S for a, b in itertools.pairwise(times))
    dones = [d for _, d, _ in periodic]
    assert dones == sorted(set(dones))


def test_retain_keeps_only_listed_digests(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    models = tmp_path / "models"
    a, b, c, d = (hashlib.sha256(bytes([i])).hexdigest() for i in range(4))
    for sha in (a, b, c):
        (models / sha).write_bytes(b"blob")
    store.save_manifest(a, b'{"a": 1}')
    store.save_manifest(b, b'{"b": 1}')
    (models / f"{d}.part").write_bytes(b"partial")
    (models / "README").write_text("not ours")

    assert store.retain([a, c]) == sorted([b, d])

    assert sorted(p.name for p in models.iterdir()) == sorted(
        [a, f"{a}.manifest.json", c, "README"]
    )
    assert store.load_manifest_bytes(a) == b'{"a": 1}'
    assert store.load_manifest_bytes(b) is None


def test_manifest_roundtrip_and_verify_detects_corruption(tmp_path: Path) -> None:
    blob = blob_of(2_000)
    manifest = manifest_for(blob)
    store = ArtifactStore(tmp_path)
    run(store.download(manifest, FakeFetcher(blob)))
    store.save_manifest(manifest.sha256, b"envelope-bytes")

    assert store.load_manifest_bytes(manifest.sha256) == b"envelope-bytes"
    assert run(store.verify(manifest.sha256))
    store.path(manifest.sha256).write_bytes(blob[:-1] + b"?")
    assert not run(store.verify(manifest.sha256))
    store.remove(manifest.sha256)
    assert not store.has(manifest.sha256)
    assert store.load_manifest_bytes(manifest.sha256) is None


@pytest.mark.parametrize("bad", ["../etc/passwd", "A" * 64, "ab" * 31, ""])
def test_paths_accept_only_digests(tmp_path: Path, bad: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(DecodeError):
        store.path(bad)


# ----- MqttChunkFetcher -------------------------------------------------------


class FakeBroadcaster:
    """The controller's side of the broadcast, in memory: a real :class:`Carousel`
    schedules what each request asks for, and every frame goes through
    ``encode_chunk``/``decode_frame`` on its way to :meth:`BroadcastFetcher.deliver`.

    ``lose``: chunk offsets lost in transit the first time they are sent;
    ``lose_always``: lost every time; ``tail_first``: each pass starts this many
    chunks in (a broadcast the node joined late); ``refuse``: answer with a
    refusal; ``size``: the size the frames claim (a source that changed).
    """

    def __init__(
        self,
        blob: bytes,
        *,
        chunk: int = 1_024,
        lose: frozenset[int] = frozenset(),
        lose_always: frozenset[int] = frozenset(),
        tail_first: int = 0,
        refuse: str | None = None,
        sha256: str | None = None,
    ) -> None:
        self.blob = blob
        self.sha256 = sha256 or hashlib.sha256(blob).hexdigest()
        self.carousel = Carousel(size=len(blob), chunk_bytes=chunk)
        self.lose = set(lose)
        self.lose_always = lose_always
        self.tail_first = tail_first
        self.refuse = refuse
        self.requests: list[ArtifactRequest] = []
        self.sent: list[int] = []
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.fetcher: BroadcastFetcher | None = None

    def make(self, **settings: Any) -> BroadcastFetcher:
        settings.setdefault("repair_after_s", 0.02)
        self.fetcher = BroadcastFetcher(
            node_id=NODE,
            fleet=FLEET,
            publish=self.publish,
            subscribe=self.subscribe,
            unsubscribe=self.unsubscribe,
            **settings,
        )
        return self.fetcher

    async def subscribe(self, topic: str) -> None:
        self.subscribed.append(topic)

    async def unsubscribe(self, topic: str) -> None:
        self.unsubscribed.append(topic)

    async def publish(self, topic: str, payload: bytes) -> None:
        request = decode(ArtifactRequest, payload)
        assert topic == topics.artifact_request(FLEET, request.sha256, NODE)
        assert request.node == NODE
        self.requests.append(request)
        self.carousel.schedule(self.carousel.wanted(request.ranges))
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        assert self.fetcher is not None
        if self.refuse is not None:
            self.fetcher.deliver(decode_frame(encode_refusal(self.sha256, self.refuse)))
            return
        order: list[int] = []
        while (index := self.carousel.next(0.0)) is not None:
            order.append(index)
        turn = min(self.tail_first, len(order))
        order = order[turn:] + order[:turn]
        for position, index in enumerate(order):
            offset, length = self.carousel.span(index)
            self.sent.append(offset)
            if offset in self.lose_always or offset in self.lose:
                self.lose.discard(offset)
                continue
            frame = encode_chunk(
                self.sha256,
                offset,
                len(self.blob),
                self.blob[offset : offset + length],
                final=position == len(order) - 1,
            )
            self.fetcher.deliver(decode_frame(frame))


async def collect(fetcher: BroadcastFetcher, sha: str, size: int, offset: int = 0) -> bytes:
    return b"".join([piece async for piece in fetcher.stream(sha, size, offset)])


def asked(request: ArtifactRequest) -> list[tuple[int, int]]:
    return [(offset, length) for offset, length in request.ranges]


def test_fetcher_asks_once_and_assembles_the_broadcast_in_order() -> None:
    blob = blob_of(10_000)
    controller = FakeBroadcaster(blob)
    fetcher = controller.make()

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob

    assert [asked(r) for r in controller.requests] == [[(0, 10_000)]]
    assert controller.sent == list(range(0, 10_000, 1_024))
    broadcast = topics.artifact_broadcast(FLEET, controller.sha256)
    assert controller.subscribed == controller.unsubscribed == [broadcast]
    # Finished: a late duplicate is no longer routed.
    late = encode_chunk(controller.sha256, 0, len(blob), blob[:10])
    assert fetcher.deliver(decode_frame(late)) is False


def test_fetcher_joining_late_buffers_the_tail_and_gets_the_head_after_it() -> None:
    blob = blob_of(10_000, seed=3)
    controller = FakeBroadcaster(blob, tail_first=6)
    fetcher = controller.make(buffer_bytes=10_000)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    assert controller.sent[0] == 6 * 1_024
    assert len(controller.requests) == 1  # nothing missing: no repair


def test_fetcher_with_a_small_buffer_drops_what_does_not_fit_and_asks_for_it_again() -> None:
    blob = blob_of(10_000, seed=4)
    controller = FakeBroadcaster(blob, tail_first=6)
    fetcher = controller.make(buffer_bytes=2_048)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    # Chunks 6 and 7 fitted the buffer; 8 and 9 were dropped and are all it repaired.
    assert [asked(r) for r in controller.requests] == [[(0, 10_000)], [(8_192, 1_808)]]


def test_fetcher_resumes_from_offset() -> None:
    blob = blob_of(10_000)
    controller = FakeBroadcaster(blob)
    fetcher = controller.make()

    assert run(collect(fetcher, controller.sha256, len(blob), 5_000)) == blob[5_000:]
    assert asked(controller.requests[0]) == [(5_000, 5_000)]
    assert min(controller.sent) == 4 * 1_024  # the chunk holding byte 5,000, trimmed


def test_fetcher_repairs_only_the_chunks_it_missed() -> None:
    blob = blob_of(12_000)
    controller = FakeBroadcaster(blob, lose=frozenset({2_048, 7_168}))
    fetcher = controller.make()

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    assert [asked(r) for r in controller.requests] == [
        [(0, 12_000)],
        [(2_048, 1_024), (7_168, 1_024)],
    ]
    assert len(controller.sent) == 12 + 2


def test_fetcher_keeps_listening_when_a_request_cannot_be_published() -> None:
    """A request that times out counts as fruitless: no new stream, nothing asked twice."""
    blob = blob_of(6_000, seed=5)
    controller = FakeBroadcaster(blob)
    publish = controller.publish
    failures = [TransferError("publishing to mqtt://broker: Operation timed out")]

    async def flaky(topic: str, payload: bytes) -> None:
        if failures:
            raise failures.pop()
        await publish(topic, payload)

    controller.publish = flaky  # type: ignore[method-assign]  # the link times out once
    fetcher = controller.make()

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    assert [asked(r) for r in controller.requests] == [[(0, 6_000)]]
    broadcast = topics.artifact_broadcast(FLEET, controller.sha256)
    assert controller.subscribed == controller.unsubscribed == [broadcast]


def test_fetcher_gives_up_when_requests_bring_nothing() -> None:
    blob = blob_of(4_000)
    controller = FakeBroadcaster(blob, lose_always=frozenset({0}))
    fetcher = controller.make(repair_after_s=0.01, max_repair_s=0.02, max_requests=3)

    with pytest.raises(TransferError, match="no new bytes after 3 requests"):
        run(collect(fetcher, controller.sha256, len(blob)))
    assert [asked(r) for r in controller.requests[1:]] == [[(0, 1_024)]] * 3
    assert controller.unsubscribed  # it left the broadcast


def test_fetcher_refusal_raises_one_line_transfer_error() -> None:
    blob = blob_of(4_000)
    controller = FakeBroadcaster(blob, refuse="blob evicted\nfrom cache")
    fetcher = controller.make()

    with pytest.raises(TransferError, match="blob evicted from cache") as info:
        run(collect(fetcher, controller.sha256, len(blob)))
    assert "\n" not in str(info.value)


def test_fetcher_refuses_a_source_that_changes_size() -> None:
    blob = blob_of(4_000)
    sha = hashlib.sha256(blob).hexdigest()
    fetcher: BroadcastFetcher | None = None

    async def publish(_topic: str, _payload: bytes) -> None:
        assert fetcher is not None
        fetcher.deliver(decode_frame(encode_chunk(sha, 2_048, 4_000, blob[2_048:3_072])))
        fetcher.deliver(decode_frame(encode_chunk(sha, 0, 4_005, blob[:1_024])))

    async def subscribe(_topic: str) -> None:
        return None

    fetcher = BroadcastFetcher(
        node_id=NODE, fleet=FLEET, publish=publish, subscribe=subscribe, unsubscribe=subscribe
    )
    with pytest.raises(TransferError, match="changed the blob size from 4000 to 4005"):
        run(collect(fetcher, sha, len(blob)))


def test_fetcher_drops_frames_nobody_waits_for() -> None:
    blob = blob_of(2_000)
    controller = FakeBroadcaster(blob)
    fetcher = controller.make()
    frame = decode_frame(encode_chunk("0" * 64, 0, 10, b"x" * 10))
    assert fetcher.deliver(frame) is False
    assert run(collect(fetcher, controller.sha256, len(blob))) == blob


def test_store_downloads_through_the_broadcast_fetcher(tmp_path: Path) -> None:
    blob = blob_of(50_000)
    manifest = manifest_for(blob)
    controller = FakeBroadcaster(blob, chunk=4_096, tail_first=5)
    store = ArtifactStore(tmp_path)

    path = run(store.download(manifest, controller.make(buffer_bytes=64_000)))
    assert path.read_bytes() == blob


def test_oversize_blob_over_mqtt_is_rejected_without_reading_past_size(tmp_path: Path) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    # The controller holds a longer blob under the manifest's digest.
    controller = FakeBroadcaster(blob + b"tail" * 10_000, sha256=manifest.sha256)
    store = ArtifactStore(tmp_path)

    with pytest.raises(DigestMismatchError, match="larger than declared size"):
        run(store.download(manifest, controller.make()))
    assert all(o + n <= len(blob) + 1 for r in controller.requests for o, n in r.ranges)
    assert list((tmp_path / "models").iterdir()) == []


def test_fetcher_rejects_bad_settings() -> None:
    async def publish(_topic: str, _payload: bytes) -> None:
        return None

    async def subscribe(_topic: str) -> None:
        return None

    lanes = {"publish": publish, "subscribe": subscribe, "unsubscribe": subscribe}
    with pytest.raises(ValueError, match="buffer_bytes"):
        BroadcastFetcher(node_id=NODE, fleet=FLEET, buffer_bytes=-1, **lanes)
    with pytest.raises(ValueError, match="repair timing"):
        BroadcastFetcher(node_id=NODE, fleet=FLEET, repair_after_s=0, **lanes)
    with pytest.raises(DecodeError):
        BroadcastFetcher(node_id="a/b", fleet=FLEET, **lanes)
