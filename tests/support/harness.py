"""The controller's side of the wire, for node integration tests.

A :class:`Harness` holds real keys, a real blob store and one real MQTT
connection (reconnecting when the test restarts the broker). It registers ONNX
files as signed manifests, signs and publishes commands, answers chunk
requests, records every status, result and state, and acknowledges outbox
slots the way the controller does: the highest contiguous ``seq`` it has
stored per node. Switches let a test pause chunk serving, corrupt chunks or
stop acknowledging.

Pausing (``serving`` cleared, or ``pause_after_chunks`` reached) holds back
chunk answers only: each request that arrives meanwhile is still recorded in
``chunk_requests`` and waits in its own task, so statuses, results and states
keep being recorded and acknowledged. Held answers go out on whatever
connection is current when serving resumes; after a broker restart the node
no longer waits for them and drops them (unknown request ids), as it would a
real controller's late replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from edge_node.agent import AgentConfig, NodeAgent
from fleet_controller.blobs import BlobStore, answer_chunk
from fleet_controller.registry import describe_model, sign_manifest
from fleet_controller.signing import sign_command
from shared import topics
from shared.broker import parse_broker_url
from shared.envelope import Envelope, SigningKey, b64decode, b64encode
from shared.messages import (
    Ack,
    ArtifactRequest,
    DeployAction,
    InferenceResult,
    ModelManifest,
    NodeState,
    NodeStatus,
    NodeTarget,
    ResultBatch,
    RollbackAction,
    WaveTarget,
    decode,
    encode,
)
from shared.trust import Role, TrustList, sign_trust_list

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class Registered:
    path: Path
    manifest: ModelManifest
    envelope: Envelope


@dataclass
class Harness:
    broker_url: str
    fleet: str
    workdir: Path
    root: SigningKey = field(default_factory=SigningKey.generate)
    release: SigningKey = field(default_factory=SigningKey.generate)
    rollout: SigningKey = field(default_factory=SigningKey.generate)
    acking: bool = True
    corrupt_chunks: bool = False
    pause_after_chunks: int | None = None
    """Clear ``serving`` once this many chunks have been answered (then reset to None)."""
    chunks_answered: int = 0
    statuses: list[NodeStatus] = field(default_factory=list)
    results: dict[str, dict[int, InferenceResult]] = field(default_factory=dict)
    result_order: dict[str, list[int]] = field(default_factory=dict)
    slots_seen: dict[str, list[int]] = field(default_factory=dict)
    states: list[NodeState] = field(default_factory=list)
    chunk_requests: list[ArtifactRequest] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)
    commands: dict[str, Envelope] = field(default_factory=dict)
    """Every command envelope published by the helpers below, by command id."""

    def __post_init__(self) -> None:
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
        self._changed = asyncio.Condition()
        self._stored: dict[str, set[int]] = defaultdict(set)
        self._settled: dict[str, int] = {}  # from births' outbox floors
        self._seq = 0
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._held: set[asyncio.Task[None]] = set()

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
        address = parse_broker_url(self.broker_url)
        while True:
            client = aiomqtt.Client(
                address.host,
                address.port,
                identifier=f"harness-{self.fleet}",
                protocol=aiomqtt.ProtocolVersion.V5,
                # paho leaves Nagle on: each multi-segment chunk answer would then
                # wait ~40 ms for the broker's delayed ACK (4 s for a 1.5 MB blob).
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            try:
                async with client:
                    base = f"{topics.PREFIX}/{self.fleet}"
                    await client.subscribe(
                        [
                            (f"{base}/node/+/status", 1),
                            (f"{base}/node/+/results", 1),
                            (f"{base}/node/+/state", 1),
                            (f"{base}/artifact/+/req/+", 1),
                        ]
                    )
                    self._client = client
                    self._connected.set()
                    async for message in client.messages:
                        await self._handle(client, message)
            except aiomqtt.MqttError:
                self._client = None
                self._connected.clear()
                await asyncio.sleep(0.2)  # reconnect back-off (not a wait: polls no state)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        parsed = topics.parse_topic(message.topic.value)
        node = parsed.node
        assert node is not None
        if parsed.kind is topics.TopicKind.ARTIFACT_REQUEST:
            request = decode(ArtifactRequest, message.payload)
            self.chunk_requests.append(request)
            if (
                self.pause_after_chunks is not None
                and self.chunks_answered >= self.pause_after_chunks
            ):
                self.pause_after_chunks = None
                self.serving.clear()
            if self.serving.is_set():
                await self._answer(client, node, request)
            else:
                task = asyncio.get_running_loop().create_task(self._answer_later(node, request))
                self._held.add(task)
                task.add_done_callback(self._held.discard)
        elif parsed.kind is topics.TopicKind.STATUS:
            status = decode(NodeStatus, message.payload)
            if status.seq not in self._stored[node]:  # stored once, as the controller does
                self.statuses.append(status)
            await self._stored_slot(client, node, status.seq)
        elif parsed.kind is topics.TopicKind.RESULTS:
            batch = decode(ResultBatch, message.payload)
            self.slots_seen.setdefault(node, []).append(batch.seq)
            for result in batch.results:
                if result.seq not in self.results.setdefault(node, {}):
                    self.result_order.setdefault(node, []).append(result.seq)
                self.results[node][result.seq] = result
            await self._stored_slot(client, node, batch.seq)
        elif parsed.kind is topics.TopicKind.STATE and message.payload:
            state = decode(NodeState, message.payload)
            self.states.append(state)
            if state.online and state.outbox_floor is not None:
                # As the controller's store does: slots below the floor are settled.
                settled = self._settled.get(node, 0)
                self._settled[node] = max(settled, state.outbox_floor - 1)
                await self._advance(client, node)
        async with self._changed:
            self._changed.notify_all()

    async def _answer(self, client: aiomqtt.Client, node: str, request: ArtifactRequest) -> None:
        chunk = answer_chunk(self.blobs, request)
        if self.corrupt_chunks and chunk.data:
            raw = bytearray(b64decode(chunk.data))
            raw[len(raw) // 2] ^= 0xFF
            chunk = chunk.model_copy(update={"data": b64encode(bytes(raw))})
        await client.publish(
            topics.artifact_data(self.fleet, request.sha256, node), encode(chunk), qos=1
        )
        self.chunks_answered += 1

    async def _answer_later(self, node: str, request: ArtifactRequest) -> None:
        """Answer a request held by a pause once serving resumes, if still connected."""
        await self.serving.wait()
        client = self._client
        if client is None:
            return  # the broker went away: the node re-requests what it still needs
        with contextlib.suppress(aiomqtt.MqttError):
            await self._answer(client, node, request)

    async def _stored_slot(self, client: aiomqtt.Client, node: str, seq: int) -> None:
        self._stored[node].add(seq)
        await self._advance(client, node)

    async def _advance(self, client: aiomqtt.Client, node: str) -> None:
        """Acknowledge the highest contiguous stored slot, as the controller does."""
        contiguous = max(self.acked.get(node, 0), self._settled.get(node, 0))
        while contiguous + 1 in self._stored[node]:
            contiguous += 1
        if self.acking and contiguous > self.acked.get(node, 0):
            self.acked[node] = contiguous
            ack = Ack(node=node, seq=contiguous, ts=time.time())
            await client.publish(topics.ack(self.fleet, node), encode(ack), qos=1)

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
        async with asyncio.timeout(20):
            await self._connected.wait()
        assert self._client is not None
        await self._client.publish(topic, envelope.to_bytes(), qos=1, retain=retain)

    async def deploy(
        self,
        node: str,
        model: Registered,
        *,
        rollout_id: str = "r1",
        health_window_s: float = 0.0,
        url: str | None = None,
    ) -> str:
        command, envelope = sign_command(
            self.rollout,
            fleet=self.fleet,
            seq=self.next_seq(),
            target=NodeTarget(node=node),
            body=DeployAction(manifest=model.envelope, health_window_s=health_window_s, url=url),
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


class RunningNode:
    """A :class:`NodeAgent` running as a task of the test's event loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = NodeAgent(config)
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
