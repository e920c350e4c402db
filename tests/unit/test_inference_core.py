"""The pure rules around a model session: inputs, signatures, summaries, gating, latency."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_node.inference_core import (
    MAX_TOPK,
    ORT_TYPE_TO_DTYPE,
    InputSpecError,
    ModelMismatchError,
    OutputSummaryError,
    check_signature,
    choose_providers,
    dtype_of,
    first_line,
    has_dynamic_batch,
    make_inputs,
    numpy_dtype,
    resolve_specs,
    spec_from_ort,
    split_outputs,
    stack_requests,
)
from edge_node.results_core import (
    ChangeGate,
    LatencyWindow,
    input_digest,
    is_corner_case,
    summarize_output,
)
from shared.errors import DecodeError, TrustError
from shared.messages import DType, ModelManifest, TensorSpec, WarmupInput

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


# ----- dtypes and specs ------------------------------------------------------


@pytest.mark.parametrize(
    ("ort_type", "dtype", "np_dtype"),
    [
        ("tensor(float)", DType.FLOAT32, np.float32),
        ("tensor(float16)", DType.FLOAT16, np.float16),
        ("tensor(double)", DType.FLOAT64, np.float64),
        ("tensor(int8)", DType.INT8, np.int8),
        ("tensor(int16)", DType.INT16, np.int16),
        ("tensor(int32)", DType.INT32, np.int32),
        ("tensor(int64)", DType.INT64, np.int64),
        ("tensor(uint8)", DType.UINT8, np.uint8),
        ("tensor(bool)", DType.BOOL, np.bool_),
    ],
)
def test_dtype_mappings(ort_type: str, dtype: DType, np_dtype: Any) -> None:
    assert ORT_TYPE_TO_DTYPE[ort_type] is dtype
    assert numpy_dtype(dtype) == np.dtype(np_dtype)
    assert dtype_of(np_dtype) is dtype


def test_every_wire_dtype_has_a_numpy_dtype_and_an_ort_type() -> None:
    assert set(ORT_TYPE_TO_DTYPE.values()) == set(DType)
    for dtype in DType:
        assert dtype_of(numpy_dtype(dtype)) is dtype
    assert dtype_of(np.dtype(">f4")) is DType.FLOAT32
    with pytest.raises(OutputSummaryError):
        dtype_of(np.complex64)


def test_spec_from_ort() -> None:
    got = spec_from_ort("input", "tensor(float)", ["N", 8, None, -1, "x" * 100])
    assert got == spec("input", DType.FLOAT32, "N", 8, None, None, "x" * 64)
    assert spec_from_ort("s", "tensor(int64)", []).shape == ()
    with pytest.raises(ModelMismatchError, match="unsupported type tensor\\(string\\)"):
        spec_from_ort("text", "tensor(string)", [1])
    with pytest.raises(ModelMismatchError, match="cannot be described"):
        spec_from_ort("deep", "tensor(float)", [1] * 17)


@pytest.mark.parametrize(
    ("preferred", "available", "expected"),
    [
        (("CPUExecutionProvider",), ("CPUExecutionProvider",), ("CPUExecutionProvider",)),
        (
            ("CUDAExecutionProvider", "CPUExecutionProvider"),
            ("AzureExecutionProvider", "CPUExecutionProvider"),
            ("CPUExecutionProvider",),
        ),
        (
            ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
            ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"),
            ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        ),
        (("CUDAExecutionProvider",), ("CPUExecutionProvider",), ("CPUExecutionProvider",)),
        ((), ("CPUExecutionProvider",), ("CPUExecutionProvider",)),
    ],
)
def test_choose_providers(
    preferred: tuple[str, ...], available: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert choose_providers(preferred, available) == expected


def test_first_line() -> None:
    assert first_line(RuntimeError("\n  first\nsecond\n")) == "first"
    assert first_line(RuntimeError("")) == "RuntimeError"
    long = first_line("x" * 1000, limit=10)
    assert len(long) == 10
    assert long.endswith("…")


# ----- make_inputs -----------------------------------------------------------


def test_make_inputs_from_declared_shapes() -> None:
    specs = (
        spec("image", DType.FLOAT32, "N", 3, "H", None),
        spec("ids", DType.INT64, None, 5),
        spec("mask", DType.BOOL, 2),
        spec("rate", DType.INT32),
        spec("half", DType.FLOAT16, 4),
    )
    feed = make_inputs(specs, (), batch=3)
    assert list(feed) == ["image", "ids", "mask", "rate", "half"]
    assert feed["image"].shape == (3, 3, 1, 1)
    assert feed["image"].dtype == np.float32
    assert ((feed["image"] >= 0) & (feed["image"] < 1)).all()
    assert feed["image"].std() > 0  # not all one value
    assert feed["ids"].shape == (3, 5)
    assert feed["ids"].dtype == np.int64
    assert not feed["ids"].any()
    assert feed["mask"].dtype == np.bool_
    assert feed["mask"].shape == (2,)
    assert feed["rate"].shape == ()
    assert feed["rate"].dtype == np.int32
    assert feed["half"].dtype == np.float16


def test_make_inputs_is_deterministic_and_depends_on_the_name() -> None:
    a = make_inputs((spec("x", DType.FLOAT32, 4, 4),), ())
    b = make_inputs((spec("x", DType.FLOAT32, 4, 4),), ())
    c = make_inputs((spec("y", DType.FLOAT32, 4, 4),), ())
    assert a["x"].tobytes() == b["x"].tobytes()
    assert a["x"].tobytes() != c["y"].tobytes()


def test_batch_only_sets_a_symbolic_first_dim() -> None:
    feed = make_inputs((spec("x", DType.FLOAT32, 1, "T"),), (), batch=4)
    assert feed["x"].shape == (1, 1)


def test_make_inputs_uses_warmup_values_and_fill() -> None:
    specs = (
        spec("audio", DType.FLOAT32, "N", "T"),
        spec("rate", DType.INT64),
        spec("flags", DType.BOOL, 3),
        spec("other", DType.FLOAT32, 2),
    )
    warmup = (
        WarmupInput(name="audio", shape=(1, 400), fill=0.5),
        WarmupInput(name="rate", shape=(), values=(16000.0,)),
        WarmupInput(name="flags", shape=(3,), values=(1.0, 0.0, 1.0)),
    )
    feed = make_inputs(specs, warmup)
    assert feed["audio"].shape == (1, 400)
    assert (feed["audio"] == np.float32(0.5)).all()
    assert feed["rate"].dtype == np.int64
    assert feed["rate"].shape == ()
    assert int(feed["rate"]) == 16000
    assert feed["flags"].tolist() == [True, False, True]
    assert feed["other"].shape == (2,)  # no warm-up: from the declared shape


def test_warmup_values_are_row_major() -> None:
    w = WarmupInput(name="x", shape=(2, 3), values=(0, 1, 2, 3, 4, 5))
    feed = make_inputs((spec("x", DType.FLOAT64, 2, 3),), (w,))
    np.testing.assert_array_equal(feed["x"], np.arange(6, dtype=np.float64).reshape(2, 3))


@pytest.mark.parametrize(
    ("specs", "warmup", "message"),
    [
        ((spec("x", DType.FLOAT32, 2),), (WarmupInput(name="y", shape=(2,)),), "not an input"),
        (
            (spec("x", DType.FLOAT32, 2),),
            (WarmupInput(name="x", shape=(2,)), WarmupInput(name="x", shape=(2,))),
            "twice",
        ),
        ((spec("x", DType.FLOAT32, 2),), (WarmupInput(name="x", shape=(1, 2)),), "rank"),
        ((spec("x", DType.FLOAT32, "N", 8),), (WarmupInput(name="x", shape=(1, 7)),), "dim"),
        (
            (spec("x", DType.FLOAT32, 3),),
            (WarmupInput(name="x", shape=(3,), values=(1.0, 2.0)),),
            "2 values",
        ),
        (
            (spec("x", DType.INT64, 2),),
            (WarmupInput(name="x", shape=(2,), values=(1.0, 2.5)),),
            "integers",
        ),
        (
            (spec("x", DType.UINT8, 2),),
            (WarmupInput(name="x", shape=(2,), values=(1.0, 256.0)),),
            "range",
        ),
        (
            (spec("x", DType.INT8, 1),),
            (WarmupInput(name="x", shape=(1,), fill=-129.0),),
            "range",
        ),
        (
            (spec("x", DType.BOOL, 1),),
            (WarmupInput(name="x", shape=(1,), values=(2.0,)),),
            "0 or 1",
        ),
        (
            (spec("x", DType.FLOAT16, 1),),
            (WarmupInput(name="x", shape=(1,), fill=1e6),),
            "range",
        ),
        (
            (spec("x", DType.FLOAT32, "N", "T"),),
            (WarmupInput(name="x", shape=(1_000_000, 1_000_000)),),
            "more than",
        ),
    ],
)
def test_make_inputs_rejects_inconsistent_warmup(
    specs: tuple[TensorSpec, ...], warmup: tuple[WarmupInput, ...], message: str
) -> None:
    with pytest.raises(InputSpecError, match=message) as info:
        make_inputs(specs, warmup)
    assert isinstance(info.value, DecodeError)
    assert isinstance(info.value, ValueError)


def test_make_inputs_rejects_huge_declared_shapes_and_bad_batch() -> None:
    with pytest.raises(InputSpecError, match="declare a warm-up"):
        make_inputs((spec("x", DType.FLOAT32, 100_000, 100_000),), ())
    with pytest.raises(InputSpecError, match="batch"):
        make_inputs((spec("x", DType.FLOAT32, 1),), (), batch=0)


def test_resolve_specs_pins_symbolic_dims_from_the_manifest() -> None:
    actual = (spec("x", DType.FLOAT32, "N", "C", 8), spec("y", DType.INT64, "N"))
    declared = (spec("x", DType.FLOAT32, 1, "C", 8), spec("y", DType.INT64, "N"))
    assert resolve_specs(declared, actual) == (
        spec("x", DType.FLOAT32, 1, "C", 8),
        spec("y", DType.INT64, "N"),
    )


def test_has_dynamic_batch() -> None:
    assert has_dynamic_batch((spec("x", DType.FLOAT32, "N", 8), spec("y", DType.FLOAT32, None)))
    assert not has_dynamic_batch((spec("x", DType.FLOAT32, 1, 8),))
    assert not has_dynamic_batch((spec("x", DType.FLOAT32, "N", 8), spec("s", DType.INT64)))
    assert not has_dynamic_batch(())


# ----- check_signature -------------------------------------------------------


@pytest.mark.parametrize(
    ("model_in", "model_out", "message"),
    [
        ((spec("x", DType.FLOAT32, "N", 8),), CLF_OUT, "input 'input' declared by the manifest"),
        ((*CLF_IN, spec("extra", DType.FLOAT32, 1)), CLF_OUT, "model input 'extra'"),
        ((spec("input", DType.FLOAT64, "N", 8),), CLF_OUT, "manifest says float32"),
        ((spec("input", DType.FLOAT32, "N", 8, 1),), CLF_OUT, "rank 2"),
        ((spec("input", DType.FLOAT32, "N", 9),), CLF_OUT, "dimension 1 is 8"),
        (CLF_IN, (spec("logits", DType.FLOAT32, "N", 4),), "output 'probs'"),
        (CLF_IN, (spec("probs", DType.FLOAT32, "N", 5),), "dimension 1 is 4"),
        (CLF_IN, (spec("probs", DType.INT64, "N", 4),), "output 'probs'.*int64"),
        (CLF_IN, (*CLF_OUT, spec("label", DType.INT64, "N")), "model output 'label'"),
        ((*CLF_IN, *CLF_IN), CLF_OUT, "twice"),
    ],
)
def test_check_signature_names_the_first_difference(
    model_in: tuple[TensorSpec, ...], model_out: tuple[TensorSpec, ...], message: str
) -> None:
    with pytest.raises(ModelMismatchError, match=message) as info:
        check_signature(manifest(CLF_IN, CLF_OUT), model_in, model_out)
    assert isinstance(info.value, TrustError)
    assert info.value.code == "model_mismatch"


@pytest.mark.parametrize(
    ("declared", "actual"),
    [
        (CLF_IN, CLF_IN),
        (CLF_IN, (spec("input", DType.FLOAT32, "batch", 8),)),  # symbolic names differ
        (CLF_IN, (spec("input", DType.FLOAT32, 1, 8),)),  # manifest symbolic, model concrete
        ((spec("input", DType.FLOAT32, 1, 8),), CLF_IN),  # manifest concrete, model symbolic
        ((spec("input", DType.FLOAT32, None, 8),), (spec("input", DType.FLOAT32, None, 8),)),
    ],
)
def test_check_signature_accepts_loose_symbolic_dims(
    declared: tuple[TensorSpec, ...], actual: tuple[TensorSpec, ...]
) -> None:
    check_signature(manifest(declared, CLF_OUT), actual, CLF_OUT)


def test_check_signature_ignores_order() -> None:
    two = (spec("a", DType.FLOAT32, 1), spec("b", DType.INT64, 1))
    check_signature(manifest(two, CLF_OUT), tuple(reversed(two)), CLF_OUT)


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


# ----- batching helpers ------------------------------------------------------


def test_stack_and_split_requests() -> None:
    a = {"x": np.ones((1, 8), np.float32), "m": np.zeros((1, 2), np.int64)}
    b = {"m": np.ones((2, 2), np.int64), "x": np.full((2, 8), 2, np.float32)}
    stacked = stack_requests([a, b])
    assert stacked is not None
    feed, sizes = stacked
    assert sizes == [1, 2]
    assert feed["x"].shape == (3, 8)
    assert feed["m"][1:].tolist() == [[1, 1], [1, 1]]
    split = split_outputs([np.arange(3), np.arange(6).reshape(3, 2)], sizes)
    assert split is not None
    assert [p[0].tolist() for p in split] == [[0], [1, 2]]
    assert split[1][1].tolist() == [[2, 3], [4, 5]]
    assert split_outputs([np.zeros((1, 4))], sizes) is None  # reduced over the batch
    assert split_outputs([np.float32(1.0)], sizes) is None


@pytest.mark.parametrize(
    "batch",
    [
        [],
        [{"x": np.ones((1, 8))}, {"y": np.ones((1, 8))}],  # different names
        [{"x": np.ones((1, 8))}, {"x": np.ones((1, 7))}],  # trailing shape
        [{"x": np.ones((1, 8))}, {"x": np.ones((1, 8), np.float32)}],  # dtype
        [{"x": np.ones((1, 8)), "m": np.ones((2, 8))}],  # rows differ in one request
        [{"x": np.float32(1.0)}],  # scalar
    ],
)
def test_stack_requests_refuses(batch: list[dict[str, np.ndarray]]) -> None:
    assert stack_requests(batch) is None


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
