"""Results of inference (edge_node.results_core): input digests, output summaries, change
gating and latency windows."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_node.inference_core import (
    MAX_TOPK,
    InputSpecError,
    OutputSummaryError,
)
from edge_node.results_core import (
    ChangeGate,
    LatencyWindow,
    PeriodCounter,
    input_digest,
    is_corner_case,
    summarize_output,
)
from shared.histogram import bucket_of
from shared.messages import DType, ModelManifest, PeriodStats, TensorSpec

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
    assert len(base) == 64
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
    assert input_digest({"a": x}) == expected.hexdigest()
    with pytest.raises(InputSpecError):
        input_digest({"s": np.array(["text"])})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=32))
def test_input_digest_property(values: list[float]) -> None:
    arr = np.asarray(values, dtype=np.float32)
    assert input_digest({"x": arr}) == input_digest({"x": arr.copy()})
    assert input_digest({"x": arr}) == input_digest({"x": arr.astype(">f4")})


# ----- summarize_output ------------------------------------------------------


def test_summarize_classifier_topk_with_labels() -> None:
    probs = np.array([[0.1, 0.6, 0.05, 0.25]], dtype=np.float32)
    topk, tensors, top = summarize_output(
        {"probs": probs}, topk=3, class_labels=("cat", "dog", "bird")
    )
    assert tensors is None
    assert topk is not None
    assert [t.index for t in topk] == [1, 3, 0]
    assert [t.label for t in topk] == ["dog", None, "cat"]  # no label for index 3
    assert topk[0].score == pytest.approx(0.6)
    assert top == pytest.approx(0.6)


def test_summarize_1d_classifier_ties_and_k_caps() -> None:
    scores = np.array([0.5, 0.5, 0.0], dtype=np.float64)
    topk, _, top = summarize_output({"s": scores}, topk=10, class_labels=())
    assert topk is not None
    assert [t.index for t in topk] == [0, 1, 2]  # k capped at C, ties by index
    assert all(t.label is None for t in topk)
    assert top == 0.5
    many = np.linspace(0, 1, 500, dtype=np.float32)
    topk, _, _ = summarize_output({"s": many}, topk=1000, class_labels=())
    assert topk is not None
    assert len(topk) == MAX_TOPK
    assert topk[0].index == 499


def test_summarize_classifier_plus_other_outputs() -> None:
    outputs = {"label": np.array([2], dtype=np.int64), "probs": np.array([[0.2, 0.3, 0.5]])}
    topk, tensors, top = summarize_output(outputs, topk=1, class_labels=("a", "b", "c"))
    assert topk is not None
    assert topk[0].label == "c"
    assert top == pytest.approx(0.5)
    assert tensors is not None
    assert [(t.name, t.dtype, t.shape, t.data) for t in tensors] == [
        ("label", DType.INT64, (1,), (2.0,))
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
    topk, tensors, top = summarize_output(outputs, topk=5, class_labels=())
    assert topk is None
    assert top is None
    assert tensors is not None
    assert [t.name for t in tensors] == list(outputs)
    for t in tensors:
        arr = outputs[t.name]
        assert t.shape == arr.shape
        np.testing.assert_allclose(t.data, arr.reshape(-1).astype(np.float64))


def test_summarize_truncates_big_tensors_keeping_the_shape() -> None:
    big = np.arange(2 * 100, dtype=np.float32).reshape(2, 100)
    _, tensors, _ = summarize_output({"emb": big}, topk=1, class_labels=(), max_tensor_elems=10)
    assert tensors is not None
    (t,) = tensors
    assert t.shape == (2, 100)
    assert t.data == tuple(float(i) for i in range(10))
    _, tensors, _ = summarize_output(
        {f"o{i}": np.zeros((3, 3)) for i in range(20)}, topk=1, class_labels=()
    )
    assert tensors is not None
    assert len(tensors) == 16


def test_summarize_refuses_non_finite_values() -> None:
    with pytest.raises(OutputSummaryError, match="'probs'"):
        summarize_output({"probs": np.array([[0.5, np.nan]])}, topk=1, class_labels=())
    with pytest.raises(OutputSummaryError, match="'t'"):
        summarize_output({"t": np.array([[np.inf, 1.0]] * 2)}, topk=1, class_labels=())
    # Non-finite values past the truncation point are never sent: fine.
    tail = np.zeros((2, 10))
    tail[1, 9] = np.inf
    summarize_output({"t": tail}, topk=1, class_labels=(), max_tensor_elems=5)
    with pytest.raises(ValueError, match="topk"):
        summarize_output({"t": tail}, topk=0, class_labels=())


@pytest.mark.parametrize(
    ("top", "threshold", "expected"),
    [
        (0.3, 0.5, True),
        (0.5, 0.5, False),
        (0.9, 0.5, False),
        (None, 0.5, False),
        (0.1, 0.0, False),  # disabled
    ],
)
def test_is_corner_case(top: float | None, threshold: float, expected: bool) -> None:
    assert is_corner_case(top, threshold) is expected


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


# ----- PeriodCounter ----------------------------------------------------------


def test_a_period_counts_runs_errors_and_latencies_then_starts_anew() -> None:
    period = PeriodCounter(100.0)
    for ms in (1.0, 1.0, 1.01, 30.0):
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
