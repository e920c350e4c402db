"""Getting a model's blob onto the node: MQTT chunks or HTTP(S), with resume and retries.

Invariants:

* the blob is verified (size and sha256) by :class:`~edge_node.artifacts.ArtifactStore`
  while it streams; nothing here judges bytes;
* an MQTT download runs only while connected. When its connection ends it is
  cut short (the chunk requests and replies in flight died with it, so
  waiting for them would only stall) and resumed from the ``.part`` as soon as
  the node is connected again; that is no failed attempt;
* other transfer failures are retried with back-off, ``retries`` times;
* chunks arriving on ``artifact/+/data/{node}`` reach the fetcher of their
  digest (:meth:`Downloader.deliver`); others are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from edge_node.artifacts import ArtifactStore
from edge_node.context import Connection, sleep_unless
from edge_node.fetchers import HttpFetcher, MqttChunkFetcher
from shared.errors import TransferError, TransportError
from shared.messages import ArtifactChunk, ModelManifest

__all__ = ["Downloader"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0


class Downloader:
    """Downloads blobs into the node's artifact store."""

    def __init__(
        self,
        artifacts: ArtifactStore,
        connection: Connection,
        *,
        node_id: str,
        fleet: str,
        chunk_bytes: int,
        chunk_window: int,
        retries: int,
        stopping: asyncio.Event,
    ) -> None:
        self._artifacts = artifacts
        self._connection = connection
        self._node_id = node_id
        self._fleet = fleet
        self._chunk_bytes = chunk_bytes
        self._chunk_window = chunk_window
        self._retries = retries
        self._stopping = stopping
        self._fetchers: dict[str, MqttChunkFetcher] = {}

    def deliver(self, chunk: ArtifactChunk) -> None:
        """Hand a received chunk to the download of its digest, if one is running."""
        fetcher = self._fetchers.get(chunk.sha256)
        if fetcher is not None:
            fetcher.deliver(chunk)

    async def download(
        self, manifest: ModelManifest, url: str | None, progress: Callable[[int, int], None]
    ) -> Path:
        """The verified blob's path, downloaded with resume and retries.

        Raises:
            TransferError: the transfer failed more than ``retries`` times.
            TrustError / ArtifactError: the bytes are not the manifest's, or the
                store cannot hold them.
        """
        attempts = 0
        while True:
            try:
                path = await self._attempt(manifest, url, progress)
            except TransferError as exc:
                attempts += 1
                if attempts > self._retries:
                    raise
                log.warning("download of %s interrupted (%s); resuming", manifest.name, exc)
                await sleep_unless(self._stopping, min(_MAX_BACKOFF_S, 0.5 * 2**attempts))
                continue
            if path is not None:
                return path
            log.info("connection lost while downloading %s; resuming", manifest.name)

    async def _attempt(
        self, manifest: ModelManifest, url: str | None, progress: Callable[[int, int], None]
    ) -> Path | None:
        """One try; ``None`` when an MQTT download's connection ended first."""
        if url is not None:
            return await self._artifacts.download(manifest, HttpFetcher(url=url), progress=progress)
        await self._connection.connected.wait()
        fetcher = self._mqtt_fetcher()
        self._fetchers[manifest.sha256] = fetcher
        try:
            download = self._artifacts.download(manifest, fetcher, progress=progress)
            return await self._while_connected(download)
        finally:
            self._fetchers.pop(manifest.sha256, None)

    async def _while_connected(self, work: Coroutine[Any, Any, Path]) -> Path | None:
        """``work``'s result, or None when the current connection ends first.

        ``work`` is then cancelled (the store keeps its ``.part``); a transfer
        error it raised because the connection went is a None too. Other
        errors propagate.
        """
        lost = self._connection.lost
        loop = asyncio.get_running_loop()
        task = loop.create_task(work)
        watch = loop.create_task(lost.wait())
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))  # the store closes its .part
        if task.cancelled() or (lost.is_set() and isinstance(task.exception(), TransferError)):
            return None
        return task.result()

    def _mqtt_fetcher(self) -> MqttChunkFetcher:
        connection = self._connection

        async def publish(topic: str, payload: bytes) -> None:
            try:
                await connection.publish(topic, payload, qos=1)
            except TransportError as exc:
                raise TransferError(f"broker connection lost during download: {exc}") from None

        return MqttChunkFetcher(
            node_id=self._node_id,
            fleet=self._fleet,
            publish=publish,
            chunk_bytes=self._chunk_bytes,
            window=self._chunk_window,
        )
