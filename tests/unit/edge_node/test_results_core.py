"""Results of inference (edge_node.results_core): input digests, output summaries, result
batches, change gating and latency windows."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_node.batches_core import PendingResults, ResultChunk, result_of_row
from edge_node.inference_core import (
    MAX_TOPK,
    InputSpecError,
)
from edge_node.results_core import (
    DIGEST_HEX,
    ChangeGate,
    LatencyWindow,
    PeriodCounter,
    RowSummaries,
    input_digest,
    row_digests,
    summarize_rows,
    top_indices,
)
from shared.histogram import bucket_of
from shared.messages import DType, ModelManifest, ModelRef, PeriodStats, TensorSpec, TopK
from shared.result_batch import decode_results, encode_results

SHA = "ab" * 32


def spec(name: str, dtype: DType, *shape: int | str | None) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def manifest(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> ModelManifest:
    return ModelManifest(
        name="clf",
        version="1.0.0",
        sha256=SHA,
        size=1,
        inputs=inputs,
        outputs=outputs,
        created_at=0.0,
    )


CLF_IN = (spec("input", DType.FLOAT32, "N", 8),)
CLF_OUT = (spec("probs", DType.FLOAT32, "N", 4),)


# ----- input_digest ----------------------------------------------------------


def test_input_digest_is_stable_and_sensitive() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = input_digest({"a": x, "b": np.array([1, 2], dtype=np.int64)})
    assert len(base) == DIGEST_HEX
    int(base, 16)
    # Order, memory layout and byte order do not matter.
    assert input_digest({"b": np.array([1, 2], dtype=np.int64), "a": x}) == base
    assert input_digest({"a": np.asfortranarray(x), "b": np.array([1, 2])}) == base
    assert input_digest({"a": x.astype(">f4"), "b": np.array([1, 2], dtype=">i8")}) == base
    strided = np.zeros((3, 8), dtype=np.float32)
    strided[:, ::2] = x
    assert input_digest({"a": strided[:, ::2], "b": np.array([1, 2])}) == base
    # Values, shapes, dtypes and names do.
    assert input_digest({"a": x + 1, "b": np.array([1, 2])}) != base
    assert input_digest({"a": x.reshape(4, 3), "b": np.array([1, 2])}) != base
    assert input_digest({"a": x.astype(np.float64), "b": np.array([1, 2])}) != base
    assert input_digest({"c": x, "b": np.array([1, 2])}) != base
    # A pinned value: the digest is part of the wire contract.
    expected = hashlib.sha256(b"edgefleet.input-digest.v1\x00")
    for field in (b"a", b"float32"):
        expected.update(len(field).to_bytes(8, "little") + field)
    expected.update((2).to_bytes(8, "little") + (3).to_bytes(8, "little"))
    expected.update((4).to_bytes(8, "little") + (48).to_bytes(8, "little"))
    expected.update(x.astype("<f4").tobytes())
    assert input_digest({"a": x}) == expected.hexdigest()[:DIGEST_HEX]
    with pytest.raises(InputSpecError):
        input_digest({"s": np.array(["text"])})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=32))
def test_input_digest_property(values: list[float]) -> None:
    arr = np.asarray(values, dtype=np.float32)
    assert input_digest({"x": arr}) == input_digest({"x": arr.copy()})
    assert input_digest({"x": arr}) == input_digest({"x": arr.astype(">f4")})


# ----- row_digests -----------------------------------------------------------


def test_row_digests_are_each_rows_own_input_digest() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    ids = np.arange(5, dtype=np.int64).reshape(5, 1)
    joined = row_digests({"x": x, "ids": ids}, 5)
    assert len(joined) == 5 * DIGEST_HEX
    for row in range(5):
        alone = input_digest({"ids": ids[row : row + 1], "x": x[row : row + 1]})
        assert joined[row * DIGEST_HEX : (row + 1) * DIGEST_HEX] == alone
    # Stable: the same rows digest alike whatever they were stacked with.
    assert row_digests({"x": x[2:4], "ids": ids[2:4]}, 2) == joined[2 * DIGEST_HEX : 4 * DIGEST_HEX]
    assert row_digests({"x": np.asfortranarray(x), "ids": ids}, 5) == joined
    with pytest.raises(InputSpecError, match="rows"):
        row_digests({"x": x}, 4)


# ----- summarize_rows ----------------------------------------------------------


def one(
    outputs: dict[str, np.ndarray], *, topk: int = 3, labels: int = 0, corner: float = 0.0
) -> RowSummaries:
    return summarize_rows(outputs, 1, topk=topk, label_count=labels, corner_threshold=corner)


def test_summarize_classifier_topk_with_labels() -> None:
    probs = np.array([[0.1, 0.6, 0.05, 0.25]], dtype=np.float32)
    rows = one({"probs": probs}, labels=3, corner=0.7)
    assert rows.kept == [0]
    assert rows.tensors == [None]
    assert rows.topk_k == [3]
    assert rows.topk_index == [1, 3, 0]
    assert rows.topk_label == [1, -1, 0]  # no label for index 3
    assert rows.topk_score[0] == pytest.approx(0.6)
    assert rows.corner_case == [True]  # 0.6 < 0.7
    assert one({"probs": probs}, corner=0.5).corner_case == [False]


def test_summarize_1d_and_conv_head_classifiers_ties_and_k_caps() -> None:
    rows = one({"s": np.array([0.5, 0.5, 0.0])}, topk=10)
    assert rows.topk_index == [0, 1, 2]  # k capped at C, ties by index
    assert rows.topk_label == [-1, -1, -1]
    many = np.linspace(0, 1, 500, dtype=np.float32)
    rows = one({"s": many}, topk=1000)
    assert rows.topk_k == [MAX_TOPK]
    assert rows.topk_index[0] == 499
    head = np.zeros((1, 1000, 1, 1), dtype=np.float32)  # squeezenet's softmax output
    head[0, 7, 0, 0] = 1.0
    assert one({"softmaxout_1": head}, topk=1).topk_index == [7]


def test_summarize_classifier_plus_other_outputs() -> None:
    outputs = {"label": np.array([2], dtype=np.int64), "probs": np.array([[0.2, 0.3, 0.5]])}
    rows = one(outputs, topk=1, labels=3)
    assert rows.topk_index == [2]
    assert [(t.name, t.dtype, t.shape, t.data) for t in rows.tensors[0] or []] == [
        ("label", "int64", [1], [2.0])
    ]


@pytest.mark.parametrize(
    "outputs",
    [
        {"boxes": np.zeros((1, 10, 4), dtype=np.float32)},  # rank 3
        {"p": np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)},  # batch of 2
        {"score": np.array([[0.7]], dtype=np.float32)},  # a single score
        {"a": np.array([0.1, 0.9]), "b": np.array([0.4, 0.6])},  # two candidates
        {"ids": np.array([3, 1], dtype=np.int64)},  # not floating
    ],
)
def test_summarize_non_classifier_outputs_as_tensors(outputs: dict[str, np.ndarray]) -> None:
    rows = one(outputs, topk=5)
    assert rows.topk_k == [0]
    assert rows.corner_case == [False]
    (tensors,) = rows.tensors
    assert tensors is not None
    assert [t.name for t in tensors] == list(outputs)
    for t in tensors:
        arr = outputs[t.name]
        assert tuple(t.shape) == arr.shape
        np.testing.assert_allclose(t.data, arr.reshape(-1).astype(np.float64))


def test_summarize_truncates_big_tensors_keeping_the_shape() -> None:
    big = np.arange(2 * 100, dtype=np.float32).reshape(2, 100)
    rows = summarize_rows(
        {"emb": big}, 1, topk=1, label_count=0, corner_threshold=0, max_tensor_elems=10
    )
    (t,) = rows.tensors[0] or []
    assert t.shape == [2, 100]
    assert t.data == [float(i) for i in range(10)]
    rows = one({f"o{i}": np.zeros((3, 3)) for i in range(20)})
    assert len(rows.tensors[0] or []) == 16


def test_summarize_refuses_rows_with_non_finite_values_and_keeps_the_others() -> None:
    rows = one({"probs": np.array([[0.5, np.nan]])})
    assert rows.kept == []
    assert "'probs'" in rows.refused[0]
    batch = np.array([[0.2, 0.8], [np.inf, 1.0], [0.9, 0.1]])
    rows = summarize_rows({"p": batch}, 3, topk=1, label_count=0, corner_threshold=0)
    assert rows.kept == [0, 2]
    assert list(rows.refused) == [1]
    assert rows.topk_index == [1, 0]
    # Non-finite values past the truncation point are never sent: fine.
    tail = np.zeros((2, 10))
    tail[1, 9] = np.inf
    rows = summarize_rows(
        {"t": tail}, 1, topk=1, label_count=0, corner_threshold=0, max_tensor_elems=5
    )
    assert rows.kept == [0]
    with pytest.raises(ValueError, match="topk"):
        one({"t": tail}, topk=0)
    strings = summarize_rows(
        {"s": np.array([["a"], ["b"]])}, 2, topk=1, label_count=0, corner_threshold=0
    )
    assert strings.kept == []
    assert len(strings.refused) == 2


def naive_topk(scores: np.ndarray, k: int) -> list[list[int]]:
    return [sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in scores.tolist()]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    columns=st.integers(2, 60),
    k=st.integers(1, 12),
    levels=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_vectorised_topk_equals_a_naive_topk(
    rows: int, columns: int, k: int, levels: int, seed: int
) -> None:
    # Few distinct levels: ties everywhere, across the cut too.
    scores = np.random.default_rng(seed).integers(0, levels, (rows, columns)).astype(np.float64)
    k = min(k, columns)
    assert top_indices(scores, k).tolist() == naive_topk(scores, k)


def test_batched_summaries_equal_row_by_row_summaries() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((16, 1000)).astype(np.float32)
    batched = summarize_rows({"p": probs}, 16, topk=5, label_count=10, corner_threshold=0.99)
    singles = [
        summarize_rows({"p": probs[r : r + 1]}, 1, topk=5, label_count=10, corner_threshold=0.99)
        for r in range(16)
    ]
    assert batched.topk_index == [i for s in singles for i in s.topk_index]
    assert batched.topk_score == [x for s in singles for x in s.topk_score]
    assert batched.topk_label == [x for s in singles for x in s.topk_label]
    assert batched.corner_case == [c for s in singles for c in s.corner_case]
    assert batched.topk_index[:5] == naive_topk(probs[:1].astype(np.float64), 5)[0]


# ----- batch assembly ----------------------------------------------------------

REF_A = ModelRef(name="clf", version="1.0.0", sha256="a" * 64)
REF_B = ModelRef(name="clf", version="1.1.0", sha256="b" * 64)


def chunk(ref: ModelRef, labels: tuple[str, ...], first: int, probs: np.ndarray) -> ResultChunk:
    rows = len(probs)
    summaries = summarize_rows(
        {"p": probs}, rows, topk=2, label_count=len(labels), corner_threshold=0.5
    )
    digests = row_digests({"x": np.arange(rows, dtype=np.float32).reshape(rows, 1)}, rows)
    return ResultChunk(
        model=ref,
        labels=labels,
        first_seq=first,
        latency_ms=1.5,
        ts=100.0 + first,
        digests=digests,
        sources=["synthetic"] * rows,
        summaries=summaries,
    )


def test_a_batch_keeps_seq_order_and_the_model_of_each_result_across_a_swap() -> None:
    pending = PendingResults()
    old = chunk(REF_A, ("cat", "dog", "bird"), 11, np.array([[0.1, 0.7, 0.2]] * 3))
    new = chunk(REF_B, ("fish", "cow", "ant"), 14, np.array([[0.6, 0.3, 0.1]] * 2))
    pending.add(old)
    pending.add(new)
    with pytest.raises(ValueError, match="follow"):
        pending.add(chunk(REF_A, (), 15, np.array([[0.5, 0.5]])))
    assert len(pending) == 5
    (whole,) = pending.batches(node="n1", most=5)
    batch = decode_results(encode_results(msgspec.structs.replace(whole, seq=7)))
    assert batch.seq == 7
    assert batch.result_seq == [11, 12, 13, 14, 15]
    assert [batch.models[m].version for m in batch.model] == ["1.0.0"] * 3 + ["1.1.0"] * 2
    labels = [batch.labels[i] for i in batch.topk_label]
    assert labels == ["dog", "bird"] * 3 + ["fish", "cow"] * 2  # each model's own labels
    assert batch.digest_len == DIGEST_HEX
    assert batch.digests == old.digests + new.digests
    # Batches cut at the swap name only the models and labels they use.
    first, second = pending.batches(node="n1", most=3)
    assert [m.version for m in first.models] == ["1.0.0"]
    assert sorted(first.labels) == ["bird", "dog"]
    pending.drop(3)
    (rest,) = pending.batches(node="n1", most=3)
    assert rest == second
    rest = decode_results(encode_results(rest))
    assert rest.result_seq == [14, 15]
    assert [m.version for m in rest.models] == ["1.1.0"]
    assert rest.digests == new.digests
    assert [rest.labels[i] for i in rest.topk_label] == ["fish", "cow"] * 2
    pending.drop(2)
    assert len(pending) == 0
    assert pending.batches(node="n1", most=3) == []


def test_a_reply_result_is_the_row_of_its_chunk() -> None:
    c = chunk(REF_A, ("cat", "dog"), 40, np.array([[0.9, 0.1], [0.3, 0.7]]))
    result = result_of_row(c, 1)
    assert result.seq == 41
    assert result.model == REF_A
    assert result.input_digest == c.digests[DIGEST_HEX:]
    assert result.topk == (
        TopK(index=1, label="dog", score=0.7),
        TopK(index=0, label="cat", score=0.3),
    )
    assert result.corner_case is False
    assert result.source == "synthetic"


# ----- ChangeGate ------------------------------------------------------------


def test_change_gate_skips_small_changes_against_the_last_inferred() -> None:
    gate = ChangeGate(0.1)
    base = np.zeros((4,), np.float32)
    assert gate.should_infer({"x": base})
    assert not gate.should_infer({"x": base + 0.05})
    assert not gate.should_infer({"x": base + 0.09})
    # Drift accumulates against the last *inferred* input, not the last seen.
    assert gate.should_infer({"x": base + 0.15})
    assert not gate.should_infer({"x": base + 0.2})
    assert gate.skipped == 3
    assert gate.passed == 2


def test_change_gate_copies_and_handles_shape_changes() -> None:
    gate = ChangeGate(0.5)
    buf = np.zeros((2, 2), np.uint8)
    assert gate.should_infer({"x": buf})
    buf[:] = 200  # the caller reuses its buffer: the gate kept a copy
    assert gate.should_infer({"x": buf})  # no uint8 wrap-around: 200 apart
    assert gate.should_infer({"x": np.zeros((3, 2), np.uint8)})  # new shape
    assert gate.should_infer({"y": np.zeros((3, 2), np.uint8)})  # new name
    assert not gate.should_infer({"y": np.zeros((3, 2), np.uint8)})
    gate.reset()
    assert gate.should_infer({"y": np.zeros((3, 2), np.uint8)})


def test_change_gate_mean_over_all_inputs() -> None:
    gate = ChangeGate(0.3)
    assert gate.should_infer({"a": np.zeros(2), "b": np.zeros(2)})
    # One element changes by 1.0 out of 4: mean 0.25 < 0.3.
    assert not gate.should_infer({"a": np.array([1.0, 0.0]), "b": np.zeros(2)})
    assert gate.should_infer({"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])})


def test_change_gate_threshold_zero_disables() -> None:
    gate = ChangeGate(0.0)
    x = {"x": np.zeros(3)}
    assert all(gate.should_infer(x) for _ in range(5))
    assert gate.skipped == 0
    with pytest.raises(ValueError, match="finite"):
        ChangeGate(float("nan"))


# ----- LatencyWindow ---------------------------------------------------------


def test_latency_window_empty_is_zero() -> None:
    stats = LatencyWindow().stats()
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == (0.0, 0.0, 0.0)


def test_latency_window_matches_numpy_percentile() -> None:
    rng = np.random.default_rng(7)
    samples = rng.gamma(2.0, 3.0, size=1000)
    window = LatencyWindow(capacity=2048)
    for s in samples:
        window.add(float(s))
    stats = window.stats()
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    assert stats.p50_ms == pytest.approx(p50)
    assert stats.p95_ms == pytest.approx(p95)
    assert stats.p99_ms == pytest.approx(p99)
    assert len(window) == 1000


def test_latency_window_keeps_only_the_last_capacity() -> None:
    window = LatencyWindow(capacity=100)
    for i in range(250):
        window.add(float(i))
    assert len(window) == 100
    kept = np.arange(150, 250, dtype=np.float64)
    stats = window.stats()
    assert stats.p50_ms == pytest.approx(np.percentile(kept, 50))
    assert stats.p99_ms == pytest.approx(np.percentile(kept, 99))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200),
)
def test_latency_window_property(capacity: int, samples: list[float]) -> None:
    window = LatencyWindow(capacity=capacity)
    for s in samples:
        window.add(s)
    kept = samples[-capacity:]
    stats = window.stats()
    p50, p95, p99 = np.percentile(kept, [50, 95, 99])
    assert stats.p50_ms == pytest.approx(p50)
    assert stats.p95_ms == pytest.approx(p95)
    assert stats.p99_ms == pytest.approx(p99)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_latency_window_rejects_bad_samples(bad: float) -> None:
    with pytest.raises(ValueError, match="latency"):
        LatencyWindow().add(bad)


@pytest.mark.parametrize(("capacity", "counts"), [(8, [3, 2, 5]), (4, [9]), (5, [0, 5, 1])])
def test_latency_window_add_many_is_count_adds(capacity: int, counts: list[int]) -> None:
    many, single = LatencyWindow(capacity), LatencyWindow(capacity)
    for value, count in enumerate(counts):
        many.add_many(float(value), count)
        for _ in range(count):
            single.add(float(value))
    assert len(many) == len(single)
    assert many.stats() == single.stats()
    with pytest.raises(ValueError, match="latency"):
        many.add_many(-1.0, 2)


# ----- PeriodCounter ----------------------------------------------------------


def test_a_period_counts_runs_errors_and_latencies_then_starts_anew() -> None:
    period = PeriodCounter(100.0)
    period.add(1.0, 2)
    for ms in (1.01, 30.0):
        period.add(ms)
    period.error(2)
    taken = period.take(110.0)
    assert (taken.since, taken.inferences, taken.errors) == (100.0, 4, 2)
    assert taken.latency == ((bucket_of(1.0), 3), (bucket_of(30.0), 1))
    assert period.take(120.0) == PeriodStats(since=110.0, inferences=0, errors=0)


def test_a_swap_drops_the_period_so_far() -> None:
    period = PeriodCounter(100.0)
    period.add(5.0)
    period.error()
    period.restart(105.0)
    period.add(7.0)
    taken = period.take(110.0)
    assert (taken.since, taken.inferences, taken.errors) == (105.0, 1, 0)
