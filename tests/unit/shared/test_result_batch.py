"""The columnar result batch: round trips, and every strictness rule of the decoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import DecodeError
from shared.messages import InferenceResult, ModelRef, TensorData, TopK
from shared.result_batch import (
    MAX_BATCH_BYTES,
    ResultBatch,
    batch_of,
    decode_results,
    encode_results,
    rows_of,
)

REF1 = ModelRef(name="det", version="1.0.0", sha256="a1" * 32)
REF2 = ModelRef(name="det", version="1.1.0-rc.1", sha256="b2" * 32)


def result(seq: int, **changes: object) -> InferenceResult:
    fields: dict[str, object] = {
        "seq": seq,
        "model": REF1,
        "input_digest": f"{seq:016x}",
        "latency_ms": 1.5,
        "ts": 1_700_000_000.0 + seq,
        "topk": (TopK(index=3, label="cat", score=0.75), TopK(index=1, label=None, score=0.25)),
        "corner_case": False,
        "source": "synthetic",
    }
    fields.update(changes)
    return InferenceResult.model_validate(fields)


def raw(*results: InferenceResult, node: str = "n1", slot: int = 7) -> bytes:
    return encode_results(batch_of(node, slot, list(results)))


def test_a_batch_round_trips_row_by_row() -> None:
    tensor = TensorData(name="out", shape=(2,), data=(0.5, -1.0))
    results = [
        result(1),
        result(2, model=REF2, topk=None, tensors=(tensor,), corner_case=True, source=None),
        result(5, topk=(TopK(index=0, label="dog", score=1.0),)),
    ]
    batch = decode_results(raw(*results))
    assert batch.seq == 7
    assert len(batch) == 3
    assert len(batch.models) == 2  # one entry per distinct model
    rows = rows_of(batch)
    assert [r.seq for r in rows] == [1, 2, 5]
    assert [r.model.version for r in rows] == ["1.0.0", "1.1.0-rc.1", "1.0.0"]
    assert [r.input_digest for r in rows] == [f"{s:016x}" for s in (1, 2, 5)]
    first_topk = rows[0].topk
    assert first_topk is not None
    assert [(t.index, t.label, t.score) for t in first_topk] == [(3, "cat", 0.75), (1, None, 0.25)]
    assert rows[1].topk is None
    assert rows[1].tensors is not None
    assert rows[1].tensors[0].data == [0.5, -1.0]
    assert rows[1].corner_case
    assert rows[1].source is None
    last_topk = rows[2].topk
    assert last_topk is not None
    assert [(t.index, t.label) for t in last_topk] == [(0, "dog")]


@given(
    st.lists(
        st.tuples(
            st.floats(0, 1e6, allow_nan=False),
            st.floats(-1e9, 1e9, allow_nan=False),
            st.booleans(),
            st.one_of(st.none(), st.text(max_size=20)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_batch_a_node_builds_decodes_to_itself(
    rows: list[tuple[float, float, bool, str | None]],
) -> None:
    results = [
        result(
            i + 1,
            latency_ms=latency,
            topk=(TopK(index=i, label=label, score=score),),
            corner_case=corner,
            source=label,
        )
        for i, (latency, score, corner, label) in enumerate(rows)
    ]
    encoded = raw(*results)
    assert encode_results(decode_results(encoded)) == encoded


GOOD = raw(result(1), result(2))


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (GOOD.replace(b'"seq":7', b'"seq":7,"seq":8'), "not in canonical form"),  # repeated key
        (GOOD.replace(b'"seq":7', b'"seq": 7'), "not in canonical form"),  # whitespace
        (GOOD.replace(b'"latency_ms":[1.5', b'"latency_ms":[NaN'), "invalid JSON"),
        (GOOD.replace(b'"latency_ms":[1.5', b'"latency_ms":[1e999'), "out of range"),
        (GOOD.replace(b'"seq":7', b'"seq":99999999999999999999'), "invalid ResultBatch"),
        (GOOD.replace(b'"seq":7', b'"seq":[[[[7]]]]'), "invalid ResultBatch"),  # nesting
        (GOOD.replace(b'"seq":7', b'"seq":7,"extra":1'), "unknown field"),
        (GOOD.replace(b'"v":2', b'"v":1'), "invalid ResultBatch"),
        (GOOD.replace(b'"result_seq":[1,2]', b'"result_seq":[2,1]'), "does not ascend"),
        (GOOD.replace(b'"result_seq":[1,2]', b'"result_seq":[1,2,3]'), "does not hold 3"),
        (GOOD.replace(b'"model":[0,0]', b'"model":[0,1]'), "names no entry of models"),
        (GOOD.replace(b'"topk_k":[2,2]', b'"topk_k":[2,3]'), "top-k columns"),
        (GOOD.replace(b'"labels":["cat"]', b'"labels":[]'), "label names no entry"),
        (GOOD.replace(b"0000000000000001", b"000000000000000g"), "hex"),
        (GOOD.replace(b'"node":"n1"', b'"node":"n1\\n"'), "is not an id"),
        (GOOD.replace(b'"version":"1.0.0"', b'"version":"1.0.0\\n"'), "model version"),
        (GOOD.replace(b'"source":["synthetic"', b'"source":["\\ud800"'), "invalid JSON"),
        (GOOD[:-1], "invalid JSON"),
        (b"[" * 100_000, "invalid"),
        (b" " * (MAX_BATCH_BYTES + 1), "exceeds the 1048576-byte limit"),
    ],
)
def test_anything_not_exactly_a_batch_is_refused(payload: bytes, error: str) -> None:
    assert payload != GOOD
    with pytest.raises(DecodeError, match=error):
        decode_results(payload)


def test_the_decoder_checks_every_column_length() -> None:
    batch = decode_results(GOOD)
    for column in ("model", "latency_ms", "ts", "corner_case", "source", "topk_k", "tensors"):
        values = getattr(batch, column)
        broken = ResultBatch(**{**_fields(batch), column: [*values, values[0]]})
        with pytest.raises(DecodeError, match=f"column {column} does not hold 2"):
            decode_results(encode_results(broken))


def _fields(batch: ResultBatch) -> dict[str, object]:
    return {name: getattr(batch, name) for name in batch.__struct_fields__}
