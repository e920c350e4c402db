"""Pure decisions around a model session: dtypes, signatures, providers, inputs, batching.

Nothing here touches onnxruntime, the event loop or the disk; :mod:`edge_node.runtime`
feeds it what the session reports (type strings, shapes, output arrays) and acts
on what it returns. That keeps every rule below testable without a model. What
a node reports of an inference (digests, summaries, gating, latency) is in
:mod:`edge_node.results_core`.

Invariants:

* :func:`check_signature` accepts a session only when its inputs and outputs are
  exactly the manifest's, by name, dtype and rank, and every dimension the
  manifest pins to a number is that number in the model (a symbolic dimension on
  either side matches anything). The first difference is named in the error.
* :func:`make_inputs` is deterministic: the same specs and warm-up values give
  the same arrays, bit for bit, on every node.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from shared.errors import DecodeError, TrustError, UsageError
from shared.messages import (
    DType,
    ModelManifest,
    TensorSpec,
    WarmupInput,
)

__all__ = [
    "CPU_PROVIDER",
    "MAX_PROVIDERS",
    "MAX_TENSORS",
    "MAX_TENSOR_ELEMS",
    "MAX_TOPK",
    "MAX_WARMUP_ELEMS",
    "ORT_TYPE_TO_DTYPE",
    "InputSpecError",
    "ModelMismatchError",
    "OutputSummaryError",
    "check_providers",
    "check_signature",
    "choose_providers",
    "dtype_of",
    "first_line",
    "has_dynamic_batch",
    "holds_rows",
    "make_inputs",
    "numpy_dtype",
    "resolve_specs",
    "spec_from_ort",
    "stack_requests",
]

CPU_PROVIDER: Final = "CPUExecutionProvider"
MAX_PROVIDERS: Final = 8  # as many as a manifest may name

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


def check_providers(
    wanted: Sequence[str],
    *,
    known: Sequence[str],
    available: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """``wanted`` (in its order) if each is an execution provider onnxruntime
    ``known``s and, when ``available`` is given, one this machine can use.

    Raises:
        UsageError: none given, more than :data:`MAX_PROVIDERS`, a repeat, or the
            first provider that is unknown or unavailable (named, with the choices).
    """
    if not wanted:
        raise UsageError("no execution provider given")
    if len(wanted) > MAX_PROVIDERS:
        raise UsageError(f"at most {MAX_PROVIDERS} execution providers")
    for index, name in enumerate(wanted):
        if name in wanted[:index]:
            raise UsageError(f"execution provider {name!r} is given twice")
        if name not in known:
            raise UsageError(
                f"unknown execution provider {name[:80]!r} (onnxruntime knows {', '.join(known)})"
            )
        if available is not None and name not in available:
            raise UsageError(
                f"execution provider {name!r} is not available on this machine "
                f"(available: {', '.join(available)})"
            )
    return tuple(wanted)


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
    the feed and each request's row count.
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


def holds_rows(outputs: Sequence[np.ndarray], rows: int) -> bool:
    """Whether every output of a stacked run has ``rows`` rows, one per request.

    False when some output's first dimension is not ``rows`` (the model mixes
    rows, e.g. reduces over the batch): run the requests one by one.
    """
    return all(np.ndim(o) >= 1 and np.shape(o)[0] == rows for o in outputs)


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
