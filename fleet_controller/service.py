"""``fleetctl serve``: the controller service, the composition root.

This module only builds and runs the controller's parts; each keeps its own
invariants, stated in its module:

* :mod:`fleet_controller.link`: the broker connection (retained
  ``controller/state`` with its Will, subscriptions, strict decoding, routing);
* :mod:`fleet_controller.ingest`: bounded queue, batch writer, acks after commit;
* :mod:`fleet_controller.leader`: the rollout lease (one replica leads);
* :mod:`fleet_controller.ticker`: rollout ticks (saved before acted on, under
  the lease's fence), pruning;
* :mod:`fleet_controller.deployments`: the deployment operations and the
  reconciler that brings late joiners of a group to its model;
* :mod:`fleet_controller.actions`: signing and publishing rollout commands, as
  planned by :mod:`fleet_controller.commands`;
* :mod:`fleet_controller.operator_api`: operator requests (parse once, dispatch
  by table, reply, audit), handled by :mod:`fleet_controller.handlers`;
* :mod:`fleet_controller.artifacts`: chunk answers and blob uploads.

Nothing stops the controller but :meth:`ControllerService.stop`: each loop of
the task group isolates its own failures (see the modules above), and, as a
last resort, a loop that raises anyway is logged with its traceback and
started again after a pause. Work started per message (chunk answers,
operator requests) runs in background tasks whose exceptions are logged,
never lost, and which are cancelled on stop.

The broker is reached through an injected
:class:`~edgefleet_io.transport.Transport` (a real broker by default, the
in-memory one in tests) and time through an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Transport, reconnect_delays
from fleet_controller.actions import ActionExecutor, CommandSender
from fleet_controller.artifacts import Artifacts
from fleet_controller.blobs import BlobStore, check_blob_dir
from fleet_controller.deployments import RECONCILE_EVERY_S, Deployments
from fleet_controller.dynsec import control as dynsec_control
from fleet_controller.handlers import OperatorHandlers
from fleet_controller.http_artifacts import ArtifactHttpServer
from fleet_controller.ingest import Ingest
from fleet_controller.keys import load_key, load_trust, trust_path
from fleet_controller.leader import DEFAULT_LEASE_S, Leadership
from fleet_controller.link import (
    MAX_RECONNECT_DELAY_S,
    ControllerLink,
    InboxLimits,
    Ingested,
    Routes,
    check_peer,
)
from fleet_controller.operator_api import OperatorApi
from fleet_controller.quotas import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_NODE_BYTES_PER_S,
    DEFAULT_NODE_RESULTS_PER_S,
    NodeQuotas,
)
from fleet_controller.store import Store, parse_database_url
from fleet_controller.ticker import RolloutTicker
from shared.broker import BrokerAddress
from shared.envelope import Envelope
from shared.errors import TransportError
from shared.messages import ArtifactRequest
from shared.trust import Role

__all__ = ["ControllerConfig", "ControllerService"]

log = logging.getLogger(__name__)

RESTART_PAUSE_S = 1.0  # before a crashed loop starts again
MAX_PENDING_REQUESTS = 256  # operator requests being handled at once; more are dropped


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    broker: BrokerAddress
    db_url: str
    keys_dir: Path
    fleet: str = "default"
    controller_id: str = field(default_factory=lambda: f"controller-{secrets.token_hex(4)}")
    tick_s: float = 1.0
    lease_s: float = DEFAULT_LEASE_S  # the rollout lease's term; renewed every third of it
    reconcile_s: float = RECONCILE_EVERY_S  # how often deployments are reconciled
    queue_max: int = 20_000  # messages waiting to be stored
    inbox: InboxLimits = field(default_factory=InboxLimits)  # received, waiting to be routed
    batch_max: int = 500  # messages per ingest transaction
    retention_days: float = 30.0
    node_results_per_s: float = DEFAULT_NODE_RESULTS_PER_S  # per node, with a 30 s burst
    node_bytes_per_s: float = DEFAULT_NODE_BYTES_PER_S
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    dynsec: bool = False  # the broker runs the dynamic security plugin: revoke there too
    ca_file: str | None = None
    cert_file: str | None = None  # mutual TLS: this replica's certificate and key
    key_file: str | None = None
    passphrase: bytes | None = None
    # Optional HTTP artifact server: where it listens, and the base URL nodes use.
    http_listen: tuple[str, int] | None = None
    http_url: str | None = None


def blob_dir(config: ControllerConfig) -> Path:
    """Beside a SQLite file, else beside the keys folder. Raises: StoreError (bad URL)."""
    sqlite_path = parse_database_url(config.db_url).sqlite_path
    if sqlite_path is not None:
        return sqlite_path.parent / "blobs"
    return config.keys_dir.parent / "blobs"


class _Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the task group to unwind every loop on stop."""


