"""The edge node daemon: one MQTT session, commands, downloads, hot-swap, inference.

The agent is a thin shell around pure decisions (:mod:`edge_node.core`) and the
parts at the edges (outbox, artifact store, runtime). What it guarantees:

* one persistent MQTT 5 session (clean start off, session expiry set) that
  reconnects forever with jittered exponential back-off; a retained birth on
  every connect and a retained death as the Will, both with a session counter;
* every command goes through :func:`edge_node.core.verify_command`; the
  verifier state is persisted before anything is acted on;
* statuses and result batches go through the disk-backed outbox and leave it
  only when the controller's ``ack`` says they are durably stored; after every
  reconnect everything unacknowledged is sent again, in order;
* a failed download, load or warm-up never replaces the working model;
* an MQTT download that loses its connection resumes from its ``.part`` as soon
  as the node is connected again (chunk requests and replies in flight die with
  the connection, so waiting for them would only stall);
* an accepted deploy or rollback is persisted (``pending``) with the verifier
  state and cleared when it ends, so a node stopped mid-job resumes it on start;
* ``stop()`` finishes in-flight inferences, flushes results to the outbox,
  sends what it can, and publishes its own death before disconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import numpy as np
import onnxruntime as ort

from edge_node.artifacts import ArtifactError, ArtifactStore
from edge_node.core import (
    Accepted,
    Duplicate,
    Ignored,
    NodeIdentity,
    Rejected,
    record,
    verify_command,
)
from edge_node.fetchers import Fetcher, HttpFetcher, MqttChunkFetcher
from edge_node.inference_core import (
    ChangeGate,
    LatencyWindow,
    input_digest,
    is_corner_case,
    numpy_dtype,
    summarize_output,
)
from edge_node.outbox import Outbox, OutboxFullError, OutboxStats
from edge_node.runtime import InferenceOutcome, ModelRuntime, SessionOptionsConfig
from edge_node.session import make_client, reconnect_delays
from edge_node.sources import (
    DirectorySource,
    InputSource,
    MqttSource,
    SourceItem,
    SyntheticSource,
)
from edge_node.state import RESULT_SEQ_BLOCK, NodeStore, PendingCommand, PersistedState
from shared import __version__, topics
from shared.broker import BrokerAddress
from shared.envelope import Envelope
from shared.errors import DecodeError, EdgeFleetError, TransferError, TrustError
from shared.messages import (
    Ack,
    ArtifactChunk,
    CancelAction,
    Capabilities,
    Command,
    DeployAction,
    InferenceResult,
    InferReply,
    InferRequest,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    ResultBatch,
    RollbackAction,
    Telemetry,
    TrustUpdateAction,
    WaveTarget,
    decode,
    encode,
)
from shared.trust import Role, TrustStore

__all__ = ["AgentConfig", "NodeAgent"]

log = logging.getLogger(__name__)

SourceKind = Literal["synthetic", "dir", "mqtt", "none"]


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything ``edge-node run`` can set. Durations in seconds, sizes in bytes."""

    node_id: str
    data_dir: Path
    trust_file: Path | None
    broker: BrokerAddress
    fleet: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    source: SourceKind = "synthetic"
    source_dir: Path | None = None
    rate_hz: float | None = 10.0
    concurrency: int = 1
    micro_batch: int = 1  # >1: run up to this many queued inputs as one batch
    swap_mode: Literal["availability", "resource"] = "availability"
    session_options: SessionOptionsConfig = field(default_factory=SessionOptionsConfig)
    change_threshold: float = 0.0
    corner_threshold: float = 0.5
    topk: int = 3
    batch_max: int = 100
    batch_interval_s: float = 1.0
    telemetry_interval_s: float = 10.0
    resend_after_s: float = 15.0
    outbox_max_bytes: int = 256 * 1024 * 1024
    chunk_bytes: int = 256 * 1024
    chunk_window: int = 4
    ca_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86_400
    reconnect_max_s: float = 30.0
    download_retries: int = 20


class _Job:
    """A deploy or rollback in progress, cancellable until it activates."""

    def __init__(self, command: Command, task: asyncio.Task[None]) -> None:
        self.command = command
        self.task = task
        self.activated = False


