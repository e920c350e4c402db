"""The outbox's asynchronous face: queueing statuses, results and telemetry, and sending them.

Invariants (the outbox's own are in :mod:`edge_node.outbox`):

* every outbox call runs in a worker thread, never on the event loop;
* a status is never dropped: when the outbox is full, :meth:`OutboxSender.put`
  waits for acks to free space; result batches are not dropped either, the
  caller keeps them and pauses (:meth:`OutboxSender.try_put_many`); ``space`` is
  clear exactly while something waits for room;
* entries are published in ``seq`` order on the current connection, and re-sent
  when unacknowledged for ``resend_after_s``, then for twice as long after each
  re-send, up to 8 times as long (:meth:`edge_node.outbox.Outbox.due`: a
  controller that lags behind is not flooded with copies); after every
  reconnect all of them go out again at once (:meth:`OutboxSender.requeue`);
* while the controller is silent (:class:`~edge_node.presence_core.ControllerWatch`:
  its retained state says offline, or acks stopped coming) the backlog is
  held: only the oldest entry goes out, as a probe, its delay doubling per
  send up to ``silent_resend_max_s``; new entries wait. When the controller
  comes back (its state says online, or an ack arrives) everything
  unacknowledged goes out again at once, in order, and the listeners
  registered with :meth:`OutboxSender.on_back` run. Without this, every node
  re-sent its whole backlog into a shared subscription group with no member
  (the broker drops it) on every round of a controller outage;
* an entry leaves the outbox only on the controller's ack;
* a full disk (:class:`~edge_node.outbox.OutboxDiskFullError`) ends nothing:
  a status waits and tries again every ``DISK_RETRY_S``, result batches stay
  with the caller until a later put succeeds (which sets ``space`` again),
  telemetry is dropped and counted, and sending pauses until the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from edge_node.context import Connection
from edge_node.outbox import Kind, Outbox, OutboxDiskFullError, OutboxEntry, OutboxFullError
from edge_node.presence_core import ControllerWatch
from edgefleet_io.transport import Link
from shared.errors import TransportError

__all__ = ["OutboxSender"]

log = logging.getLogger(__name__)

_DUE_LIMIT = 200  # sequenced entries read per round
_TELEMETRY_LIMIT = 50
_MAX_IDLE_S = 5.0  # the sender looks for due re-sends at least this often
DISK_RETRY_S = 1.0  # a status put refused by a full disk is tried again this often


class OutboxSender:
    """Puts entries into the outbox and sends what is due on the current connection."""

    def __init__(
        self,
        outbox: Outbox,
        connection: Connection,
        *,
        resend_after_s: float,
        silent_resend_max_s: float,
        watch: ControllerWatch,
        clock: Callable[[], float],
        stopping: asyncio.Event,
    ) -> None:
        self.outbox = outbox
        self.watch = watch
        self._connection = connection
        self._resend_after_s = resend_after_s
        self._silent_resend_max_s = silent_resend_max_s
        self._clock = clock
        self._stopping = stopping
        self._back_listeners: list[Callable[[], None]] = []
        self._requeue_due = False  # the controller came back: everything goes out again
        self._wake = asyncio.Event()
        # One sender at a time (the run loop, or a stop's last send): two would
        # publish interleaved, and a stop cutting one short leaves a gap.
        self._sending = asyncio.Lock()
        self.space = asyncio.Event()
        self.space.set()
        self.dropped_telemetry = 0  # refused by a full disk (the outbox counts the rest)

    def wake(self) -> None:
        self._wake.set()

    # ----- queueing -----------------------------------------------------------

    async def put(self, kind: Kind, topic: str, build: Callable[[int], bytes]) -> None:
        """Store an entry, waiting for acks while the outbox is full."""
        while True:
            try:
                await asyncio.to_thread(self.outbox.put, kind, topic, build)
                break
            except OutboxDiskFullError as exc:
                log.error("%s: the %s waits for space", exc, kind)
                self.space.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DISK_RETRY_S):
                        await self.space.wait()
            except OutboxFullError:
                log.error("outbox full: waiting for the controller to acknowledge")
                self.space.clear()
                await self.space.wait()
        self.space.set()  # stored: there is room (again)
        self.wake()

    async def try_put_many(
        self, kind: Kind, topic: str, builds: list[Callable[[int], bytes]]
    ) -> bool:
        """Store all entries in one commit; False (``space`` cleared) when they do not fit.

        A success sets ``space``: after a full disk nothing else would.
        """
        try:
            await asyncio.to_thread(self.outbox.put_many, kind, topic, builds)
        except OutboxFullError:
            self.space.clear()
            return False
        self.space.set()
        self.wake()
        return True

    async def put_telemetry(self, topic: str, payload: bytes) -> None:
        """Store telemetry, best effort: a full disk drops it (counted)."""
        try:
            await asyncio.to_thread(self.outbox.put_telemetry, topic, payload)
        except OutboxDiskFullError as exc:
            self.dropped_telemetry += 1
            log.warning("telemetry dropped: %s", exc)
            return
        self.wake()

    async def on_ack(self, seq: int) -> None:
        try:
            removed = await asyncio.to_thread(self.outbox.ack, seq)
        except OutboxDiskFullError as exc:
            log.warning("ack of seq %d not applied yet: %s", seq, exc)  # the next ack covers it
            return
        if removed:
            self.space.set()
        if self.watch.acked(self._clock(), outstanding=self.outbox.depth() > 0):
            log.info("the controller answers again: re-sending everything unacknowledged")
            self._came_back()

    def controller_state(self, online: bool) -> None:
        """The retained ``controller/state`` said ``online`` (or not)."""
        if self.watch.state(online=online, now=self._clock()):
            log.info("the controller is online again: re-sending everything unacknowledged")
            self._came_back()
        elif not online:
            log.info("the controller is offline: holding the outbox until it comes back")

    def on_back(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the event loop, must not block) whenever the controller
        comes back."""
        self._back_listeners.append(listener)

    def _came_back(self) -> None:
        self._requeue_due = True
        self.wake()
        for listener in self._back_listeners:
            listener()

    async def requeue(self) -> None:
        """After a (re)connect: everything unacknowledged goes out again, in order.

        On a full disk they go out at their re-send time instead.
        """
        try:
            await asyncio.to_thread(self.outbox.requeue_all)
        except OutboxDiskFullError as exc:
            log.warning("outbox not requeued: %s", exc)

    # ----- sending ------------------------------------------------------------

    async def run(self) -> None:
        """Send due entries whenever woken, and look for due re-sends periodically."""
        # Not `while True`: on Python 3.11 a cancel that lands as a PUBACK arrives is
        # swallowed by asyncio.wait_for inside aiomqtt's publish, and the stop's
        # TaskGroup would then wait for this loop forever.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._resend_after_s, _MAX_IDLE_S)):
                    await self._wake.wait()
            self._wake.clear()
            if self._requeue_due:
                self._requeue_due = False
                await self.requeue()
            link = self._connection.link
            if link is None:
                continue
            try:
                await self.send_due(link)
            except TransportError as exc:
                log.debug("send interrupted: %s", exc)

    async def send_due(self, link: Link) -> None:
        """Publish every due entry and all stored telemetry on ``link``; a full disk
        pauses sending until the next call (what was not sent stays due).

        Raises:
            TransportError: the connection failed (what was not sent stays due).
        """
        async with self._sending:
            try:
                await self._send_due(link)
            except OutboxDiskFullError as exc:
                log.warning("sending paused until the next round: %s", exc)

    async def _send_due(self, link: Link) -> None:
        while True:
            now = self._clock()
            if self.watch.silent(now):
                entries = await asyncio.to_thread(self._probe, now)
            else:
                entries = await asyncio.to_thread(
                    self.outbox.due, now, resend_after_s=self._resend_after_s, limit=_DUE_LIMIT
                )
            telemetry = await asyncio.to_thread(self.outbox.telemetry_due, _TELEMETRY_LIMIT)
            if not entries and not telemetry:
                return
            if entries:
                # Marked before they go: an ack may come back before the last
                # publish returns, and the outbox frees only entries sent. One that
                # then fails to go is due again on the reconnect (requeue_all).
                await asyncio.to_thread(self.outbox.mark_sent, [e.seq for e in entries], now)
                self.watch.sent(now)
            for entry in entries:
                await link.publish(entry.topic, entry.payload, qos=1)
            for item in telemetry:
                await link.publish(item.topic, item.payload, qos=1)
            if telemetry:
                await asyncio.to_thread(self.outbox.telemetry_sent, [t.id for t in telemetry])

    def _probe(self, now: float) -> list[OutboxEntry]:
        """While the controller is silent: the oldest entry alone, when its back-off allows.

        An ack for it ends the silence (a controller that serves although its
        retained state says offline is found this way).
        """
        head = self.outbox.due(
            now,
            resend_after_s=self._resend_after_s,
            limit=1,
            max_resend_s=self._silent_resend_max_s,
        )
        return head if head and head[0].seq == self.outbox.floor() else []
