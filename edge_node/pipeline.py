"""The inference pipeline: source, gate, workers, results, batches, telemetry.

Invariants:

* inputs wait at their source, not in memory: the queue to the workers is
  bounded, and a full outbox stops the reader (``space``) until acks free room;
* every result gets a ``seq`` unique across restarts: numbers come from
  :func:`edge_node.numbering.next_result_seq`, and a new block is saved in
  ``state.json`` before any number in it is used; numbering happens in one
  critical section, so results reach the batch in ``seq`` order even with
  several workers;
* a result names the model that produced it (a swap may happen meanwhile),
  and uses that model's class labels only;
* result batches and telemetry go through the outbox; nothing is published
  from here except replies to MQTT requests (best effort: a lost reply is the
  requester's to retry);
* telemetry latency describes the serving model only: the window restarts on
  every swap, so the controller compares the new model with the old, not a mix.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_node.context import Background, Connection, ServingModel, sleep_unless
from edge_node.inference_core import numpy_dtype
from edge_node.numbering import next_result_seq
from edge_node.results_core import (
    ChangeGate,
    LatencyWindow,
    PeriodCounter,
    input_digest,
    is_corner_case,
    summarize_output,
)
from edge_node.runtime import InferenceOutcome, ModelRuntime
from edge_node.sender import OutboxSender
from edge_node.sources import DirectorySource, InputSource, MqttSource, SourceItem, SyntheticSource
from edge_node.state import StateKeeper
from shared import topics
from shared.errors import DecodeError, EdgeFleetError, TransportError
from shared.messages import (
    InferenceResult,
    InferReply,
    InferRequest,
    Telemetry,
    encode,
)
from shared.result_batch import batch_of, encode_results

__all__ = ["Pipeline", "PipelineSettings"]

log = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a stop waits for in-flight inferences


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSettings:
    node_id: str
    fleet: str
    source: str  # synthetic, dir, mqtt or none
    source_dir: Path | None
    rate_hz: float | None
    concurrency: int
    micro_batch: int
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
        self.counts = {"inferences": 0, "errors": 0}
        self.gate = ChangeGate(settings.change_threshold)
        self.pending: list[InferenceResult] = []
        self._latency = LatencyWindow()
        self._period = PeriodCounter(clock())
        self._started = time.monotonic()
        self._inputs: asyncio.Queue[SourceItem | None] = asyncio.Queue(
            2 * max(1, settings.micro_batch) * self.workers
        )
        self._result_seq = keeper.state.result_seq_reserved
        self._numbering = asyncio.Lock()  # one result number (and reservation) at a time
        self._synthetic: SyntheticSource | None = None
        self._mqtt: MqttSource | None = None
        self.source = self._make_source()
        serving.on_change(self._model_changed)

    def _make_source(self) -> InputSource | None:
        cfg = self._cfg
        if cfg.source == "synthetic":
            self._synthetic = SyntheticSource(self._serving.get, rate_hz=cfg.rate_hz)
            return self._synthetic
        if cfg.source == "dir":
            assert cfg.source_dir is not None
            return DirectorySource(cfg.source_dir, self._serving.get)
        if cfg.source == "mqtt":
            self._mqtt = MqttSource(self._serving.get)
            return self._mqtt
        return None

    def _model_changed(self) -> None:
        self._latency = LatencyWindow()
        self._period.restart(self._clock())
        if self._synthetic is not None:
            self._synthetic.model_changed()

    @property
    def takes_requests(self) -> bool:
        """Whether this node answers inference requests over MQTT."""
        return self._mqtt is not None

    # ----- requests over MQTT ---------------------------------------------------

    def offer_request(self, request: InferRequest) -> None:
        """Queue an MQTT request, or answer at once why it cannot run."""
        if self._mqtt is None:
            return
        if (problem := _tensor_error(request)) is not None:
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

    # ----- reading and inferring ------------------------------------------------

    async def read(self) -> None:
        """Take inputs from the source, gate them, and queue them for the workers.

        The bounded queue is the back-pressure: a full outbox stops the reader,
        so inputs wait at their source instead of piling up in memory.
        """
        source = self.source
        while source is not None:
            await self._sender.space.wait()
            item = await source.next()
            if item is None:
                break
            if self.gate.should_infer(item.inputs):
                await self._inputs.put(item)
        for _ in range(self.workers):
            await self._inputs.put(None)  # one end marker per worker

    async def work(self) -> None:
        """Run queued inputs; with ``micro_batch`` > 1, whatever is queued runs as one batch."""
        while (item := await self._inputs.get()) is not None:
            batch = [item]
            while len(batch) < self._cfg.micro_batch and not self._inputs.empty():
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
            self.counts["errors"] += len(items)
            self._period.error(len(items))
            log.warning("inference failed: %s", exc)
            for item in items:
                if item.request is not None:
                    await self._reply(item.request, None, str(exc))
            return
        for item, outcome in zip(items, outcomes, strict=True):
            await self._record(item, outcome)

    async def _record(self, item: SourceItem, outcome: InferenceOutcome) -> None:
        """Turn one outcome into a result (queued for the outbox) and any reply."""
        self.counts["inferences"] += 1
        self._latency.add(outcome.latency_ms)
        manifest = self._serving.manifest
        # Labels of the model that produced this output (a swap may have happened since).
        labels = (
            manifest.class_labels
            if manifest is not None and manifest.sha256 == outcome.model.sha256
            else ()
        )
        try:
            topk, tensors, top_score = summarize_output(
                outcome.outputs, topk=self._cfg.topk, class_labels=labels
            )
        except DecodeError as exc:
            self.counts["errors"] += 1
            self._period.error()
            log.warning("output of %s cannot be reported: %s", outcome.model.name, exc)
            if item.request is not None:
                await self._reply(item.request, None, str(exc))
            return
        self._period.add(outcome.latency_ms)
        result = InferenceResult(
            seq=await self._next_seq(),
            model=outcome.model,
            input_digest=input_digest(item.inputs),
            latency_ms=outcome.latency_ms,
            ts=self._clock(),
            topk=topk,
            tensors=tensors,
            corner_case=is_corner_case(top_score, self._cfg.corner_threshold),
            source=item.source[:500],
        )
        self.pending.append(result)
        if item.request is not None:
            await self._reply(item.request, result, None)

    async def _next_seq(self) -> int:
        """The next result number, its block reserved on disk before it is used."""
        async with self._numbering:
            allocation = next_result_seq(self._result_seq, self._keeper.state.result_seq_reserved)
            if allocation.reserve_through is not None:
                await self._keeper.update(result_seq_reserved=allocation.reserve_through)
            self._result_seq = allocation.seq
            return allocation.seq

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
        while self.pending:
            batch = tuple(self.pending[: cfg.batch_max])

            def build(seq: int, batch: tuple[InferenceResult, ...] = batch) -> bytes:
                return encode_results(batch_of(cfg.node_id, seq, batch))

            if not await self._sender.try_put("results", topic, build):
                log.error("outbox full: pausing inference until the controller acknowledges")
                return
            del self.pending[: len(batch)]

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """On stop: close the source, let in-flight inferences finish, flush their results."""
        if self.source is not None:
            self.source.close()
        self._sender.space.set()  # release workers waiting for space; they see the end
        _, stuck = await asyncio.wait(tasks, timeout=_DRAIN_S)
        for task in stuck:
            task.cancel()
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
            queue_depth=(self.source.depth() if self.source else 0) + self._inputs.qsize(),
            outbox_depth=stats.depth,
            latency=self._latency.stats(),
            cpu_percent=max(0.0, cpu),
            memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            model=self._keeper.state.active,
            period=self._period.take(now),
        )


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
