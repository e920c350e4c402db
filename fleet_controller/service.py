"""``fleetctl serve``: the controller service.

A thin asyncio shell around the store (:mod:`fleet_controller.store`) and the
pure rollout engine (:mod:`fleet_controller.rollout_core`). What it keeps:

* one MQTT session with a retained ``controller/state`` and its Last Will;
* node status, results and telemetry arrive on shared subscriptions
  (``$share/controllers/...``, clean session) so replicas split the load; the
  retained node states are read without ``$share`` (shared subscriptions get
  no retained messages);
* messages are decoded strictly (a bad one is logged with its topic, counted
  and dropped) and queued; a bounded queue that is full drops the message
  *unacknowledged*, so the node sends it again later: nothing is lost and the
  MQTT loop never blocks;
* a writer stores queued messages in batches off the event loop, folds node
  statuses into their saved rollouts, and only then publishes
  ``node/{id}/ack`` with each node's highest contiguous stored slot;
* rollouts tick once a second: the new record is saved *before* its commands
  are published, so a restart resumes every rollout and never sends a node the
  same step twice;
* every operator request is answered on its client's reply topic, and every
  mutating one is written to the audit log with operator, time, arguments and
  outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt

from edge_node.session import make_client, reconnect_delays
from fleet_controller import rollout_core as core
from fleet_controller.api import MUTATING, OPERATIONS
from fleet_controller.blobs import BlobStore, answer_chunk
from fleet_controller.http_artifacts import ArtifactHttpServer
from fleet_controller.keys import load_key, load_trust
from fleet_controller.signing import sign_command
from fleet_controller.store import (
    PendingStatus,
    RolloutReader,
    Store,
    UnknownRolloutError,
    parse_database_url,
)
from shared import __version__, topics
from shared.broker import BrokerAddress
from shared.envelope import Envelope, SigningKey, b64decode
from shared.errors import DecodeError, EdgeFleetError, TrustError
from shared.messages import (
    Ack,
    ArtifactRequest,
    CancelAction,
    ControllerState,
    DeployAction,
    ModelManifest,
    ModelRef,
    NodeState,
    NodeStatus,
    NodeTarget,
    OperatorReply,
    OperatorRequest,
    ResultBatch,
    RollbackAction,
    RolloutState,
    Telemetry,
    TrustUpdateAction,
    WaveTarget,
    decode,
    encode,
)
from shared.trust import Role, TrustStore
from shared.version import SemVer
from shared.waves import format_selector, parse_selector

__all__ = ["ControllerConfig", "ControllerService", "UsageError"]

log = logging.getLogger(__name__)

ACTIVE_STATES = frozenset(
    {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)


class UsageError(DecodeError):
    """An operator request with bad arguments (exit code 2)."""


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    broker: BrokerAddress
    db_url: str
    keys_dir: Path
    fleet: str = "default"
    controller_id: str = field(default_factory=lambda: f"controller-{secrets.token_hex(4)}")
    tick_s: float = 1.0
    queue_max: int = 20_000
    batch_max: int = 500
    retention_days: float = 30.0
    ca_file: str | None = None
    passphrase: bytes | None = None
    # Optional HTTP artifact server: where it listens, and the base URL nodes use.
    http_listen: tuple[str, int] | None = None
    http_url: str | None = None


@dataclass
class _Batch:
    statuses: list[NodeStatus] = field(default_factory=list)
    results: list[ResultBatch] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)
    states: list[NodeState] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.statuses) + len(self.results) + len(self.telemetry) + len(self.states)


Ingested = NodeStatus | ResultBatch | Telemetry | NodeState
_INGESTED: dict[topics.TopicKind, type[Ingested]] = {
    topics.TopicKind.STATUS: NodeStatus,
    topics.TopicKind.RESULTS: ResultBatch,
    topics.TopicKind.TELEMETRY: Telemetry,
    topics.TopicKind.STATE: NodeState,
}


class ControllerService:
    """Run with ``await service.run()``; ``service.stop()`` ends it cleanly."""

    def __init__(self, config: ControllerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.blobs = BlobStore(self._blob_dir())  # beside a SQLite file, which it also creates
        self.store = Store.open(config.db_url)
        self._rollout_key: SigningKey = load_key(config.keys_dir, Role.ROLLOUT, config.passphrase)
        self._trust: TrustStore = load_trust(config.keys_dir, now=clock())
        self._queue: asyncio.Queue[Ingested] = asyncio.Queue(config.queue_max)
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self._chunk_slots = asyncio.Semaphore(16)
        self._uploads: dict[str, Path] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._session = 0
        self.metrics: Counter[str] = Counter()

    def _blob_dir(self) -> Path:
        """Beside a SQLite file, else beside the keys folder. Raises: StoreError (bad URL)."""
        sqlite_path = parse_database_url(self.config.db_url).sqlite_path
        if sqlite_path is not None:
            return sqlite_path.parent / "blobs"
        return self.config.keys_dir.parent / "blobs"

    def stop(self) -> None:
        self._stopping.set()

    # ----- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        active = await asyncio.to_thread(self.store.rollouts.list, active_only=True)
        if active:
            names = ", ".join(info.rollout_id for info in active)
            log.info("resuming %d rollout(s): %s", len(active), names)
        http = None
        if self.config.http_listen is not None:
            host, port = self.config.http_listen
            http = ArtifactHttpServer(self.blobs, host=host, port=port)
            http.start()
            log.info("serving artifacts over HTTP on %s:%d", host, http.port)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._connection_loop(), name="connection")
                group.create_task(self._writer(), name="writer")
                group.create_task(self._ticker(), name="ticker")
                group.create_task(self._pruner(), name="pruner")
                group.create_task(self._stop_watch(), name="stop-watch")
        except* _Stopping:
            pass
        finally:
            if http is not None:
                await asyncio.to_thread(http.close)
            await asyncio.to_thread(self.store.close)

    async def _stop_watch(self) -> None:
        await self._stopping.wait()
        await self._drain_queue()
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2):
                    await client.publish(
                        topics.controller_state(self.config.fleet),
                        self._state_payload(online=False),
                        qos=1,
                        retain=True,
                    )
        raise _Stopping

    def _state_payload(self, *, online: bool) -> bytes:
        return encode(
            ControllerState(
                controller_id=self.config.controller_id,
                online=online,
                session=self._session,
                version=__version__,
                ts=self._clock(),
            )
        )

    async def _connection_loop(self) -> None:
        cfg = self.config
        fleet = cfg.fleet
        delays = reconnect_delays(maximum_s=10.0)
        while not self._stopping.is_set():
            self._session += 1
            will = aiomqtt.Will(
                topics.controller_state(fleet),
                self._state_payload(online=False),
                qos=1,
                retain=True,
            )
            client = make_client(
                cfg.broker,
                client_id=cfg.controller_id,
                will=will,
                persistent=False,
                ca_file=cfg.ca_file,
            )
            try:
                async with client:
                    await client.publish(
                        topics.controller_state(fleet),
                        self._state_payload(online=True),
                        qos=1,
                        retain=True,
                    )
                    share = topics.shared_subscription
                    await client.subscribe(
                        [
                            (share(topics.node_filter(fleet, "status")), 1),
                            (share(topics.node_filter(fleet, "results")), 1),
                            (share(topics.node_filter(fleet, "telemetry")), 1),
                            (share(f"{topics.PREFIX}/{fleet}/artifact/+/req/+"), 1),
                            (share(topics.ctl_request(fleet)), 1),
                            (topics.node_filter(fleet, "state"), 1),
                        ]
                    )
                    self._client = client
                    self.connected.set()
                    delays = reconnect_delays(maximum_s=10.0)
                    log.info(
                        "controller %s serving fleet %s on %s", cfg.controller_id, fleet, cfg.broker
                    )
                    async for message in client.messages:
                        self._dispatch(client, message)
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost: %s", exc)
            finally:
                self._client = None
                self.connected.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next(delays)):
                    await self._stopping.wait()

    # ----- incoming ------------------------------------------------------------

    def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray) or not payload:
            return
        topic = message.topic.value
        try:
            item = self._decode(client, topics.parse_topic(topic), bytes(payload))
        except DecodeError as exc:
            self.metrics["malformed"] += 1
            log.warning("dropping malformed message on %s: %s", topic, exc)
            return
        if item is None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # Not acknowledged, so the node sends it again: nothing is lost.
            self.metrics["ingest_dropped"] += 1

    def _decode(
        self, client: aiomqtt.Client, parsed: topics.ParsedTopic, data: bytes
    ) -> Ingested | None:
        """Decode one message; requests are answered in the background (``None``).

        Raises:
            DecodeError: the payload is malformed or names another node than its topic.
        """
        kind = parsed.kind
        if kind is topics.TopicKind.ARTIFACT_REQUEST:
            request = decode(ArtifactRequest, data)
            if request.node != parsed.node or request.sha256 != parsed.sha256:
                raise DecodeError("artifact request does not match its topic")
            self._spawn(self._serve_chunk(client, request))
            return None
        if kind is topics.TopicKind.CTL_REQUEST:
            self._spawn(self._operator(client, decode(OperatorRequest, data)))
            return None
        model = _INGESTED.get(kind)
        if model is None:
            return None
        item = decode(model, data)
        if item.node != parsed.node:
            raise DecodeError(f"payload names node {item.node!r}, topic {parsed.node!r}")
        return item

    async def _serve_chunk(self, client: aiomqtt.Client, request: ArtifactRequest) -> None:
        async with self._chunk_slots:
            chunk = await asyncio.to_thread(answer_chunk, self.blobs, request)
            topic = topics.artifact_data(self.config.fleet, request.sha256, request.node)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(topic, encode(chunk), qos=1)
        self.metrics["chunks_served"] += 1

    # ----- ingest ----------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            first = await self._queue.get()
            batch = _Batch()
            self._add(batch, first)
            while len(batch) < self.config.batch_max and not self._queue.empty():
                self._add(batch, self._queue.get_nowait())
            await self._store_batch(batch)

    @staticmethod
    def _add(batch: _Batch, item: Ingested) -> None:
        if isinstance(item, NodeStatus):
            batch.statuses.append(item)
        elif isinstance(item, ResultBatch):
            batch.results.append(item)
        elif isinstance(item, Telemetry):
            batch.telemetry.append(item)
        else:
            batch.states.append(item)

    async def _drain_queue(self) -> None:
        batch = _Batch()
        while not self._queue.empty():
            self._add(batch, self._queue.get_nowait())
        if len(batch):
            await self._store_batch(batch)

    async def _store_batch(self, batch: _Batch) -> None:
        now = self._clock()

        def write() -> dict[str, int]:
            for state in batch.states:
                self.store.nodes.apply_state(state, now)
            return self.store.ingest.write(batch.statuses, batch.results, batch.telemetry, now)

        try:
            acks = await asyncio.to_thread(write)
        except EdgeFleetError as exc:
            log.error("storing a batch failed (nodes will re-send): %s", exc)
            return
        self.metrics["stored"] += len(batch)
        # Stored statuses are folded into their rollouts from the database by
        # the ticker (store.rollouts.step), so acknowledging them now loses
        # nothing even if this controller dies before the next tick.
        await self._publish_acks(acks)

    async def _publish_acks(self, acks: dict[str, int]) -> None:
        client = self._client
        if client is None:
            return
        now = self._clock()
        for node_id, seq in acks.items():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    topics.ack(self.config.fleet, node_id),
                    encode(Ack(node=node_id, seq=seq, ts=now)),
                    qos=1,
                )

    # ----- rollouts ----------------------------------------------------------------

    async def _ticker(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._stopping.wait()
            if self._client is None or self._stopping.is_set():
                continue
            try:
                await self._tick_all()
            except EdgeFleetError as exc:
                log.error("rollout tick failed: %s", exc)

    async def _tick_all(self) -> None:
        for info in await asyncio.to_thread(self.store.rollouts.list, active_only=True):
            await self._tick_one(info.rollout_id)

    async def _tick_one(self, rollout_id: str) -> None:
        """Fold new statuses and advance one rollout, atomically in the store.

        Several controllers may tick the same rollout: the store serialises the
        steps, and each action comes from a state change saved by exactly one
        step, so no node gets the same step twice.
        """
        now = self._clock()

        def decide(
            current: core.RolloutRecord, pending: list[PendingStatus], reader: RolloutReader
        ) -> tuple[core.RolloutRecord, tuple[bool, list[core.RolloutAction]]]:
            sent = current.nodes.values()
            since = (current.nodes and min((p.sent_at or now) for p in sent)) or now
            fleet = self._fleet_view(reader, current.spec, since - 600)
            new, actions = core.tick(_fold_statuses(current, pending, now), fleet, now=now)
            return new, (current.state in ACTIVE_STATES, actions)

        try:
            new, (was_active, actions) = await asyncio.to_thread(
                self.store.rollouts.step, rollout_id, decide, now
            )
        except UnknownRolloutError:
            return
        for action in actions:
            await self._execute(new, action, now)
        if new.state not in ACTIVE_STATES and was_active:
            log.info("rollout %s ended: %s (%s)", rollout_id, new.state.value, new.reason)

    @staticmethod
    def _fleet_view(
        reader: RolloutReader, spec: core.RolloutSpec, since: float
    ) -> dict[str, core.NodeView]:
        nodes = reader.nodes(dict(spec.selector) or None)
        samples = reader.samples([n.node_id for n in nodes], since)
        return {
            n.node_id: core.NodeView(
                node_id=n.node_id,
                labels=n.labels,
                online=n.online,
                model=n.model,
                samples=tuple(samples.get(n.node_id, ())),
            )
            for n in nodes
            if not n.revoked
        }

    async def _execute(
        self, record: core.RolloutRecord, action: core.RolloutAction, now: float
    ) -> None:
        client = self._client
        if client is None:
            return
        spec = record.spec
        fleet = self.config.fleet
        rollout_topic = topics.rollout_cmd(fleet, spec.rollout_id)
        try:
            if isinstance(action, core.ClearBroadcast):
                await client.publish(rollout_topic, b"", qos=1, retain=True)
                return
            manifest_env = await asyncio.to_thread(self._manifest_envelope, spec.model.sha256)
            seq = await asyncio.to_thread(self.store.next_command_seq, int(now * 1000))
            if isinstance(action, core.SendWave):
                _, envelope = sign_command(
                    self._rollout_key,
                    fleet=fleet,
                    seq=seq,
                    target=WaveTarget(
                        selector=dict(spec.selector),
                        bucket_limit=action.bucket_limit,
                        wave=action.wave,
                    ),
                    body=DeployAction(
                        manifest=manifest_env,
                        activate_at=spec.activate_at,
                        url=self._artifact_url(spec.model.sha256),
                    ),
                    now=now,
                    rollout_id=spec.rollout_id,
                )
                await client.publish(rollout_topic, envelope.to_bytes(), qos=1, retain=True)
                log.info("rollout %s: wave %d sent", spec.rollout_id, action.wave + 1)
                return
            target = NodeTarget(node=action.node_id)
            body: DeployAction | RollbackAction | CancelAction
            if action.kind == "deploy":
                body = DeployAction(
                    manifest=manifest_env,
                    activate_at=spec.activate_at,
                    url=self._artifact_url(spec.model.sha256),
                )
            elif action.kind == "cancel":
                body = CancelAction()
            else:
                if action.target is None:
                    return
                previous = await asyncio.to_thread(self._manifest_envelope, action.target.sha256)
                body = RollbackAction(
                    manifest=previous,
                    reason=record.reason or "rollback",
                    url=self._artifact_url(action.target.sha256),
                )
            _, envelope = sign_command(
                self._rollout_key,
                fleet=fleet,
                seq=seq,
                target=target,
                body=body,
                now=now,
                rollout_id=spec.rollout_id,
            )
            await client.publish(topics.node_cmd(fleet, action.node_id), envelope.to_bytes(), qos=1)
        except EdgeFleetError as exc:
            log.error("rollout %s: cannot send %s: %s", spec.rollout_id, action, exc)
        except aiomqtt.MqttError as exc:
            log.warning("rollout %s: publish failed (%s); the engine retries", spec.rollout_id, exc)

    def _artifact_url(self, sha256: str) -> str | None:
        """The HTTP URL of a blob when the HTTP server is on (else nodes use MQTT)."""
        base = self.config.http_url
        return f"{base.rstrip('/')}/artifacts/{sha256}" if base else None

    def _manifest_envelope(self, sha256: str) -> Envelope:
        info = self.store.models.by_sha(sha256)
        if info is None:
            raise EdgeFleetError(f"no registered model with sha256 {sha256[:12]}")
        return Envelope.from_bytes(info.envelope.encode())

    async def _pruner(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3600):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            cutoff = self._clock() - self.config.retention_days * 86_400
            telemetry, results = await asyncio.to_thread(self.store.results.prune, cutoff, cutoff)
            if telemetry or results:
                log.info("pruned %d telemetry rows and %d results", telemetry, results)

    # ----- operator API ----------------------------------------------------------------

    async def _operator(self, client: aiomqtt.Client, request: OperatorRequest) -> None:
        now = self._clock()
        if request.expires_at < now:
            log.info("dropping expired operator request %s (%s)", request.id, request.op)
            return
        try:
            if request.op not in OPERATIONS:
                raise UsageError(f"unknown operation {request.op!r}")
            handler = getattr(self, "_op_" + request.op.replace(".", "_"))
            result = await handler(request.args, request.operator)
            reply = OperatorReply(id=request.id, ok=True, result=result)
            outcome, detail = "ok", None
        except DecodeError as exc:
            reply = OperatorReply(id=request.id, ok=False, code=2, error=str(exc)[:500])
            outcome, detail = "refused", str(exc)
        except EdgeFleetError as exc:
            reply = OperatorReply(id=request.id, ok=False, code=1, error=str(exc)[:500])
            outcome, detail = "failed", str(exc)
        if request.op in MUTATING:
            # Big blobs (chunk data, signed envelopes) are summarised, not copied.
            args = {
                k: f"<{len(v)} characters>" if isinstance(v, str) and len(v) > 256 else v
                for k, v in request.args.items()
            }
            await asyncio.to_thread(
                self.store.audit.append, request.operator, request.op, args, outcome, detail, now
            )
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                topics.ctl_reply(self.config.fleet, request.client), encode(reply), qos=1
            )

    @staticmethod
    def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
        """``args[name]`` checked to be a ``kind``. Raises: UsageError."""
        if name not in args:
            if default is ...:
                raise UsageError(f"missing argument {name!r}")
            return default
        value = args[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"argument {name!r} must be {kind.__name__}")
        return value

    async def _op_model_upload(self, args: dict[str, Any], operator: str) -> Any:
        sha = topics.check_sha256(self._arg(args, "sha256", str))
        offset = self._arg(args, "offset", int)
        size = self._arg(args, "size", int)
        data = b64decode(self._arg(args, "data", str), "data")
        return await asyncio.to_thread(self._receive_upload, sha, offset, size, data)

    def _receive_upload(self, sha: str, offset: int, size: int, data: bytes) -> dict[str, Any]:
        if self.blobs.has(sha):
            return {"received": size, "complete": True}
        part = self.blobs.root / f".{sha}.upload"
        have = part.stat().st_size if part.exists() else 0
        if offset != have:
            return {"received": have, "complete": False}
        if have + len(data) > size:
            part.unlink(missing_ok=True)
            raise UsageError("upload exceeds its declared size")
        with part.open("ab") as handle:
            handle.write(data)
        have += len(data)
        if have < size:
            return {"received": have, "complete": False}
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != sha:
            part.unlink(missing_ok=True)
            raise TrustError(f"uploaded blob hashes to {digest[:12]}, not {sha[:12]}")
        os.replace(part, self.blobs.path(sha))
        return {"received": have, "complete": True}

    async def _op_model_add(self, args: dict[str, Any], operator: str) -> Any:
        envelope_text = self._arg(args, "envelope", str)
        envelope = Envelope.from_bytes(envelope_text.encode())
        payload = self._trust.open(envelope, Role.RELEASE, now=self._clock())
        manifest = decode(ModelManifest, payload)
        same = await asyncio.to_thread(self.store.models.by_sha, manifest.sha256)
        if same is not None:
            raise EdgeFleetError(
                f"this file is registered already as {same.name}@{same.version}; "
                "a new version must be a new file"
            )
        if not self.blobs.has(manifest.sha256) or self.blobs.size(manifest.sha256) != manifest.size:
            raise EdgeFleetError(f"blob {manifest.sha256[:12]} has not been uploaded")
        info = await asyncio.to_thread(
            self.store.models.add, manifest, envelope_text, operator, self._clock()
        )
        return info.to_dict()

    async def _op_model_list(self, args: dict[str, Any], operator: str) -> Any:
        return [m.to_dict() for m in await asyncio.to_thread(self.store.models.list)]

    async def _op_rollout_start(self, args: dict[str, Any], operator: str) -> Any:
        reference = self._arg(args, "model", str)
        name, sep, version = reference.partition("@")
        if not sep:
            raise UsageError(f"model {reference!r} must be NAME@VERSION")
        SemVer.parse(version)
        info = await asyncio.to_thread(self.store.models.get, name, version)
        if info is None:
            raise EdgeFleetError(
                f"unknown model {name}@{version}: add it with `fleetctl model add`"
            )
        selector = parse_selector(self._arg(args, "select", str, ""))
        waves = tuple(float(w) for w in self._arg(args, "waves", list, [1, 10, 50, 100]))
        try:
            core.wave_limits(waves)
        except EdgeFleetError as exc:
            raise UsageError(str(exc)) from None
        nodes = await asyncio.to_thread(self.store.nodes.list, selector or None)
        if not [n for n in nodes if not n.revoked]:
            raise EdgeFleetError(
                f"selection {format_selector(selector) or '(all)'} matches no known node"
            )
        rollout_id = self._arg(args, "rollout_id", str, "") or f"r-{secrets.token_hex(4)}"
        topics.check_id(rollout_id, "rollout id")
        if await asyncio.to_thread(self.store.rollouts.load, rollout_id) is not None:
            raise UsageError(f"rollout {rollout_id} exists already")
        spec = core.RolloutSpec(
            rollout_id=rollout_id,
            model=ModelRef(name=info.name, version=info.version, sha256=info.sha256),
            selector=selector,
            waves=waves,
            max_failures=self._arg(args, "max_failures", float, 0.10),
            wave_timeout_s=self._arg(args, "wave_timeout_s", float, 300.0),
            health_window_s=self._arg(args, "health_window_s", float, 60.0),
            max_latency_regression=self._arg(args, "max_latency_regression", float, 0.5),
            min_latency_regression_ms=self._arg(args, "min_latency_regression_ms", float, 1.0),
            auto_rollback=self._arg(args, "auto_rollback", bool, default=True),
            activate_at=self._arg(args, "activate_at", float, None)
            if args.get("activate_at") is not None
            else None,
            max_retries=self._arg(args, "max_retries", int, 2),
            retry_backoff_s=self._arg(args, "retry_backoff_s", float, 10.0),
        )
        record = core.RolloutRecord(spec=spec)
        await asyncio.to_thread(self.store.rollouts.create, record, operator, self._clock())
        return _rollout_dict(record)

    async def _rollout(self, args: dict[str, Any]) -> core.RolloutRecord:
        rollout_id = self._arg(args, "rollout_id", str)
        record = await asyncio.to_thread(self.store.rollouts.load, rollout_id)
        if record is None:
            raise EdgeFleetError(f"unknown rollout {rollout_id}")
        return record

    async def _op_rollout_status(self, args: dict[str, Any], operator: str) -> Any:
        return _rollout_dict(await self._rollout(args), nodes=True)

    async def _op_rollout_list(self, args: dict[str, Any], operator: str) -> Any:
        active = self._arg(args, "active_only", bool, default=False)
        infos = await asyncio.to_thread(self.store.rollouts.list, active)
        # Waves count from 1 for operators, as in rollout.status.
        return [{**i.to_dict(), "wave": i.wave + 1} for i in infos]

    async def _change(self, args: dict[str, Any], event: core.RolloutEvent) -> Any:
        rollout_id = self._arg(args, "rollout_id", str)
        now = self._clock()

        def decide(
            current: core.RolloutRecord, pending: list[PendingStatus], _reader: RolloutReader
        ) -> tuple[core.RolloutRecord, None]:
            record = _fold_statuses(current, pending, now)
            if event is core.RolloutEvent.ROLLBACK:
                new = core.start_rollback(record)
            else:
                new = replace(record, state=core.apply_event(record.state, event))
            return replace(new, reason=f"{event.value} by operator"), None

        try:
            new, _ = await asyncio.to_thread(self.store.rollouts.step, rollout_id, decide, now)
        except core.IllegalTransitionError as exc:
            raise EdgeFleetError(str(exc)) from None
        if new.state not in ACTIVE_STATES:
            await self._execute(new, core.ClearBroadcast(), now)
            for progress in new.nodes.values():
                if progress.state in core.IN_FLIGHT:
                    await self._execute(new, core.SendNode(progress.node_id, "cancel"), now)
        return _rollout_dict(new)

    async def _op_rollout_pause(self, args: dict[str, Any], operator: str) -> Any:
        return await self._change(args, core.RolloutEvent.PAUSE)

    async def _op_rollout_resume(self, args: dict[str, Any], operator: str) -> Any:
        return await self._change(args, core.RolloutEvent.RESUME)

    async def _op_rollout_abort(self, args: dict[str, Any], operator: str) -> Any:
        return await self._change(args, core.RolloutEvent.ABORT)

    async def _op_rollout_rollback(self, args: dict[str, Any], operator: str) -> Any:
        return await self._change(args, core.RolloutEvent.ROLLBACK)

    async def _op_nodes_list(self, args: dict[str, Any], operator: str) -> Any:
        selector = parse_selector(self._arg(args, "select", str, ""))
        nodes = await asyncio.to_thread(self.store.nodes.list, selector or None)
        return [n.to_dict() for n in nodes]

    async def _op_node_revoke(self, args: dict[str, Any], operator: str) -> Any:
        node_id = topics.check_id(self._arg(args, "node_id", str), "node id")
        await asyncio.to_thread(self.store.nodes.set_revoked, node_id, True)  # noqa: FBT003
        return {"node_id": node_id, "revoked": True}

    async def _op_trust_push(self, args: dict[str, Any], operator: str) -> Any:
        """Adopt a rotated trust list and broadcast it (retained) to every node.

        The list must be a valid rotation of the controller's own (signed by the
        current and the new root, newer, not expired), exactly as nodes check it.
        """
        envelope = Envelope.from_bytes(self._arg(args, "trust", str).encode())
        now = self._clock()
        rotated = self._trust.rotate(envelope, now=now)
        client = self._client
        if client is None:
            raise EdgeFleetError("not connected to the broker; try again")
        rollout_id = f"trust-v{rotated.version}"
        seq = await asyncio.to_thread(self.store.next_command_seq, int(now * 1000))
        _, command = sign_command(
            self._rollout_key,
            fleet=self.config.fleet,
            seq=seq,
            target=WaveTarget(bucket_limit=10_000, wave=0),
            body=TrustUpdateAction(trust=envelope),
            now=now,
            rollout_id=rollout_id,
        )
        await client.publish(
            topics.rollout_cmd(self.config.fleet, rollout_id),
            command.to_bytes(),
            qos=1,
            retain=True,
        )
        self._trust = rotated
        return {"version": rotated.version, "rollout_id": rollout_id}

    async def _op_audit_list(self, args: dict[str, Any], operator: str) -> Any:
        limit = self._arg(args, "limit", int, 100)
        entries = await asyncio.to_thread(self.store.audit.list, limit)
        return [e.to_dict() for e in entries]

    async def _op_report(self, args: dict[str, Any], operator: str) -> Any:
        report = await asyncio.to_thread(self.store.results.report)
        return {**report, "controller": dict(self.metrics)}

    # ----- helpers ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the task group to unwind every loop on stop."""


