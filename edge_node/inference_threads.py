"""Inference threads: take inputs, run them, summarise and number the results.

Each thread loops: take inputs (drawn from the synthetic source, or taken
from the bounded queue the event loop fills from a directory or MQTT
requests), run them on the active model (up to ``max_rows`` requests stacked
into one ``session.run`` when the model has a dynamic batch dimension),
summarise the whole run at once (vectorised top-k, one digest per row),
number the results and post them for the event loop as one
:class:`~edge_node.batches_core.ResultChunk`.

Invariants:

* no input is taken while the outbox is full (``space`` clear);
* every result gets a ``seq`` unique across restarts: numbers come from
  :func:`edge_node.numbering.next_result_seq`, and a new block is saved in
  ``state.json`` before any number in it is used (saved ahead, half a block
  early; a thread that outruns the save waits for it); numbering a chunk and
  posting it happen in one critical section, so results reach the loop in
  ``seq`` order even with several threads;
* a result names the model that produced it: a thread holds a reference to
  the model from ``session.run`` until its chunk is built, and a swap in the
  middle of a micro-batch only changes the model of the next run; a result
  uses that model's class labels only;
* the loop is woken once for whatever was posted in the last ``_COLLECT_S``
  (at once for a request waiting for its reply), not once per inference:
  each wake-up takes a core from onnxruntime's threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from edge_node.batches_core import ResultChunk
from edge_node.disk import DiskFullError
from edge_node.inference_core import stack_requests
from edge_node.numbering import RESULT_SEQ_BLOCK, next_result_seq
from edge_node.results_core import DIGEST_HEX, ChangeGate, row_digests, summarize_rows
from edge_node.runtime import LoadedModel, ModelRuntime, Run
from edge_node.sources import InputQueue, SourceItem, SyntheticRows, SyntheticSource
from edge_node.state import PersistedState, StateKeeper
from shared.errors import DecodeError, EdgeFleetError
from shared.messages import InferRequest

__all__ = ["InferenceThreads", "Reported"]

log = logging.getLogger(__name__)

_POLL_S: Final = 0.25  # how often a waiting inference thread looks at its halt flag
_COLLECT_S: Final = 0.05  # how long results without a waiting request wait for the loop


@dataclass(frozen=True, slots=True, eq=False)
class Reported:
    """Posted by a thread: a numbered chunk, its requests by row, rows that failed,
    and rows that ran but could not be kept (no result number could be saved:
    the disk is full; not the model's failure)."""

    chunk: ResultChunk | None
    requests: list[InferRequest | None]
    failures: list[tuple[InferRequest | None, str]]
    unkept: list[tuple[InferRequest | None, str]] = field(default_factory=list)


class InferenceThreads:
    """What the inference threads share: their inputs, numbering, and what they post.

    :meth:`serve` is each thread's loop; ``on_posted`` runs on the event loop
    to collect what was posted (:meth:`take_posted`). ``halt`` ends the threads
    after their current run.
    """

    def __init__(
        self,
        *,
        runtime: ModelRuntime,
        keeper: StateKeeper,
        space: asyncio.Event,
        gate: ChangeGate,
        synthetic: SyntheticSource | None,
        queue: InputQueue,
        max_rows: int,
        topk: int,
        corner_threshold: float,
        clock: Callable[[], float],
        on_posted: Callable[[], None],
    ) -> None:
        self._runtime = runtime
        self._keeper = keeper
        self._space = space
        self._gate = gate
        self._gate_lock = threading.Lock()  # the synthetic source gates on the threads
        self._synthetic = synthetic
        self._queue = queue
        self._max_rows = max_rows
        self._topk = topk
        self._corner_threshold = corner_threshold
        self._clock = clock
        self._on_posted = on_posted
        self.halt = threading.Event()
        # Numbering: the last number used and the saved mark, guarded by _numbering.
        self._numbering = threading.Lock()
        self._result_seq = self._reserved = keeper.state.result_seq_reserved
        # A save of a higher mark under way: (mark, its future), guarded by _numbering.
        self._saving: tuple[int, concurrent.futures.Future[PersistedState]] | None = None
        # What the threads posted for the loop, guarded by _post_lock (never held
        # while waiting for the loop: the loop takes it too).
        self._post_lock = threading.Lock()
        self._posted: list[Reported] = []
        self._post_scheduled = False

    def take_posted(self) -> list[Reported]:
        """On the loop: everything posted since the last call, in order."""
        with self._post_lock:
            posted, self._posted = self._posted, []
            self._post_scheduled = False
        return posted

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        synthetic = self._synthetic
        while not self.halt.is_set():
            if not self._space.is_set():
                self._wait_for_space(loop)
                continue
            if synthetic is not None:
                if not synthetic.wait_due(self.halt):
                    return
                handle = self._runtime.acquire_blocking(self.halt)
                if handle is None:
                    return
                try:
                    self._infer_synthetic(loop, handle, synthetic)
                finally:
                    handle.release()
                continue
            items = self._queue.take(self._max_rows, self.halt, loop)
            if not items:
                return
            handle = self._runtime.acquire_blocking(self.halt)
            if handle is None:
                self._post(loop, Reported(None, [], [(i.request, "node stopping") for i in items]))
                return
            try:
                self._infer_items(loop, handle, items)
            finally:
                handle.release()

    def _wait_for_space(self, loop: asyncio.AbstractEventLoop) -> None:
        future = asyncio.run_coroutine_threadsafe(self._space.wait(), loop)
        while not self.halt.is_set():
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
            self._post(loop, Reported(None, [], [(None, str(exc))]))
            self.halt.wait(1.0)  # the same model fails the same way: do not spin
            return
        if drawn is None:
            return
        if self._gate.threshold > 0:
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
                if self._gate.should_infer(
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
                self._post(loop, Reported(None, [], [(r, str(exc)) for r in requests]))
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
            self._post(loop, Reported(None, [], failures))
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
        labels = handle.manifest.class_labels
        summaries = summarize_rows(
            run.outputs,
            run.rows,
            topk=self._topk,
            label_count=len(labels),
            corner_threshold=self._corner_threshold,
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
                try:
                    first_seq = self._allocate(loop, len(summaries.kept))
                except DiskFullError as exc:  # no number can be reserved: nothing kept
                    unkept = [(r, f"result not kept: {exc}") for r in requests]
                    self._post(loop, Reported(None, [], failures, unkept))
                    return
                chunk = ResultChunk(
                    model=handle.ref,
                    labels=labels,
                    first_seq=first_seq,
                    latency_ms=run.latency_ms,
                    ts=ts,
                    digests=digests,
                    sources=sources,
                    summaries=summaries,
                )
            self._post(loop, Reported(chunk, requests, failures))

    def _allocate(self, loop: asyncio.AbstractEventLoop, count: int) -> int:
        """The first of ``count`` result numbers, all reserved on disk. Holds _numbering.

        The next block is saved ahead, while half of the current one is left,
        so a thread waits for the disk only when it outruns the save.
        """
        end = self._result_seq + count
        while True:
            saving = self._saving
            if saving is not None and (saving[1].done() or end > self._reserved):
                try:
                    saving[1].result()  # raises what the save raised
                finally:
                    self._saving = None  # a failed save is tried again by the next run
                self._reserved = saving[0]
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

    def _post(self, loop: asyncio.AbstractEventLoop, reported: Reported) -> None:
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
            loop.call_soon_threadsafe(self._on_posted)
        elif not scheduled:
            loop.call_soon_threadsafe(loop.call_later, _COLLECT_S, self._on_posted)
