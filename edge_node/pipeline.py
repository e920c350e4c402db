"""The inference pipeline: sources, inference threads, result batches, telemetry.

Each of ``concurrency`` inference threads loops: take inputs (drawn from the
synthetic source, or taken from the bounded queue the event loop fills from a
directory or MQTT requests), run them on the active model (up to
``micro_batch`` requests stacked into one ``session.run`` when the model has a
dynamic batch dimension), summarise the whole run at once (vectorised top-k,
one digest per row), number the results and hand them to the event loop as one
:class:`~edge_node.results_core.ResultChunk`. The loop only appends chunks to
the pending columns, answers MQTT requests and keeps telemetry; every
``batch_interval_s`` it moves pending results into the outbox as columnar
:class:`~shared.result_batch.ResultBatch` messages. The loop wakes once for
whatever the threads posted in the last 50 ms (at once for a request waiting
for its reply), not once per inference.

Invariants:

* inputs wait at their source, not in memory: the queue to the threads is
  bounded, and the threads take no input while the outbox is full (``space``)
  until acks free room;
* every result gets a ``seq`` unique across restarts: numbers come from
  :func:`edge_node.numbering.next_result_seq`, and a new block is saved in
  ``state.json`` before any number in it is used (saved ahead, half a block
  early; a thread that outruns the save waits for it); numbering a chunk and
  posting it to the loop happen in one critical section, so results reach the
  batch in ``seq`` order even with several threads;
* a result names the model that produced it: a thread holds a reference to
  the model from ``session.run`` until its chunk is built, and a swap in the
  middle of a batch only changes the model of the next run; a result uses
  that model's class labels only;
* result batches and telemetry go through the outbox; nothing is published
  from here except replies to MQTT requests (best effort: a lost reply is the
  requester's to retry);
* telemetry latency describes the serving model only: the window restarts on
  every swap, and results of another model are not counted in it, so the
  controller compares the new model with the old, not a mix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import numpy as np

from edge_node.batches_core import PendingResults, ResultChunk, result_of_row
from edge_node.context import Background, Connection, ServingModel, sleep_unless
from edge_node.inference_core import stack_requests
from edge_node.numbering import RESULT_SEQ_BLOCK, next_result_seq
from edge_node.results_core import (
    DIGEST_HEX,
    ChangeGate,
    LatencyWindow,
    PeriodCounter,
    row_digests,
    summarize_rows,
)
from edge_node.runtime import LoadedModel, ModelRuntime, Run
from edge_node.sender import OutboxSender
from edge_node.sources import (
    DirectorySource,
    InputQueue,
    InputSource,
    MqttSource,
    SourceItem,
    SyntheticRows,
    SyntheticSource,
    tensor_error,
)
from edge_node.state import PersistedState, StateKeeper
from shared import topics
from shared.errors import DecodeError, EdgeFleetError, TransportError
from shared.messages import InferenceResult, InferReply, InferRequest, Telemetry, encode
from shared.result_batch import ResultBatch, encode_results

__all__ = ["Pipeline", "PipelineSettings"]

log = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a stop waits for in-flight inferences
_POLL_S: Final = 0.25  # how often a waiting inference thread looks at its halt flag
_COLLECT_S: Final = 0.05  # how long results without a waiting request wait for the loop


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


@dataclass(frozen=True, slots=True, eq=False)
class _Reported:
    """Posted by a thread: a numbered chunk, its requests by row, and rows that failed."""

    chunk: ResultChunk | None
    requests: list[InferRequest | None]
    failures: list[tuple[InferRequest | None, str]]


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
    ) -> None:
        self._cfg = settings
        self._runtime = runtime
        self._serving = serving
        self._keeper = keeper
        self._sender = sender
        self._connection = connection
        self._background = background
        self._stopping = stopping
        self._clock = clock
        self.workers = max(1, settings.concurrency)
        self._max_rows = max(1, settings.micro_batch)
        self.counts = {"inferences": 0, "errors": 0}
        self.gate = ChangeGate(settings.change_threshold)
        self._gate_lock = threading.Lock()  # the synthetic source gates on the threads
        self.pending = PendingResults()
        self._latency = LatencyWindow()
        self._period = PeriodCounter(clock())
        self._started = time.monotonic()
        self._halt = threading.Event()
        self._queue = InputQueue(2 * self._max_rows * self.workers)
        # Numbering: the last number used and the saved mark, guarded by _numbering.
        self._numbering = threading.Lock()
        self._result_seq = self._reserved = keeper.state.result_seq_reserved
        # A save of a higher mark under way: (mark, its future), guarded by _numbering.
        self._saving: tuple[int, concurrent.futures.Future[PersistedState]] | None = None
        # What the threads posted for the loop, guarded by _post_lock (never held
        # while waiting for the loop: the loop takes it too).
        self._post_lock = threading.Lock()
        self._posted: list[_Reported] = []
        self._post_scheduled = False
        self._synthetic: SyntheticSource | None = None
        self._queued: InputSource | None = None
        self._mqtt: MqttSource | None = None
        self.source = self._make_source()
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
                self._serve(loop)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits
                loop.call_soon_threadsafe(_settle, done, error)

        threading.Thread(target=main, name="inference", daemon=True).start()
        try:
            await done
        finally:
            if not done.done():  # cancelled: the thread ends after its current run
                self._halt.set()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        synthetic = self._synthetic
        while not self._halt.is_set():
            if not self._sender.space.is_set():
                self._wait_for_space(loop)
                continue
            if synthetic is not None:
                if not synthetic.wait_due(self._halt):
                    return
                handle = self._runtime.acquire_blocking(self._halt)
                if handle is None:
                    return
                try:
                    self._infer_synthetic(loop, handle, synthetic)
                finally:
                    handle.release()
                continue
            items = self._queue.take(self._max_rows, self._halt, loop)
            if not items:
                return
            handle = self._runtime.acquire_blocking(self._halt)
            if handle is None:
                self._post(loop, _Reported(None, [], [(i.request, "node stopping") for i in items]))
                return
            try:
                self._infer_items(loop, handle, items)
            finally:
                handle.release()

    def _wait_for_space(self, loop: asyncio.AbstractEventLoop) -> None:
        future = asyncio.run_coroutine_threadsafe(self._sender.space.wait(), loop)
        while not self._halt.is_set():
            try:
                future.result(_POLL_S)
            except concurrent.futures.TimeoutError:
                continue
            return
        future.cancel()

    def _infer_synthetic(
        self, loop: asyncio.AbstractEventLoop, handle: LoadedModel, synthetic: SyntheticSource
    ) -> None:
        try:
            drawn = synthetic.draw(handle.manifest, self._max_rows if handle.dynamic_batch else 1)
        except DecodeError as exc:
            log.warning("synthetic inputs for %s cannot be built: %s", handle.ref.name, exc)
            self._post(loop, _Reported(None, [], [(None, str(exc))]))
            self._halt.wait(1.0)  # the same model fails the same way: do not spin
            return
        if drawn is None:
            return
        if self.gate.threshold > 0:
            drawn = self._gated(drawn)
        if drawn.rows:
            self._run(
                loop,
                handle,
                feed=drawn.inputs,
                rows=drawn.rows,
                digests=drawn.digests,
                sources=["synthetic"],
                requests=[],
            )

    def _gated(self, drawn: SyntheticRows) -> SyntheticRows:
        """The rows of ``drawn`` that pass the change gate, in order."""
        rows, inputs = drawn.rows, drawn.inputs
        with self._gate_lock:  # a single request is gated whole, as it is
            kept = [
                row
                for row in range(rows)
                if self.gate.should_infer(
                    {n: v[row : row + 1] for n, v in inputs.items()} if rows > 1 else inputs
                )
            ]
        if len(kept) == rows:
            return drawn
        if rows == 1:
            return SyntheticRows(inputs, 0, "")
        return SyntheticRows(
            {name: value[kept] for name, value in drawn.inputs.items()},
            len(kept),
            "".join(drawn.digests[r * DIGEST_HEX : (r + 1) * DIGEST_HEX] for r in kept),
        )

    def _infer_items(
        self, loop: asyncio.AbstractEventLoop, handle: LoadedModel, items: list[SourceItem]
    ) -> None:
        groups: list[list[SourceItem]] = [[item] for item in items]
        feeds = [item.inputs for item in items]
        if handle.dynamic_batch and len(items) > 1:
            stacked = stack_requests(feeds)
            if stacked is not None and all(size == 1 for size in stacked[1]):
                groups, feeds = [items], [stacked[0]]
        for group, feed in zip(groups, feeds, strict=True):
            requests = [item.request for item in group]
            try:
                digests = row_digests(feed, len(group))
            except DecodeError as exc:
                self._post(loop, _Reported(None, [], [(r, str(exc)) for r in requests]))
                continue
            sources = [item.source[:500] for item in group]
            self._run(
                loop,
                handle,
                feed=feed,
                rows=len(group),
                digests=digests,
                sources=sources,
                requests=requests,
            )

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: LoadedModel,
        *,
        feed: dict[str, np.ndarray],
        rows: int,
        digests: str,
        sources: list[str],
        requests: list[InferRequest | None],
    ) -> None:
        """Run ``rows`` requests and report them; ``sources`` of one entry names every row."""
        try:
            runs = self._runtime.run_rows(handle, feed, rows)
        except EdgeFleetError as exc:
            failures = [(r, str(exc)) for r in requests] or [(None, str(exc))] * rows
            self._post(loop, _Reported(None, [], failures))
            return
        for run in runs:
            span = slice(run.first, run.first + run.rows)
            self._report(
                loop,
                handle,
                run,
                digests=digests[run.first * DIGEST_HEX : (run.first + run.rows) * DIGEST_HEX],
                sources=sources[span] if len(sources) > 1 else sources * run.rows,
                requests=requests[span] if requests else [None] * run.rows,
            )

    def _report(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: LoadedModel,
        run: Run,
        *,
        digests: str,
        sources: list[str],
        requests: list[InferRequest | None],
    ) -> None:
        """Summarise one run, number its results and post them to the loop."""
        cfg = self._cfg
        labels = handle.manifest.class_labels
        summaries = summarize_rows(
            run.outputs,
            run.rows,
            topk=cfg.topk,
            label_count=len(labels),
            corner_threshold=cfg.corner_threshold,
        )
        failures = [(requests[row], reason) for row, reason in summaries.refused.items()]
        if summaries.refused:
            kept = summaries.kept
            digests = "".join(digests[r * DIGEST_HEX : (r + 1) * DIGEST_HEX] for r in kept)
            sources = [sources[r] for r in kept]
            requests = [requests[r] for r in kept]
        ts = self._clock()
        with self._numbering:
            chunk = None
            if summaries.kept:
                chunk = ResultChunk(
                    model=handle.ref,
                    labels=labels,
                    first_seq=self._allocate(loop, len(summaries.kept)),
                    latency_ms=run.latency_ms,
                    ts=ts,
                    digests=digests,
                    sources=sources,
                    summaries=summaries,
                )
            self._post(loop, _Reported(chunk, requests, failures))

    def _allocate(self, loop: asyncio.AbstractEventLoop, count: int) -> int:
        """The first of ``count`` result numbers, all reserved on disk. Holds _numbering.

        The next block is saved ahead, while half of the current one is left,
        so a thread waits for the disk only when it outruns the save.
        """
        end = self._result_seq + count
        while True:
            saving = self._saving
            if saving is not None and (saving[1].done() or end > self._reserved):
                saving[1].result()  # raises what the save raised
                self._reserved, self._saving = saving[0], None
                continue
            if end <= self._reserved:
                break
            through = next_result_seq(self._result_seq, self._reserved, count=count)
            assert through.reserve_through is not None  # end > reserved
            self._save_mark(loop, through.reserve_through)
        if self._saving is None and self._reserved - end < RESULT_SEQ_BLOCK // 2:
            self._save_mark(loop, self._reserved + RESULT_SEQ_BLOCK)
        first, self._result_seq = self._result_seq + 1, end
        return first

    def _save_mark(self, loop: asyncio.AbstractEventLoop, through: int) -> None:
        update = self._keeper.update(result_seq_reserved=through)
        self._saving = (through, asyncio.run_coroutine_threadsafe(update, loop))

    def _post(self, loop: asyncio.AbstractEventLoop, reported: _Reported) -> None:
        """Hand ``reported`` to the loop: at once when a request waits for its reply,
        else within ``_COLLECT_S`` (one wake-up of the loop for many runs: each
        wake-up takes a core from onnxruntime's threads)."""
        urgent = any(r is not None for r in reported.requests) or any(
            r is not None for r, _ in reported.failures
        )
        with self._post_lock:
            self._posted.append(reported)
            scheduled, self._post_scheduled = self._post_scheduled, True
        if urgent:
            loop.call_soon_threadsafe(self._accept)
        elif not scheduled:
            loop.call_soon_threadsafe(loop.call_later, _COLLECT_S, self._accept)

    # ----- results on the loop --------------------------------------------------

    def _accept(self) -> None:
        """Take in everything the threads posted: results, failures, replies, telemetry."""
        with self._post_lock:
            posted, self._posted = self._posted, []
            self._post_scheduled = False
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
                for position, request in enumerate(reported.requests):
                    if request is not None:
                        result = result_of_row(chunk, position)
                        self._background.spawn(self._reply(request, result, None))
            if reported.failures:
                self.counts["errors"] += len(reported.failures)
                self._period.error(len(reported.failures))
                log.warning(
                    "%d inference(s) failed: %s", len(reported.failures), reported.failures[0][1]
                )
                for request, reason in reported.failures:
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

    async def flush(self) -> None:
        """Move pending results into the outbox, ``batch_max`` per message."""
        cfg = self._cfg
        topic = topics.results(cfg.fleet, cfg.node_id)
        # Cut here (slices of the columns), encoded in the outbox's thread.
        drafts = self.pending.batches(node=cfg.node_id, most=cfg.batch_max)
        stored = 0
        try:
            for draft in drafts:

                def build(seq: int, draft: ResultBatch = draft) -> bytes:
                    return encode_results(msgspec.structs.replace(draft, seq=seq))

                if not await self._sender.try_put("results", topic, build):
                    log.error("outbox full: pausing inference until the controller acknowledges")
                    return
                stored += len(draft)
        finally:
            self.pending.drop(stored)

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """On stop: close the source, let in-flight inferences finish, flush their results."""
        if self.source is not None:
            self.source.close()
        if self._synthetic is not None:
            self._halt.set()  # no more inputs: the threads end after their current run
        self._queue.close()
        self._sender.space.set()  # release threads waiting for space; they see the end
        _, stuck = await asyncio.wait(tasks, timeout=_DRAIN_S)
        self._halt.set()
        for task in stuck:
            task.cancel()
        self._accept()
        await self.flush()

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
        )


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
