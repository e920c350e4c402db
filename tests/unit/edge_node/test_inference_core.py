"""The pure rules around a model session (edge_node.inference_core): dtypes, specs, inputs,
signatures and batching."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_node.inference_core import (
    ORT_TYPE_TO_DTYPE,
    InputSpecError,
    ModelMismatchError,
    OutputSummaryError,
    check_providers,
    check_signature,
    choose_providers,
    dtype_of,
    first_line,
    has_dynamic_batch,
    holds_rows,
    make_inputs,
    numpy_dtype,
    resolve_specs,
    spec_from_ort,
    stack_requests,
)
from shared.errors import DecodeError, TrustError, UsageError
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


KNOWN = ("CUDAExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
HERE = ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    ("wanted", "available", "error"),
    [
        (("CUDAExecutionProvider", "CPUExecutionProvider"), None, None),
        (("CPUExecutionProvider",), HERE, None),
        (("CUDAExecutionProvider",), HERE, "'CUDAExecutionProvider' is not available on this"),
        (("GpuProvider",), None, "unknown execution provider 'GpuProvider' (onnxruntime knows"),
        (("CPUExecutionProvider", "CPUExecutionProvider"), None, "is given twice"),
        ((), None, "no execution provider given"),
        (("CPUExecutionProvider",) * 9, None, "at most 8"),
    ],
)
def test_check_providers(
    wanted: tuple[str, ...], available: tuple[str, ...] | None, error: str | None
) -> None:
    if error is None:
        assert check_providers(wanted, known=KNOWN, available=available) == wanted
        return
    with pytest.raises(UsageError) as caught:
        check_providers(wanted, known=KNOWN, available=available)
    assert error in str(caught.value)


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


# ----- batching helpers ------------------------------------------------------


def test_stack_requests_and_outputs_that_hold_their_rows() -> None:
    a = {"x": np.ones((1, 8), np.float32), "m": np.zeros((1, 2), np.int64)}
    b = {"m": np.ones((2, 2), np.int64), "x": np.full((2, 8), 2, np.float32)}
    stacked = stack_requests([a, b])
    assert stacked is not None
    feed, sizes = stacked
    assert sizes == [1, 2]
    assert feed["x"].shape == (3, 8)
    assert feed["m"][1:].tolist() == [[1, 1], [1, 1]]
    assert holds_rows([np.arange(3), np.arange(6).reshape(3, 2)], sum(sizes))
    assert not holds_rows([np.zeros((1, 4))], 3)  # reduced over the batch
    assert not holds_rows([np.float32(1.0)], 3)


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