class _Background:
    """Tasks started per message: kept until done, exceptions logged, cancelled on close."""

    def __init__(self, metrics: Counter[str]) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts: Counter[str] = Counter()
        self._metrics = metrics

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        self._counts[name] += 1
        task.add_done_callback(self._done)

    def count(self, name: str) -> int:
        """Tasks named ``name`` still running."""
        return self._counts[name]

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        name = task.get_name()
        self._counts[name] -= 1
        if self._counts[name] <= 0:
            del self._counts[name]  # one key per node's chunk task name: keep it bounded
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._metrics["background_errors"] += 1
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ControllerService:
    """Run with ``await service.run()``; ``service.stop()`` ends it cleanly."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self.metrics: Counter[str] = Counter()
        self.blobs = BlobStore(blob_dir(config))  # beside a SQLite file, which it also creates
        self.store = Store.open(config.db_url)
        rollout_key = load_key(config.keys_dir, Role.ROLLOUT, config.passphrase)
        trust = load_trust(config.keys_dir, now=clock())
        self._stopping = asyncio.Event()
        self._background = _Background(self.metrics)
        fleet = config.fleet
        self._transport = transport or MqttTransport(
            config.broker,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )
        self.link = ControllerLink(
            self._transport,
            fleet=fleet,
            controller_id=config.controller_id,
            store_id=self.store.store_id,
            clock=clock,
            metrics=self.metrics,
            shared=config.broker.shared_subscriptions,
            inbox=config.inbox,
        )
        self._quotas = NodeQuotas(
            results_per_s=config.node_results_per_s,
            bytes_per_s=config.node_bytes_per_s,
            metrics=self.metrics,
        )
        self.ingest = Ingest(
            self.store,
            self.link,
            fleet=fleet,
            clock=clock,
            metrics=self.metrics,
            ack_key=rollout_key,
            quotas=self._quotas,
            queue_max=config.queue_max,
            batch_max=config.batch_max,
        )
        self.artifacts = Artifacts(
            self.blobs,
            self.link,
            fleet=fleet,
            metrics=self.metrics,
            fetchers=self.store.rollouts.fetchers,
            clock=clock,
            max_upload_bytes=config.max_upload_bytes,
        )
        sender = CommandSender(link=self.link, store=self.store, key=rollout_key, fleet=fleet)
        executor = ActionExecutor(
            sender=sender,
            link=self.link,
            store=self.store,
            fleet=fleet,
            artifact_base=config.http_url,
        )
        self.leadership = Leadership(
            self.store,
            holder=config.controller_id,
            lease_s=config.lease_s,
            connected=self.link.connected,
            on_change=self.link.set_term,
        )
        self.ticker = RolloutTicker(
            self.store,
            executor,
            leadership=self.leadership,
            connected=self.link.connected,
            clock=clock,
            metrics=self.metrics,
            tick_s=config.tick_s,
            retention_days=config.retention_days,
        )
        handlers = OperatorHandlers(
            store=self.store,
            artifacts=self.artifacts,
            executor=executor,
            sender=sender,
            trust=trust,
            trust_file=trust_path(config.keys_dir),
            clock=clock,
            metrics=self.metrics,
            broker_control=self._broker_control if config.dynsec else None,
        )
        self.deployments = Deployments(
            store=self.store,
            handlers=handlers,
            connected=self.link.connected,
            leading=lambda: self.leadership.fence is not None,
            clock=clock,
            interval_s=config.reconcile_s,
        )
        self.operator_api = OperatorApi(
            {**handlers.routes(), **self.deployments.routes()},
            store=self.store,
            link=self.link,
            fleet=fleet,
            trust=lambda: handlers.trust,
            clock=clock,
            metrics=self.metrics,
        )

    @property
    def connected(self) -> asyncio.Event:
        """Set while the broker connection is up."""
        return self.link.connected

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`.

        Raises:
            StoreError: the store fails at start.
            BlobDirError: the blob directory is not the one this store's replicas share.
            StoreConflictError: a live controller of this fleet uses another store.
        """
        try:
            await asyncio.to_thread(
                check_blob_dir, self.blobs.root, self.store.store_id, self.store.claim_blob_dir
            )
            joining = await self._may_join()
        except BaseException:
            await asyncio.to_thread(self.store.close)
            raise
        if not joining:
            await asyncio.to_thread(self.store.close)
            return
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
        routes = Routes(ingest=self._on_ingest, artifact=self._on_chunk, operator=self._on_request)
        stopping = self._stopping
        try:
            async with asyncio.TaskGroup() as group:
                loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
                    "link": lambda: self.link.run(routes, stopping),
                    "leader": lambda: self.leadership.run(stopping),
                    "ingest": self.ingest.run,
                    "ticker": lambda: self.ticker.run(stopping),
                    "pruner": lambda: self.ticker.prune(stopping),
                    "reconciler": lambda: self.deployments.run(stopping),
                    "uploads": lambda: self.artifacts.sweep_uploads(stopping),
                }
                for name, loop in loops.items():
                    group.create_task(self._keep_running(name, loop), name=name)
                group.create_task(self._stop_watch(), name="stop-watch")
        except* _Stopping:
            pass
        finally:
            await self._background.close()
            if http is not None:
                await asyncio.to_thread(http.close)
            await asyncio.to_thread(self.store.close)

    async def _may_join(self) -> bool:
        """Check the retained ``controller/state`` before joining (waiting for the
        broker as long as it takes); False when stopped meanwhile.

        Raises: StoreConflictError (see :func:`~fleet_controller.link.check_peer`).
        """
        delays = reconnect_delays(maximum_s=MAX_RECONNECT_DELAY_S)
        while not self._stopping.is_set():
            try:
                peer = await self.link.read_peer()
            except TransportError as exc:
                log.warning("cannot reach the broker to check for other controllers: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next(delays)):
                        await self._stopping.wait()
                continue
            check_peer(peer, store_id=self.store.store_id)
            log.info("store %s; joining fleet %s", self.store.store_id, self.config.fleet)
            return True
        return False

    async def _broker_control(self, commands: list[dict[str, Any]]) -> None:
        await dynsec_control(self._transport, commands)

    def _on_ingest(self, item: Ingested, size: int) -> None:
        if self._quotas.admit(item.node, size, self._clock()):
            self.ingest.offer(item)

    def _on_chunk(self, request: ArtifactRequest) -> None:
        self._background.spawn(self.artifacts.serve_chunk(request), f"chunk-{request.node}")

    def _on_request(self, request: Envelope) -> None:
        if self._background.count("ctl") >= MAX_PENDING_REQUESTS:
            self.metrics["ctl_overflow"] += 1
            return
        self._background.spawn(self.operator_api.handle(request), "ctl")

    async def _keep_running(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``loop`` until it returns; if it raises, log it and start it again."""
        while True:
            try:
                await loop()
            except Exception:
                self.metrics["loop_restarts"] += 1
                log.exception("controller loop %s crashed; restarting it", name)
            else:
                return
            await asyncio.sleep(RESTART_PAUSE_S)

    async def _stop_watch(self) -> None:
        await self._stopping.wait()
        await self.ingest.drain()
        await self.leadership.release()
        await self.link.announce_offline()
        raise _Stopping