class NodeAgent:
    """One edge node. ``await agent.run()`` until ``agent.stop()`` is called."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._me = NodeIdentity(config.node_id, config.fleet, dict(config.labels))
        self._store = NodeStore(config.data_dir)
        self._artifacts = ArtifactStore(config.data_dir)
        self._outbox = Outbox(
            config.data_dir / "outbox.db",
            max_bytes=config.outbox_max_bytes,
            first_seq=int(clock() * 1_000_000),  # a new outbox never reuses acked numbers
        )
        self._runtime = ModelRuntime(options=config.session_options, swap_mode=config.swap_mode)
        self._state: PersistedState = self._store.load()
        self._trust: TrustStore | None = None
        self._manifest: ModelManifest | None = None
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._link_lost = asyncio.Event()  # set when the current connection ends (one each)
        self._stopping = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._commands: asyncio.Queue[bytes] = asyncio.Queue(256)
        self._job: _Job | None = None
        self._fetchers: dict[str, MqttChunkFetcher] = {}
        self._pending: list[InferenceResult] = []
        self._outbox_space = asyncio.Event()
        self._outbox_space.set()
        self._result_seq = self._state.result_seq_reserved
        self._reserving = asyncio.Lock()  # one result-number reservation at a time
        self._started = time.monotonic()
        self._latency = LatencyWindow()
        self._gate = ChangeGate(config.change_threshold)
        self._counts = {"inferences": 0, "errors": 0}
        self._source: InputSource | None = None
        self._synthetic: SyntheticSource | None = None
        self._mqtt_source: MqttSource | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._state_lock = asyncio.Lock()
        self._inputs: asyncio.Queue[SourceItem | None] = asyncio.Queue(
            2 * max(1, config.micro_batch) * max(1, config.concurrency)
        )
        self._workers: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()  # started: trust and the active model loaded

    # ----- lifecycle ---------------------------------------------------------

    @property
    def active(self) -> ModelRef | None:
        """The model this node has installed (``state.json``)."""
        return self._state.active

    @property
    def serving(self) -> ModelRef | None:
        """The model new inference requests run on right now."""
        return self._runtime.active

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; then shut down cleanly."""
        await self._start()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._connection_loop(), name="connection")
                group.create_task(self._command_worker(), name="commands")
                group.create_task(self._sender(), name="sender")
                group.create_task(self._telemetry_loop(), name="telemetry")
                group.create_task(self._batcher(), name="batcher")
                self._workers = [
                    group.create_task(self._inference_worker(), name=f"inference-{index}")
                    for index in range(max(1, self.config.concurrency))
                ]
                self._workers.append(group.create_task(self._reader(), name="source"))
                group.create_task(self._stop_watch(), name="stop-watch")
        except* _Stopping:
            pass
        finally:
            await self._shutdown()

    async def _start(self) -> None:
        try:
            self._trust = self._store.load_trust(self.config.trust_file, now=self._clock())
        except TrustError as exc:
            log.error("%s", exc)  # fail closed: every command is refused
        self._make_source()
        if self._state.active is not None:
            await self._restore_active(self._state.active)
        self.ready.set()

    async def _restore_active(self, ref: ModelRef) -> None:
        """Load the active model again after a restart, re-hashing its blob first."""
        manifest = self._stored_manifest(ref.sha256)
        if manifest is None or not await self._artifacts.verify(ref.sha256):
            log.error("active model %s %s is missing or damaged on disk", ref.name, ref.version)
            return
        try:
            await self._runtime.activate(self._artifacts.path(ref.sha256), manifest)
        except EdgeFleetError as exc:
            log.error("cannot load active model %s %s: %s", ref.name, ref.version, exc)
            return
        self._set_manifest(manifest)

    def _stored_manifest(self, sha256: str) -> ModelManifest | None:
        """The release-signed manifest saved with a blob, verified again.

        A manifest whose release key has since been rotated out no longer
        verifies; for the models this node itself verified and installed (its
        active and previous ones, recorded in ``state.json``) it is still used,
        and the blob's digest is checked again by the caller's load.
        """
        if self._trust is None:
            return None
        try:
            data = self._artifacts.load_manifest_bytes(sha256)
            if data is None:
                log.error("no stored manifest for %s", sha256[:12])
                return None
            envelope = Envelope.from_bytes(data)
            try:
                payload = self._trust.open(envelope, Role.RELEASE, now=self._clock())
            except TrustError as exc:
                installed = {r.sha256 for r in (self._state.active, self._state.previous) if r}
                if sha256 not in installed:
                    raise
                log.warning("manifest of installed model %s: %s; kept", sha256[:12], exc)
                payload = envelope.payload_bytes()
            manifest = decode(ModelManifest, payload)
        except (OSError, EdgeFleetError) as exc:
            log.error("stored manifest for %s is unusable: %s", sha256[:12], exc)
            return None
        if manifest.sha256 != sha256:
            log.error("stored manifest for %s names another blob", sha256[:12])
            return None
        return manifest

    def _make_source(self) -> None:
        kind = self.config.source
        if kind == "synthetic":
            self._synthetic = SyntheticSource(lambda: self._manifest, rate_hz=self.config.rate_hz)
            self._source = self._synthetic
        elif kind == "dir":
            assert self.config.source_dir is not None
            self._source = DirectorySource(self.config.source_dir, lambda: self._manifest)
        elif kind == "mqtt":
            self._mqtt_source = MqttSource(lambda: self._manifest)
            self._source = self._mqtt_source

    def _set_manifest(self, manifest: ModelManifest | None) -> None:
        self._manifest = manifest
        # Telemetry latency describes the active model only, so the controller's
        # health gate compares the new model with the old, not a mix of both.
        self._latency = LatencyWindow()
        if self._synthetic is not None:
            self._synthetic.model_changed()

    async def _stop_watch(self) -> None:
        """Clean shutdown: drain inference, flush results, send, publish death."""
        await self._stopping.wait()
        if self._source is not None:
            self._source.close()
        self._outbox_space.set()  # release workers waiting for space; they see the end
        _, stuck = await asyncio.wait(self._workers, timeout=5.0)
        for task in stuck:
            task.cancel()
        await self._flush_results()
        client = self._client
        if client is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._send_due(client)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                log.warning("outbox not fully sent before stopping (kept on disk): %r", exc)
            # Its own budget: a backlog that used up the first must not cost the
            # death (a clean disconnect sends no Will, so the node would stay online).
            try:
                async with asyncio.timeout(2.0):
                    await self._publish_state(client, online=False)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                log.warning("could not say goodbye to the broker: %s", exc)
        raise _Stopping

    async def _shutdown(self) -> None:
        self._stopping.set()  # a job cancelled now is interrupted, not canceled: it stays pending
        job = self._job
        if job is not None and not job.task.done():
            job.task.cancel()
            # Let it close its partial download before run() returns.
            await asyncio.wait((job.task,), timeout=5.0)
        with contextlib.suppress(EdgeFleetError):
            await self._flush_results()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._runtime.close()
        self._outbox.close()

    # ----- MQTT session ---------------------------------------------------

    def _state_message(self, *, online: bool) -> bytes:
        return encode(
            NodeState(
                node=self.config.node_id,
                online=online,
                session=self._state.session,
                agent_version=__version__,
                model=self._state.active if self._manifest is not None else None,
                previous_model=self._state.previous,
                labels=dict(self.config.labels),
                capabilities=self._capabilities() if online else None,
                outbox_floor=self._outbox.floor() if online else None,
                ts=self._clock(),
            )
        )

    def _capabilities(self) -> Capabilities:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return Capabilities(
            providers=tuple(ort.get_available_providers()),
            cpus=os.cpu_count() or 1,
            memory_bytes=max(0, pages * os.sysconf("SC_PAGE_SIZE")),
            disk_free_bytes=shutil.disk_usage(self.config.data_dir).free,
        )

    async def _connection_loop(self) -> None:
        cfg = self.config
        state_topic = topics.state(cfg.fleet, cfg.node_id)
        delays = reconnect_delays(maximum_s=cfg.reconnect_max_s)
        while not self._stopping.is_set():
            # One session number per connection, shared by its birth and its Will.
            self._state = self._state.model_copy(update={"session": self._state.session + 1})
            await self._save_state()
            will = aiomqtt.Will(state_topic, self._state_message(online=False), qos=1, retain=True)
            client = make_client(
                cfg.broker,
                client_id=cfg.node_id,
                will=will,
                persistent=True,
                session_expiry_s=cfg.session_expiry_s,
                keepalive_s=cfg.keepalive_s,
                ca_file=cfg.ca_file,
            )
            try:
                async with client:
                    await self._on_connect(client)
                    delays = reconnect_delays(maximum_s=cfg.reconnect_max_s)
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost: %s", exc)
            finally:
                self._client = None
                self._link_lost.set()
                self.connected.clear()
            await self._sleep_unless_stopping(next(delays))

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """Subscribe first and announce last: a birth means commands can be received."""
        cfg = self.config
        subscriptions = [
            topics.node_cmd(cfg.fleet, cfg.node_id),
            topics.rollout_cmd_filter(cfg.fleet),
            topics.ack(cfg.fleet, cfg.node_id),
            f"{topics.PREFIX}/{cfg.fleet}/artifact/+/data/{cfg.node_id}",
        ]
        if self._mqtt_source is not None:
            subscriptions.append(topics.infer_request(cfg.fleet, cfg.node_id))
        await client.subscribe([(t, 1) for t in subscriptions])
        await asyncio.to_thread(self._outbox.requeue_all)
        self._client = client
        self._link_lost = asyncio.Event()
        await self._publish_state(client, online=True)
        self.connected.set()
        self._wake_sender.set()
        log.info("connected to %s as %s (session %d)", cfg.broker, cfg.node_id, self._state.session)

    async def _publish_state(self, client: aiomqtt.Client, *, online: bool) -> None:
        """Publish birth (online) or a clean death, retained, QoS 1."""
        topic = topics.state(self.config.fleet, self.config.node_id)
        await client.publish(topic, self._state_message(online=online), qos=1, retain=True)

    async def _announce_model(self) -> None:
        """Re-publish the birth so watchers see the newly active model."""
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_state(client, online=True)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        """Route one incoming message; malformed input is logged and dropped."""
        payload = message.payload
        if not isinstance(payload, bytes | bytearray) or not payload:
            return  # a cleared retained command
        data = bytes(payload)
        try:
            parsed = topics.parse_topic(message.topic.value)
            kind = parsed.kind
            if kind in (topics.TopicKind.NODE_CMD, topics.TopicKind.ROLLOUT_CMD):
                try:
                    self._commands.put_nowait(data)
                except asyncio.QueueFull:
                    log.error("command queue full: dropping a command (the controller retries)")
            elif kind is topics.TopicKind.ACK:
                ack = decode(Ack, data)
                if ack.node == self.config.node_id:
                    self._spawn(self._on_ack(ack.seq))
            elif kind is topics.TopicKind.ARTIFACT_DATA:
                chunk = decode(ArtifactChunk, data)
                fetcher = self._fetchers.get(chunk.sha256)
                if fetcher is not None:
                    fetcher.deliver(chunk)
            elif kind is topics.TopicKind.INFER_REQUEST and self._mqtt_source is not None:
                request = decode(InferRequest, data)
                if (problem := _tensor_error(request)) is not None:
                    self._spawn(self._reply(request, None, problem))
                elif not self._mqtt_source.offer(request):
                    self._spawn(self._reply(request, None, "node busy: request queue full"))
        except DecodeError as exc:
            log.warning("dropping malformed message on %s: %s", message.topic.value, exc)

    async def _on_ack(self, seq: int) -> None:
        removed = await asyncio.to_thread(self._outbox.ack, seq)
        if removed:
            self._outbox_space.set()

    async def _sender(self) -> None:
        """Send due outbox entries in order; re-send unacknowledged ones periodically."""
        cfg = self.config
        # Not `while True`: on Python 3.11 a cancel that lands as a PUBACK arrives is
        # swallowed by asyncio.wait_for inside aiomqtt's publish, and the stop's
        # TaskGroup would then wait for this loop forever.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(cfg.resend_after_s, 5.0)):
                    await self._wake_sender.wait()
            self._wake_sender.clear()
            client = self._client
            if client is None:
                continue
            try:
                await self._send_due(client)
            except aiomqtt.MqttError as exc:
                log.debug("send interrupted: %s", exc)

    async def _send_due(self, client: aiomqtt.Client) -> None:
        while True:
            now = self._clock()
            entries = await asyncio.to_thread(
                self._outbox.due, now, resend_after_s=self.config.resend_after_s, limit=200
            )
            telemetry = await asyncio.to_thread(self._outbox.telemetry_due, 50)
            if not entries and not telemetry:
                return
            for entry in entries:
                await client.publish(entry.topic, entry.payload, qos=1)
            if entries:
                await asyncio.to_thread(self._outbox.mark_sent, [e.seq for e in entries], now)
            for item in telemetry:
                await client.publish(item.topic, item.payload, qos=1)
            if telemetry:
                await asyncio.to_thread(self._outbox.telemetry_sent, [t.id for t in telemetry])

    # ----- commands -------------------------------------------------------

    async def _command_worker(self) -> None:
        await self._resume_pending()
        while not self._stopping.is_set():  # see _sender: a cancel may be swallowed
            data = await self._commands.get()
            await self._handle_command(data)

    async def _handle_command(self, data: bytes) -> None:
        if self._trust is None:
            log.error("refusing a command: no trust list (fail closed)")
            await self._status(
                NodeRolloutState.REJECTED,
                None,
                code="no_trust",
                reason="node has no usable trust list",
            )
            return
        outcome = verify_command(
            data,
            trust=self._trust,
            me=self._me,
            state=self._state.verifier_state(),
            now=self._clock(),
        )
        if isinstance(outcome, Ignored):
            log.debug("ignoring command: %s", outcome.reason)
            return
        if isinstance(outcome, Rejected):
            log.warning("rejected command: %s", outcome.error)
            await self._status(
                NodeRolloutState.REJECTED,
                outcome.command,
                code=outcome.code,
                reason=str(outcome.error),
            )
            return
        if isinstance(outcome, Duplicate):
            log.info("duplicate command %s: %s", outcome.command.command_id, outcome.reason)
            await self._report_duplicate(outcome)
            return
        verifier = record(self._state.verifier_state(), outcome)
        update: dict[str, Any] = {
            "last_seq": verifier.last_seq,
            "attempted": list(verifier.attempted),
        }
        if isinstance(outcome.command.body, DeployAction | RollbackAction):
            # In the same write: after a restart the verifier calls this command a
            # duplicate, so only this record lets the node finish the job.
            update["pending"] = PendingCommand(
                command_id=outcome.command.command_id, envelope=data.decode()
            )
        self._state = self._state.model_copy(update=update)
        await self._save_state()
        await self._act(outcome)

    async def _resume_pending(self) -> None:
        """Resume the deploy or rollback that a stop or crash interrupted.

        The persisted envelope is verified again with today's trust list (a key
        rotated out since must not keep acting); its expiry is not checked again,
        since the command was accepted while valid and this only finishes it.
        One that no longer verifies ends as ``failed``.
        """
        pending = self._state.pending
        if pending is None:
            return
        if self._trust is None:
            log.error("cannot resume command %s: no trust list", pending.command_id)
            return
        try:
            command, body, manifest = _open_pending(pending, self._trust, now=self._clock())
        except (TrustError, DecodeError) as exc:
            log.error("cannot resume command %s: %s", pending.command_id, exc)
            await self._status(
                NodeRolloutState.FAILED,
                None,
                code=exc.code if isinstance(exc, TrustError) else "malformed",
                reason=f"command {pending.command_id} was interrupted and cannot resume: {exc}",
            )
            await self._clear_pending(pending.command_id)
            return
        log.info("resuming command %s after a restart", command.command_id)
        await self._start_job(command, body, manifest, resumed=True)

    async def _clear_pending(self, command_id: str) -> None:
        """Forget the persisted job of ``command_id`` (a newer one that replaced it stays)."""
        pending = self._state.pending
        if pending is None or pending.command_id != command_id:
            return
        self._state = self._state.model_copy(update={"pending": None})
        await self._save_state()

    async def _report_duplicate(self, duplicate: Duplicate) -> None:
        """Acknowledge a repeated command with where it stands, without re-running it."""
        command, manifest = duplicate.command, duplicate.manifest
        job = self._job
        if job is not None and job.command.rollout_id == command.rollout_id and manifest:
            return  # still in progress: that job reports its own states
        if isinstance(command.body, TrustUpdateAction) and isinstance(command.target, WaveTarget):
            return  # a pushed trust list stays retained: seen again on every reconnect
        active = self._state.active
        if manifest is not None and active is not None and active.sha256 == manifest.sha256:
            state = (
                NodeRolloutState.ROLLED_BACK
                if isinstance(command.body, RollbackAction)
                else NodeRolloutState.SUCCEEDED
            )
        elif manifest is not None:
            state = NodeRolloutState.FAILED
        else:
            state = NodeRolloutState.SUCCEEDED
        await self._status(
            state,
            command,
            model=manifest.ref if manifest else None,
            reason=duplicate.reason,
            duplicate=True,
        )

    async def _act(self, accepted: Accepted) -> None:
        command, body = accepted.command, accepted.command.body
        if isinstance(body, TrustUpdateAction):
            assert accepted.new_trust is not None
            await asyncio.to_thread(self._store.save_trust, accepted.new_trust)
            self._trust = accepted.new_trust
            log.info("trust list rotated to v%d", accepted.new_trust.version)
            await self._status(
                NodeRolloutState.SUCCEEDED, command, reason=f"trust v{accepted.new_trust.version}"
            )
            return
        if isinstance(body, CancelAction):
            job = self._job
            if (
                job is not None
                and job.command.rollout_id == command.rollout_id
                and not job.activated
            ):
                job.task.cancel()
            else:
                await self._status(NodeRolloutState.CANCELED, command, reason="nothing to cancel")
            return
        assert accepted.manifest is not None
        await self._start_job(command, body, accepted.manifest)

    async def _start_job(
        self,
        command: Command,
        body: DeployAction | RollbackAction,
        manifest: ModelManifest,
        *,
        resumed: bool = False,
    ) -> None:
        """Make ``command`` the node's one job, superseding one still in progress."""
        if self._job is not None and not self._job.task.done():
            log.info("superseding %s with %s", self._job.command.command_id, command.command_id)
            self._job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._job.task
        task = asyncio.get_running_loop().create_task(
            self._run_job(command, body, manifest, resumed=resumed),
            name=f"job-{command.command_id}",
        )
        self._job = _Job(command, task)

    async def _run_job(
        self,
        command: Command,
        body: DeployAction | RollbackAction,
        manifest: ModelManifest,
        *,
        resumed: bool = False,
    ) -> None:
        """Carry out a deploy or rollback, reporting each state; never raises but cancellation.

        A ``resumed`` job (interrupted by a restart) does not report ``queued``
        again, and one whose model was already activated before the restart
        only runs its health window.
        """
        job = self._job
        interrupted = False
        try:
            if not resumed:
                await self._status(NodeRolloutState.QUEUED, command, model=manifest.ref)
            active = self._state.active
            if resumed and active is not None and active.sha256 == manifest.sha256:
                await self._finish_job(command, body, manifest, job)
                return
            path = await self._obtain(command, body, manifest)
            await self._status(NodeRolloutState.VERIFYING, command, model=manifest.ref)
            await asyncio.to_thread(
                self._artifacts.save_manifest, manifest.sha256, body.manifest.to_bytes()
            )
            if isinstance(body, DeployAction) and body.activate_at is not None:
                # A plain sleep: a stop cancels the job (it stays pending) rather
                # than cutting the wait short and activating early.
                await asyncio.sleep(max(0.0, body.activate_at - self._clock()))
            await self._status(NodeRolloutState.LOADING, command, model=manifest.ref)
            if self._state.active is None or self._state.active.sha256 != manifest.sha256:
                await self._runtime.activate(path, manifest)
                previous = self._state.active
                self._state = self._state.model_copy(
                    update={"active": manifest.ref, "previous": previous}
                )
                await self._save_state()
                keep = [r.sha256 for r in (manifest.ref, previous) if r is not None]
                await asyncio.to_thread(self._artifacts.retain, keep)
                self._set_manifest(manifest)
            await self._finish_job(command, body, manifest, job)
        except asyncio.CancelledError:
            if self._stopping.is_set():
                interrupted = True  # stays pending: the next start resumes it
            else:
                await self._status(NodeRolloutState.CANCELED, command, model=manifest.ref)
            raise
        except (TrustError, ArtifactError) as exc:
            log.error("command %s failed: %s", command.command_id, exc)
            code = exc.code if isinstance(exc, TrustError) else "artifact"
            await self._status(
                NodeRolloutState.FAILED, command, model=manifest.ref, code=code, reason=str(exc)
            )
        except EdgeFleetError as exc:
            log.error("command %s failed: %s", command.command_id, exc)
            await self._status(
                NodeRolloutState.FAILED, command, model=manifest.ref, code="error", reason=str(exc)
            )
        finally:
            if self._job is job:
                self._job = None
            if not interrupted:
                await self._clear_pending(command.command_id)

    async def _finish_job(
        self,
        command: Command,
        body: DeployAction | RollbackAction,
        manifest: ModelManifest,
        job: _Job | None,
    ) -> None:
        """The active ``manifest``'s last steps: ``activated``, health window, final state."""
        if job is not None:
            job.activated = True
        await self._announce_model()
        await self._status(NodeRolloutState.ACTIVATED, command, model=manifest.ref)
        final = await self._health_window(body, command, manifest)
        if final is not None:
            rollback = isinstance(body, RollbackAction)
            state = NodeRolloutState.ROLLED_BACK if rollback else NodeRolloutState.SUCCEEDED
            await self._status(state, command, model=manifest.ref, reason=final)

    async def _obtain(
        self, command: Command, body: DeployAction | RollbackAction, manifest: ModelManifest
    ) -> Path:
        """The verified blob on disk: already present, else downloaded with resume.

        Progress (throttled by the store to once a second) is reported in order
        by one reporter task, so no ``downloading`` status overtakes ``downloaded``.
        """
        if self._artifacts.has(manifest.sha256, manifest.size):
            return self._artifacts.path(manifest.sha256)
        updates: asyncio.Queue[float | None] = asyncio.Queue()

        def progress(done: int, total: int) -> None:
            updates.put_nowait(round(100.0 * done / total, 1) if total else 100.0)

        async def reporter() -> None:
            while (percent := await updates.get()) is not None:
                await self._status(
                    NodeRolloutState.DOWNLOADING, command, model=manifest.ref, progress=percent
                )

        await self._status(NodeRolloutState.DOWNLOADING, command, model=manifest.ref, progress=0.0)
        reporting = asyncio.get_running_loop().create_task(reporter())
        try:
            path = await self._download(manifest, body.url, progress)
        finally:
            updates.put_nowait(None)
            await reporting
        await self._status(NodeRolloutState.DOWNLOADED, command, model=manifest.ref, progress=100.0)
        return path

    async def _download(
        self, manifest: ModelManifest, url: str | None, progress: Callable[[int, int], None]
    ) -> Path:
        """Download with resume, retrying transfer failures with back-off.

        An MQTT download is cut short when its connection ends and resumed from
        the ``.part`` once connected again; that is no failed attempt.
        """
        attempts = 0
        while True:
            if url is None:
                await self.connected.wait()
            fetcher = self._fetcher(manifest.sha256, url)
            try:
                download = self._artifacts.download(manifest, fetcher, progress=progress)
                if url is not None:
                    return await download
                path = await self._while_connected(download)
                if path is not None:
                    return path
                log.info("connection lost while downloading %s; resuming", manifest.name)
            except TransferError as exc:
                attempts += 1
                if attempts > self.config.download_retries:
                    raise
                log.warning("download of %s interrupted (%s); resuming", manifest.name, exc)
                await self._sleep_unless_stopping(min(30.0, 0.5 * 2**attempts))
            finally:
                self._fetchers.pop(manifest.sha256, None)

    async def _while_connected(self, work: Coroutine[Any, Any, Path]) -> Path | None:
        """``work``'s result, or None when the current connection ends first.

        ``work`` is then cancelled (the store keeps its ``.part``); a transfer
        error it raised because the connection went is a None too. Other
        errors propagate.
        """
        lost = self._link_lost
        task = asyncio.get_running_loop().create_task(work)
        watch = asyncio.get_running_loop().create_task(lost.wait())
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))  # the store closes its .part
        if task.cancelled() or (lost.is_set() and isinstance(task.exception(), TransferError)):
            return None
        return task.result()

    def _fetcher(self, sha256: str, url: str | None) -> Fetcher:
        if url is not None:
            return HttpFetcher(url=url)

        async def publish(topic: str, payload: bytes) -> None:
            client = self._client
            if client is None:
                raise TransferError("broker connection lost during download")
            try:
                await client.publish(topic, payload, qos=1)
            except aiomqtt.MqttError as exc:
                raise TransferError(f"broker connection lost during download: {exc}") from None

        fetcher = MqttChunkFetcher(
            node_id=self.config.node_id,
            fleet=self.config.fleet,
            publish=publish,
            chunk_bytes=self.config.chunk_bytes,
            window=self.config.chunk_window,
        )
        self._fetchers[sha256] = fetcher
        return fetcher

    async def _health_window(
        self, body: DeployAction | RollbackAction, command: Command, manifest: ModelManifest
    ) -> str | None:
        """Wait out the health window; ``None`` when a failure status was sent instead."""
        window = body.health_window_s if isinstance(body, DeployAction) else 0.0
        if window <= 0:
            return "activated"
        errors_before = self._counts["errors"]
        # A plain sleep: a stop cancels the job (it stays pending and the window
        # runs again after the restart) instead of ending it as a false success.
        await asyncio.sleep(window)
        new_errors = self._counts["errors"] - errors_before
        if new_errors:
            await self._status(
                NodeRolloutState.FAILED,
                command,
                model=manifest.ref,
                code="unhealthy",
                reason=f"{new_errors} inference errors during the {window:g}s health window",
            )
            return None
        return f"healthy for {window:g}s"

    async def _status(
        self,
        state: NodeRolloutState,
        command: Command | None,
        *,
        code: str | None = None,
        reason: str | None = None,
        progress: float | None = None,
        model: ModelRef | None = None,
        duplicate: bool = False,
    ) -> None:
        """Queue a status in the outbox (it is sent, and re-sent, until acknowledged)."""
        cfg = self.config

        def build(seq: int) -> bytes:
            return encode(
                NodeStatus(
                    node=cfg.node_id,
                    seq=seq,
                    command_id=command.command_id if command else None,
                    rollout_id=command.rollout_id if command else None,
                    state=state,
                    code=code,
                    reason=reason[:500] if reason else None,
                    progress=progress,
                    model=model,
                    duplicate=duplicate,
                    ts=self._clock(),
                )
            )

        topic = topics.status(cfg.fleet, cfg.node_id)
        while True:
            try:
                await asyncio.to_thread(self._outbox.put, "status", topic, build)
                break
            except OutboxFullError:
                log.error("outbox full: waiting for the controller to acknowledge")
                self._outbox_space.clear()
                await self._outbox_space.wait()
        self._wake_sender.set()

    # ----- inference ------------------------------------------------------

    async def _reader(self) -> None:
        """Take inputs from the source, gate them, and queue them for the workers.

        The bounded queue is the back-pressure: a full outbox stops the reader,
        so inputs wait at their source instead of piling up in memory.
        """
        source = self._source
        while source is not None:
            await self._outbox_space.wait()
            item = await source.next()
            if item is None:
                break
            if self._gate.should_infer(item.inputs):
                await self._inputs.put(item)
        for _ in range(max(1, self.config.concurrency)):
            await self._inputs.put(None)  # one end marker per worker

    async def _inference_worker(self) -> None:
        """Run queued inputs; with ``micro_batch`` > 1, whatever is queued runs as one batch."""
        while (item := await self._inputs.get()) is not None:
            batch = [item]
            while len(batch) < self.config.micro_batch and not self._inputs.empty():
                following = self._inputs.get_nowait()
                if following is None:
                    self._inputs.put_nowait(None)  # leave the end marker for this loop
                    break
                batch.append(following)
            await self._infer(batch)

    async def _infer(self, items: list[SourceItem]) -> None:
        try:
            if len(items) == 1:
                outcomes = [await self._runtime.infer(items[0].inputs)]
            else:
                outcomes = await self._runtime.infer_batch([i.inputs for i in items])
        except EdgeFleetError as exc:
            self._counts["errors"] += len(items)
            log.warning("inference failed: %s", exc)
            for item in items:
                if item.request is not None:
                    await self._reply(item.request, None, str(exc))
            return
        for item, outcome in zip(items, outcomes, strict=True):
            await self._record(item, outcome)

    async def _record(self, item: SourceItem, outcome: InferenceOutcome) -> None:
        """Turn one outcome into a result (queued for the outbox) and any reply."""
        manifest = self._manifest
        self._counts["inferences"] += 1
        self._latency.add(outcome.latency_ms)
        # Labels of the model that produced this output (a swap may have happened since).
        labels = (
            manifest.class_labels
            if manifest is not None and manifest.sha256 == outcome.model.sha256
            else ()
        )
        try:
            topk, tensors, top_score = summarize_output(
                outcome.outputs, topk=self.config.topk, class_labels=labels
            )
        except DecodeError as exc:
            self._counts["errors"] += 1
            log.warning("output of %s cannot be reported: %s", outcome.model.name, exc)
            if item.request is not None:
                await self._reply(item.request, None, str(exc))
            return
        async with self._reserving:
            # Reserve durably before numbering, and number only after the await, so
            # results reach _pending in seq order even with several workers.
            seq = self._result_seq + 1
            if seq > self._state.result_seq_reserved:
                # Reserve a block on disk before using any number in it, so numbers
                # stay unique across restarts.
                reserved = seq + RESULT_SEQ_BLOCK - 1
                self._state = self._state.model_copy(update={"result_seq_reserved": reserved})
                await self._save_state()
            self._result_seq = seq
        result = InferenceResult(
            seq=seq,
            model=outcome.model,
            input_digest=input_digest(item.inputs),
            latency_ms=outcome.latency_ms,
            ts=self._clock(),
            topk=topk,
            tensors=tensors,
            corner_case=is_corner_case(top_score, self.config.corner_threshold),
            source=item.source[:500],
        )
        self._pending.append(result)
        if item.request is not None:
            await self._reply(item.request, result, None)

    async def _reply(
        self, request: InferRequest, result: InferenceResult | None, error: str | None
    ) -> None:
        client = self._client
        if client is None:
            return
        reply = InferReply(id=request.id, ok=error is None, result=result, error=error)
        topic = topics.infer_reply(self.config.fleet, self.config.node_id, request.client)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, encode(reply), qos=1)

    async def _batcher(self) -> None:
        # Ends on stop (the sleep no longer suspends then, so looping would starve
        # the event loop); _stop_watch does the final flush after draining workers.
        while not self._stopping.is_set():
            await self._sleep_unless_stopping(self.config.batch_interval_s)
            await self._flush_results()

    async def _flush_results(self) -> None:
        """Move pending results into the outbox, ``batch_max`` per message."""
        cfg = self.config
        topic = topics.results(cfg.fleet, cfg.node_id)
        while self._pending:
            batch = tuple(self._pending[: cfg.batch_max])

            def build(seq: int, batch: tuple[InferenceResult, ...] = batch) -> bytes:
                return encode(ResultBatch(node=cfg.node_id, seq=seq, results=batch))

            try:
                await asyncio.to_thread(self._outbox.put, "results", topic, build)
            except OutboxFullError:
                log.error("outbox full: pausing inference until the controller acknowledges")
                self._outbox_space.clear()
                return
            del self._pending[: len(batch)]
            self._wake_sender.set()

    async def _telemetry_loop(self) -> None:
        cfg = self.config
        topic = topics.telemetry(cfg.fleet, cfg.node_id)
        last_cpu = (time.monotonic(), time.process_time())
        while True:
            await self._sleep_unless_stopping(cfg.telemetry_interval_s)
            if self._stopping.is_set():
                return
            now_mono, now_cpu = time.monotonic(), time.process_time()
            cpu = 100.0 * (now_cpu - last_cpu[1]) / max(1e-6, now_mono - last_cpu[0])
            last_cpu = (now_mono, now_cpu)
            stats = await asyncio.to_thread(self._outbox.stats)
            message = Telemetry(
                node=cfg.node_id,
                ts=self._clock(),
                uptime_s=now_mono - self._started,
                inferences=self._counts["inferences"],
                errors=self._counts["errors"],
                skips=self._gate.skipped,
                queue_depth=(self._source.depth() if self._source else 0) + self._inputs.qsize(),
                outbox_depth=stats.depth,
                latency=self._latency.stats(),
                cpu_percent=max(0.0, cpu),
                memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                model=self._state.active,
            )
            await asyncio.to_thread(self._outbox.put_telemetry, topic, encode(message))
            self._wake_sender.set()

    # ----- helpers --------------------------------------------------------

    async def _save_state(self) -> None:
        """Write the current state; saves run one at a time, each writing the latest."""
        async with self._state_lock:
            await asyncio.to_thread(self._store.save, self._state)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    def stats(self) -> dict[str, int]:
        """Counters for tests and the simulator."""
        return {
            **self._counts,
            "skips": self._gate.skipped,
            "pending": len(self._pending),
            "stacked_runs": self._runtime.stacked_runs,
        }

    def outbox_stats(self) -> OutboxStats:
        """Depth and last ``seq`` of the on-disk outbox (in-memory counters, no I/O)."""
        return self._outbox.stats()


