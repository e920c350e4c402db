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
from itertools import islice
from typing import Annotated, Literal

import msgspec

from shared.errors import DecodeError
from shared.version import SEMVER_PATTERN

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RESULTS",
    "RESULT_BATCH_VERSION",
    "BatchModel",
    "ResultBatch",
    "TensorEntry",
    "decode_results",
    "encode_results",
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


def _check_columns(batch: ResultBatch) -> None:
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
