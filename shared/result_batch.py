"""The result batch on the wire: columnar, decoded strictly in one C pass.

A :class:`ResultBatch` (``v`` 2) carries up to 1,000 inference results as one
array per field, so a node builds it straight from the arrays a batched
``session.run`` returned and the controller stores it with one bulk insert.

Invariants kept by :func:`decode_results`, before anything looks at a batch:

* the payload is at most :data:`MAX_BATCH_BYTES` long (checked before parsing);
* it is one JSON object of exactly this schema, decoded by msgspec (C): no
  unknown field, no ``NaN`` or ``Infinity`` (not JSON), no float that overflows,
  every integer within its bounds, no lone surrogate, no nesting beyond what
  the schema allows;
* it is in **canonical form**: re-encoding the decoded batch gives back the
  payload byte for byte. This is what refuses a repeated key (the re-encoding
  holds it once), whitespace, reordered fields, ``1`` where ``1.0`` belongs
  and defaults spelled out, all in C and linear in the payload's size;
* every column has one entry per result, result numbers ascend strictly, and
  every model index names an entry of ``models``.

Any violation raises :class:`~shared.errors.DecodeError` with a one-line reason.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Annotated, Literal, NamedTuple, Protocol, cast

import msgspec

from shared.errors import DecodeError
from shared.version import SEMVER_PATTERN, SemVer, VersionError

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RESULTS",
    "RESULT_BATCH_VERSION",
    "BatchModel",
    "ResultBatch",
    "ResultLike",
    "ResultView",
    "TensorEntry",
    "TopKView",
    "batch_of",
    "decode_results",
    "encode_results",
    "rows_of",
]

RESULT_BATCH_VERSION: Literal[2] = 2
MAX_BATCH_RESULTS = 1000
MAX_BATCH_BYTES = 1024 * 1024  # bytes: the payload limit of every wire message
_MAX_MODELS = 16  # distinct models in one batch (a swap adds one)
_INT64 = 2**63 - 1
_MAX_TOPK = 100  # entries of one result's top-k
_MAX_LABELS = 10_000  # distinct class labels in one batch (a manifest's limit)

_Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Text = Annotated[str, msgspec.Meta(max_length=512)]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_Version = Annotated[str, msgspec.Meta(pattern=SEMVER_PATTERN, max_length=128)]
_Seq = Annotated[int, msgspec.Meta(ge=1, le=_INT64)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=_INT64)]
_NonNegative = Annotated[float, msgspec.Meta(ge=0)]
_DType = Literal[
    "float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"
]


class BatchModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model that produced results of the batch (the wire's ``ModelRef``)."""

    name: _Name
    version: _Version
    sha256: _Sha256


class TensorEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A small output tensor, row-major; stored as it arrived."""

    name: _Name
    dtype: _DType
    shape: Annotated[list[_Count], msgspec.Meta(max_length=16)]
    data: Annotated[list[float], msgspec.Meta(max_length=65_536)]


_Column = msgspec.Meta(min_length=1, max_length=MAX_BATCH_RESULTS)


class ResultBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Results of one node in ``result_seq`` order; ``seq`` is the outbox slot.

    Result ``i`` is ``result_seq[i]``, produced by ``models[model[i]]`` at
    ``ts[i]`` in ``latency_ms[i]``; its input's digest is the ``i``-th
    ``digest_len`` characters of ``digests``. Its top-k (``topk_k[i]`` entries,
    0 for none) continues the flat ``topk_index``/``topk_score``/``topk_label``
    columns where result ``i - 1``'s ended; a label is an index into ``labels``
    or -1 for none. ``tensors[i]`` is null when the output was not reported.
    """

    v: Literal[2] = RESULT_BATCH_VERSION
    type: Literal["results"] = "results"
    node: _Id
    seq: _Seq
    models: Annotated[list[BatchModel], msgspec.Meta(min_length=1, max_length=_MAX_MODELS)]
    result_seq: Annotated[list[_Seq], _Column]
    model: Annotated[list[_Count], _Column]
    digest_len: Annotated[int, msgspec.Meta(ge=16, le=64)]
    digests: Annotated[str, msgspec.Meta(max_length=64 * MAX_BATCH_RESULTS)]
    latency_ms: Annotated[list[_NonNegative], _Column]
    ts: Annotated[list[_NonNegative], _Column]
    corner_case: Annotated[list[bool], _Column]
    source: Annotated[list[_Text | None], _Column]
    topk_k: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=_MAX_TOPK)]], _Column]
    topk_index: Annotated[list[_Count], msgspec.Meta(max_length=_MAX_TOPK * MAX_BATCH_RESULTS)]
    topk_score: Annotated[list[float], msgspec.Meta(max_length=_MAX_TOPK * MAX_BATCH_RESULTS)]
    topk_label: Annotated[
        list[Annotated[int, msgspec.Meta(ge=-1, lt=_MAX_LABELS)]],
        msgspec.Meta(max_length=_MAX_TOPK * MAX_BATCH_RESULTS),
    ]
    labels: Annotated[list[_Text], msgspec.Meta(max_length=_MAX_LABELS)]
    tensors: Annotated[
        list[Annotated[list[TensorEntry], msgspec.Meta(max_length=16)] | None], _Column
    ]

    def __len__(self) -> int:
        return len(self.result_seq)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ResultBatch)


