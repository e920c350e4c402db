"""A controller on the in-memory broker, and the parties that talk to it.

* :class:`Controller` runs a real :class:`ControllerService` (SQLite in a temp
  dir) over :class:`edgefleet_io.memory.MemoryBroker`, with a :class:`Clock`
  the test moves.
* :class:`Operator` is a raw request/reply client of the operator API: unlike
  ``fleetctl``'s :class:`~fleet_controller.api.CtlClient` it dates requests by
  the test's clock (so a test can send expired ones), can sign as anyone or
  send anything, and returns whole replies. The key fixture names the
  operators of :data:`OPERATORS`.
* :class:`FakeNode` is a client publishing what an agent publishes (births,
  statuses, result batches, telemetry) and reading its acks and commands.

Everything waits on messages or polls with a deadline; nothing sleeps to
synchronise.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.transport import Link, Message, Session
from fleet_controller.keys import load_key, load_operator_key, load_trust, operator_key_path
from fleet_controller.link import RawResults
from fleet_controller.registry import sign_manifest
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.acks import open_ack
from shared.broker import BrokerAddress
from shared.envelope import PAYLOAD_REQUEST, SigningKey, sign_envelope
from shared.messages import (
    Capabilities,
    InferenceResult,
    LatencyStats,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    OperatorReply,
    OperatorRequest,
    Telemetry,
    TensorSpec,
    decode,
    encode,
)
from shared.result_batch import batch_of, encode_results
from shared.trust import Role

NOW = 1_800_000_000.0  # as in tests/unit/shared/test_operations.py
FLEET = "f1"
DEADLINE_S = 5.0
OPERATORS = {"alice": "admin", "dave": "deployer", "vera": "viewer"}


@dataclass
class Clock:
    """The controller's clock: ``clock()`` is ``now``; tests move it."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


async def eventually(what: str, check: Callable[[], object]) -> None:
    """Poll ``check`` until it is true, failing after the deadline."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)  # polling against the deadline


def blob(seed: int = 1, size: int = 3000) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + bytes(size % 32)


def manifest_for(data: bytes, *, name: str = "clf", version: str = "1.0.0") -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=(TensorSpec(name="input", dtype="float32", shape=("N", 8)),),
        outputs=(TensorSpec(name="probs", dtype="float32", shape=("N", 4)),),
        created_at=NOW,
    )


@dataclass
class Controller:
    """A running service and what the test needs to reach it."""

    service: ControllerService
    broker: MemoryBroker
    clock: Clock
    keys: Path
    db: Path

    @property
    def store(self) -> Any:
        return self.service.store

    def register(self, data: bytes, *, name: str = "clf", version: str = "1.0.0") -> ModelRef:
        """Put a blob and its release-signed manifest straight into the store."""
        manifest = manifest_for(data, name=name, version=version)
        release = load_key(self.keys, Role.RELEASE, None)
        envelope = sign_manifest(manifest, release).to_bytes().decode()
        self.service.blobs.add_bytes(data)
        self.service.store.models.add(manifest, envelope, "alice", self.clock())
        return manifest.ref

    @asynccontextmanager
    async def operator(
        self, name: str = "alice", *, key: SigningKey | None = None
    ) -> AsyncIterator[Operator]:
        """Operator ``name``, signing with their key from the key folder (or ``key``),
        reading ``name``'s replies."""
        client = f"op-{secrets.token_hex(3)}"
        key = key or load_operator_key(operator_key_path(self.keys, name), None)
        async with self.broker.transport().connect(Session(client_id=client)) as link:
            await link.subscribe([(topics.ctl_reply(FLEET, name), 1)])
            yield Operator(link, name=name, key=key, clock=self.clock)

    @asynccontextmanager
    async def node(self, node_id: str) -> AsyncIterator[FakeNode]:
        async with self.broker.transport().connect(Session(client_id=node_id)) as link:
            await link.subscribe(
                [(topics.ack(FLEET, node_id), 1), (topics.node_cmd(FLEET, node_id), 1)]
            )
            yield FakeNode(link, node_id, self.clock, self.keys)


def make_service(
    tmp_path: Path, keys: Path, broker: MemoryBroker, clock: Clock, **config: Any
) -> ControllerService:
    settings: dict[str, Any] = {
        "broker": BrokerAddress(host="memory", port=1883, tls=False),
        "db_url": str(tmp_path / "db" / "fleet.db"),
        "keys_dir": keys,
        "fleet": FLEET,
        "controller_id": "ctl-1",
        "tick_s": 0.01,
    } | config
    return ControllerService(
        ControllerConfig(**settings), transport=broker.transport(), clock=clock
    )


@asynccontextmanager
async def controller(
    tmp_path: Path, keys: Path, *, clock: Clock | None = None, **config: Any
) -> AsyncIterator[Controller]:
    """A controller running on a fresh in-memory broker for the block."""
    broker = MemoryBroker()
    clock = clock or Clock()
    service = make_service(tmp_path, keys, broker, clock, **config)
    async with running(service):
        yield Controller(service, broker, clock, keys, tmp_path / "db" / "fleet.db")


