"""Pure decisions around a model session: signatures, inputs, summaries, gating, latency.

Nothing here touches onnxruntime, the event loop or the disk; :mod:`edge_node.runtime`
feeds it what the session reports (type strings, shapes, output arrays) and acts
on what it returns. That keeps every rule below testable without a model.

Invariants:

* :func:`check_signature` accepts a session only when its inputs and outputs are
  exactly the manifest's, by name, dtype and rank, and every dimension the
  manifest pins to a number is that number in the model (a symbolic dimension on
  either side matches anything). The first difference is named in the error.
* :func:`make_inputs` is deterministic: the same specs and warm-up values give
  the same arrays, bit for bit, on every node.
* :func:`input_digest` depends only on names, dtypes, shapes and element values
  (little-endian), never on memory layout or dict order.
* Everything :func:`summarize_output` returns fits the wire limits of
  :class:`~shared.messages.InferenceResult` (finite numbers, at most
  :data:`MAX_TOPK` top-k entries, :data:`MAX_TENSORS` tensors of at most
  :data:`MAX_TENSOR_ELEMS` elements).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from shared.errors import DecodeError, TrustError
from shared.messages import (
    DType,
    LatencyStats,
    ModelManifest,
    TensorData,
    TensorSpec,
    TopK,
    WarmupInput,
)

__all__ = [
    "CPU_PROVIDER",
    "MAX_TENSORS",
    "MAX_TENSOR_ELEMS",
    "MAX_TOPK",
    "MAX_WARMUP_ELEMS",
    "ORT_TYPE_TO_DTYPE",
    "ChangeGate",
    "InputSpecError",
    "LatencyWindow",
    "ModelMismatchError",
    "OutputSummaryError",
    "check_signature",
    "choose_providers",
    "dtype_of",
    "first_line",
    "has_dynamic_batch",
    "input_digest",
    "is_corner_case",
    "make_inputs",
    "numpy_dtype",
    "resolve_specs",
    "spec_from_ort",
    "split_outputs",
    "stack_requests",
    "summarize_output",
]

CPU_PROVIDER: Final = "CPUExecutionProvider"

#: Wire limits of :class:`~shared.messages.InferenceResult` and :class:`TensorData`.
MAX_TOPK: Final = 100
MAX_TENSORS: Final = 16
MAX_TENSOR_ELEMS: Final = 65_536

#: Largest warm-up input :func:`make_inputs` builds, in elements (64 MiB of float32).
MAX_WARMUP_ELEMS: Final = 1 << 24

# Longest symbolic dimension name a TensorSpec carries (characters).
_MAX_DIM_NAME: Final = 64

ORT_TYPE_TO_DTYPE: Final[Mapping[str, DType]] = {
    "tensor(float)": DType.FLOAT32,
    "tensor(float16)": DType.FLOAT16,
    "tensor(double)": DType.FLOAT64,
    "tensor(int8)": DType.INT8,
    "tensor(int16)": DType.INT16,
    "tensor(int32)": DType.INT32,
    "tensor(int64)": DType.INT64,
    "tensor(uint8)": DType.UINT8,
    "tensor(bool)": DType.BOOL,
}

_NUMPY: Final[Mapping[DType, np.dtype[Any]]] = {
    DType.FLOAT32: np.dtype(np.float32),
    DType.FLOAT16: np.dtype(np.float16),
    DType.FLOAT64: np.dtype(np.float64),
    DType.INT8: np.dtype(np.int8),
    DType.INT16: np.dtype(np.int16),
    DType.INT32: np.dtype(np.int32),
    DType.INT64: np.dtype(np.int64),
    DType.UINT8: np.dtype(np.uint8),
    DType.BOOL: np.dtype(np.bool_),
}
_FROM_NUMPY: Final[Mapping[np.dtype[Any], DType]] = {v: k for k, v in _NUMPY.items()}


class InputSpecError(DecodeError, ValueError):
    """Warm-up values or input arrays do not fit the declared tensor specs."""


class OutputSummaryError(DecodeError, ValueError):
    """A model output cannot be reported on the wire (non-finite or unsupported dtype)."""


class ModelMismatchError(TrustError):
    """The loaded model's inputs or outputs differ from what its manifest declares."""

    code = "model_mismatch"


