"""The controller's one broker connection, over the transport seam.

What it keeps:

* **One session at a time**, reconnecting with
  :func:`~edgefleet_io.transport.reconnect_delays` back-off; clean sessions,
  since shared consumers must not have messages queued for them while away.
* **A retained ``controller/state``**, the fleet's controller service:
  ``online`` on every connect, with an ``offline`` Last Will for a connection
  that dies, and an explicit ``offline`` on a clean stop
  (:meth:`ControllerLink.announce_offline`). Every replica reads it, and one
  that is up answers an ``offline`` (another replica's Will or stop) by
  publishing ``online`` again, so it reads offline only while no replica is
  up; the leader publishes it when it takes the lease, so it normally names
  the leader. Each connect counts a new ``session``, as nodes' births do. It
  names the store (``store_id``): before joining,
  :meth:`ControllerLink.read_peer` reads what is retained there and
  :func:`check_peer` refuses a live controller of another store, which would
  split the fleet's records between two databases.
* **A retained ``controller/state/{controller_id}``** per replica: online on
  connect and whenever its leadership changes (``leader``, ``term``), offline
  on a clean stop; for a replica that died, the replica that sees its Will
  retains it there too.
* **Subscriptions**: node statuses, results and telemetry and artifact chunk
  requests on shared subscriptions (``$share/controllers/...``) so replicas
  split them; node states without ``$share`` (every replica needs every birth
  and death). With ``shared`` off (an MQTT 3.1.1 broker, which has no shared
  subscriptions) every filter is plain: one controller per fleet. Operator
  requests (shared as well) come on a second, clean
  connection of their own (client id ``{controller_id}-ctl``, no Will), so
  that under a flood they do not queue at the broker behind ingest; all the
  controller publishes (acks, commands, chunks, replies) goes out on it too,
  since a QoS 1 publish waits for a PUBACK that would otherwise queue there.
* **A bounded, prioritised inbox** (:func:`controller_inbox`, see
  :mod:`edgefleet_io.inbox`): operator requests and node births and deaths
  first, then what nodes send for storing (statuses, results, telemetry,
  chunk requests), then everything else (unknown topics, and what a node or
  the operator topic sends over its rate: ``node_messages_per_s`` per node,
  ``control_per_s`` per node or for ``ctl/request``). Each lane is bounded in
  messages and bytes; a full one drops its oldest, counted in
  ``metrics["inbox_dropped_{lane}"]`` (over-rate demotions in
  ``metrics["inbox_over_rate_{lane}"]``). A flood costs bounded memory, and
  an operator request waits behind other operator requests only. What is
  dropped is safe to drop: nodes send statuses and results again until they
  are acked, and an operator whose request is dropped sees it time out.
* **Routing**: each message is decoded strictly, once (:func:`decode_incoming`,
  which also applies :func:`shared.rules.require_topic_node`), and handed to
  one of :class:`Routes`. Result batches, the bulk of the traffic, are not
  decoded on the event loop: they go on as :class:`RawResults`, decoded by the
  ingest writer's thread (:func:`open_results`), once their canonical
  beginning (version, type and the topic's node) is seen to be there. A
  malformed message is counted (``metrics["malformed"]``), logged with its topic
  (at most one line a second, :class:`~edgefleet_io.throttle.LogThrottle`)
  and dropped; a route that raises is logged with a traceback and counted,
  and the connection carries on.

Nothing here imports an MQTT library: a :class:`~edgefleet_io.transport.Transport`
is injected (:class:`~edgefleet_io.mqtt.MqttTransport` in production,
:class:`~edgefleet_io.memory.MemoryTransport` in tests), and every broker
failure arrives as a :class:`~shared.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet_io.inbox import InboxPolicy, Lane
from edgefleet_io.throttle import LogThrottle
from edgefleet_io.transport import Link, Message, Session, Transport, Will, reconnect_delays
from shared import __version__, topics
from shared.envelope import Envelope
from shared.errors import BrokerUnavailableError, DecodeError, TransportError, UsageError
from shared.messages import (
    ArtifactRequest,
    ControllerState,
    NodeState,
    NodeStatus,
    Telemetry,
    decode,
    encode,
)
from shared.result_batch import (
    MAX_BATCH_BYTES,
    RESULT_BATCH_VERSION,
    ResultBatch,
    decode_results,
)
from shared.rules import require_topic_node

__all__ = [
    "MAX_RECONNECT_DELAY_S",
    "PEER_WAIT_S",
    "ControllerLink",
    "InboxLimits",
    "Incoming",
    "Ingested",
    "RawResults",
    "Routes",
    "StoreConflictError",
    "check_peer",
    "controller_inbox",
    "decode_incoming",
    "open_results",
    "sort_controller_topic",
]

log = logging.getLogger(__name__)

MAX_RECONNECT_DELAY_S = 10.0
OFFLINE_PUBLISH_TIMEOUT_S = 2.0
PEER_WAIT_S = 2.0  # the longest wait for the retained controller/state at start
_SLICE = 64  # messages routed between two yields to the event loop


class StoreConflictError(UsageError):
    """A live controller of the same fleet works on another database."""


def check_peer(peer: ControllerState | None, *, store_id: str) -> None:
    """Whether a controller on ``store_id`` may join next to ``peer`` (the retained state).

    Nothing retained, an offline controller, one that names no store (an older
    version) and one on the same store (a replica) are fine.

    Raises:
        StoreConflictError: ``peer`` is online and names another store.
    """
    if peer is None or not peer.online or not peer.store_id or peer.store_id == store_id:
        return
    raise StoreConflictError(
        f"controller {peer.controller_id} is live on this fleet with store {peer.store_id}, "
        f"this one has store {store_id}: give --db the database it uses (replicas share "
        "one PostgreSQL database) or serve another --fleet"
    )


@dataclass(frozen=True, slots=True)
class RawResults:
    """A result batch as it arrived on ``node/{node}/results``, not decoded yet."""

    node: str
    payload: bytes


def open_results(raw: RawResults) -> ResultBatch:
    """Decode a :class:`RawResults` strictly (off the event loop: it is the bulk).

    Raises:
        DecodeError: the payload is malformed or names another node than its topic.
    """
    batch = decode_results(raw.payload)
    require_topic_node(raw.node, batch.node)
    return batch


Ingested = NodeStatus | RawResults | Telemetry | NodeState
"""What nodes send that the controller stores (and acks, for statuses and results)."""

Incoming = Ingested | ArtifactRequest | Envelope
"""An operator request arrives as the DSSE envelope its operator signed."""

_MODELS: dict[topics.TopicKind, type[NodeStatus | Telemetry | NodeState | ArtifactRequest]] = {
    topics.TopicKind.STATUS: NodeStatus,
    topics.TopicKind.TELEMETRY: Telemetry,
    topics.TopicKind.STATE: NodeState,
    topics.TopicKind.ARTIFACT_REQUEST: ArtifactRequest,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxLimits:
    """Bounds of the controller's inbox lanes (messages, payload bytes) and rates.

    Each connection has its own inbox: with the defaults the ingest one holds
    at most ~44 MiB of payloads, the operator one (control and junk lanes
    only) ~12 MiB. What a node sends is handed on quickly (result batches are
    decoded later, by the ingest writer), so the lanes only fill under a flood.
    """

    control_messages: int = 1_000
    control_bytes: int = 4 * 2**20
    control_per_s: float = 50.0  # per node (births, deaths) and for ctl/request
    control_burst: float = 500.0
    ingest_messages: int = 20_000
    ingest_bytes: int = 32 * 2**20
    # Per node: statuses, results, telemetry and chunk requests (a download asks
    # for up to 64 chunks a second); the burst covers an outbox flushing after an
    # outage. Beyond it a node's messages wait behind every other node's.
    node_messages_per_s: float = 100.0
    node_burst: float = 500.0
    junk_messages: int = 2_000
    junk_bytes: int = 8 * 2**20


CONTROL, INGEST, JUNK = 0, 1, 2  # the controller's inbox lanes, by priority
_INGEST_LEAVES = frozenset({"status", "results", "telemetry"})


def sort_controller_topic(topic: str) -> tuple[int, str | None]:
    """The inbox lane of a topic the controller subscribes to, and its rate key.

    Topic levels only, no validation (decoding checks every identifier later):
    ``ctl/request``, ``controller/state`` (the service's state, which a replica
    answers when it says offline) and ``node/{node}/state`` are control,
    ``node/{node}/status``, ``results``, ``telemetry`` and
    ``artifact/{sha}/req/{node}`` are ingest (keyed by node), anything else is
    junk.
    """
    parts = topic.split("/")
    if len(parts) == 5 and parts[3] == "ctl" and parts[4] == "request":
        return CONTROL, "ctl/request"
    if len(parts) == 5 and parts[3] == "controller" and parts[4] == "state":
        return CONTROL, "controller"
    if len(parts) == 6 and parts[3] == "node":
        if parts[5] == "state":
            return CONTROL, parts[4]
        if parts[5] in _INGEST_LEAVES:
            return INGEST, parts[4]
    if len(parts) == 7 and parts[3] == "artifact" and parts[5] == "req":
        return INGEST, parts[6]
    return JUNK, None


def controller_inbox(limits: InboxLimits, counters: Counter[str]) -> InboxPolicy:
    """The controller connection's inbox policy (see the module docstring)."""
    return InboxPolicy(
        lanes=(
            Lane(
                name="control",
                max_messages=limits.control_messages,
                max_bytes=limits.control_bytes,
                rate_per_s=limits.control_per_s,
                burst=limits.control_burst,
            ),
            Lane(
                name="ingest",
                max_messages=limits.ingest_messages,
                max_bytes=limits.ingest_bytes,
                rate_per_s=limits.node_messages_per_s,
                burst=limits.node_burst,
            ),
            Lane(name="junk", max_messages=limits.junk_messages, max_bytes=limits.junk_bytes),
        ),
        sort=sort_controller_topic,
        counters=counters,
    )


