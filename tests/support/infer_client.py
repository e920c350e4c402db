"""A local application asking one node to infer over MQTT, for end-to-end tests.

:class:`InferClient` runs in its own thread with its own event loop, so a test
driving real processes with blocking calls (:class:`tests.support.fleet.Fleet`)
can kill and restart the node while it asks. It talks through the project's
transport (:mod:`edgefleet_io`), as any application would: ``window``
requests in flight, each with an input no other request has (so its
``input_digest`` names the request), published at QoS 0 so the broker never
delivers one twice; a request unanswered after ``reply_timeout_s`` is given up
and another sent. Every ``ok`` reply is recorded, late ones too: what the
client has *seen* is what the node promised to keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid

import numpy as np

from edge_node.results_core import input_digest
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Link, Session, reconnect_delays
from shared import topics
from shared.broker import parse_broker_url
from shared.errors import TransportError
from shared.messages import InferenceResult, InferReply, InferRequest, TensorData, decode, encode

__all__ = ["InferClient"]

N_IN = 8  # the test classifier's input width (tests.support.models.make_classifier)
_STOP_S = 5.0  # how long a clean stop may take before the client's task is cancelled


class InferClient:
    """Asks ``node`` to infer until stopped; ``seen`` holds every answered result.

    Use as a context manager (the thread starts on enter and is stopped and
    joined on exit). ``seen`` maps request id to the result its reply carried;
    ``sent`` maps request id to the digest of the input it carried; read both
    under ``lock``.
    """

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        node: str,
        *,
        window: int = 4,
        reply_timeout_s: float = 3.0,
    ) -> None:
        self._transport = MqttTransport(parse_broker_url(broker_url))
        self._fleet = fleet
        self._node = node
        self._window = window
        self._timeout_s = reply_timeout_s
        self._client = f"app-{uuid.uuid4().hex[:8]}"
        self.lock = threading.Lock()
        self.sent: dict[str, str] = {}
        self.seen: dict[str, InferenceResult] = {}
        self.refused: list[str] = []  # errors the node replied with
        self._numbers = itertools.count()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self._client, daemon=True)

    def answered(self) -> int:
        with self.lock:
            return len(self.seen)

    def __enter__(self) -> InferClient:
        self._thread.start()
        self._started.wait(timeout=10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop asking and wait for the thread (replies still in flight are not waited for).

        A clean disconnect first; if that does not end within ``_STOP_S`` (aiomqtt
        waits for the broker to close the socket, without a timeout), the client's
        task is cancelled, again until it ends.
        """
        loop, stop, task = self._loop, self._stop, self._task
        if loop is None or stop is None or task is None:
            self._thread.join(timeout=_STOP_S)
            return
        if self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        deadline = time.monotonic() + 6 * _STOP_S
        self._thread.join(timeout=_STOP_S)
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
            self._thread.join(timeout=_STOP_S)
        assert not self._thread.is_alive(), "the infer client did not stop"

    # ----- the client's own thread ---------------------------------------------------

    def _main(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._task = asyncio.current_task()
        self._started.set()
        delays = reconnect_delays(initial_s=0.1, maximum_s=1.0)
        while not self._stop.is_set():
            try:
                async with self._transport.connect(Session(client_id=self._client)) as link:
                    reply_topic = topics.infer_reply(self._fleet, self._node, self._client)
                    await link.subscribe([(reply_topic, 1)])
                    await self._ask(link)
            except* TransportError:
                pass  # the connection is gone: connect again after a pause
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next(delays)):  # reconnect back-off, or stop
                        await self._stop.wait()

    async def _ask(self, link: Link) -> None:
        assert self._stop is not None
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read(link))
            askers = [group.create_task(self._asker(link)) for _ in range(self._window)]
            await self._stop.wait()
            for task in (reader, *askers):
                task.cancel()

    async def _read(self, link: Link) -> None:
        async for message in link.messages():
            reply = decode(InferReply, message.payload)
            with self.lock:
                if reply.ok and reply.result is not None:
                    self.seen[reply.id] = reply.result
                elif reply.error is not None:
                    self.refused.append(reply.error)
            waiting = self._waiting.pop(reply.id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(None)

    async def _asker(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        topic = topics.infer_request(self._fleet, self._node)
        while True:
            number = next(self._numbers)
            request_id = f"r{number}"
            row = np.arange(N_IN, dtype=np.float32) / N_IN + np.float32(number)
            request = InferRequest(
                id=request_id,
                client=self._client,
                inputs=(
                    TensorData(name="input", shape=(1, N_IN), data=tuple(float(x) for x in row)),
                ),
            )
            answered = loop.create_future()
            self._waiting[request_id] = answered
            with self.lock:
                self.sent[request_id] = input_digest({"input": row.reshape(1, N_IN)})
            await link.publish(topic, encode(request), qos=0)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await answered
            except TimeoutError:  # the node is down or lost it: give up, ask again
                self._waiting.pop(request_id, None)
