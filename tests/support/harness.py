"""The controller's side of the wire, for node tests, over either broker.

A :class:`Harness` holds real keys, a real blob store and one connection
through the transport seam (reconnecting when the test restarts the broker):
to a real Mosquitto when given its URL (:class:`~edgefleet_io.mqtt.MqttTransport`),
or to an in-process :class:`~edgefleet_io.memory.MemoryBroker`. It registers
ONNX files as signed manifests, signs and publishes commands, serves chunk
requests with the controller's own broadcaster
(:class:`~fleet_controller.artifacts.Artifacts`, every node allowed, chunks of
``chunk_bytes``), records every status, result and state, and acknowledges outbox
slots with the protocol's own rule, :class:`shared.rules.SlotLedger`: each slot
is stored once, and the ack names the highest contiguous slot stored (a birth's
``outbox_floor`` settles everything below it). Switches let a test pause chunk
serving, corrupt chunks or stop acknowledging.

``acking`` off means acks are lost, not that nothing is stored: slots keep
being stored, and once acking is back the next new slot, or the next re-send
of a stored one, brings the ack, exactly as with the controller.

Pausing (``serving`` cleared, or ``pause_after_chunks`` reached) holds back
the broadcast only: the chunk about to be published waits, requests that
arrive meanwhile are still recorded in ``chunk_requests`` and scheduled, and
statuses, results and states keep being recorded and acknowledged. The held
chunk goes out on whatever connection is current when serving resumes (none:
that broadcast ends, and the nodes ask again).

Run a node against the harness's broker with :func:`start_node` (or
``RunningNode(node_config(harness, ...), transport=harness.transport)``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_node.agent import AgentConfig, NodeAgent
from edgefleet_io.memory import MemoryBroker
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Link, Message, Session, Transport, reconnect_delays
from fleet_controller.artifacts import Artifacts
from fleet_controller.blobs import BlobStore
from fleet_controller.registry import describe_model, sign_manifest
from fleet_controller.signing import sign_command
from shared import topics
from shared.acks import sign_ack
from shared.broker import parse_broker_url
from shared.chunks import HEADER_BYTES
from shared.envelope import Envelope, SigningKey
from shared.errors import BrokerUnavailableError, TransportError
from shared.messages import (
    Ack,
    ArtifactRequest,
    DeployAction,
    DType,
    InferenceResult,
    ModelManifest,
    ModelRef,
    NodeState,
    NodeStatus,
    NodeTarget,
    RollbackAction,
    TensorData,
    TopK,
    WaveTarget,
    decode,
)
from shared.result_batch import ResultBatch, ResultView, decode_results, rows_of
from shared.rules import SlotLedger
from shared.trust import Role, TrustList, sign_trust_list

DEFAULT_TIMEOUT_S = 60.0


class _Anyone(frozenset[str]):
    """The harness lets every node fetch every blob."""

    def __contains__(self, item: object) -> bool:
        return True


_EVERYONE = _Anyone()
MEMORY_URL = "mqtt://memory.invalid:1883"
"""What a node's config names as its broker when it runs on a MemoryBroker (never dialled)."""


class _HarnessPublisher:
    """What the broadcaster needs of the controller's link: ``publish``, via the harness."""

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await self._harness.publish_chunk(topic, payload)


@dataclass
class Registered:
    path: Path
    manifest: ModelManifest
    envelope: Envelope