def _results_prefix(node: str) -> bytes:
    """How a canonical result batch of ``node`` begins (node ids need no escaping)."""
    return b'{"v":%d,"type":"results","node":"%s"' % (RESULT_BATCH_VERSION, node.encode())


def decode_incoming(topic: str, data: bytes) -> Incoming | None:
    """The message on ``topic``, decoded (None: a topic the controller does not read).

    Raises:
        DecodeError: the topic or payload is malformed, or the payload names
            another node (or blob) than its topic.
    """
    parsed = topics.parse_topic(topic)
    if parsed.kind is topics.TopicKind.CTL_REQUEST:
        return Envelope.from_bytes(data)
    if parsed.kind is topics.TopicKind.RESULTS and parsed.node is not None:
        if len(data) > MAX_BATCH_BYTES:
            raise DecodeError(
                f"payload of {len(data)} bytes exceeds the {MAX_BATCH_BYTES}-byte limit"
            )
        # Junk must not wait for the writer's thread (and hold memory) to be refused.
        if not data.startswith(_results_prefix(parsed.node)):
            raise DecodeError(f"not a canonical result batch of node {parsed.node}")
        return RawResults(parsed.node, data)
    model = _MODELS.get(parsed.kind)
    if model is None:
        return None
    item = decode(model, data)
    require_topic_node(parsed.node, item.node)
    if isinstance(item, ArtifactRequest) and item.sha256 != parsed.sha256:
        raise DecodeError(f"request names blob {item.sha256[:12]}, topic {parsed.sha256}")
    return item


