"""The node's broker connection: connect forever, birth and death, route what arrives.

Invariants:

* one persistent session (the broker keeps subscriptions and queued QoS 1
  messages while the node is away) under the node id, reconnecting forever
  with jittered exponential back-off through the transport seam
  (:mod:`edgefleet_io.transport`); nothing here knows MQTT libraries;
* every connection gets a new session number, saved before connecting: the
  retained birth published once subscribed and the Will registered with the
  connection (the retained death) carry it, so a late Will of an old
  connection can be told apart;
* subscribe first, announce last: a birth means commands can be received; then
  everything unacknowledged in the outbox goes out again;
* received messages wait in a bounded inbox by priority (:func:`node_inbox`,
  see :mod:`edgefleet_io.inbox`): commands and acks first, then artifact
  chunks and inference requests, then everything else, each lane bounded in
  messages and bytes and each topic kind rate-limited (over its rate a
  message goes to the last lane); drops are counted in ``counters``
  (``inbox_dropped_{lane}``), which telemetry reports;
* incoming messages are parsed once at this boundary and handed to the part
  that owns them (:class:`Inbound`); malformed input is counted
  (``counters["malformed"]``), logged at most once a second and dropped, a
  cleared retained command is ignored;
* the retained ``controller/state`` is subscribed to and handed on, so the
  node holds what only a listening controller can take (see
  :mod:`edge_node.presence_core`);
* a clean stop publishes its own death (same session number) before leaving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edge_node.context import Connection, ServingModel, sleep_unless
from edge_node.disk import DiskFullError
from edge_node.sender import OutboxSender
from edge_node.state import StateKeeper
from edgefleet_io.inbox import InboxPolicy, Lane
from edgefleet_io.throttle import LogThrottle
from edgefleet_io.transport import Link, Message, Session, Transport, Will, reconnect_delays
from shared import __version__, topics
from shared.chunks import Frame, decode_frame
from shared.errors import DecodeError, TransportError
from shared.messages import (
    Capabilities,
    ControllerState,
    InferRequest,
    NodeState,
    decode,
    encode,
)

__all__ = ["Inbound", "LinkSettings", "NodeLink", "node_inbox", "sort_node_topic"]

log = logging.getLogger(__name__)

_GOODBYE_S = 2.0  # each of: sending the outbox, publishing the death, on a clean stop


CONTROL, DATA, JUNK = 0, 1, 2  # the node's inbox lanes, by priority


def sort_node_topic(topic: str) -> tuple[int, str | None]:
    """The inbox lane of a topic the node subscribes to, and its rate key.

    Topic levels only, no validation: ``node/{node}/cmd``, ``node/{node}/ack``
    and ``rollout/{rollout}/cmd`` are control, and so is ``controller/state``
    (sending waits on it), artifact chunks and inference requests are data,
    anything else is junk. Keys are topic kinds, so made-up rollout ids or
    digests share one bucket.
    """
    parts = topic.split("/")
    count = len(parts)
    if count == 5 and parts[3] == "controller" and parts[4] == "state":
        return CONTROL, "controller"
    if count < 6:
        return JUNK, None
    section = parts[3]
    if section == "node" and count == 6 and parts[5] in ("cmd", "ack"):
        return CONTROL, parts[5]
    if section == "rollout" and count == 6 and parts[5] == "cmd":
        return CONTROL, "rollout"
    if section == "artifact" and parts[5] == "data" and count in (6, 7):
        return DATA, "chunks"
    if section == "node" and count == 7 and parts[5] == "infer" and parts[6] == "request":
        return DATA, "infer"
    return JUNK, None


def node_inbox(counters: Counter[str]) -> InboxPolicy:
    """The node connection's inbox policy: at most ~22 MiB of payloads held."""
    return InboxPolicy(
        lanes=(
            # Commands are rare and small (a manifest each); acks come per commit.
            Lane(name="control", max_messages=256, max_bytes=4 * 2**20, rate_per_s=20, burst=200),
            # A download keeps a few chunks in flight; inference requests are the workload.
            Lane(
                name="data",
                max_messages=2_000,
                max_bytes=16 * 2**20,
                rate_per_s=2_000,
                burst=10_000,
            ),
            Lane(name="junk", max_messages=256, max_bytes=2 * 2**20),
        ),
        sort=sort_node_topic,
        counters=counters,
    )


