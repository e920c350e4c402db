"""Pure decisions about what a node reports of an inference: digests, summaries,
gating, latency (the batches they travel in: :mod:`edge_node.batches_core`).

Nothing here touches onnxruntime, the event loop or the disk; the pipeline
(:mod:`edge_node.pipeline`) feeds it inputs and output arrays, a whole run's
rows at a time, and sends what it returns.

Invariants:

* :func:`row_digests` (and :func:`input_digest`, its one-row case) depends only
  on names, dtypes, shapes and element values (little-endian), never on memory
  layout, dict order or which rows were stacked together.
* Everything :func:`summarize_rows` keeps fits the wire limits of
  :class:`~shared.result_batch.ResultBatch` and
  :class:`~shared.messages.InferenceResult` (finite numbers, at most
  :data:`~edge_node.inference_core.MAX_TOPK` top-k entries,
  :data:`~edge_node.inference_core.MAX_TENSORS` tensors of at most
  :data:`~edge_node.inference_core.MAX_TENSOR_ELEMS` elements); its top-k is
  exactly a stable sort's.
* :class:`ChangeGate` compares with the last *inferred* input, so a slow drift
  still triggers once it has drifted far enough.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edge_node.inference_core import (
    MAX_TENSOR_ELEMS,
    MAX_TENSORS,
    MAX_TOPK,
    InputSpecError,
    OutputSummaryError,
    dtype_of,
)
from shared.histogram import bucket_of
from shared.messages import LatencyStats, PeriodStats
from shared.result_batch import TensorEntry

__all__ = [
    "DIGEST_HEX",
    "ChangeGate",
    "LatencyWindow",
    "PeriodCounter",
    "RowSummaries",
    "input_digest",
    "row_digests",
    "summarize_rows",
    "top_indices",
]


# ----- inputs ----------------------------------------------------------------

#: Hex characters of an input digest: the first 128 bits of its SHA-256.
DIGEST_HEX: Final = 32

_DIGEST_DOMAIN: Final = b"edgefleet.input-digest.v1\x00"


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def row_digests(inputs: Mapping[str, np.ndarray], rows: int) -> str:
    """The digests of ``rows`` stacked inputs, :data:`DIGEST_HEX` hex characters each, joined.

    Row ``i``'s digest is :func:`input_digest` of the single-row input
    ``{name: array[i:i+1]}``; with ``rows`` 1 the arrays are taken whole, in
    whatever shape they have. One SHA-256 per row over fixed headers and the
    row's bytes, so a batch costs one pass over its memory.

    Raises:
        InputSpecError: an array has no stable byte form (object or string
            dtype), or (``rows`` > 1) its first dimension is not ``rows``.
    """
    parts: list[tuple[bytes, np.ndarray]] = []
    for name in sorted(inputs):
        arr = np.asarray(inputs[name])
        if arr.dtype.kind not in "biuf":
            raise InputSpecError(f"input {name!r} has unsupported dtype {arr.dtype}")
        if rows != 1 and (arr.ndim == 0 or arr.shape[0] != rows):
            raise InputSpecError(f"input {name!r} does not hold {rows} rows")
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        shape = arr.shape if rows == 1 else (1, *arr.shape[1:])
        header = b"".join(
            (
                _field(name.encode()),
                _field(arr.dtype.name.encode()),
                len(shape).to_bytes(8, "little"),
                *(dim.to_bytes(8, "little") for dim in shape),
                (arr.nbytes // rows).to_bytes(8, "little"),
            )
        )
        parts.append((header, arr.reshape(rows, -1)))
    base = hashlib.sha256(_DIGEST_DOMAIN)
    digests: list[str] = []
    for row in range(rows):
        h = base.copy()
        for header, flat in parts:
            h.update(header)
            h.update(flat[row])
        digests.append(h.hexdigest()[:DIGEST_HEX])
    return "".join(digests)


def input_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """The first 128 bits (hex) of SHA-256 over every input's name, dtype, shape
    and little-endian bytes.

    Stable across dict order, memory layout (strides, Fortran order) and host
    byte order. Each field is length-prefixed, so no two inputs hash alike by
    concatenation.

    Raises:
        InputSpecError: an array has no stable byte form (object or string dtype).
    """
    return row_digests(inputs, 1)


# ----- outputs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class RowSummaries:
    """What the results of one run's rows report, one list per field.

    ``kept`` are the rows that can be reported (ascending); every other list
    has one entry per kept row, except the flat top-k lists, where row ``j``'s
    ``topk_k[j]`` entries follow row ``j - 1``'s. ``topk_label`` is the class
    index when the model has a label for it, else -1. ``refused`` says why
    each other row cannot be reported.
    """

    kept: list[int]
    refused: dict[int, str]
    topk_k: list[int]
    topk_index: list[int]
    topk_score: list[float]
    topk_label: list[int]
    corner_case: list[bool]
    tensors: list[list[TensorEntry] | None]


def _classifier_like(arr: np.ndarray, rows: int) -> bool:
    """One row's output is ``[C]`` (unbatched) or ``[1, C, 1, ..., 1]``, floating, C >= 2."""
    if arr.dtype.kind != "f":
        return False
    if rows == 1 and arr.ndim == 1:
        return bool(arr.shape[0] >= 2)
    return bool(
        arr.ndim >= 2
        and arr.shape[0] == rows
        and arr.shape[1] >= 2
        and all(d == 1 for d in arr.shape[2:])
    )


