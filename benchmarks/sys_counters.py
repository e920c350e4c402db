"""The broker's ``$SYS`` counters, read live by the benchmarks that need them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from shared.broker import BrokerAddress

MESSAGES_SENT = "$SYS/broker/publish/messages/sent"


class SysCounters:
    """Mosquitto's ``$SYS`` counters named in ``topics`` (name: topic), as last
    published (every second with ``sys_interval 1``).

    ``topics`` must include :data:`MESSAGES_SENT`: Mosquitto republishes a
    counter only when it changed, and that one changes every second (it counts
    the ``$SYS`` messages sent to this subscriber), so it marks each update.
    """

    def __init__(self, broker: BrokerAddress, topics: Mapping[str, str]) -> None:
        if MESSAGES_SENT not in topics.values():
            raise ValueError(f"the counters must include {MESSAGES_SENT}")
        self._broker = broker
        self._names = {topic: name for name, topic in topics.items()}
        self.values: dict[str, int] = {}
        self._updated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SysCounters:
        self._task = asyncio.get_running_loop().create_task(self._read())
        await self.fresh()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        async with MqttTransport(self._broker).connect(Session(client_id="bench-sys")) as link:
            await link.subscribe([(topic, 0) for topic in self._names])
            async for message in link.messages():
                if message.payload:
                    self.values[self._names[message.topic]] = int(message.payload)
                    if message.topic == MESSAGES_SENT:
                        self._updated.set()

    async def fresh(self) -> dict[str, int]:
        """Counters from the next update after now (at most ~1 s away)."""
        async with asyncio.timeout(10):
            self._updated.clear()
            await self._updated.wait()
        await asyncio.sleep(0.05)  # the rest of that update
        return dict(self.values)
