"""HttpFetcher + ArtifactStore against a real HTTP server on 127.0.0.1.

The server (``http.server.ThreadingHTTPServer`` in a thread) serves one blob at
``/blob`` and records every ``Range`` header it sees. Modes: ``range`` (206 with
Content-Range, 416 past the end), ``ignore_range`` (always 200 with the whole
blob), ``cut`` (honours Range, then closes the connection after ``cut_at`` body
bytes), ``bad_range`` (206 that always claims to start at 0), ``stall``
(sends ``cut_at`` body bytes, then waits for ``release`` before the rest).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import threading
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge_node.artifacts import ArtifactStore
from edge_node.fetchers import HttpFetcher
from shared.errors import DigestMismatchError, TransferError
from shared.messages import ModelManifest, TensorSpec

T = TypeVar("T")
BLOB = bytes((i * 7 + i // 251) % 256 for i in range(300_000))


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def manifest_for(blob: bytes) -> ModelManifest:
    spec = TensorSpec(name="x", dtype="float32", shape=(1,))
    return ModelManifest(
        name="m",
        version="1.0.0",
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        inputs=(spec,),
        outputs=(spec,),
        created_at=0,
    )


class BlobServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, blob: bytes) -> None:
        super().__init__(("127.0.0.1", 0), BlobHandler)
        self.blob = blob
        self.mode = "range"
        self.cut_at = 0
        self.ranges: list[str | None] = []
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/blob"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up early (oversize test) is expected


class BlobHandler(BaseHTTPRequestHandler):
    server: BlobServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        header = self.headers.get("Range")
        with srv.lock:
            srv.ranges.append(header)
            mode, blob = srv.mode, srv.blob
        if self.path != "/blob":
            self.send_error(404, "no such artifact")
            return
        start = 0
        if mode != "ignore_range" and header is not None:
            match = re.fullmatch(r"bytes=(\d+)-", header)
            assert match is not None
            start = int(match[1])
        if start >= len(blob):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(blob)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = blob[start:]
        if mode == "ignore_range" or header is None:
            self.send_response(200)
        else:
            self.send_response(206)
            claimed = 0 if mode == "bad_range" else start
            self.send_header("Content-Range", f"bytes {claimed}-{len(blob) - 1}/{len(blob)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "cut":
            body = body[: srv.cut_at]
        if mode == "stall":
            self.wfile.write(body[: srv.cut_at])
            self.wfile.flush()
            srv.stalled.set()
            srv.release.wait(timeout=10)
            body = body[srv.cut_at :]
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def server() -> Iterator[BlobServer]:
    srv = BlobServer(BLOB)
    thread = threading.Thread(
        target=srv.serve_forever, args=(0.05,), name="blob-server", daemon=True
    )
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def fetcher_for(url: str) -> HttpFetcher:
    return HttpFetcher(url=url, timeout_s=5.0, chunk_bytes=16 * 1024)


def test_download_with_range_support(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)

    path = run(store.download(manifest, fetcher_for(server.url)))

    assert path.read_bytes() == BLOB
    assert server.ranges == ["bytes=0-"]


def test_resume_after_mid_body_cut(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)
    server.mode, server.cut_at = "cut", 100_000

    with pytest.raises(TransferError, match="closed the connection"):
        run(store.download(manifest, fetcher_for(server.url)))
    offset = store.partial_bytes(manifest.sha256)
    assert offset == 100_000

    server.mode = "range"
    path = run(store.download(manifest, fetcher_for(server.url)))
    assert path.read_bytes() == BLOB
    assert server.ranges == ["bytes=0-", f"bytes={offset}-"]


def test_resume_when_server_ignores_range(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)
    server.mode, server.cut_at = "cut", 123_457

    with pytest.raises(TransferError):
        run(store.download(manifest, fetcher_for(server.url)))
    assert store.partial_bytes(manifest.sha256) == 123_457

    server.mode = "ignore_range"  # answers 200 with the whole blob: the fetcher skips
    path = run(store.download(manifest, fetcher_for(server.url)))
    assert path.read_bytes() == BLOB
    assert server.ranges[-1] == "bytes=123457-"


def test_cancel_mid_read_keeps_a_resumable_part(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)
    server.mode, server.cut_at = "stall", 3 * 16 * 1024 + 100

    async def cancel_while_stalled() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(store.download(manifest, fetcher_for(server.url)))
        deadline = loop.time() + 5
        while not server.stalled.is_set():  # a worker thread now blocks in read()
            assert loop.time() < deadline, "server never reached the stall"
            assert not task.done()
            await asyncio.sleep(0.01)  # poll against the deadline above
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.mode = "range"
        server.release.set()  # the abandoned worker read returns, then closes the response

    run(cancel_while_stalled())
    offset = store.partial_bytes(manifest.sha256)
    part = tmp_path / "models" / f"{manifest.sha256}.part"
    assert part.read_bytes() == BLOB[:offset]

    path = run(store.download(manifest, fetcher_for(server.url)))
    assert path.read_bytes() == BLOB
    assert server.ranges == ["bytes=0-", f"bytes={offset}-"]


def test_not_found_is_a_transfer_error(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)

    with pytest.raises(TransferError, match="HTTP 404") as info:
        run(store.download(manifest, fetcher_for(server.url.replace("/blob", "/nope"))))
    assert "\n" not in str(info.value)
    assert not store.has(manifest.sha256)


async def _drain(fetcher: HttpFetcher, size: int, offset: int) -> bytes:
    sha = hashlib.sha256(BLOB).hexdigest()
    return b"".join([piece async for piece in fetcher.stream(sha, size, offset)])


def test_range_past_end_is_a_transfer_error(server: BlobServer) -> None:
    with pytest.raises(TransferError, match="416"):
        run(_drain(fetcher_for(server.url), len(BLOB), len(BLOB)))


def test_wrong_content_range_is_a_transfer_error(server: BlobServer) -> None:
    server.mode = "bad_range"
    with pytest.raises(TransferError, match="Content-Range"):
        run(_drain(fetcher_for(server.url), len(BLOB), 1_000))


def test_connection_refused_is_a_transfer_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransferError, match="cannot reach"):
        run(_drain(fetcher_for(f"http://127.0.0.1:{port}/blob"), len(BLOB), 0))


def test_oversize_blob_over_http_is_rejected(server: BlobServer, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    manifest = manifest_for(BLOB)
    server.blob = BLOB + b"more" * 50_000

    with pytest.raises(DigestMismatchError, match="larger than declared size"):
        run(store.download(manifest, fetcher_for(server.url)))
    assert list((tmp_path / "models").iterdir()) == []


def test_fetcher_refuses_non_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpFetcher(url="file:///etc/passwd")
