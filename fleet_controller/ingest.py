"""Ingest: what nodes send, queued, stored in batches, acknowledged after the commit.

Invariants:

* **The broker loop never blocks.** :meth:`Ingest.offer` puts a message on a
  bounded queue; when the queue is full the message is dropped
  *unacknowledged* (``metrics["ingest_dropped"]``), so the node sends it again
  later: nothing is lost.
* **Durable before ack.** The writer takes up to ``batch_max`` queued messages,
  stores them off the event loop (births and deaths first, then statuses,
  results and telemetry in one transaction, :meth:`IngestRepository.write`)
  and only then publishes ``node/{id}/ack`` with each node's contiguous mark,
  signed with the rollout key (:func:`shared.acks.sign_ack`): nodes free
  nothing on an ack that does not verify.
  Node statuses are folded into their rollouts later, from the database, by
  the ticker (``store.rollouts.step``), so acking now loses nothing even if
  this controller dies before the next tick.
* **Result batches are decoded by the writer**, in its thread
  (:func:`~fleet_controller.link.open_results`): one that does not decode is
  logged, counted (``metrics["malformed"]``) and dropped; one over its node's
  results quota (:meth:`NodeQuotas.admit_results`) is dropped unacknowledged
  and counted (``metrics["quota_refused_results"]``), once per batch, before
  any retry. Counts made in the thread reach ``metrics`` on the event loop.
* **One poison message cannot block the rest.** A batch that fails with a
  store error (the database is away) is dropped unacknowledged, to be re-sent.
  A batch that raises anything else is retried item by item: what stores is
  acked, what still fails is logged with its node and counted
  (``metrics["ingest_failed"]``) and, unacknowledged, comes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fleet_controller.link import ControllerLink, Ingested, RawResults, open_results
from fleet_controller.quotas import NodeQuotas
from fleet_controller.store import Store
from shared import topics
from shared.acks import sign_ack
from shared.envelope import SigningKey
from shared.errors import DecodeError, EdgeFleetError, TransportError
from shared.messages import Ack, NodeState, NodeStatus, Telemetry
from shared.result_batch import ResultBatch

__all__ = ["Ingest"]

log = logging.getLogger(__name__)


_Opened = NodeStatus | ResultBatch | Telemetry | NodeState
"""What ingest stores: what nodes sent, result batches decoded."""


@dataclass
class _Batch:
    statuses: list[NodeStatus] = field(default_factory=list)
    results: list[ResultBatch] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)
    states: list[NodeState] = field(default_factory=list)

    @classmethod
    def of(cls, items: Iterable[_Opened]) -> _Batch:
        batch = cls()
        for item in items:
            if isinstance(item, NodeStatus):
                batch.statuses.append(item)
            elif isinstance(item, ResultBatch):
                batch.results.append(item)
            elif isinstance(item, Telemetry):
                batch.telemetry.append(item)
            else:
                batch.states.append(item)
        return batch


def _merge(acks: dict[str, int], more: dict[str, int]) -> None:
    """Acks are contiguous marks: the higher one per node says it all."""
    for node, seq in more.items():
        acks[node] = max(seq, acks.get(node, 0))


class Ingest:
    """The bounded queue (:meth:`offer`) and its batch writer (:meth:`run`)."""

    def __init__(
        self,
        store: Store,
        link: ControllerLink,
        *,
        fleet: str,
        clock: Callable[[], float],
        metrics: Counter[str],
        ack_key: SigningKey,
        quotas: NodeQuotas,
        queue_max: int,
        batch_max: int,
    ) -> None:
        self._store = store
        self._quotas = quotas
        self._ack_key = ack_key
        self._link = link
        self._fleet = fleet
        self._clock = clock
        self._metrics = metrics
        self._batch_max = batch_max
        self._queue: asyncio.Queue[Ingested] = asyncio.Queue(queue_max)
        self._writing = asyncio.Lock()  # held while a batch is stored: a stop waits for it
        self._closed = False

    def offer(self, item: Ingested) -> None:
        """Queue ``item`` for storing; when the queue is full (or the controller is
        stopping) it is dropped, unacked."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._metrics["ingest_dropped"] += 1

    async def run(self) -> None:
        """Store queued messages in batches, forever."""
        while True:
            items = [await self._queue.get()]
            async with self._writing:
                while len(items) < self._batch_max and not self._queue.empty():
                    items.append(self._queue.get_nowait())
                await self.store(items)

    async def drain(self) -> None:
        """On a clean stop: take nothing new, finish the batch being stored, then store
        whatever is queued."""
        self._closed = True
        async with self._writing:
            items: list[Ingested] = []
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            if items:
                await self.store(items)

    async def store(self, items: Sequence[Ingested]) -> None:
        """Store ``items`` and publish the acks they earned; never raises."""
        now = self._clock()
        counts: Counter[str] = Counter()
        # Decoded and charged to their nodes' quotas once, before any retry.
        opened = await asyncio.to_thread(self._open, items, now, counts)
        self._metrics.update(counts)
        try:
            acks = await asyncio.to_thread(self._write, opened, now)
        except EdgeFleetError as exc:
            log.error("storing a batch failed (nodes will re-send): %s", exc)
            return
        except Exception:
            log.exception("storing a batch of %d failed; retrying one by one", len(opened))
            acks = await self._one_by_one(opened, now)
        else:
            self._metrics["stored"] += len(opened)
        await self._publish_acks(acks)

    async def _one_by_one(self, items: Sequence[_Opened], now: float) -> dict[str, int]:
        acks: dict[str, int] = {}
        for item in items:
            try:
                _merge(acks, await asyncio.to_thread(self._write, [item], now))
            except Exception as exc:
                self._metrics["ingest_failed"] += 1
                log.error(
                    "cannot store a %s from node %s (not acked; it will come again): %r",
                    type(item).__name__,
                    item.node,
                    exc,
                    exc_info=not isinstance(exc, EdgeFleetError),
                )
            else:
                self._metrics["stored"] += 1
        return acks

    def _write(self, items: Sequence[_Opened], now: float) -> dict[str, int]:
        """In a worker thread. Raises: StoreError, or anything a bad message provokes."""
        batch = _Batch.of(items)
        for state in batch.states:
            self._store.nodes.apply_state(state, now)
        return self._store.ingest.write(batch.statuses, batch.results, batch.telemetry, now)

    def _open(self, items: Sequence[Ingested], now: float, counts: Counter[str]) -> list[_Opened]:
        """In a worker thread: decode result batches, dropping (and counting in
        ``counts``) the malformed and the over-quota; everything else as it is."""
        opened: list[_Opened] = []
        for item in items:
            if not isinstance(item, RawResults):
                opened.append(item)
                continue
            try:
                batch = open_results(item)
            except DecodeError as exc:
                counts["malformed"] += 1
                log.warning("dropping a malformed result batch from %s: %s", item.node, exc)
                continue
            if not self._quotas.admit_results(item.node, len(batch), now):
                counts["quota_refused_results"] += 1
                continue
            opened.append(batch)
        return opened

    async def _publish_acks(self, acks: dict[str, int]) -> None:
        now = self._clock()
        for node_id, seq in acks.items():
            try:
                await self._link.publish(
                    topics.ack(self._fleet, node_id),
                    sign_ack(Ack(node=node_id, seq=seq, ts=now), self._ack_key),
                    qos=1,
                )
            except TransportError as exc:
                # The node re-sends the slot; the store re-acks a settled one.
                log.debug("ack to %s not sent: %s", node_id, exc)