def _tensor_error(request: InferRequest) -> str | None:
    """Why a request's tensors cannot become arrays (data not filling the shape, a
    value out of the dtype's range), else ``None``. Checked before queueing: the
    source builds the arrays in an inference worker, where the error would end it.
    """
    for tensor in request.inputs:
        try:
            np.asarray(tensor.data, dtype=numpy_dtype(tensor.dtype)).reshape(tensor.shape)
        except (ValueError, OverflowError) as exc:
            return f"input {tensor.name!r}: {exc}"
    return None


def _open_pending(
    pending: PendingCommand, trust: TrustStore, *, now: float
) -> tuple[Command, DeployAction | RollbackAction, ModelManifest]:
    """Verify a persisted command envelope again: command, action and manifest.

    Raises:
        TrustError: a signature no longer verifies (e.g. a key rotated out).
        DecodeError: the stored envelope is malformed or holds no deploy or rollback.
    """
    envelope = Envelope.from_bytes(pending.envelope.encode())
    command = decode(Command, trust.open(envelope, Role.ROLLOUT, now=now))
    body = command.body
    if not isinstance(body, DeployAction | RollbackAction):
        raise DecodeError(f"pending command is a {body.action}, not a deploy or rollback")
    manifest = decode(ModelManifest, trust.open(body.manifest, Role.RELEASE, now=now))
    return command, body, manifest


class _Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the task group to unwind every loop on stop."""
