"""Getting a model's blob onto the node: MQTT chunks or HTTP(S), with resume and retries.

Invariants:

* the blob is verified (size and sha256) by :class:`~edge_node.artifacts.ArtifactStore`
  while it streams; nothing here judges bytes;
* an MQTT download runs only while connected. When its connection ends it is
  cut short (the broadcast it followed and its requests died with it, so
  waiting would only stall) and resumed from the ``.part`` as soon as the node
  is connected again; that is no failed attempt;
* other transfer failures are retried with back-off, ``retries`` times;
* chunk requests wait while the retained ``controller/state`` says offline
  (``controller_offline``): the broker would drop them. When the controller
  comes back (:meth:`Downloader.controller_online`) a running MQTT download
  asks for its gaps at once and a back-off between attempts is cut short;
* frames arriving on ``artifact/{sha256}/data`` (the broadcast) and
  ``artifact/+/data/{node}`` (refusals) reach the download of their digest
  (:meth:`Downloader.deliver`); others are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from edge_node.artifacts import ArtifactStore
from edge_node.context import Connection
from edge_node.fetchers import BroadcastFetcher, HttpFetcher
from edgefleet_io.transport import Link
from shared.chunks import Frame
from shared.errors import BrokerUnavailableError, TransferError
from shared.messages import ModelManifest

__all__ = ["Downloader"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0


class Downloader:
    """Downloads blobs into the node's artifact store.

    An MQTT download keeps at most ``chunk_window`` x ``chunk_bytes`` bytes
    that arrived ahead of its write position in memory (a broadcast joined
    late starts with the blob's tail); what does not fit is asked for again.
    """

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
        controller_offline: Callable[[], bool] = lambda: False,
    ) -> None:
        self._artifacts = artifacts
        self._connection = connection
        self._retries = retries
        self._stopping = stopping
        self._controller_back = asyncio.Event()
        self._fetcher = BroadcastFetcher(
            node_id=node_id,
            fleet=fleet,
            publish=self._publish,
            subscribe=self._subscribe,
            unsubscribe=self._unsubscribe,
            buffer_bytes=chunk_bytes * chunk_window,
            controller_offline=controller_offline,
        )

    def deliver(self, frame: Frame) -> None:
        """Hand a received frame to the download of its digest, if one is running."""
        self._fetcher.deliver(frame)

    def controller_online(self) -> None:
        """The controller came (back) online: ask now, and end a back-off between attempts."""
        self._fetcher.controller_online()
        self._controller_back.set()

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
                await self._back_off(min(_MAX_BACKOFF_S, 0.5 * 2**attempts))
                continue
            if path is not None:
                return path
            log.info("connection lost while downloading %s; resuming", manifest.name)

    async def _back_off(self, seconds: float) -> None:
        """Sleep ``seconds``, less when stopping or when the controller comes back meanwhile."""
        self._controller_back.clear()
        loop = asyncio.get_running_loop()
        waits = (
            loop.create_task(self._controller_back.wait()),
            loop.create_task(self._stopping.wait()),
        )
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _attempt(
        self, manifest: ModelManifest, url: str | None, progress: Callable[[int, int], None]
    ) -> Path | None:
        """One try; ``None`` when an MQTT download's connection ended first."""
        if url is not None:
            return await self._artifacts.download(manifest, HttpFetcher(url=url), progress=progress)
        await self._connection.connected.wait()
        download = self._artifacts.download(manifest, self._fetcher, progress=progress)
        return await self._while_connected(download)

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

    def _link(self) -> Link:
        link = self._connection.link
        if link is None:
            raise BrokerUnavailableError("not connected to the broker")
        return link

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self._link().publish(topic, payload, qos=1)

    async def _subscribe(self, topic: str) -> None:
        # QoS 0: the broker queues nothing for a node that is away; it repairs gaps.
        await self._link().subscribe([(topic, 0)])

    async def _unsubscribe(self, topic: str) -> None:
        await self._link().unsubscribe([topic])
