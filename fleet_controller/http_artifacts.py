"""Optional HTTP(S)-reachable artifact server with Range support (off by default).

``GET /artifacts/<sha256>`` serves a blob from the controller's blob store,
with ``Range: bytes=N-`` / ``bytes=N-M`` for resumable downloads (206 with
``Content-Range``; 416 past the end). Anything else is 404. Blobs are
content-addressed and immutable, and nodes verify size and SHA-256 against the
release-signed manifest, so the server needs no authentication of its own;
put TLS in front of it (or use the MQTT transfer) where the network is hostile.
"""

from __future__ import annotations

import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fleet_controller.blobs import BlobStore

__all__ = ["ArtifactHttpServer"]

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/artifacts/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{0,19})$")
_COPY_BYTES = 256 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        match = _PATH.match(self.path)
        if match is None or not self.server.blobs.has(match.group(1)):
            self._empty(HTTPStatus.NOT_FOUND)
            return
        path = self.server.blobs.path(match.group(1))
        size = path.stat().st_size
        start, end = 0, size - 1
        ranged = self.headers.get("Range")
        if ranged is not None:
            parsed = _RANGE.match(ranged.strip())
            if parsed is None:
                self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, size)
                return
            start = int(parsed.group(1))
            end = min(int(parsed.group(2)), size - 1) if parsed.group(2) else size - 1
            if start >= size or end < start:
                self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, size)
                return
        length = end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with path.open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining:
                block = handle.read(min(_COPY_BYTES, remaining))
                if not block:
                    break
                self.wfile.write(block)
                remaining -= len(block)

    def _empty(self, status: HTTPStatus, size: int | None = None) -> None:
        self.send_response(status)
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.client_address[0], format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], blobs: BlobStore) -> None:
        super().__init__(address, _Handler)
        self.blobs = blobs


class ArtifactHttpServer:
    """Serve ``blobs`` on ``host:port`` from a background thread until :meth:`close`."""

    def __init__(self, blobs: BlobStore, *, host: str, port: int) -> None:
        self._server = _Server((host, port), blobs)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="artifact-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