def run(scenario: Callable[[], Awaitable[None]], *, timeout_s: float = 20.0) -> None:
    """``asyncio.run`` with an overall deadline."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await scenario()

    asyncio.run(bounded())


@asynccontextmanager
async def running(
    service: ControllerService, *, leading: bool = True
) -> AsyncIterator[ControllerService]:
    """``service`` runs (and is connected, and with ``leading`` holds the rollout
    lease) inside the block; stopped cleanly after it."""
    task = asyncio.get_running_loop().create_task(service.run())
    connected = asyncio.get_running_loop().create_task(service.connected.wait())
    try:
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # it ended early: raise what it raised
        if leading:
            lease = asyncio.ensure_future(service.leadership.leading.wait())
            async with asyncio.timeout(DEADLINE_S):
                await asyncio.wait({task, lease}, return_when=asyncio.FIRST_COMPLETED)
            lease.cancel()
            if task.done():
                task.result()
        yield service
    finally:
        connected.cancel()
        service.stop()
        async with asyncio.timeout(DEADLINE_S):
            await task


@dataclass
class Operator:
    link: Link
    name: str
    key: SigningKey
    clock: Clock
    _messages: AsyncIterator[Message] | None = field(default=None, repr=False)

    async def _next(self) -> Message:
        if self._messages is None:
            self._messages = aiter(self.link.messages())
        return await anext(self._messages)

    def signed(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        ttl_s: float = 60,
        issued_at: float | None = None,
        operator: str | None = None,
    ) -> tuple[str, bytes]:
        """A request signed with this operator's key: its id and the envelope's bytes."""
        issued = self.clock() if issued_at is None else issued_at
        request = OperatorRequest(
            id=secrets.token_hex(6),
            operator=operator or self.name,
            nonce=secrets.token_hex(16),
            op=op,
            args=args or {},
            issued_at=issued,
            expires_at=issued + ttl_s,
        )
        envelope = sign_envelope(encode(request), PAYLOAD_REQUEST, [self.key])
        return request.id, envelope.to_bytes()

    async def publish(self, data: bytes) -> None:
        await self.link.publish(topics.ctl_request(FLEET), data, qos=1)

    async def send(self, op: str, args: dict[str, Any] | None = None, *, ttl_s: float = 60) -> str:
        """Publish a signed request; returns its id."""
        request_id, data = self.signed(op, args, ttl_s=ttl_s)
        await self.publish(data)
        return request_id

    async def next_reply(self) -> OperatorReply:
        """The next reply on this operator's topic, whichever request it answers."""
        async with asyncio.timeout(DEADLINE_S):
            return decode(OperatorReply, (await self._next()).payload)

    async def reply(self, request_id: str) -> OperatorReply:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                reply = decode(OperatorReply, (await self._next()).payload)
                if reply.id == request_id:
                    return reply

    async def request(self, op: str, args: dict[str, Any] | None = None) -> OperatorReply:
        return await self.reply(await self.send(op, args))

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """The result of a request that must succeed."""
        reply = await self.request(op, args)
        assert reply.ok, f"{op} failed: {reply.error}"
        return reply.result


def result_batch(
    node: str, slot: int, seqs: list[int], *, ts: float = NOW, source: str = "cam0"
) -> RawResults:
    """A result batch as the controller's link hands it to ingest (encoded, not decoded)."""
    batch = batch_of(
        node,
        slot,
        [
            InferenceResult(
                seq=s,
                model=ModelRef(name="clf", version="1.0.0", sha256="ab" * 32),
                input_digest=f"{s:016x}",
                latency_ms=2.0,
                ts=ts,
                source=source,
            )
            for s in seqs
        ],
    )
    return RawResults(node, encode_results(batch))


@dataclass
class FakeNode:
    link: Link
    node_id: str
    clock: Clock
    keys: Path
    _messages: AsyncIterator[Message] | None = field(default=None, repr=False)

    async def next_message(self) -> Message:
        if self._messages is None:
            self._messages = aiter(self.link.messages())
        async with asyncio.timeout(DEADLINE_S):
            return await anext(self._messages)

    async def next_ack(self) -> int:
        """The seq of the next ack (commands in between are skipped)."""
        while True:
            message = await self.next_message()
            if message.topic == topics.ack(FLEET, self.node_id):
                # As a node does: the ack must verify against the trust list.
                trust = load_trust(self.keys, now=self.clock())
                return open_ack(
                    message.payload, trust=trust, node=self.node_id, now=self.clock()
                ).seq

    async def birth(
        self,
        *,
        session: int = 1,
        outbox_floor: int | None = None,
        labels: dict[str, str] | None = None,
        model: ModelRef | None = None,
    ) -> None:
        state = NodeState(
            node=self.node_id,
            online=True,
            session=session,
            agent_version="0.1.0",
            model=model,
            labels=labels or {},
            capabilities=Capabilities(
                providers=("CPUExecutionProvider",),
                cpus=2,
                memory_bytes=2**30,
                disk_free_bytes=2**32,
            ),
            outbox_floor=outbox_floor,
            ts=self.clock(),
        )
        await self.link.publish(topics.state(FLEET, self.node_id), encode(state), retain=True)

    async def results(self, slot: int, seqs: list[int], *, source: str = "cam0") -> None:
        batch = result_batch(self.node_id, slot, seqs, ts=self.clock(), source=source)
        await self.link.publish(topics.results(FLEET, self.node_id), batch.payload)

    async def status(
        self, slot: int, state: NodeRolloutState, *, rollout_id: str = "r1", command_id: str = "c1"
    ) -> None:
        message = NodeStatus(
            node=self.node_id,
            seq=slot,
            command_id=command_id,
            rollout_id=rollout_id,
            state=state,
            ts=self.clock(),
        )
        await self.link.publish(topics.status(FLEET, self.node_id), encode(message))

    async def telemetry(self, *, inferences: int = 10, errors: int = 0) -> None:
        message = Telemetry(
            node=self.node_id,
            ts=self.clock(),
            uptime_s=60.0,
            inferences=inferences,
            errors=errors,
            skips=0,
            queue_depth=0,
            outbox_depth=0,
            latency=LatencyStats(p50_ms=1.0, p95_ms=2.0, p99_ms=3.0),
            cpu_percent=5.0,
            memory_bytes=2**20,
        )
        await self.link.publish(topics.telemetry(FLEET, self.node_id), encode(message))