# ----- dtypes, specs, providers ----------------------------------------------


def numpy_dtype(dtype: DType) -> np.dtype[Any]:
    """The numpy dtype of a wire :class:`DType`."""
    return _NUMPY[dtype]


def dtype_of(dtype: npt.DTypeLike) -> DType:
    """The wire :class:`DType` of a numpy dtype.

    Raises:
        OutputSummaryError: the dtype has no wire equivalent (strings, complex, ...).
    """
    try:
        return _FROM_NUMPY[np.dtype(dtype).newbyteorder("=")]
    except (KeyError, TypeError):
        raise OutputSummaryError(f"unsupported tensor dtype {dtype!s}") from None


def spec_from_ort(name: str, ort_type: str, shape: Sequence[object] | None) -> TensorSpec:
    """A :class:`TensorSpec` from what an onnxruntime ``NodeArg`` reports.

    Negative or non-integer dimensions become ``None``; symbolic names longer than
    the wire allows are cut.

    Raises:
        ModelMismatchError: the type is not a tensor type the wire knows (strings,
            sequences, maps), or the name or rank exceed the wire's limits.
    """
    dtype = ORT_TYPE_TO_DTYPE.get(ort_type)
    if dtype is None:
        raise ModelMismatchError(f"tensor {name!r} has unsupported type {ort_type}")
    dims: list[int | str | None] = []
    for dim in shape or ():
        if isinstance(dim, bool):
            dims.append(None)
        elif isinstance(dim, int):
            dims.append(dim if dim >= 0 else None)
        elif isinstance(dim, str):
            dims.append(dim[:_MAX_DIM_NAME])
        else:
            dims.append(None)
    try:
        return TensorSpec(name=name, dtype=dtype, shape=tuple(dims))
    except ValidationError:
        raise ModelMismatchError(
            f"tensor {name[:64]!r} cannot be described on the wire (name or rank too long)"
        ) from None


def choose_providers(
    preferred: Sequence[str],
    available: Sequence[str],
    *,
    fallback: str = CPU_PROVIDER,
) -> tuple[str, ...]:
    """``preferred`` in its order, keeping only ``available`` ones; ``(fallback,)`` if none."""
    have = set(available)
    chosen = tuple(dict.fromkeys(p for p in preferred if p in have))
    return chosen or (fallback,)


def resolve_specs(
    declared: Sequence[TensorSpec], actual: Sequence[TensorSpec]
) -> tuple[TensorSpec, ...]:
    """``actual`` (the model's specs) with every symbolic dim the manifest pins made concrete.

    Used to build warm-up inputs: the model may accept ``[N, 8]`` while the
    manifest promises ``[1, 8]``. Specs the manifest does not name are kept as is.
    """
    by_name = {s.name: s for s in declared}
    out: list[TensorSpec] = []
    for spec in actual:
        pinned = by_name.get(spec.name)
        if pinned is None or len(pinned.shape) != len(spec.shape):
            out.append(spec)
            continue
        shape = tuple(
            d if isinstance(d, int) else p if isinstance(p, int) else d
            for d, p in zip(spec.shape, pinned.shape, strict=True)
        )
        out.append(spec.model_copy(update={"shape": shape}))
    return tuple(out)


def has_dynamic_batch(specs: Sequence[TensorSpec]) -> bool:
    """Whether every spec has rank >= 1 and a symbolic (or unknown) first dimension."""
    return bool(specs) and all(s.shape and not isinstance(s.shape[0], int) for s in specs)


