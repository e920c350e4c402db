"""ArtifactStore and MqttChunkFetcher against honest in-memory fakes (no network, no broker).

The fakes serve real bytes: ``FakeFetcher`` plays any Fetcher (cut off, corrupt,
oversize), ``FakeController`` plays the controller's side of the MQTT chunk
protocol by decoding each ArtifactRequest and delivering ArtifactChunks.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest

from edge_node.artifacts import ArtifactStore, InsufficientSpaceError
from edge_node.fetchers import MqttChunkFetcher
from shared import topics
from shared.envelope import b64encode
from shared.errors import DecodeError, DigestMismatchError, TransferError
from shared.messages import ArtifactChunk, ArtifactRequest, ModelManifest, TensorSpec, decode

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


def test_progress_is_throttled_to_once_per_second_plus_final(tmp_path: Path) -> None:
    blob = blob_of(20_000)
    manifest = manifest_for(blob)
    now = [100.0]

    def tick() -> None:
        now[0] += 0.3  # each chunk "takes" 0.3 s

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
    assert 4 <= len(periodic) <= 6  # 20 chunks over 6 s
    assert all(total == 20_000 and 0 < done < total for _, done, total in periodic)
    times = [t for t, _, _ in periodic]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
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


class FakeController:
    """The controller's side of the chunk protocol, in process.

    ``publish`` decodes each request and schedules the reply on the loop (as a
    broker round trip would). ``reverse``: replies to a burst of requests are
    delivered newest first. ``drop_first``: the first request for each of these
    offsets goes unanswered. ``drop_always``: never answered. ``error_at``: the
    reply for that offset carries an error. ``short_at``: that reply lacks its
    last byte. ``stale``: before each reply, deliver a stale one (unknown id)
    and one with a wrong digest.
    """

    def __init__(
        self,
        blob: bytes,
        *,
        reverse: bool = False,
        drop_first: frozenset[int] = frozenset(),
        drop_always: frozenset[int] = frozenset(),
        error_at: int | None = None,
        short_at: int | None = None,
        stale: bool = False,
        sha256: str | None = None,
    ) -> None:
        self.blob = blob
        self.sha256 = sha256 or hashlib.sha256(blob).hexdigest()
        self.reverse = reverse
        self.drop_first = set(drop_first)
        self.drop_always = drop_always
        self.error_at = error_at
        self.short_at = short_at
        self.stale = stale
        self.requests: list[ArtifactRequest] = []
        self.delivered: list[int] = []
        self.stale_accepted: list[bool] = []
        self.held: list[ArtifactChunk] = []
        self.fetcher: MqttChunkFetcher | None = None

    def make(self, **settings: Any) -> MqttChunkFetcher:
        self.fetcher = MqttChunkFetcher(node_id=NODE, fleet=FLEET, publish=self.publish, **settings)
        return self.fetcher

    async def publish(self, topic: str, payload: bytes) -> None:
        request = decode(ArtifactRequest, payload)
        assert topic == topics.artifact_request(FLEET, request.sha256, NODE)
        assert request.node == NODE
        self.requests.append(request)
        if request.offset in self.drop_always:
            return
        if request.offset in self.drop_first:
            self.drop_first.discard(request.offset)
            return
        self.held.append(self.reply(request))
        asyncio.get_running_loop().call_soon(self.flush)

    def reply(self, request: ArtifactRequest) -> ArtifactChunk:
        common = {
            "sha256": request.sha256,
            "request_id": request.request_id,
            "offset": request.offset,
            "size": len(self.blob),
        }
        if request.offset == self.error_at:
            return ArtifactChunk(**common, error="blob evicted\nfrom cache")
        data = self.blob[request.offset : request.offset + request.length]
        if request.offset == self.short_at:
            data = data[:-1]
        return ArtifactChunk(**common, data=b64encode(data))

    def flush(self) -> None:
        assert self.fetcher is not None
        held, self.held = self.held, []
        for chunk in reversed(held) if self.reverse else held:
            if self.stale:
                self.stale_accepted.append(
                    self.fetcher.deliver(chunk.model_copy(update={"request_id": "stale0000000"}))
                )
                self.stale_accepted.append(
                    self.fetcher.deliver(chunk.model_copy(update={"sha256": "0" * 64}))
                )
            self.delivered.append(chunk.offset)
            self.fetcher.deliver(chunk)


async def collect(fetcher: MqttChunkFetcher, sha: str, size: int, offset: int = 0) -> bytes:
    return b"".join([piece async for piece in fetcher.stream(sha, size, offset)])


def test_mqtt_fetcher_yields_blob_in_order_with_unique_ids() -> None:
    blob = blob_of(10_000)
    controller = FakeController(blob)
    fetcher = controller.make(chunk_bytes=1_024, window=4)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob

    offsets = [r.offset for r in controller.requests]
    assert offsets == list(range(0, 10_000, 1_024))
    assert controller.requests[-1].length == 10_000 - 9 * 1_024
    ids = [r.request_id for r in controller.requests]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", i) for i in ids)
    # Finished: a late duplicate of any reply is no longer routed.
    late = controller.reply(controller.requests[0])
    assert fetcher.deliver(late) is False


def test_mqtt_fetcher_reorders_out_of_order_replies() -> None:
    blob = blob_of(10_000, seed=3)
    controller = FakeController(blob, reverse=True)
    fetcher = controller.make(chunk_bytes=1_000, window=4)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    assert controller.delivered != sorted(controller.delivered)


def test_mqtt_fetcher_resumes_from_offset() -> None:
    blob = blob_of(10_000)
    controller = FakeController(blob)
    fetcher = controller.make(chunk_bytes=1_024)

    assert run(collect(fetcher, controller.sha256, len(blob), 5_000)) == blob[5_000:]
    assert controller.requests[0].offset == 5_000


def test_mqtt_fetcher_re_requests_a_lost_chunk() -> None:
    blob = blob_of(8_000)
    controller = FakeController(blob, drop_first=frozenset({2_048}))
    fetcher = controller.make(chunk_bytes=1_024, stall_timeout_s=0.05)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    asked = [r.request_id for r in controller.requests if r.offset == 2_048]
    assert len(asked) >= 2  # exactly 2 unless a starved loop outlasts the 50 ms stall again
    assert len(set(asked)) == len(asked)


def test_mqtt_fetcher_gives_up_after_max_retries() -> None:
    blob = blob_of(4_000)
    controller = FakeController(blob, drop_always=frozenset({0}))
    fetcher = controller.make(chunk_bytes=1_024, stall_timeout_s=0.02, max_retries=2)

    with pytest.raises(TransferError, match="after 3 requests"):
        run(collect(fetcher, controller.sha256, len(blob)))
    assert [r.offset for r in controller.requests].count(0) == 3


def test_mqtt_fetcher_error_chunk_raises_transfer_error() -> None:
    blob = blob_of(4_000)
    controller = FakeController(blob, error_at=2_048)
    fetcher = controller.make(chunk_bytes=1_024)

    with pytest.raises(TransferError, match="blob evicted from cache") as info:
        run(collect(fetcher, controller.sha256, len(blob)))
    assert "\n" not in str(info.value)


def test_mqtt_fetcher_wrong_length_chunk_raises_transfer_error() -> None:
    blob = blob_of(4_000)
    controller = FakeController(blob, short_at=1_024)
    fetcher = controller.make(chunk_bytes=1_024)

    with pytest.raises(TransferError, match="asked for 1024"):
        run(collect(fetcher, controller.sha256, len(blob)))


def test_mqtt_fetcher_ignores_stale_chunks() -> None:
    blob = blob_of(6_000)
    controller = FakeController(blob, stale=True, reverse=True)
    fetcher = controller.make(chunk_bytes=1_024)

    assert run(collect(fetcher, controller.sha256, len(blob))) == blob
    assert controller.stale_accepted
    assert not any(controller.stale_accepted)


def test_store_downloads_through_mqtt_fetcher(tmp_path: Path) -> None:
    blob = blob_of(50_000)
    manifest = manifest_for(blob)
    controller = FakeController(blob, reverse=True)
    store = ArtifactStore(tmp_path)

    path = run(store.download(manifest, controller.make(chunk_bytes=4_096, window=3)))
    assert path.read_bytes() == blob


def test_oversize_blob_over_mqtt_is_rejected_without_reading_past_size(tmp_path: Path) -> None:
    blob = blob_of(10_000)
    manifest = manifest_for(blob)
    # The controller holds a longer blob under the manifest's digest.
    controller = FakeController(blob + b"tail" * 10_000, sha256=manifest.sha256)
    store = ArtifactStore(tmp_path)

    with pytest.raises(DigestMismatchError, match="larger than declared size"):
        run(store.download(manifest, controller.make(chunk_bytes=1_024)))
    assert all(r.offset + r.length <= len(blob) + 1 for r in controller.requests)
    assert list((tmp_path / "models").iterdir()) == []


def test_mqtt_fetcher_rejects_bad_settings() -> None:
    async def publish(_topic: str, _payload: bytes) -> None:
        return None

    with pytest.raises(ValueError, match="chunk_bytes"):
        MqttChunkFetcher(node_id=NODE, fleet=FLEET, publish=publish, chunk_bytes=600 * 1024)
    with pytest.raises(DecodeError):
        MqttChunkFetcher(node_id="a/b", fleet=FLEET, publish=publish)
