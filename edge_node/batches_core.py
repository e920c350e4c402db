"""Pure: results waiting for the outbox, kept as columns, and the result batches cut from them.

Nothing here touches onnxruntime, the event loop or the disk. The inference
threads number each run's reported rows and hand them over as one
:class:`ResultChunk`; the event loop appends chunks to :class:`PendingResults`
and, every batch interval, cuts :class:`~shared.result_batch.ResultBatch`
messages from the columns (slices, no object per result).

Invariants:

* results stay in ``seq`` order: a chunk whose numbers do not follow the last
  one's is refused;
* every result of a batch names the model that produced it (a swap inside a
  batch adds a second entry to ``models``) and only that model's labels;
* a batch's ``models`` and ``labels`` tables list only what its results name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from edge_node.results_core import DIGEST_HEX, RowSummaries
from shared.messages import DType, InferenceResult, ModelRef, TensorData, TopK
from shared.result_batch import BatchModel, ResultBatch, TensorEntry

__all__ = ["PendingResults", "ResultChunk", "result_of_row"]


@dataclass(frozen=True, slots=True, eq=False)
class ResultChunk:
    """The reported rows of one run, numbered from ``first_seq`` in row order.

    ``labels`` are the class labels of ``model``, the model that produced them;
    ``digests`` holds :data:`DIGEST_HEX` characters per row.
    """

    model: ModelRef
    labels: tuple[str, ...]
    first_seq: int
    latency_ms: float
    ts: float
    digests: str
    sources: Sequence[str | None]
    summaries: RowSummaries

    def __len__(self) -> int:
        return len(self.summaries.kept)


class PendingResults:
    """Numbered results waiting for the outbox, kept as columns, in ``seq`` order.

    :meth:`add` appends a chunk (its numbers must follow the last added);
    :meth:`batches` builds the :class:`~shared.result_batch.ResultBatch`
    messages of everything pending, and :meth:`drop` forgets the first results
    once the outbox holds them. A batch's ``models`` and ``labels`` tables list
    only what its results name. Not thread-safe: use from one thread (the event loop).
    """

    def __init__(self) -> None:
        self._models: list[BatchModel] = []
        self._model_index: dict[ModelRef, int] = {}
        self._labels: list[str] = []
        self._label_index: dict[str, int] = {}
        self._seq: list[int] = []
        self._model: list[int] = []
        self._digests: list[str] = []
        self._latency: list[float] = []
        self._ts: list[float] = []
        self._corner: list[bool] = []
        self._source: list[str | None] = []
        self._topk_k: list[int] = []
        self._topk_index: list[int] = []
        self._topk_score: list[float] = []
        self._topk_label: list[int] = []
        self._tensors: list[list[TensorEntry] | None] = []

    def __len__(self) -> int:
        return len(self._seq)

    def seq_of(self, index: int) -> int:
        """The result number of the ``index``-th pending result (``IndexError`` past the end)."""
        return self._seq[index]

    def add(self, chunk: ResultChunk) -> None:
        """Append ``chunk``'s results.

        Raises:
            ValueError: its numbers do not follow the last result's.
        """
        count = len(chunk)
        if not count:
            return
        if self._seq and chunk.first_seq <= self._seq[-1]:
            raise ValueError(f"result {chunk.first_seq} does not follow {self._seq[-1]}")
        model = self._model_index.get(chunk.model)
        if model is None:
            model = self._model_index[chunk.model] = len(self._models)
            ref = chunk.model
            self._models.append(BatchModel(name=ref.name, version=ref.version, sha256=ref.sha256))
        rows = chunk.summaries
        self._seq.extend(range(chunk.first_seq, chunk.first_seq + count))
        self._model.extend([model] * count)
        self._digests.append(chunk.digests)
        self._latency.extend([chunk.latency_ms] * count)
        self._ts.extend([chunk.ts] * count)
        self._corner.extend(rows.corner_case)
        self._source.extend(chunk.sources)
        self._topk_k.extend(rows.topk_k)
        self._topk_index.extend(rows.topk_index)
        self._topk_score.extend(rows.topk_score)
        self._topk_label.extend(self._label_ids(rows.topk_label, chunk.labels))
        self._tensors.extend(rows.tensors)

    def _label_ids(self, classes: list[int], labels: tuple[str, ...]) -> list[int]:
        ids: dict[int, int] = {-1: -1}
        for cls in set(classes):
            if cls < 0:
                continue
            text = labels[cls]
            index = self._label_index.get(text)
            if index is None:
                index = self._label_index[text] = len(self._labels)
                self._labels.append(text)
            ids[cls] = index
        return [ids[cls] for cls in classes]

    def batches(self, *, node: str, most: int) -> list[ResultBatch]:
        """Every pending result, ``most`` per batch, in order; each batch's ``seq`` is 1
        until the outbox gives it its slot (``msgspec.structs.replace``)."""
        digests = "".join(self._digests)
        self._digests = [digests] if digests else []
        out: list[ResultBatch] = []
        start = entries = 0
        while start < len(self._seq):
            stop = min(start + most, len(self._seq))
            ends = entries + sum(self._topk_k[start:stop])
            model, models = _compact(self._model[start:stop], self._models)
            label, labels = _compact(self._topk_label[entries:ends], self._labels)
            out.append(
                ResultBatch(
                    node=node,
                    seq=1,
                    models=models,
                    result_seq=self._seq[start:stop],
                    model=model,
                    digest_len=DIGEST_HEX,
                    digests=digests[start * DIGEST_HEX : stop * DIGEST_HEX],
                    latency_ms=self._latency[start:stop],
                    ts=self._ts[start:stop],
                    corner_case=self._corner[start:stop],
                    source=self._source[start:stop],
                    topk_k=self._topk_k[start:stop],
                    topk_index=self._topk_index[entries:ends],
                    topk_score=self._topk_score[entries:ends],
                    topk_label=label,
                    labels=labels,
                    tensors=self._tensors[start:stop],
                )
            )
            start, entries = stop, ends
        return out

    def drop(self, count: int) -> None:
        """Forget the first ``count`` results (the outbox holds them now)."""
        entries = sum(self._topk_k[:count])
        digests = "".join(self._digests)[count * DIGEST_HEX :]
        self._digests = [digests] if digests else []
        for column in (
            self._seq,
            self._model,
            self._latency,
            self._ts,
            self._corner,
            self._source,
            self._topk_k,
            self._tensors,
        ):
            del column[:count]
        for flat in (self._topk_index, self._topk_score, self._topk_label):
            del flat[:entries]
        if not self._seq:  # start the tables afresh: they only grow otherwise
            self._models, self._model_index = [], {}
            self._labels, self._label_index = [], {}


_T = TypeVar("_T")


def _compact(ids: list[int], table: list[_T]) -> tuple[list[int], list[_T]]:
    """``ids`` renumbered into the entries of ``table`` they name (-1 stays -1)."""
    used = sorted(set(ids) - {-1})
    if used == list(range(len(table))):
        # A copy: the pending buffer's table grows while this batch waits for the outbox.
        return ids, table[:]
    new = {old: index for index, old in enumerate(used)}
    new[-1] = -1
    return [new[i] for i in ids], [table[i] for i in used]


def result_of_row(chunk: ResultChunk, position: int) -> InferenceResult:
    """The wire :class:`InferenceResult` of the chunk's ``position``-th reported row.

    For replies to inference requests (one row at a time, off the hot path).
    """
    rows = chunk.summaries
    start = sum(rows.topk_k[:position])
    stop = start + rows.topk_k[position]
    topk = tuple(
        TopK(
            index=index,
            label=chunk.labels[label] if label >= 0 else None,
            score=score,
        )
        for index, score, label in zip(
            rows.topk_index[start:stop],
            rows.topk_score[start:stop],
            rows.topk_label[start:stop],
            strict=True,
        )
    )
    entries = rows.tensors[position]
    tensors = (
        tuple(
            TensorData(name=t.name, dtype=DType(t.dtype), shape=tuple(t.shape), data=tuple(t.data))
            for t in entries
        )
        if entries is not None
        else None
    )
    return InferenceResult(
        seq=chunk.first_seq + position,
        model=chunk.model,
        input_digest=chunk.digests[position * DIGEST_HEX : (position + 1) * DIGEST_HEX],
        latency_ms=chunk.latency_ms,
        ts=chunk.ts,
        topk=topk or None,
        tensors=tensors,
        corner_case=rows.corner_case[position],
        source=chunk.sources[position],
    )