def stack_requests(
    batch: Sequence[Mapping[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """Concatenate requests along axis 0 into one feed, or ``None`` when they do not stack.

    Requests stack when they name the same inputs, every array has rank >= 1,
    all arrays of one request share their first dimension (its row count), and
    each input has the same dtype and trailing shape in every request. Returns
    the feed and each request's row count, for :func:`split_outputs`.
    """
    if not batch:
        return None
    names = list(batch[0])
    sizes: list[int] = []
    for request in batch:
        if set(request) != set(names):
            return None
        rows = {np.shape(request[n])[0] if np.ndim(request[n]) >= 1 else -1 for n in names}
        if len(rows) != 1 or -1 in rows:
            return None
        sizes.append(rows.pop())
    feed: dict[str, np.ndarray] = {}
    for name in names:
        parts = [np.asarray(request[name]) for request in batch]
        first = parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
            return None
        feed[name] = np.concatenate(parts, axis=0)
    return feed, sizes


def split_outputs(
    outputs: Sequence[np.ndarray], sizes: Sequence[int]
) -> list[list[np.ndarray]] | None:
    """Split batched ``outputs`` back into one list per request of ``sizes`` rows.

    ``None`` when some output's first dimension is not the total row count (the
    model mixes rows, e.g. reduces over the batch): run the requests one by one.
    """
    total = sum(sizes)
    if any(np.ndim(o) < 1 or np.shape(o)[0] != total for o in outputs):
        return None
    cuts = np.cumsum(sizes)[:-1]
    per_output = [np.split(o, cuts, axis=0) for o in outputs]
    return [[parts[i] for parts in per_output] for i in range(len(sizes))]


def first_line(text: object, *, limit: int = 400) -> str:
    """The first non-empty line of ``str(text)``, cut to ``limit`` characters.

    onnxruntime's messages can span many lines; statuses and CLI output want one.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----- signatures ------------------------------------------------------------


def check_signature(
    manifest: ModelManifest,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> None:
    """Check a loaded session's ``inputs`` and ``outputs`` against ``manifest``.

    Names must be the same sets; for each name the dtype and rank must be equal,
    and a dimension the manifest gives as a number must be that number in the
    model when the model's is also a number. Symbolic (string) and unknown
    (``None``) dimensions on either side match anything.

    Raises:
        ModelMismatchError: naming the first difference found (inputs first, in
            the manifest's order).
    """
    _check_side("input", manifest.inputs, inputs)
    _check_side("output", manifest.outputs, outputs)


def _check_side(kind: str, declared: Sequence[TensorSpec], actual: Sequence[TensorSpec]) -> None:
    for label, specs in (("manifest", declared), ("model", actual)):
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ModelMismatchError(f"{label} lists {kind} {spec.name!r} twice")
            seen.add(spec.name)
    model = {s.name: s for s in actual}
    for want in declared:
        have = model.get(want.name)
        if have is None:
            raise ModelMismatchError(
                f"{kind} {want.name!r} declared by the manifest is not in the model"
            )
        if want.dtype != have.dtype:
            raise ModelMismatchError(
                f"{kind} {want.name!r}: manifest says {want.dtype}, model has {have.dtype}"
            )
        if len(want.shape) != len(have.shape):
            raise ModelMismatchError(
                f"{kind} {want.name!r}: manifest says rank {len(want.shape)} "
                f"{_fmt_shape(want.shape)}, model has rank {len(have.shape)} "
                f"{_fmt_shape(have.shape)}"
            )
        for axis, (w, h) in enumerate(zip(want.shape, have.shape, strict=True)):
            if isinstance(w, int) and isinstance(h, int) and w != h:
                raise ModelMismatchError(
                    f"{kind} {want.name!r}: dimension {axis} is {w} in the manifest "
                    f"but {h} in the model"
                )
    names = {s.name for s in declared}
    for have in actual:
        if have.name not in names:
            raise ModelMismatchError(f"model {kind} {have.name!r} is not declared by the manifest")


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ----- inputs ----------------------------------------------------------------


def make_inputs(
    specs: Sequence[TensorSpec],
    warmup: Sequence[WarmupInput],
    *,
    batch: int = 1,
    max_elems: int = MAX_WARMUP_ELEMS,
) -> dict[str, np.ndarray]:
    """Build one array per spec, for warm-up or a synthetic source.

    An input with a :class:`WarmupInput` gets its ``values`` reshaped to its
    ``shape`` (or ``fill`` everywhere when ``values`` is absent), cast to the
    spec's dtype. Any other input is made from its declared shape, symbolic and
    unknown dimensions set to 1 except a symbolic *first* dimension, set to
    ``batch``; floating inputs get deterministic pseudo-random values in [0, 1)
    (seeded by the input's name), integer and boolean inputs zeros (integers are
    often indices or lengths, where 0 is the one value sure to be valid).

    Raises:
        InputSpecError: a warm-up names no input, is given twice, has a rank or a
            pinned dimension that differs from the spec, a ``values`` length that
            is not the product of its shape, values that do not fit the dtype
            (fractional integers, out of range, non-0/1 booleans), or more than
            ``max_elems`` elements; or ``batch`` < 1.
    """
    if batch < 1:
        raise InputSpecError(f"batch must be at least 1, got {batch}")
    by_name: dict[str, WarmupInput] = {}
    names = {s.name for s in specs}
    for w in warmup:
        if w.name not in names:
            raise InputSpecError(f"warm-up input {w.name!r} is not an input of the model")
        if w.name in by_name:
            raise InputSpecError(f"warm-up input {w.name!r} is given twice")
        by_name[w.name] = w
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        given = by_name.get(spec.name)
        if given is not None:
            out[spec.name] = _from_warmup(spec, given, max_elems)
        else:
            out[spec.name] = _synthetic(spec, batch, max_elems)
    return out


def _from_warmup(spec: TensorSpec, w: WarmupInput, max_elems: int) -> np.ndarray:
    if len(w.shape) != len(spec.shape):
        raise InputSpecError(
            f"warm-up input {spec.name!r} has rank {len(w.shape)}, the model expects "
            f"rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(w.shape, spec.shape, strict=True)):
        if isinstance(want, int) and got != want:
            raise InputSpecError(
                f"warm-up input {spec.name!r}: dimension {axis} is {got}, the model expects {want}"
            )
    count = math.prod(w.shape)
    if count > max_elems:
        raise InputSpecError(
            f"warm-up input {spec.name!r} has {count} elements, more than {max_elems}"
        )
    dtype = numpy_dtype(spec.dtype)
    if w.values is not None:
        if len(w.values) != count:
            raise InputSpecError(
                f"warm-up input {spec.name!r} has {len(w.values)} values for shape "
                f"{list(w.shape)} ({count} elements)"
            )
        raw = np.asarray(w.values, dtype=np.float64).reshape(w.shape)
    else:
        raw = np.full(w.shape, w.fill, dtype=np.float64)
    _check_fits(spec.name, raw, dtype)
    return raw.astype(dtype)


def _check_fits(name: str, raw: npt.NDArray[np.float64], dtype: np.dtype[Any]) -> None:
    if raw.size == 0:
        return
    if dtype == np.bool_:
        if not np.isin(raw, (0.0, 1.0)).all():
            raise InputSpecError(f"warm-up input {name!r} is boolean: values must be 0 or 1")
    elif dtype.kind in "iu":
        if not (np.floor(raw) == raw).all():
            raise InputSpecError(f"warm-up input {name!r} is {dtype}: values must be integers")
        info = np.iinfo(dtype)
        # float64 cannot hold every int64; compare against the representable bounds.
        if raw.min() < float(info.min) or raw.max() >= float(info.max) + 1.0:
            raise InputSpecError(f"warm-up input {name!r} has values outside the range of {dtype}")
    elif np.abs(raw).max() > float(np.finfo(dtype).max):
        raise InputSpecError(f"warm-up input {name!r} has values outside the range of {dtype}")


def _synthetic(spec: TensorSpec, batch: int, max_elems: int) -> np.ndarray:
    shape = tuple(
        d if isinstance(d, int) else (batch if axis == 0 else 1)
        for axis, d in enumerate(spec.shape)
    )
    count = math.prod(shape)
    if count > max_elems:
        raise InputSpecError(
            f"input {spec.name!r} {list(shape)} has {count} elements, more than {max_elems}; "
            "declare a warm-up input for it"
        )
    dtype = numpy_dtype(spec.dtype)
    if dtype.kind != "f":
        return np.zeros(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).random(shape).astype(dtype)


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
