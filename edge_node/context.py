"""Small pieces of state the agent's parts share, each passed explicitly to those that need it.

* :class:`Connection`: the current broker link (or none), and events for "up"
  and "this connection ended";
* :class:`ServingModel`: the manifest of the model the node serves, with the
  callbacks that must run when it changes;
* :class:`Background`: fire-and-forget tasks kept referenced until they end and
  cancelled at shutdown; one that fails is logged and counted, never left with
  an unretrieved exception;
* :func:`sleep_unless`: a pause that a stop cuts short.

None of them decides anything; each keeps one invariant, stated on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from edgefleet_io.transport import Link
from shared.errors import BrokerUnavailableError
from shared.messages import ModelManifest

__all__ = ["Background", "Connection", "ServingModel", "sleep_unless"]

log = logging.getLogger(__name__)


class Connection:
    """The node's one broker connection, as the other parts see it.

    Invariant: ``link`` is set exactly while ``connected`` is set, and every
    connection gets its own ``lost`` event, set once when that connection ends
    (so a waiter holding an old one is never confused by a reconnect).
    """

    def __init__(self) -> None:
        self.link: Link | None = None
        self.connected = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost.set()  # no connection yet

    def up(self, link: Link) -> None:
        self.link = link
        self.lost = asyncio.Event()
        self.connected.set()

    def down(self) -> None:
        self.link = None
        self.lost.set()
        self.connected.clear()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current connection.

        Raises:
            TransportError: not connected, or the connection failed.
        """
        link = self.link
        if link is None:
            raise BrokerUnavailableError("not connected to the broker")
        await link.publish(topic, payload, qos=qos, retain=retain)


class ServingModel:
    """The manifest of the model being served (``None`` until one is loaded)."""

    def __init__(self) -> None:
        self.manifest: ModelManifest | None = None
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set(self, manifest: ModelManifest | None) -> None:
        self.manifest = manifest
        for listener in self._listeners:
            listener()

    def get(self) -> ModelManifest | None:
        return self.manifest


class Background:
    """Tasks started and forgotten by the caller, kept referenced until they finish.

    A task that raises is logged with its traceback and counted in ``failures``.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved: never "exception was never retrieved"
        if error is not None:
            self.failures += 1
            log.error("background task %s failed", task.get_name(), exc_info=error)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stopping`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