def summarize_rows(
    outputs: Mapping[str, np.ndarray],
    rows: int,
    *,
    topk: int,
    label_count: int,
    corner_threshold: float,
    max_tensor_elems: int = 64,
) -> RowSummaries:
    """What each of ``rows`` results carries about ``outputs``, vectorised over the rows.

    With ``rows`` 1, each output is one request's output whole; with more, every
    output's first dimension is ``rows`` and row ``i``'s output is
    ``output[i:i+1]``.

    *Classifier-like* means exactly one floating output whose row is ``[C]``
    (unbatched) or ``[1, C]``, optionally followed by dimensions of 1 (a
    ``[1, C, 1, 1]`` convolutional head), with C >= 2 (a single score is a
    regression or a sigmoid, whose "top" would not be a confidence). For it:
    the ``min(topk, C, MAX_TOPK)`` highest scores of each row, best first
    (ties by lower index), as the model gave them; a row is a corner case when
    its best score is below ``corner_threshold`` (> 0).

    Every other output (all of them when there is no single classifier-like
    one) is reported per row with its row's shape and its first
    ``max_tensor_elems`` elements in row-major order (truncated exactly when
    fewer than the shape's product). At most :data:`MAX_TENSORS` outputs, in
    the mapping's order; ``None`` when there are none.

    A row with a NaN or infinite value among those reported is refused (the
    others are kept); an output dtype with no wire equivalent refuses all rows.

    Raises:
        ValueError: ``topk`` < 1, ``max_tensor_elems`` < 0 or ``rows`` < 1.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if max_tensor_elems < 0:
        raise ValueError(f"max_tensor_elems must be >= 0, got {max_tensor_elems}")
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    limit = min(max_tensor_elems, MAX_TENSOR_ELEMS)
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    candidates = [name for name, arr in arrays.items() if _classifier_like(arr, rows)]
    head = candidates[0] if len(candidates) == 1 else None
    rest = [name for name in arrays if name != head][:MAX_TENSORS]
    refused: dict[int, str] = {}
    try:
        tensor_parts = [_tensor_rows(name, arrays[name], rows, limit, refused) for name in rest]
    except OutputSummaryError as exc:
        return _refuse_all(rows, str(exc))
    scores: np.ndarray | None = None
    if head is not None:
        scores = arrays[head].reshape(rows, -1).astype(np.float64)
        for row in np.flatnonzero(~np.isfinite(scores).all(axis=1)).tolist():
            refused.setdefault(row, f"output {head!r} has non-finite scores")
    kept = [row for row in range(rows) if row not in refused] if refused else list(range(rows))
    tensors: list[list[TensorEntry] | None] = (
        [[part[row] for part in tensor_parts] for row in kept]
        if tensor_parts
        else [None] * len(kept)
    )
    if scores is None or not kept:
        return RowSummaries(
            kept, refused, [0] * len(kept), [], [], [], [False] * len(kept), tensors
        )
    if refused:
        scores = scores[kept]
    k = min(topk, scores.shape[1], MAX_TOPK)
    order = top_indices(scores, k)
    best = np.take_along_axis(scores, order, axis=1)
    corner = (
        (best[:, 0] < corner_threshold).tolist() if corner_threshold > 0 else [False] * len(kept)
    )
    flat = order.reshape(-1)
    return RowSummaries(
        kept=kept,
        refused=refused,
        topk_k=[k] * len(kept),
        topk_index=flat.tolist(),
        topk_score=best.reshape(-1).tolist(),
        topk_label=np.where(flat < label_count, flat, -1).tolist(),
        corner_case=corner,
        tensors=tensors,
    )


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores`` (2-D), the indices of the ``k`` highest, best first, ties by index.

    The same as a stable ``argsort`` of the negated scores cut to ``k``; for
    ``k`` well below the row length, an ``argpartition`` does the work and only
    rows with a tie across the cut are sorted whole.
    """
    columns = scores.shape[1]
    if 4 * k >= columns:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.take_along_axis(part, np.lexsort((part, -values), axis=1), axis=1)
    # A row whose k-th score is tied with one left out may have kept the wrong
    # index of the tie (argpartition does not prefer the lower one): sort it whole.
    cut = np.take_along_axis(scores, order[:, -1:], axis=1)
    tied = np.flatnonzero((scores >= cut).sum(axis=1) > k)
    if tied.size:
        order[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return order


def _tensor_rows(
    name: str, arr: np.ndarray, rows: int, limit: int, refused: dict[int, str]
) -> list[TensorEntry]:
    dtype: Any = dtype_of(arr.dtype).value  # the wire's dtype names: TensorEntry's too
    shape = list(arr.shape) if rows == 1 else [1, *arr.shape[1:]]
    head = arr.reshape(rows, -1)[:, :limit].astype(np.float64)
    for row in np.flatnonzero(~np.isfinite(head).all(axis=1)).tolist():
        refused.setdefault(row, f"output {name!r} has non-finite values")
    return [TensorEntry(name=name, dtype=dtype, shape=shape, data=data) for data in head.tolist()]


def _refuse_all(rows: int, reason: str) -> RowSummaries:
    return RowSummaries([], dict.fromkeys(range(rows), reason), [], [], [], [], [], [])


# ----- change gating ---------------------------------------------------------


class ChangeGate:
    """Skip inference when the input barely changed since the last one inferred.

    The difference is the mean absolute difference over every element of every
    input (as float64), compared with the *last inferred* input, not the last
    seen: a slow drift that never crosses the threshold step by step still
    triggers once it has drifted far enough. A change of input names, shapes or
    dtypes always infers. ``threshold <= 0`` disables gating.

    Not thread-safe: one gate per source loop.
    """

    def __init__(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.threshold = threshold
        self.skipped = 0
        self.passed = 0
        self._last: dict[str, np.ndarray] | None = None

    def should_infer(self, x: Mapping[str, np.ndarray]) -> bool:
        """``True`` to run inference on ``x`` (then ``x`` is remembered), ``False`` to skip."""
        if self.threshold <= 0:
            self.passed += 1
            return True
        current = {name: np.asarray(value) for name, value in x.items()}
        last = self._last
        if last is not None and self._comparable(last, current):
            total = sum(a.size for a in current.values())
            if total > 0:
                diff = sum(
                    float(np.abs(current[n].astype(np.float64) - last[n].astype(np.float64)).sum())
                    for n in current
                )
                if diff / total < self.threshold:
                    self.skipped += 1
                    return False
        # Copy: the caller may reuse its buffers for the next frame.
        self._last = {name: arr.copy() for name, arr in current.items()}
        self.passed += 1
        return True

    def reset(self) -> None:
        """Forget the last inferred input (the next one always infers)."""
        self._last = None

    @staticmethod
    def _comparable(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
        return a.keys() == b.keys() and all(
            a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a
        )


# ----- latency ---------------------------------------------------------------


class LatencyWindow:
    """The last ``capacity`` latencies (milliseconds) and their percentiles.

    Percentiles use numpy's default (linear interpolation), over the samples
    currently held. Not thread-safe: add from one thread (the event loop).
    """

    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds.

        Raises:
            ValueError: ``ms`` is negative or not finite.
        """
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"latency must be a finite, non-negative number of ms, got {ms}")
        self._buf[self._next] = ms
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def add_many(self, ms: float, count: int) -> None:
        """Record ``count`` latencies of ``ms`` milliseconds each (the rows of one run).

        Raises:
            ValueError: ``ms`` is negative or not finite.
        """
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"latency must be a finite, non-negative number of ms, got {ms}")
        if count <= 0:
            return
        slots = (self._next + np.arange(min(count, self.capacity))) % self.capacity
        self._buf[slots] = ms
        self._next = (self._next + count) % self.capacity
        self._count = min(self._count + count, self.capacity)

    def stats(self) -> LatencyStats:
        """p50, p95 and p99 of the samples held; all zero when there are none."""
        if self._count == 0:
            return LatencyStats(p50_ms=0.0, p95_ms=0.0, p99_ms=0.0)
        p50, p95, p99 = np.percentile(self._buf[: self._count], [50, 95, 99])
        return LatencyStats(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99))


class PeriodCounter:
    """The serving model's runs, errors and latency histogram since ``since``.

    :meth:`take` returns the period as :class:`~shared.messages.PeriodStats` and
    starts the next one; :meth:`restart` drops the period (on a model swap, so a
    period never mixes two models). Not thread-safe: use from the event loop.
    """

    def __init__(self, since: float) -> None:
        self._since = since
        self._errors = 0
        self._counts: dict[int, int] = {}

    def add(self, ms: float, count: int = 1) -> None:
        """Count ``count`` successful runs of ``ms`` milliseconds each."""
        index = bucket_of(ms)
        self._counts[index] = self._counts.get(index, 0) + count

    def error(self, runs: int = 1) -> None:
        """Count ``runs`` failed runs."""
        self._errors += runs

    def restart(self, since: float) -> None:
        """Start an empty period at ``since``."""
        self._since = since
        self._errors = 0
        self._counts = {}

    def take(self, now: float) -> PeriodStats:
        """The period up to ``now``; the next one starts there."""
        period = PeriodStats(
            since=self._since,
            inferences=sum(self._counts.values()),
            errors=self._errors,
            latency=tuple(sorted(self._counts.items())),
        )
        self.restart(now)
        return period
