"""The controller's optional HTTP artifact server against the node's HTTP fetcher."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_node.artifacts import ArtifactStore
from edge_node.fetchers import HttpFetcher
from fleet_controller.blobs import BlobStore
from fleet_controller.http_artifacts import ArtifactHttpServer
from shared.messages import ModelManifest, TensorSpec

BLOB = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.add_bytes(BLOB)
    server = ArtifactHttpServer(blobs, host="127.0.0.1", port=0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/artifacts/{sha}", sha
    finally:
        server.close()


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


@pytest.mark.parametrize(
    ("range_header", "status", "body"),
    [
        pytest.param(None, 200, BLOB, id="whole"),
        pytest.param("bytes=1000-", 206, BLOB[1000:], id="from-offset"),
        pytest.param("bytes=10-19", 206, BLOB[10:20], id="closed-range"),
        pytest.param(f"bytes={len(BLOB)}-", 416, b"", id="past-the-end"),
        pytest.param("bytes=-5", 416, b"", id="suffix-range-refused"),
    ],
)
def test_ranges(
    served: tuple[str, str], range_header: str | None, status: int, body: bytes
) -> None:
    url, _ = served
    code, headers, data = fetch(url, {"Range": range_header} if range_header else None)
    assert (code, data) == (status, body)
    if status == 206:
        assert headers["Content-Range"].endswith(f"/{len(BLOB)}")


def test_unknown_blob_is_404(served: tuple[str, str]) -> None:
    url, sha = served
    assert fetch(url.replace(sha, "0" * 64))[0] == 404
    assert fetch(url.replace(f"artifacts/{sha}", "etc/passwd"))[0] == 404


def test_node_downloads_and_resumes_over_http(served: tuple[str, str], tmp_path: Path) -> None:
    url, sha = served
    store = ArtifactStore(tmp_path / "node")
    part = store.path(sha).with_name(f"{sha}.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(BLOB[:300_000])  # an interrupted earlier download
    manifest = ModelManifest(
        name="m",
        version="1.0.0",
        sha256=sha,
        size=len(BLOB),
        inputs=(TensorSpec(name="x", dtype="float32", shape=(1,)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(1,)),),
        created_at=0.0,
    )
    path = asyncio.run(store.download(manifest, HttpFetcher(url=url)))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