@dataclass(frozen=True, slots=True)
class Routes:
    """Where decoded messages go. Each is called on the event loop and must not block."""

    ingest: Callable[[Ingested, int], None]
    """A node's message and its size on the wire (for the node's quota)."""
    artifact: Callable[[ArtifactRequest], None]
    operator: Callable[[Envelope], None]


class ControllerLink:
    """The connection loop (:meth:`run`) and publishing (:meth:`publish`) for the service."""

    def __init__(
        self,
        transport: Transport,
        *,
        fleet: str,
        controller_id: str,
        store_id: str,
        clock: Callable[[], float],
        metrics: Counter[str],
        shared: bool = True,
        inbox: InboxLimits | None = None,
    ) -> None:
        self._transport = transport
        self._shared = shared
        self._fleet = fleet
        self._controller_id = controller_id
        self._store_id = store_id
        self._clock = clock
        self._metrics = metrics
        self._inbox = controller_inbox(inbox or InboxLimits(), metrics)
        self._malformed_log = LogThrottle(log)
        self._link: Link | None = None
        self._control: Link | None = None  # operator requests in, everything published out
        self.session = 0
        self.term = 0  # the rollout lease's term this replica holds (0: not leading)
        self._leaving = False  # announced offline: no more online states
        self.connected = asyncio.Event()

    def _state(self, *, online: bool) -> bytes:
        return encode(
            ControllerState(
                controller_id=self._controller_id,
                online=online,
                session=self.session,
                version=__version__,
                store_id=self._store_id,
                leader=self.term > 0,
                term=self.term,
                ts=self._clock(),
            )
        )

    async def set_term(self, term: int) -> None:
        """Leadership changed (``term`` 0: not leading): say so on this replica's
        state, and on the fleet's when leading. Published at the next connect if
        the broker is away now."""
        self.term = term
        if self._leaving:
            return
        with contextlib.suppress(TransportError):
            online = self._state(online=True)
            await self.publish(self._replica_topic, online, retain=True)
            if term:
                await self.publish(topics.controller_state(self._fleet), online, retain=True)

    @property
    def _replica_topic(self) -> str:
        return topics.controller_replica_state(self._fleet, self._controller_id)

    def _filters(self) -> list[tuple[str, int]]:
        fleet = self._fleet
        share = topics.shared_subscription if self._shared else str
        return [
            (share(topics.node_filter(fleet, "status")), 1),
            (share(topics.node_filter(fleet, "results")), 1),
            (share(topics.node_filter(fleet, "telemetry")), 1),
            (share(f"{topics.PREFIX}/{fleet}/artifact/+/req/+"), 1),
            (topics.node_filter(fleet, "state"), 1),
            (topics.controller_state(fleet), 1),
        ]

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Raises: TransportError (also while not connected).

        Everything goes out on the operator connection (see :meth:`_serve`): a
        QoS 1 publish waits for its PUBACK, which the broker sends on the same
        stream as everything else it delivers to that connection, and on the
        ingest connection that is behind whatever a flood put there. Acks,
        commands, chunks and replies must not wait for it.
        """
        link = self._control
        if link is None:
            raise BrokerUnavailableError("not connected to the broker; try again")
        await link.publish(topic, payload, qos=qos, retain=retain)

    async def announce_offline(self) -> None:
        """Replace this replica's and the fleet's retained states with ``offline`` (a
        clean stop; another replica still up publishes the fleet's online again)."""
        self._leaving = True
        offline = self._state(online=False)
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(OFFLINE_PUBLISH_TIMEOUT_S):
                await self.publish(self._replica_topic, offline, retain=True)
                await self.publish(topics.controller_state(self._fleet), offline, retain=True)

    async def read_peer(self, wait_s: float = PEER_WAIT_S) -> ControllerState | None:
        """The controller state retained for this fleet (None: nothing, or unreadable).

        One connection without a Will, which publishes nothing others read: it
        subscribes to ``controller/state`` and to its own reply topic, then
        sends itself a marker there. The broker hands out retained messages on
        subscribe, before the marker, so the marker arriving first means there
        is nothing retained; ``wait_s`` bounds the wait either way.

        Raises: TransportError (the broker cannot be reached).
        """
        state_topic = topics.controller_state(self._fleet)
        marker_topic = topics.ctl_reply(self._fleet, self._controller_id)
        async with self._transport.connect(Session(client_id=self._controller_id)) as link:
            await link.subscribe([(state_topic, 1), (marker_topic, 1)])
            await link.publish(marker_topic, b"{}", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    async for message in link.messages():
                        if message.topic == marker_topic:
                            return None
                        if message.topic == state_topic and message.payload:
                            return _peer_state(message.payload)
        return None

    async def run(self, routes: Routes, stopping: asyncio.Event) -> None:
        """Stay connected until ``stopping`` is set, handing every message to ``routes``."""
        delays = reconnect_delays(maximum_s=MAX_RECONNECT_DELAY_S)
        while not stopping.is_set():
            self.session += 1
            try:
                await self._serve(routes)
            except TransportError as exc:
                log.warning("broker connection lost: %s", exc)
            except Exception:
                log.exception("broker connection failed unexpectedly; reconnecting")
                self._metrics["link_errors"] += 1
            finally:
                if self.connected.is_set():  # it was up: back off from the start again
                    delays = reconnect_delays(maximum_s=MAX_RECONNECT_DELAY_S)
                self._link = self._control = None
                self.connected.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next(delays)):
                    await stopping.wait()

    async def _serve(self, routes: Routes) -> None:
        """Both connections, until the broker ends one of them. Raises: TransportError.

        Operator requests come on a connection of their own: the broker queues
        what it delivers per connection, in order, so on the connection that
        carries ingest a request would wait behind every message a flood put
        there before it. On its own (clean, no Will, client id
        ``{controller_id}-ctl``, ``$share`` like the rest) it waits only behind
        other requests. The two live and die together.
        """
        state_topic = topics.controller_state(self._fleet)
        session = Session(
            client_id=self._controller_id,
            will=Will(state_topic, self._state(online=False), qos=1, retain=True),
            inbox=self._inbox,
        )
        control_session = Session(client_id=f"{self._controller_id}-ctl", inbox=self._inbox)
        share = topics.shared_subscription if self._shared else str
        requests = share(topics.ctl_request(self._fleet))
        async with (
            self._transport.connect(session) as link,
            self._transport.connect(control_session) as control,
        ):
            # Subscribed before announcing: nodes send their held requests and
            # backlog the moment they see "online", into the shared group.
            await link.subscribe(self._filters())
            await control.subscribe([(requests, 1)])
            online = self._state(online=True)
            await link.publish(state_topic, online, qos=1, retain=True)
            await link.publish(self._replica_topic, online, qos=1, retain=True)
            self._link, self._control = link, control
            self.connected.set()
            log.info(
                "controller %s serving fleet %s on %s",
                self._controller_id,
                self._fleet,
                self._transport,
            )
            loop = asyncio.get_running_loop()
            readers = [loop.create_task(self._read(c, routes)) for c in (link, control)]
            try:
                done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            for reader in done:
                reader.result()  # raises what ended it
            raise BrokerUnavailableError(f"connection to {self._transport} ended")

    async def _read(self, link: Link, routes: Routes) -> None:
        """Route what ``link`` receives until it fails. Raises: TransportError."""
        routed = 0
        state_topic = topics.controller_state(self._fleet)
        async for message in link.messages():
            if message.topic == state_topic:
                await self._answer_offline(message.payload)
            else:
                self.route(message, routes)
            routed += 1
            if routed % _SLICE == 0:
                # A full inbox is read without suspending: let the other
                # connection and the other loops run between slices.
                await asyncio.sleep(0)

    async def _answer_offline(self, payload: bytes) -> None:
        """The fleet's state went ``offline`` while this replica is up: publish
        ``online`` again, and retain the offline on the replica's own topic
        when another replica left. Raises: TransportError."""
        if not payload or self._leaving:
            return
        try:
            state = decode(ControllerState, payload)
        except DecodeError as exc:
            self._metrics["malformed"] += 1
            log.warning("malformed controller state retained for the fleet: %s", exc)
            state = None
        if state is not None and state.online:
            return
        if state is not None and state.controller_id != self._controller_id:
            log.info("controller %s went offline; this replica serves on", state.controller_id)
            replica = topics.controller_replica_state(self._fleet, state.controller_id)
            await self.publish(replica, payload, retain=True)
        state_topic = topics.controller_state(self._fleet)
        await self.publish(state_topic, self._state(online=True), retain=True)

    def route(self, message: Message, routes: Routes) -> None:
        """Decode one message and hand it on; never raises."""
        if not message.payload:
            return  # a cleared retained topic
        try:
            item = decode_incoming(message.topic, message.payload)
        except DecodeError as exc:
            self._metrics["malformed"] += 1
            self._malformed_log.warning("dropping malformed message on %s: %s", message.topic, exc)
            return
        try:
            if isinstance(item, ArtifactRequest):
                routes.artifact(item)
            elif isinstance(item, Envelope):
                routes.operator(item)
            elif item is not None:
                routes.ingest(item, len(message.payload))
        except Exception:
            self._metrics["route_errors"] += 1
            log.exception("handling the message on %s failed", message.topic)


def _peer_state(payload: bytes) -> ControllerState | None:
    try:
        return decode(ControllerState, payload)
    except DecodeError as exc:
        log.warning("ignoring a malformed retained controller state: %s", exc)
        return None