@dataclass(frozen=True, slots=True)
class Inbound:
    """Where incoming messages go (each callback runs on the event loop and must not block)."""

    command: Callable[[bytes], None]
    ack: Callable[[bytes], None]
    """A signed ack, as it came: the receiver verifies it before freeing anything."""
    chunk: Callable[[Frame], None]
    """An artifact frame (broadcast chunk or refusal), its digest checked against its topic."""
    infer_request: Callable[[InferRequest], None] | None = None
    controller: Callable[[ControllerState], None] | None = None
    """The retained ``controller/state`` (online or offline), each time it arrives."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    node_id: str
    fleet: str
    labels: dict[str, str]
    data_dir: Path
    keepalive_s: int
    session_expiry_s: int
    reconnect_max_s: float


class NodeLink:
    """Keeps the node connected and routes incoming messages."""

    def __init__(
        self,
        settings: LinkSettings,
        transport: Transport,
        *,
        connection: Connection,
        keeper: StateKeeper,
        serving: ServingModel,
        sender: OutboxSender,
        inbound: Inbound,
        stopping: asyncio.Event,
        clock: Callable[[], float],
        counters: Counter[str],
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._connection = connection
        self._keeper = keeper
        self._serving = serving
        self._sender = sender
        self._inbound = inbound
        self._stopping = stopping
        self._clock = clock
        self._counters = counters
        self._inbox = node_inbox(counters)
        self._malformed_log = LogThrottle(log)

    # ----- the connection loop -------------------------------------------------

    async def run(self) -> None:
        """Connect, serve the connection, and connect again, until stopped."""
        cfg = self._settings
        delays = reconnect_delays(maximum_s=cfg.reconnect_max_s)
        while not self._stopping.is_set():
            session = await self._next_session()
            try:
                async with self._transport.connect(session) as link:
                    await self._on_connect(link)
                    delays = reconnect_delays(maximum_s=cfg.reconnect_max_s)
                    async for message in link.messages():
                        self._dispatch(message)
            except TransportError as exc:
                log.warning("broker connection lost: %s", exc)
            finally:
                self._connection.down()
            await sleep_unless(self._stopping, next(delays))

    async def _next_session(self) -> Session:
        """One session number per connection, shared by its birth and its Will."""
        cfg = self._settings
        try:
            await self._keeper.update(session=self._keeper.state.session + 1)
        except DiskFullError as exc:  # connect anyway: a node that cannot report helps no one
            log.warning(
                "session %d not saved before connecting: %s", self._keeper.state.session, exc
            )
        will = Will(topics.state(cfg.fleet, cfg.node_id), self.state_message(online=False))
        return Session(
            client_id=cfg.node_id,
            will=will,
            persistent=True,
            session_expiry_s=cfg.session_expiry_s,
            keepalive_s=cfg.keepalive_s,
            inbox=self._inbox,
        )

    async def _on_connect(self, link: Link) -> None:
        """Subscribe first and announce last: a birth means commands can be received."""
        cfg = self._settings
        subscriptions = [
            topics.node_cmd(cfg.fleet, cfg.node_id),
            topics.rollout_cmd_filter(cfg.fleet),
            topics.ack(cfg.fleet, cfg.node_id),
            f"{topics.PREFIX}/{cfg.fleet}/artifact/+/data/{cfg.node_id}",
        ]
        if self._inbound.infer_request is not None:
            subscriptions.append(topics.infer_request(cfg.fleet, cfg.node_id))
        if self._inbound.controller is not None:
            subscriptions.append(topics.controller_state(cfg.fleet))
        await link.subscribe([(t, 1) for t in subscriptions])
        await self._sender.requeue()
        await self._publish_state(link, online=True)
        self._connection.up(link)
        self._sender.wake()
        session = self._keeper.state.session
        log.info("connected to %s as %s (session %d)", self._transport, cfg.node_id, session)

    # ----- birth and death -----------------------------------------------------

    def state_message(self, *, online: bool) -> bytes:
        cfg = self._settings
        state = self._keeper.state
        return encode(
            NodeState(
                node=cfg.node_id,
                online=online,
                session=state.session,
                agent_version=__version__,
                model=state.active if self._serving.manifest is not None else None,
                previous_model=state.previous,
                labels=dict(cfg.labels),
                capabilities=self._capabilities() if online else None,
                outbox_floor=self._sender.outbox.floor() if online else None,
                ts=self._clock(),
            )
        )

    def _capabilities(self) -> Capabilities:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return Capabilities(
            providers=tuple(ort.get_available_providers()),
            cpus=os.cpu_count() or 1,
            memory_bytes=max(0, pages * os.sysconf("SC_PAGE_SIZE")),
            disk_free_bytes=shutil.disk_usage(self._settings.data_dir).free,
        )

    async def _publish_state(self, link: Link, *, online: bool) -> None:
        """Publish birth (online) or a clean death, retained, QoS 1."""
        topic = topics.state(self._settings.fleet, self._settings.node_id)
        await link.publish(topic, self.state_message(online=online), qos=1, retain=True)

    async def announce(self) -> None:
        """Re-publish the birth so watchers see the newly active model (best effort)."""
        link = self._connection.link
        if link is not None:
            try:
                await self._publish_state(link, online=True)
            except TransportError as exc:
                log.debug("birth not re-published: %s", exc)

    async def goodbye(self) -> None:
        """On a clean stop: send what the outbox holds, then publish the death."""
        link = self._connection.link
        if link is None:
            return
        try:
            async with asyncio.timeout(_GOODBYE_S):
                await self._sender.send_due(link)
        except (TimeoutError, TransportError) as exc:
            log.warning("outbox not fully sent before stopping (kept on disk): %r", exc)
        # Its own budget: a backlog that used up the first must not cost the
        # death (a clean disconnect sends no Will, so the node would stay online).
        try:
            async with asyncio.timeout(_GOODBYE_S):
                await self._publish_state(link, online=False)
        except (TimeoutError, TransportError) as exc:
            log.warning("could not say goodbye to the broker: %s", exc)

    # ----- incoming ------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        """Route one incoming message; malformed input is logged and dropped."""
        if not message.payload:
            return  # a cleared retained command
        try:
            self._route(topics.parse_topic(message.topic), message.payload)
        except DecodeError as exc:
            self._counters["malformed"] += 1
            self._malformed_log.warning("dropping malformed message on %s: %s", message.topic, exc)

    def _route(self, parsed: topics.ParsedTopic, data: bytes) -> None:
        """Raises: DecodeError for a malformed payload."""
        inbound = self._inbound
        kind = parsed.kind
        if kind in (topics.TopicKind.NODE_CMD, topics.TopicKind.ROLLOUT_CMD):
            inbound.command(data)
        elif kind is topics.TopicKind.ACK:
            inbound.ack(data)
        elif kind in (topics.TopicKind.ARTIFACT_BROADCAST, topics.TopicKind.ARTIFACT_DATA):
            frame = decode_frame(data)
            if frame.sha256 != parsed.sha256:
                raise DecodeError(f"frame of blob {frame.sha256[:12]} on another blob's topic")
            inbound.chunk(frame)
        elif kind is topics.TopicKind.INFER_REQUEST and inbound.infer_request is not None:
            inbound.infer_request(decode(InferRequest, data))
        elif kind is topics.TopicKind.CONTROLLER_STATE and inbound.controller is not None:
            inbound.controller(decode(ControllerState, data))