def encode_results(batch: ResultBatch) -> bytes:
    """The canonical JSON of ``batch``: what :func:`decode_results` accepts."""
    return _ENCODER.encode(batch)


def decode_results(payload: bytes, *, max_bytes: int = MAX_BATCH_BYTES) -> ResultBatch:
    """Decode ``payload`` strictly (see the module docstring).

    Raises:
        DecodeError: the payload is too big, malformed, not canonical, or inconsistent.
    """
    if len(payload) > max_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        batch = _DECODER.decode(payload)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid ResultBatch: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if _ENCODER.encode(batch) != payload:
        raise DecodeError(
            "ResultBatch is not in canonical form (a repeated key, whitespace, "
            "field order or number spelling)"
        )
    _check_columns(batch)
    return batch


_HEX = re.compile(r"[0-9a-f]*")


_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_strings(batch: ResultBatch) -> None:
    """Exact checks of the few identifiers (a schema pattern's ``$`` lets a final
    newline through, and ``\\d`` any Unicode digit)."""
    if not _ID.fullmatch(batch.node):
        raise DecodeError(f"invalid ResultBatch: node {batch.node[:64]!r} is not an id")
    for model in batch.models:
        if not _SHA256.fullmatch(model.sha256):
            raise DecodeError("invalid ResultBatch: a model's sha256 is not 64 hex digits")
        try:
            SemVer.parse(model.version)
        except VersionError as exc:
            raise DecodeError(f"invalid ResultBatch: model version: {exc}") from None


def _check_columns(batch: ResultBatch) -> None:
    _check_strings(batch)
    n = len(batch.result_seq)
    for name in ("model", "latency_ms", "ts", "corner_case", "source", "topk_k", "tensors"):
        if len(getattr(batch, name)) != n:
            raise DecodeError(f"invalid ResultBatch: column {name} does not hold {n} entries")
    if len(batch.digests) != n * batch.digest_len or not _HEX.fullmatch(batch.digests):
        raise DecodeError(f"invalid ResultBatch: digests are not {n} x {batch.digest_len} hex")
    entries = sum(batch.topk_k)
    if not len(batch.topk_index) == len(batch.topk_score) == len(batch.topk_label) == entries:
        raise DecodeError(f"invalid ResultBatch: top-k columns do not hold {entries} entries")
    if entries and max(batch.topk_label) >= len(batch.labels):
        raise DecodeError("invalid ResultBatch: a top-k label names no entry of labels")
    seqs = batch.result_seq
    if not all(map(operator.lt, seqs, islice(seqs, 1, None))):
        raise DecodeError("invalid ResultBatch: result_seq does not ascend strictly")
    if max(batch.model) >= len(batch.models):
        raise DecodeError("invalid ResultBatch: a model index names no entry of models")


# ----- between rows and columns ---------------------------------------------------


class _ModelLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def sha256(self) -> str: ...


