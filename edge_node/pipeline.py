"""The inference pipeline: sources, inference threads, result batches, telemetry.

``concurrency`` inference threads (:mod:`edge_node.inference_threads`) take
inputs, run them in micro-batches, summarise and number the results and post
them as chunks. The event loop here only reads directory and MQTT sources into
the threads' bounded queue, appends posted chunks to the pending columns,
answers MQTT requests and keeps telemetry; every ``batch_interval_s`` it moves
pending results into the outbox as columnar
:class:`~shared.result_batch.ResultBatch` messages.

Invariants:

* inputs wait at their source, not in memory: the queue to the threads is
  bounded, and the threads take no input while the outbox is full (``space``)
  until acks free room;
* results reach the pending columns, and the batches, in ``seq`` order, each
  naming the model that produced it (the threads' invariants); one flush runs
  at a time, and results leave the columns only once the outbox holds them;
* **an answered result is a durable result**: the reply to an MQTT request
  that carries a result is published only after the outbox has committed
  (fsynced) that result. A run's results that a requester waits for are
  flushed at once rather than at the next ``batch_interval_s``; results that
  become ready while one commit runs go together in the next (group commit:
  one transaction for everything pending, at most ``_GROUP_BATCHES`` messages);
* result batches and telemetry go through the outbox; nothing is published
  from here except replies to MQTT requests (best effort: a lost reply is the
  requester's to retry; a failed inference is answered at once, it has no
  result to keep);
* telemetry latency describes the serving model only: the window restarts on
  every swap, and results of another model are not counted in it, so the
  controller compares the new model with the old, not a mix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from edge_node.batches_core import PendingResults, result_of_row
from edge_node.context import Background, Connection, ServingModel, sleep_unless
from edge_node.inference_threads import InferenceThreads
from edge_node.results_core import (
    ChangeGate,
    LatencyWindow,
    PeriodCounter,
)
from edge_node.runtime import ModelRuntime
from edge_node.sender import OutboxSender
from edge_node.sources import (
    DirectorySource,
    InputQueue,
    InputSource,
    MqttSource,
    SyntheticSource,
    tensor_error,
)
from edge_node.state import StateKeeper
from edgefleet_io.throttle import LogThrottle
from shared import topics
from shared.errors import TransportError
from shared.messages import InferenceResult, InferReply, InferRequest, Telemetry, encode
from shared.result_batch import ResultBatch, encode_results

__all__ = ["Pipeline", "PipelineSettings"]

log = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a stop waits for in-flight inferences
_GROUP_BATCHES = 64  # result batch messages committed in one transaction, at most


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSettings:
    node_id: str
    fleet: str
    source: str  # synthetic, dir, mqtt or none
    source_dir: Path | None
    rate_hz: float | None
    concurrency: int
    micro_batch: int  # most requests stacked into one session.run (dynamic batch models)
    change_threshold: float
    corner_threshold: float
    topk: int
    batch_max: int
    batch_interval_s: float
    telemetry_interval_s: float


class Pipeline:
    """Reads inputs, runs them on the serving model, and queues results and telemetry."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        runtime: ModelRuntime,
        serving: ServingModel,
        keeper: StateKeeper,
        sender: OutboxSender,
        connection: Connection,
        background: Background,
        stopping: asyncio.Event,
        clock: Callable[[], float],
        inbound: Counter[str],
    ) -> None:
        """``inbound`` counts what the node's link and command handler refused or
        dropped (reported in telemetry)."""
        self._cfg = settings
        self._runtime = runtime
        self._serving = serving
        self._keeper = keeper
        self._sender = sender
        self._connection = connection
        self._background = background
        self._stopping = stopping
        self._clock = clock
        self._inbound = inbound
        self.workers = max(1, settings.concurrency)
        max_rows = max(1, settings.micro_batch)
        self.counts = {"inferences": 0, "errors": 0, "unkept": 0}
        self._unkept_log = LogThrottle(log, every_s=10.0)
        self.gate = ChangeGate(settings.change_threshold)
        self.pending = PendingResults()
        self._latency = LatencyWindow()
        self._period = PeriodCounter(clock())
        self._started = time.monotonic()
        self._queue = InputQueue(2 * max_rows * self.workers)
        self._flushing = asyncio.Lock()  # one flush at a time: each cuts from the front
        # Replies held until the outbox holds their result: (result seq, request, result).
        self._unreplied: collections.deque[tuple[int, InferRequest, InferenceResult]] = (
            collections.deque()
        )
        self._stored_through = 0  # the last result seq the outbox holds
        self._committing = False
        self._commit_again = False
        self._synthetic: SyntheticSource | None = None
        self._queued: InputSource | None = None
        self._mqtt: MqttSource | None = None
        self.source = self._make_source()
        self._threads = InferenceThreads(
            runtime=runtime,
            keeper=keeper,
            space=sender.space,
            gate=self.gate,
            synthetic=self._synthetic,
            queue=self._queue,
            max_rows=max_rows,
            topk=settings.topk,
            corner_threshold=settings.corner_threshold,
            clock=clock,
            on_posted=self._accept,
        )
        serving.on_change(self._model_changed)

    def _make_source(self) -> InputSource | SyntheticSource | None:
        cfg = self._cfg
        if cfg.source == "synthetic":
            self._synthetic = SyntheticSource(rate_hz=cfg.rate_hz)
            return self._synthetic
        if cfg.source == "dir":
            assert cfg.source_dir is not None
            self._queued = DirectorySource(cfg.source_dir, self._serving.get)
        elif cfg.source == "mqtt":
            self._mqtt = MqttSource(self._serving.get)
            self._queued = self._mqtt
        return self._queued

    def _model_changed(self) -> None:
        self._latency = LatencyWindow()
        self._period.restart(self._clock())

    @property
    def takes_requests(self) -> bool:
        """Whether this node answers inference requests over MQTT."""
        return self._mqtt is not None

    # ----- requests over MQTT ---------------------------------------------------

    def offer_request(self, request: InferRequest) -> None:
        """Queue an MQTT request, or answer at once why it cannot run."""
        if self._mqtt is None:
            return
        if (problem := tensor_error(request)) is not None:
            self._background.spawn(self._reply(request, None, problem))
        elif not self._mqtt.offer(request):
            self._background.spawn(self._reply(request, None, "node busy: request queue full"))

    async def _reply(
        self, request: InferRequest, result: InferenceResult | None, error: str | None
    ) -> None:
        reply = InferReply(id=request.id, ok=error is None, result=result, error=error)
        topic = topics.infer_reply(self._cfg.fleet, self._cfg.node_id, request.client)
        try:
            await self._connection.publish(topic, encode(reply), qos=1)
        except TransportError as exc:
            log.debug("inference reply to %s lost: %s", request.client, exc)

    # ----- reading (on the loop) ------------------------------------------------

    async def read(self) -> None:
        """Take inputs from a directory or MQTT, gate them, and queue them for the threads.

        The bounded queue is the back-pressure: a full outbox stops the reader,
        so inputs wait at their source instead of piling up in memory. The
        synthetic source needs no reader: the threads draw from it.
        """
        source = self._queued
        while source is not None:
            await self._sender.space.wait()
            item = await source.next()
            if item is None:
                break
            if self.gate.should_infer(item.inputs):
                await self._queue.put(item)
        self._queue.close()

    # ----- inferring (on the threads) -------------------------------------------

    async def work(self) -> None:
        """Run one inference thread until the source ends or the pipeline halts."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def main() -> None:
            error: BaseException | None = None
            try:
                self._threads.serve(loop)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits
                loop.call_soon_threadsafe(_settle, done, error)

        threading.Thread(target=main, name="inference", daemon=True).start()
        try:
            await done
        finally:
            if not done.done():  # cancelled: the thread ends after its current run
                self._threads.halt.set()

    # ----- results on the loop --------------------------------------------------

    def _accept(self) -> None:
        """Take in everything the threads posted: results, failures, replies, telemetry."""
        posted = self._threads.take_posted()
        serving = self._serving.manifest
        for reported in posted:
            chunk = reported.chunk
            if chunk is not None:
                count = len(chunk)
                self.counts["inferences"] += count
                self.pending.add(chunk)
                if serving is not None and chunk.model.sha256 == serving.sha256:
                    self._latency.add_many(chunk.latency_ms, count)
                    self._period.add(chunk.latency_ms, count)
                waiting = [
                    (chunk.first_seq + position, request, result_of_row(chunk, position))
                    for position, request in enumerate(reported.requests)
                    if request is not None
                ]
                if waiting:
                    self._unreplied.extend(waiting)
                    self._commit_soon()
            if reported.failures:
                self.counts["errors"] += len(reported.failures)
                self._period.error(len(reported.failures))
                log.warning(
                    "%d inference(s) failed: %s", len(reported.failures), reported.failures[0][1]
                )
                for request, reason in reported.failures:
                    if request is not None:
                        self._background.spawn(self._reply(request, None, reason))
            if reported.unkept:  # the disk, not the model: no error counted against it
                self.counts["unkept"] += len(reported.unkept)
                self._unkept_log.warning(
                    "%d result(s) not kept: %s", len(reported.unkept), reported.unkept[0][1]
                )
                for request, reason in reported.unkept:
                    if request is not None:
                        self._background.spawn(self._reply(request, None, reason))

    # ----- batches and telemetry ------------------------------------------------

    async def batch(self) -> None:
        """Move results into the outbox every ``batch_interval_s``, until stopped."""
        # Ends on stop (the sleep no longer suspends then, so looping would starve
        # the event loop); the stop does the final flush after draining workers.
        while not self._stopping.is_set():
            await sleep_unless(self._stopping, self._cfg.batch_interval_s)
            await self.flush()

    def _commit_soon(self) -> None:
        """Flush now for a waiting requester; one commit at a time, the next takes all."""
        if self._committing:
            self._commit_again = True
            return
        self._committing = True
        self._background.spawn(self._commit())

    async def _commit(self) -> None:
        try:
            self._commit_again = True
            while self._commit_again:
                self._commit_again = False
                await self.flush()
        finally:
            self._committing = False

    async def flush(self) -> None:
        """Move pending results into the outbox, ``batch_max`` per message, then
        release the replies whose results it now holds."""
        async with self._flushing:
            try:
                await self._flush()
            finally:
                self._release_replies()

    async def _flush(self) -> None:
        cfg = self._cfg
        topic = topics.results(cfg.fleet, cfg.node_id)
        # Cut here (slices of the columns), encoded in the outbox's thread.
        drafts = self.pending.batches(node=cfg.node_id, most=cfg.batch_max)
        stored = 0
        try:
            for start in range(0, len(drafts), _GROUP_BATCHES):
                group = drafts[start : start + _GROUP_BATCHES]
                builds = [_builder(draft) for draft in group]
                if not await self._sender.try_put_many("results", topic, builds):
                    log.error("outbox full: pausing inference until there is room")
                    return
                stored += sum(len(draft) for draft in group)
                self._stored_through = self.pending.seq_of(stored - 1)
        finally:
            self.pending.drop(stored)

    def _release_replies(self) -> None:
        """Publish the replies whose results the outbox holds (a result seq at most
        ``_stored_through``; they wait in seq order)."""
        unreplied = self._unreplied
        while unreplied and unreplied[0][0] <= self._stored_through:
            _, request, result = unreplied.popleft()
            self._background.spawn(self._reply(request, result, None))

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """On stop: close the source, let in-flight inferences finish, flush their results."""
        if self.source is not None:
            self.source.close()
        if self._synthetic is not None:
            self._threads.halt.set()  # no more inputs: the threads end after their current run
        self._queue.close()
        self._sender.space.set()  # release threads waiting for space; they see the end
        _, stuck = await asyncio.wait(tasks, timeout=_DRAIN_S)
        self._threads.halt.set()
        for task in stuck:
            task.cancel()
        self._accept()
        await self.flush()
        while self._unreplied:  # not stored (outbox or disk full): say so, never unsaved
            _, request, _ = self._unreplied.popleft()
            self._background.spawn(self._reply(request, None, "node stopping: result not stored"))

    async def report_telemetry(self) -> None:
        """Queue a :class:`Telemetry` message every ``telemetry_interval_s``, until stopped."""
        cfg = self._cfg
        topic = topics.telemetry(cfg.fleet, cfg.node_id)
        last = (time.monotonic(), time.process_time())
        while True:
            await sleep_unless(self._stopping, cfg.telemetry_interval_s)
            if self._stopping.is_set():
                return
            now = (time.monotonic(), time.process_time())
            cpu = 100.0 * (now[1] - last[1]) / max(1e-6, now[0] - last[0])
            last = now
            message = await self._telemetry(uptime_s=now[0] - self._started, cpu=cpu)
            await self._sender.put_telemetry(topic, encode(message))

    async def _telemetry(self, *, uptime_s: float, cpu: float) -> Telemetry:
        stats = await asyncio.to_thread(self._sender.outbox.stats)
        now = self._clock()
        return Telemetry(
            node=self._cfg.node_id,
            ts=now,
            uptime_s=uptime_s,
            inferences=self.counts["inferences"],
            errors=self.counts["errors"],
            skips=self.gate.skipped,
            queue_depth=(self.source.depth() if self.source else 0) + len(self._queue),
            outbox_depth=stats.depth,
            latency=self._latency.stats(),
            cpu_percent=max(0.0, cpu),
            memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            model=self._keeper.state.active,
            period=self._period.take(now),
            malformed=self._inbound["malformed"] + self._inbound["refused_commands"],
            dropped=sum(n for key, n in self._inbound.items() if key.startswith("inbox_dropped_")),
        )


def _builder(draft: ResultBatch) -> Callable[[int], bytes]:
    """The outbox's payload callback for ``draft``: the batch given its slot."""

    def build(seq: int) -> bytes:
        return encode_results(msgspec.structs.replace(draft, seq=seq))

    return build


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