def _fold_statuses(
    record: core.RolloutRecord, pending: list[PendingStatus], now: float
) -> core.RolloutRecord:
    for status in pending:
        record = core.apply_node_status(
            record,
            status.node_id,
            status.state,
            now=now,
            code=status.code,
            reason=status.reason,
            duplicate=status.duplicate,
        )
    return record


def _rollout_dict(record: core.RolloutRecord, *, nodes: bool = False) -> dict[str, Any]:
    spec = record.spec
    counts = Counter(p.state.value for p in record.nodes.values())
    result: dict[str, Any] = {
        "rollout_id": spec.rollout_id,
        "model": f"{spec.model.name}@{spec.model.version}",
        "sha256": spec.model.sha256,
        "state": record.state.value,
        "wave": record.wave + 1,
        "waves": list(spec.waves),
        "selector": format_selector(spec.selector),
        "reason": record.reason,
        "nodes_total": len(record.nodes),
        "counts": dict(counts),
    }
    if nodes:
        result["nodes"] = [
            {
                "node": p.node_id,
                "wave": p.wave + 1,
                "state": p.state.value,
                "attempts": p.attempts,
                "code": p.code,
                "reason": p.reason,
                "from": f"{p.from_model.name}@{p.from_model.version}" if p.from_model else None,
            }
            for p in sorted(record.nodes.values(), key=lambda p: (p.wave, p.node_id))
        ]
    return result
