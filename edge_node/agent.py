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
  sends what it can, and publishes its own death before disconnecting;
* nothing but ``stop()`` ends :meth:`NodeAgent.run` once it has started: a
  background loop that raises is logged, counted (``task_restarts``) and
  started again with jittered back-off (:func:`supervise`); fire-and-forget
  tasks log and count their failures (:class:`~edge_node.context.Background`);
  a full disk is a state the parts live through (:mod:`edge_node.disk`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_node.artifacts import ArtifactStore
from edge_node.commands import CommandHandler
from edge_node.context import Background, Connection, ServingModel, sleep_unless
from edge_node.core import NodeIdentity
from edge_node.disk import DiskFullError
from edge_node.downloads import Downloader
from edge_node.jobs import JobRunner, StatusReporter
from edge_node.link import Inbound, LinkSettings, NodeLink
from edge_node.outbox import Outbox, OutboxStats
from edge_node.pipeline import Pipeline, PipelineSettings
from edge_node.presence_core import ControllerWatch
from edge_node.runtime import ModelRuntime, SessionOptionsConfig
from edge_node.sender import OutboxSender
from edge_node.state import NodeStore, StateKeeper
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Transport, reconnect_delays
from shared.broker import BrokerAddress
from shared.errors import EdgeFleetError, TrustError
from shared.messages import ModelRef

__all__ = ["AgentConfig", "NodeAgent", "SourceKind", "supervise"]

log = logging.getLogger(__name__)

SourceKind = Literal["synthetic", "dir", "mqtt", "none"]

_RESTART_MAX_S = 30.0  # the longest pause before a failed loop starts again
_HEALTHY_S = 60.0  # a loop that ran this long before failing starts again at the shortest pause


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
    silent_resend_max_s: float = 300.0  # the oldest entry's longest pause while no controller acks
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
        self.task_restarts: Counter[str] = Counter()  # by task name
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
        # Silent after an unanswered send has waited through three re-sends.
        watch = ControllerWatch(silent_after_s=4 * config.resend_after_s)
        self._sender = OutboxSender(
            self._outbox,
            self._connection,
            resend_after_s=config.resend_after_s,
            silent_resend_max_s=config.silent_resend_max_s,
            watch=watch,
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
            controller_offline=lambda: watch.offline,
        )
        self._sender.on_back(self._downloader.controller_online)
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
            controller=lambda state: self._sender.controller_state(state.online),
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
            "task_restarts": sum(self.task_restarts.values()),
            "background_failures": self._background.failures,
            "dropped_telemetry": self._sender.dropped_telemetry,
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
        try:
            await self._commands.remember_trust()
        except DiskFullError as exc:  # the list in force is used; recorded by the next save
            log.error("trust version not recorded: %s", exc)
        await self._commands.restore_active()
        self.ready.set()
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
            ("connection", self._link.run),
            ("commands", self._commands.run),
            ("sender", self._sender.run),
            ("telemetry", self._pipeline.report_telemetry),
            ("batcher", self._pipeline.batch),
        ]
        try:
            async with asyncio.TaskGroup() as group:
                for name, loop in loops:
                    group.create_task(self._supervise(name, loop), name=name)
                workers = [
                    group.create_task(
                        self._supervise(f"inference-{index}", self._pipeline.work),
                        name=f"inference-{index}",
                    )
                    for index in range(self._pipeline.workers)
                ]
                workers.append(
                    group.create_task(self._supervise("source", self._pipeline.read), name="source")
                )
                group.create_task(self._stop_watch(workers), name="stop-watch")
        except* _Stopping:
            pass
        finally:
            await self._shutdown()

    async def _supervise(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await supervise(name, loop, stopping=self._stopping, failures=self.task_restarts)

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


async def supervise(
    name: str,
    loop: Callable[[], Coroutine[Any, Any, None]],
    *,
    stopping: asyncio.Event,
    failures: Counter[str],
    maximum_s: float = _RESTART_MAX_S,
) -> None:
    """Run ``loop()`` until it returns or ``stopping`` is set; restart it when it raises.

    Each failure is logged with its traceback and counted in ``failures[name]``;
    the next start waits a jittered, doubling pause (up to ``maximum_s``), back
    to the shortest once a run lasted :data:`_HEALTHY_S`. Cancellation passes.
    """
    delays = reconnect_delays(maximum_s=maximum_s)
    while not stopping.is_set():
        started = time.monotonic()
        try:
            await loop()
        except Exception:
            if stopping.is_set():
                return
            if time.monotonic() - started >= _HEALTHY_S:
                delays = reconnect_delays(maximum_s=maximum_s)
            failures[name] += 1
            delay = next(delays)
            log.exception("node task %s failed; starting it again in %.1f s", name, delay)
            await sleep_unless(stopping, delay)
        else:
            return
