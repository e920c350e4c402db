"""Pure decisions about what a node reports of an inference: digests, summaries, gating, latency.

Nothing here touches onnxruntime, the event loop or the disk; the pipeline
(:mod:`edge_node.pipeline`) feeds it inputs and output arrays and sends what it
returns.

Invariants:

* :func:`input_digest` depends only on names, dtypes, shapes and element values
  (little-endian), never on memory layout or dict order.
* Everything :func:`summarize_output` returns fits the wire limits of
  :class:`~shared.messages.InferenceResult` (finite numbers, at most
  :data:`~edge_node.inference_core.MAX_TOPK` top-k entries,
  :data:`~edge_node.inference_core.MAX_TENSORS` tensors of at most
  :data:`~edge_node.inference_core.MAX_TENSOR_ELEMS` elements).
* :class:`ChangeGate` compares with the last *inferred* input, so a slow drift
  still triggers once it has drifted far enough.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

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
from shared.messages import LatencyStats, PeriodStats, TensorData, TopK

__all__ = [
    "ChangeGate",
    "LatencyWindow",
    "PeriodCounter",
    "input_digest",
    "is_corner_case",
    "summarize_output",
]


# ----- inputs ----------------------------------------------------------------


def input_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over every input's name, dtype, shape and little-endian bytes.

    Stable across dict order, memory layout (strides, Fortran order) and host
    byte order. Each field is length-prefixed, so no two inputs hash alike by
    concatenation.

    Raises:
        InputSpecError: an array has no stable byte form (object or string dtype).
    """
    h = hashlib.sha256(b"edgefleet.input-digest.v1\x00")
    for name in sorted(inputs):
        arr = np.asarray(inputs[name])
        if arr.dtype.kind not in "biuf":
            raise InputSpecError(f"input {name!r} has unsupported dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        for field in (name.encode(), arr.dtype.name.encode()):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
        h.update(arr.ndim.to_bytes(8, "little"))
        for dim in arr.shape:
            h.update(dim.to_bytes(8, "little"))
        h.update(arr.nbytes.to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()


# ----- outputs ---------------------------------------------------------------


def summarize_output(
    outputs: Mapping[str, np.ndarray],
    *,
    topk: int,
    class_labels: Sequence[str],
    max_tensor_elems: int = 64,
) -> tuple[tuple[TopK, ...] | None, tuple[TensorData, ...] | None, float | None]:
    """What a result carries about ``outputs``: ``(topk, tensors, top_score)``.

    *Classifier-like* means exactly one floating output of shape ``[C]`` or
    ``[1, C]`` with C >= 2 (a ``[1, 1]`` score is a regression or a sigmoid, whose
    "top" would not be a confidence). For it: the ``min(topk, C, MAX_TOPK)``
    highest scores, best first (ties by lower index), each with its index, its
    label when ``class_labels`` has one at that index, and its score as the model
    gave it (probabilities for a softmax head); ``top_score`` is the best score.

    Every other output (all of them when there is no single classifier-like
    one) is returned as :class:`TensorData` with its full shape and its first
    ``max_tensor_elems`` elements in row-major order: a tensor is *truncated*
    exactly when ``len(data) < prod(shape)``. At most :data:`MAX_TENSORS`
    outputs are returned, in the mapping's order. ``tensors`` is ``None`` when
    there are none; ``top_score`` is ``None`` without a classifier.

    Raises:
        OutputSummaryError: a reported value is NaN or infinite, or an output's
            dtype has no wire equivalent.
        ValueError: ``topk`` < 1 or ``max_tensor_elems`` < 0.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if max_tensor_elems < 0:
        raise ValueError(f"max_tensor_elems must be >= 0, got {max_tensor_elems}")
    limit = min(max_tensor_elems, MAX_TENSOR_ELEMS)
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    candidates = [name for name, arr in arrays.items() if _classifier_like(arr)]
    top: tuple[TopK, ...] | None = None
    top_score: float | None = None
    rest = list(arrays)
    if len(candidates) == 1:
        name = candidates[0]
        rest.remove(name)
        top, top_score = _topk(name, arrays[name].reshape(-1), topk, class_labels)
    tensors = tuple(_tensor(name, arrays[name], limit) for name in rest[:MAX_TENSORS])
    return top, (tensors or None), top_score


def _classifier_like(arr: np.ndarray) -> bool:
    if arr.dtype.kind != "f":
        return False
    rows, cols = (1, arr.shape[0]) if arr.ndim == 1 else arr.shape if arr.ndim == 2 else (0, 0)
    return int(rows) == 1 and int(cols) >= 2


def _topk(
    name: str, scores: np.ndarray, k: int, labels: Sequence[str]
) -> tuple[tuple[TopK, ...], float]:
    values = scores.astype(np.float64)
    if not np.isfinite(values).all():
        raise OutputSummaryError(f"output {name!r} has non-finite scores")
    k = min(k, values.shape[0], MAX_TOPK)
    # Stable sort on the negated scores: best first, lower index first on ties.
    order = np.argsort(-values, kind="stable")[:k]
    top = tuple(
        TopK(
            index=int(i),
            label=labels[int(i)] if int(i) < len(labels) else None,
            score=float(values[i]),
        )
        for i in order
    )
    return top, top[0].score


def _tensor(name: str, arr: np.ndarray, limit: int) -> TensorData:
    dtype = dtype_of(arr.dtype)
    head = arr.reshape(-1)[:limit].astype(np.float64)
    if not np.isfinite(head).all():
        raise OutputSummaryError(f"output {name!r} has non-finite values")
    return TensorData(name=name, dtype=dtype, shape=arr.shape, data=tuple(head.tolist()))


def is_corner_case(top_score: float | None, threshold: float) -> bool:
    """Whether a result should be flagged for audit: its top score is below ``threshold``.

    Results without a top score (not classifier-like) and thresholds <= 0 never flag.
    """
    return top_score is not None and threshold > 0 and top_score < threshold


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

    def add(self, ms: float) -> None:
        """Count one successful run of ``ms`` milliseconds."""
        index = bucket_of(ms)
        self._counts[index] = self._counts.get(index, 0) + 1

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