class _TopKLike(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def label(self) -> str | None: ...
    @property
    def score(self) -> float: ...


class _TensorLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def data(self) -> Sequence[float]: ...


class ResultLike(Protocol):
    """One result as rows hold it (:class:`shared.messages.InferenceResult` is one)."""

    @property
    def seq(self) -> int: ...
    @property
    def model(self) -> _ModelLike: ...
    @property
    def input_digest(self) -> str: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def ts(self) -> float: ...
    @property
    def topk(self) -> Sequence[_TopKLike] | None: ...
    @property
    def tensors(self) -> Sequence[_TensorLike] | None: ...
    @property
    def corner_case(self) -> bool: ...
    @property
    def source(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class TopKView:
    """One top-k entry of a :class:`ResultView`."""

    index: int
    label: str | None
    score: float


class ResultView(NamedTuple):
    """Result ``i`` of a batch as one row (for readers that look at few results)."""

    seq: int
    model: BatchModel
    input_digest: str
    latency_ms: float
    ts: float
    topk: tuple[TopKView, ...] | None
    tensors: tuple[TensorEntry, ...] | None
    corner_case: bool
    source: str | None


def batch_of(node: str, seq: int, results: Sequence[ResultLike]) -> ResultBatch:
    """The columnar batch of ``results`` (in ``seq`` order), for outbox slot ``seq``.

    All digests must have one length (a node digests every input alike).
    """
    models: dict[tuple[str, str, str], int] = {}
    labels: dict[str, int] = {}
    topk_k: list[int] = []
    topk_index: list[int] = []
    topk_score: list[float] = []
    topk_label: list[int] = []
    model: list[int] = []
    for r in results:
        key = (r.model.name, r.model.version, r.model.sha256)
        model.append(models.setdefault(key, len(models)))
        entries = r.topk or ()
        topk_k.append(len(entries))
        for entry in entries:
            topk_index.append(entry.index)
            topk_score.append(entry.score)
            label = entry.label
            topk_label.append(-1 if label is None else labels.setdefault(label, len(labels)))
    digests = [r.input_digest for r in results]
    return ResultBatch(
        node=node,
        seq=seq,
        models=[BatchModel(name=n, version=v, sha256=s) for n, v, s in models],
        result_seq=[r.seq for r in results],
        model=model,
        digest_len=len(digests[0]) if digests else 16,
        digests="".join(digests),
        latency_ms=[float(r.latency_ms) for r in results],
        ts=[float(r.ts) for r in results],
        corner_case=[r.corner_case for r in results],
        source=[r.source for r in results],
        topk_k=topk_k,
        topk_index=topk_index,
        topk_score=[float(s) for s in topk_score],
        topk_label=topk_label,
        labels=list(labels),
        tensors=[None if r.tensors is None else _tensor_entries(r.tensors) for r in results],
    )


def _tensor_entries(tensors: Sequence[_TensorLike]) -> list[TensorEntry]:
    return [
        TensorEntry(
            name=t.name,
            dtype=cast(_DType, str(t.dtype)),
            shape=list(t.shape),
            data=[float(x) for x in t.data],
        )
        for t in tensors
    ]


def rows_of(batch: ResultBatch) -> list[ResultView]:
    """Every result of ``batch`` as a row, in order."""
    rows: list[ResultView] = []
    width = batch.digest_len
    start = 0
    for i, k in enumerate(batch.topk_k):
        end = start + k
        topk = (
            tuple(
                TopKView(index, None if label < 0 else batch.labels[label], score)
                for index, score, label in zip(
                    batch.topk_index[start:end],
                    batch.topk_score[start:end],
                    batch.topk_label[start:end],
                    strict=True,
                )
            )
            if k
            else None
        )
        start = end
        tensors = batch.tensors[i]
        rows.append(
            ResultView(
                seq=batch.result_seq[i],
                model=batch.models[batch.model[i]],
                input_digest=batch.digests[i * width : (i + 1) * width],
                latency_ms=batch.latency_ms[i],
                ts=batch.ts[i],
                topk=topk,
                tensors=None if tensors is None else tuple(tensors),
                corner_case=batch.corner_case[i],
                source=batch.source[i],
            )
        )
    return rows