@dataclass
class Harness:
    broker: str | MemoryBroker
    """A Mosquitto URL, or an in-process broker."""
    fleet: str
    workdir: Path
    root: SigningKey = field(default_factory=SigningKey.generate)
    release: SigningKey = field(default_factory=SigningKey.generate)
    rollout: SigningKey = field(default_factory=SigningKey.generate)
    acking: bool = True
    corrupt_chunks: bool = False
    pause_after_chunks: int | None = None
    """Clear ``serving`` once this many chunks have been broadcast (then reset to None)."""
    chunks_answered: int = 0
    """Chunks broadcast (refusals not counted)."""
    chunk_bytes: int = 16 * 1024
    gather_s: float = 0.05
    """How long the broadcaster waits for more nodes to ask before it starts."""
    statuses: list[NodeStatus] = field(default_factory=list)
    results: dict[str, dict[int, InferenceResult]] = field(default_factory=dict)
    result_order: dict[str, list[int]] = field(default_factory=dict)
    slots_seen: dict[str, list[int]] = field(default_factory=dict)
    states: list[NodeState] = field(default_factory=list)
    chunk_requests: list[ArtifactRequest] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)
    """The last ack published per node."""
    commands: dict[str, Envelope] = field(default_factory=dict)
    """Every command envelope published by the helpers below, by command id."""

    def __post_init__(self) -> None:
        self.transport: Transport = (
            self.broker.transport()
            if isinstance(self.broker, MemoryBroker)
            else MqttTransport(parse_broker_url(self.broker))
        )
        self.blobs = BlobStore(self.workdir / "blobs")
        self.trust_file = self.workdir / "trust.json"
        trust = TrustList.build(
            version=1,
            expires_at=time.time() + 86_400,
            roles={
                Role.ROOT: [self.root],
                Role.RELEASE: [self.release],
                Role.ROLLOUT: [self.rollout],
            },
        )
        self.trust_file.write_bytes(sign_trust_list(trust, [self.root]).to_bytes())
        self.serving = asyncio.Event()
        self.serving.set()
        self.artifacts = Artifacts(
            self.blobs,
            _HarnessPublisher(self),  # type: ignore[arg-type]
            fleet=self.fleet,
            metrics=Counter(),
            fetchers=lambda _sha: _EVERYONE,
            clock=time.time,
            chunk_bytes=self.chunk_bytes,
            gather_quiet_s=self.gather_s,
            gather_max_s=4 * self.gather_s,
        )
        self._changed = asyncio.Condition()
        self._ledgers: dict[str, tuple[int, set[int]]] = {}  # node -> (stored mark, held)
        self._seq = 0
        self._link: Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._held: set[asyncio.Task[None]] = set()

    @property
    def broker_url(self) -> str:
        """The URL a node (or ``edge-node run``) is configured with."""
        return MEMORY_URL if isinstance(self.broker, MemoryBroker) else self.broker

    # ----- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Harness:
        self._task = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(20):
            await self._connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        tasks = [*self._held, self._task]
        # Cancel until they end: on Python 3.11, asyncio.wait_for inside aiomqtt's
        # publish swallows a cancel that lands as the PUBACK arrives.
        while not all(task.done() for task in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        base = f"{topics.PREFIX}/{self.fleet}"
        delays = reconnect_delays(initial_s=0.1, maximum_s=0.5)
        while True:
            try:
                async with self.transport.connect(
                    Session(client_id=f"harness-{self.fleet}")
                ) as link:
                    await link.subscribe(
                        [
                            (f"{base}/node/+/status", 1),
                            (f"{base}/node/+/results", 1),
                            (f"{base}/node/+/state", 1),
                            (f"{base}/artifact/+/req/+", 1),
                        ]
                    )
                    self._link = link
                    self._connected.set()
                    delays = reconnect_delays(initial_s=0.1, maximum_s=0.5)
                    async for message in link.messages():
                        await self._handle(link, message)
            except TransportError:
                pass
            finally:
                self._link = None
                self._connected.clear()
            await asyncio.sleep(next(delays))  # reconnect back-off (not a wait: polls no state)

    async def _handle(self, link: Link, message: Message) -> None:
        parsed = topics.parse_topic(message.topic)
        node = parsed.node
        assert node is not None
        if parsed.kind is topics.TopicKind.ARTIFACT_REQUEST:
            await self._on_chunk_request(link, node, decode(ArtifactRequest, message.payload))
        elif parsed.kind is topics.TopicKind.STATUS:
            status = decode(NodeStatus, message.payload)
            ledger = self._ledger(node)
            if ledger.offer(status.seq):  # stored once, as the controller does
                self.statuses.append(status)
            await self._settle(link, node, ledger)
        elif parsed.kind is topics.TopicKind.RESULTS:
            await self._on_results(link, node, decode_results(message.payload))
        elif parsed.kind is topics.TopicKind.STATE and message.payload:
            state = decode(NodeState, message.payload)
            self.states.append(state)
            if state.online and state.outbox_floor is not None:
                ledger = self._ledger(node)
                ledger.settle_floor(state.outbox_floor)
                await self._settle(link, node, ledger)
        async with self._changed:
            self._changed.notify_all()

    async def _on_chunk_request(self, link: Link, node: str, request: ArtifactRequest) -> None:
        self.chunk_requests.append(request)
        task = asyncio.get_running_loop().create_task(self.artifacts.serve_chunk(request))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _on_results(self, link: Link, node: str, batch: ResultBatch) -> None:
        self.slots_seen.setdefault(node, []).append(batch.seq)
        ledger = self._ledger(node)
        if ledger.offer(batch.seq):
            stored = self.results.setdefault(node, {})
            for result in rows_of(batch):
                if result.seq not in stored:
                    self.result_order.setdefault(node, []).append(result.seq)
                stored[result.seq] = as_result(result)
        await self._settle(link, node, ledger)

    async def publish_chunk(self, topic: str, payload: bytes) -> None:
        """Publish one frame of the broadcaster, through the pause and corruption switches."""
        if len(payload) > HEADER_BYTES and topics.parse_topic(topic).node is None:
            await self.serving.wait()
            if self.corrupt_chunks:
                raw = bytearray(payload)
                raw[HEADER_BYTES + (len(raw) - HEADER_BYTES) // 2] ^= 0xFF
                payload = bytes(raw)
            self.chunks_answered += 1
            pause_at = self.pause_after_chunks
            if pause_at is not None and self.chunks_answered >= pause_at:
                self.pause_after_chunks = None
                self.serving.clear()
        link = self._link
        if link is None:
            raise BrokerUnavailableError("the harness is not connected")
        await link.publish(topic, payload, qos=1)

    # ----- acknowledging: the protocol's own rule ----------------------------

    def _ledger(self, node: str) -> SlotLedger:
        mark, held = self._ledgers.get(node, (0, set()))
        return SlotLedger(mark, held)

    async def _settle(self, link: Link, node: str, ledger: SlotLedger) -> None:
        """Keep what the ledger stored and publish the ack it calls for (unless acks are off)."""
        ledger.advance()
        self._ledgers[node] = (ledger.acked, set(ledger.held))
        due = ledger.ack_due()
        if due is not None and self.acking:
            self.acked[node] = due
            ack = Ack(node=node, seq=due, ts=time.time())
            await link.publish(topics.ack(self.fleet, node), sign_ack(ack, self.rollout), qos=1)

    # ----- models and commands ------------------------------------------------

    def register(self, path: Path, name: str, version: str, **extra: Any) -> Registered:
        manifest = describe_model(path, name=name, version=version, now=time.time(), **extra)
        self.blobs.add_file(path)
        return Registered(path, manifest, sign_manifest(manifest, self.release))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def publish_command(
        self, topic: str, envelope: Envelope, *, retain: bool = False
    ) -> None:
        await self.publish(topic, envelope.to_bytes(), retain=retain)

    async def publish(self, topic: str, data: bytes, *, retain: bool = False) -> None:
        """Publish ``data`` as it is, as the controller (or the broker) could."""
        async with asyncio.timeout(20):
            await self._connected.wait()
        assert self._link is not None
        await self._link.publish(topic, data, qos=1, retain=retain)

    async def deploy(
        self, node: str, model: Registered, *, rollout_id: str = "r1", url: str | None = None
    ) -> str:
        command, envelope = sign_command(
            self.rollout,
            fleet=self.fleet,
            seq=self.next_seq(),
            target=NodeTarget(node=node),
            body=DeployAction(manifest=model.envelope, url=url),
            now=time.time(),
            rollout_id=rollout_id,
        )
        self.commands[command.command_id] = envelope
        await self.publish_command(topics.node_cmd(self.fleet, node), envelope)
        return command.command_id

    async def rollback(self, node: str, model: Registered, *, rollout_id: str = "rb") -> str:
        command, envelope = sign_command(
            self.rollout,
            fleet=self.fleet,
            seq=self.next_seq(),
            target=NodeTarget(node=node),
            body=RollbackAction(manifest=model.envelope, reason="test"),
            now=time.time(),
            rollout_id=rollout_id,
        )
        self.commands[command.command_id] = envelope
        await self.publish_command(topics.node_cmd(self.fleet, node), envelope)
        return command.command_id

    async def broadcast(
        self, model: Registered, *, rollout_id: str, bucket_limit: int = 10_000, wave: int = 0
    ) -> str:
        command, envelope = sign_command(
            self.rollout,
            fleet=self.fleet,
            seq=self.next_seq(),
            target=WaveTarget(bucket_limit=bucket_limit, wave=wave),
            body=DeployAction(manifest=model.envelope),
            now=time.time(),
            rollout_id=rollout_id,
        )
        self.commands[command.command_id] = envelope
        await self.publish_command(
            topics.rollout_cmd(self.fleet, rollout_id), envelope, retain=True
        )
        return command.command_id

    # ----- waiting ------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[], bool], *, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = ""
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking whenever a message arrives."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._changed:
                    await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or predicate}") from None

    def states_of(self, command_id: str) -> list[str]:
        return [s.state.value for s in self.statuses if s.command_id == command_id]

    def final_state(self, command_id: str) -> str | None:
        states = self.states_of(command_id)
        return states[-1] if states else None

    async def wait_state(
        self, command_id: str, state: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        await self.wait_for(
            lambda: state in self.states_of(command_id),
            timeout_s=timeout_s,
            what=f"{command_id} to reach {state} (seen {self.states_of(command_id)})",
        )


def node_config(harness: Harness, node_id: str, data: Path, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "node_id": node_id,
        "data_dir": data,
        "trust_file": harness.trust_file,
        "broker": parse_broker_url(harness.broker_url),
        "fleet": harness.fleet,
        "source": "none",
        "telemetry_interval_s": 1.0,
        "batch_interval_s": 0.1,
        "resend_after_s": 2.0,
        "reconnect_max_s": 1.0,
    }
    settings.update(overrides)
    return AgentConfig(**settings)


def start_node(harness: Harness, node_id: str, data: Path, **overrides: Any) -> RunningNode:
    """A node on the harness's broker (``async with start_node(...) as node``)."""
    return RunningNode(
        node_config(harness, node_id, data, **overrides), transport=harness.transport
    )


class RunningNode:
    """A :class:`NodeAgent` running as a task of the test's event loop.

    ``transport``: the harness's (``harness.transport``) for a node on its
    broker; ``None`` dials ``config.broker`` (a real Mosquitto).
    """

    def __init__(self, config: AgentConfig, *, transport: Transport | None = None) -> None:
        self.agent = NodeAgent(config, transport=transport)
        self.task = asyncio.get_running_loop().create_task(self.agent.run())

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.agent.stop()
        async with asyncio.timeout(timeout_s):
            await self.task

    async def __aenter__(self) -> RunningNode:
        async with asyncio.timeout(30):
            await self.agent.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.task.done():
            await self.stop()


def as_result(row: ResultView) -> InferenceResult:
    """A result of a columnar batch as the wire's row model, for comparisons."""
    return InferenceResult(
        seq=row.seq,
        model=ModelRef(name=row.model.name, version=row.model.version, sha256=row.model.sha256),
        input_digest=row.input_digest,
        latency_ms=row.latency_ms,
        ts=row.ts,
        topk=None
        if row.topk is None
        else tuple(TopK(index=t.index, label=t.label, score=t.score) for t in row.topk),
        tensors=None
        if row.tensors is None
        else tuple(
            TensorData(name=t.name, dtype=DType(t.dtype), shape=tuple(t.shape), data=tuple(t.data))
            for t in row.tensors
        ),
        corner_case=row.corner_case,
        source=row.source,
    )
