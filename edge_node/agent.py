"""The edge node daemon: the composition root that builds the node's parts and runs them.

The agent itself only starts, runs and stops; each concern lives in its own
part, wired here and handed the small shared objects it needs
(:mod:`edge_node.context`, :class:`~edge_node.state.StateKeeper`):

* :class:`~edge_node.link.NodeLink` keeps one persistent broker session through
  the transport seam (reconnecting with back-off, birth and Will with a session
  counter) and routes incoming messages;
* :class:`~edge_node.sender.OutboxSender` queues statuses, result batches and
  telemetry in the disk-backed outbox and sends them until acknowledged;
* :class:`~edge_node.commands.CommandHandler` verifies every command and hands
  deploys and rollbacks to :class:`~edge_node.jobs.JobRunner`, which reports
  each step by the table in :mod:`edge_node.job_states`;
* :class:`~edge_node.pipeline.Pipeline` reads inputs, runs inference and turns
  outcomes into results and telemetry.

What the whole guarantees:

* without a usable trust list it does not start (:meth:`NodeAgent.run` raises
  before connecting);
* a failed download, load or warm-up never replaces the working model;
* statuses and results leave the outbox only on the controller's ack, and go
  out again after every reconnect, in order; nothing is lost across a broker
  outage or a node restart;
* an accepted deploy or rollback is persisted with the verifier state and
  resumed after a stop;
* ``stop()`` finishes in-flight inferences, flushes results to the outbox,
  sends what it can, and publishes its own death before disconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_node.artifacts import ArtifactStore
from edge_node.commands import CommandHandler
from edge_node.context import Background, Connection, ServingModel
from edge_node.core import NodeIdentity
from edge_node.downloads import Downloader
from edge_node.jobs import JobRunner, StatusReporter
from edge_node.link import Inbound, LinkSettings, NodeLink
from edge_node.outbox import Outbox, OutboxStats
from edge_node.pipeline import Pipeline, PipelineSettings
from edge_node.runtime import ModelRuntime, SessionOptionsConfig
from edge_node.sender import OutboxSender
from edge_node.state import NodeStore, StateKeeper
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Transport
from shared.broker import BrokerAddress
from shared.errors import EdgeFleetError, TrustError
from shared.messages import ModelRef

__all__ = ["AgentConfig", "NodeAgent", "SourceKind"]

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
    micro_batch: int = 32  # most waiting inputs stacked into one run (dynamic batch models)
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
    cert_file: str | None = None  # mutual TLS: the node's certificate and key
    key_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86_400
    reconnect_max_s: float = 30.0
    download_retries: int = 20


class NodeAgent:
    """One edge node. ``await agent.run()`` until ``agent.stop()`` is called.

    ``transport`` defaults to the broker of ``config`` (``MqttTransport``);
    tests pass an in-memory one. ``executor`` runs ``session.run`` (default: a
    small pool of the node's own); the simulator shares one among its nodes.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config
        self._transport = transport or MqttTransport(
            config.broker,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )
        self._clock = clock
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # started: trust and the active model loaded
        self._background = Background()
        self._connection = Connection()
        self._inbound: Counter[str] = Counter()  # refused and dropped incoming messages
        self._serving = ServingModel()
        self._store = NodeStore(config.data_dir)
        self._keeper = StateKeeper(self._store)
        self._artifacts = ArtifactStore(config.data_dir)
        self._runtime = ModelRuntime(
            options=config.session_options, swap_mode=config.swap_mode, executor=executor
        )
        self._outbox = Outbox(
            config.data_dir / "outbox.db",
            max_bytes=config.outbox_max_bytes,
            first_seq=int(clock() * 1_000_000),  # a new outbox never reuses acked numbers
        )
        self._sender = OutboxSender(
            self._outbox,
            self._connection,
            resend_after_s=config.resend_after_s,
            clock=clock,
            stopping=self._stopping,
        )
        self._downloader = Downloader(
            self._artifacts,
            self._connection,
            node_id=config.node_id,
            fleet=config.fleet,
            chunk_bytes=config.chunk_bytes,
            chunk_window=config.chunk_window,
            retries=config.download_retries,
            stopping=self._stopping,
        )
        self._pipeline = self._make_pipeline()
        self._commands, self._runner = self._make_commands()
        self._link = self._make_link()

    def _make_pipeline(self) -> Pipeline:
        cfg = self.config
        settings = PipelineSettings(
            node_id=cfg.node_id,
            fleet=cfg.fleet,
            source=cfg.source,
            source_dir=cfg.source_dir,
            rate_hz=cfg.rate_hz,
            concurrency=cfg.concurrency,
            micro_batch=cfg.micro_batch,
            change_threshold=cfg.change_threshold,
            corner_threshold=cfg.corner_threshold,
            topk=cfg.topk,
            batch_max=cfg.batch_max,
            batch_interval_s=cfg.batch_interval_s,
            telemetry_interval_s=cfg.telemetry_interval_s,
        )
        return Pipeline(
            settings,
            runtime=self._runtime,
            serving=self._serving,
            keeper=self._keeper,
            sender=self._sender,
            connection=self._connection,
            background=self._background,
            stopping=self._stopping,
            clock=self._clock,
            inbound=self._inbound,
        )

    def _make_commands(self) -> tuple[CommandHandler, JobRunner]:
        cfg = self.config
        reporter = StatusReporter(
            self._sender, node_id=cfg.node_id, fleet=cfg.fleet, clock=self._clock
        )
        runner = JobRunner(
            keeper=self._keeper,
            artifacts=self._artifacts,
            runtime=self._runtime,
            serving=self._serving,
            downloader=self._downloader,
            reporter=reporter,
            announce=self._announce,
            stopping=self._stopping,
            clock=self._clock,
        )
        commands = CommandHandler(
            me=NodeIdentity(cfg.node_id, cfg.fleet, dict(cfg.labels)),
            trust_file=cfg.trust_file,
            store=self._store,
            keeper=self._keeper,
            artifacts=self._artifacts,
            runtime=self._runtime,
            serving=self._serving,
            runner=runner,
            reporter=reporter,
            stopping=self._stopping,
            clock=self._clock,
            counters=self._inbound,
        )
        return commands, runner

    def _on_ack(self, data: bytes) -> None:
        seq = self._commands.verified_ack(data)
        if seq is not None:
            self._background.spawn(self._sender.on_ack(seq))

    def _make_link(self) -> NodeLink:
        cfg = self.config
        pipeline = self._pipeline
        inbound = Inbound(
            command=self._commands.offer,
            ack=self._on_ack,
            chunk=self._downloader.deliver,
            infer_request=pipeline.offer_request if pipeline.takes_requests else None,
        )
        settings = LinkSettings(
            node_id=cfg.node_id,
            fleet=cfg.fleet,
            labels=dict(cfg.labels),
            data_dir=cfg.data_dir,
            keepalive_s=cfg.keepalive_s,
            session_expiry_s=cfg.session_expiry_s,
            reconnect_max_s=cfg.reconnect_max_s,
        )
        return NodeLink(
            settings,
            self._transport,
            connection=self._connection,
            keeper=self._keeper,
            serving=self._serving,
            sender=self._sender,
            inbound=inbound,
            stopping=self._stopping,
            clock=self._clock,
            counters=self._inbound,
        )

    async def _announce(self) -> None:
        await self._link.announce()

    # ----- what callers see -----------------------------------------------------

    @property
    def connected(self) -> asyncio.Event:
        """Set while the node is connected to its broker."""
        return self._connection.connected

    @property
    def active(self) -> ModelRef | None:
        """The model this node has installed (``state.json``)."""
        return self._keeper.state.active

    @property
    def serving(self) -> ModelRef | None:
        """The model new inference requests run on right now."""
        return self._runtime.active

    def stats(self) -> dict[str, int]:
        """Counters for tests and the simulator."""
        return {
            **self._pipeline.counts,
            "skips": self._pipeline.gate.skipped,
            "pending": len(self._pipeline.pending),
            "stacked_runs": self._runtime.stacked_runs,
            "refused_acks": self._commands.refused_acks,
            **self._inbound,
        }

    def outbox_stats(self) -> OutboxStats:
        """Depth and last ``seq`` of the on-disk outbox (in-memory counters, no I/O)."""
        return self._outbox.stats()

    # ----- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; then shut down cleanly.

        Raises:
            TrustFileError: no usable trust list; the node stops before it
                connects (no birth: a node that would refuse every command must
                not look ready to the controller).
        """
        try:
            self._commands.load_trust()
        except TrustError:
            await self._shutdown()
            raise
        await self._commands.remember_trust()
        await self._commands.restore_active()
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._link.run(), name="connection")
                group.create_task(self._commands.run(), name="commands")
                group.create_task(self._sender.run(), name="sender")
                group.create_task(self._pipeline.report_telemetry(), name="telemetry")
                group.create_task(self._pipeline.batch(), name="batcher")
                workers = [
                    group.create_task(self._pipeline.work(), name=f"inference-{index}")
                    for index in range(self._pipeline.workers)
                ]
                workers.append(group.create_task(self._pipeline.read(), name="source"))
                group.create_task(self._stop_watch(workers), name="stop-watch")
        except* _Stopping:
            pass
        finally:
            await self._shutdown()

    async def _stop_watch(self, workers: list[asyncio.Task[None]]) -> None:
        """Clean shutdown: drain inference, flush results, send, publish death."""
        await self._stopping.wait()
        await self._pipeline.drain(workers)
        await self._link.goodbye()
        raise _Stopping

    async def _shutdown(self) -> None:
        self._stopping.set()  # a job cancelled now is interrupted, not canceled: it stays pending
        await self._runner.shutdown()
        with contextlib.suppress(EdgeFleetError):  # an unusable outbox keeps nothing more
            await self._pipeline.flush()
        await self._background.cancel_all()
        await self._runtime.close()
        self._outbox.close()


class _Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the task group to unwind every loop on stop."""
