"""The ONNX builders in tests/support/models.py make what they promise to onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from tests.support.models import (
    BATCH_DIM,
    IR_VERSION,
    OPSET,
    make_broken_model,
    make_classifier,
    make_failing_warmup_model,
    make_int64_model,
    make_slow_model,
    matmul_flops,
)

# onnxruntime's own errors (they derive from Exception only): a wrong feed name or
# dtype would raise something else and fail these tests instead of passing them.
ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidProtobuf,
    ort_state.RuntimeException,
)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def io_signature(sess: ort.InferenceSession) -> tuple[list[tuple[str, list[object], str]], ...]:
    return (
        [(i.name, list(i.shape), i.type) for i in sess.get_inputs()],
        [(o.name, list(o.shape), o.type) for o in sess.get_outputs()],
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classifier_interface_and_output(tmp_path: Path) -> None:
    path = make_classifier(tmp_path / "c.onnx", n_in=8, n_classes=4)
    assert path == tmp_path / "c.onnx"
    sess = session(path)
    assert io_signature(sess) == (
        [("input", [BATCH_DIM, 8], "tensor(float)")],
        [("probs", [BATCH_DIM, 4], "tensor(float)")],
    )
    batch = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    (probs,) = sess.run(None, {"input": batch})
    assert probs.shape == (5, 4)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_classifier_fixed_batch_and_sizes(tmp_path: Path) -> None:
    sess = session(make_classifier(tmp_path / "c.onnx", n_in=3, n_classes=7, dynamic_batch=False))
    assert io_signature(sess) == (
        [("input", [1, 3], "tensor(float)")],
        [("probs", [1, 7], "tensor(float)")],
    )
    (probs,) = sess.run(None, {"input": np.ones((1, 3), np.float32)})
    assert probs.shape == (1, 7)


def test_models_declare_opset_and_ir_version(tmp_path: Path) -> None:
    model = onnx.load(str(make_classifier(tmp_path / "c.onnx")))
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]


def test_builders_are_deterministic_per_seed(tmp_path: Path, classifier_v1: Path) -> None:
    again = make_classifier(tmp_path / "again.onnx", seed=1)
    other = make_classifier(tmp_path / "other.onnx", seed=2)
    assert again.read_bytes() == classifier_v1.read_bytes()
    assert sha256(other) != sha256(again)
    slow_a = make_slow_model(tmp_path / "s1.onnx", work=4)
    slow_b = make_slow_model(tmp_path / "s2.onnx", work=4)
    assert slow_a.read_bytes() == slow_b.read_bytes()


def test_classifier_fixtures_differ_but_share_an_interface(
    classifier_v1: Path, classifier_v2: Path
) -> None:
    assert classifier_v1.parent == classifier_v2.parent
    assert sha256(classifier_v1) != sha256(classifier_v2)
    v1, v2 = session(classifier_v1), session(classifier_v2)
    assert io_signature(v1) == io_signature(v2)
    x = np.ones((1, 8), np.float32)
    assert not np.allclose(v1.run(None, {"input": x})[0], v2.run(None, {"input": x})[0])


def test_slow_model_has_the_classifier_interface(tmp_path: Path) -> None:
    fast = session(make_classifier(tmp_path / "c.onnx"))
    slow_path = make_slow_model(tmp_path / "s.onnx")
    slow = session(slow_path)
    assert io_signature(slow) == io_signature(fast)
    (probs,) = slow.run(None, {"input": np.ones((2, 8), np.float32)})
    assert probs.shape == (2, 4)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_slow_model_costs_far_more_per_inference(tmp_path: Path) -> None:
    # Cost by construction (FLOPs and nodes), never by wall clock: timings flake.
    classifier = make_classifier(tmp_path / "c.onnx")
    slow = make_slow_model(tmp_path / "s.onnx")
    assert matmul_flops(slow) >= 10_000 * matmul_flops(classifier)
    assert len(onnx.load(str(slow)).graph.node) >= 10 * len(onnx.load(str(classifier)).graph.node)
    assert matmul_flops(make_slow_model(tmp_path / "s2.onnx", work=96)) > matmul_flops(slow)
    # Weights are shared across layers, so the file stays small enough to ship in tests.
    assert slow.stat().st_size < 1024 * 1024


def test_matmul_flops_counts_batch_rows(tmp_path: Path) -> None:
    path = make_classifier(tmp_path / "c.onnx", n_in=8, n_classes=4)
    assert matmul_flops(path) == 2 * 8 * 4
    assert matmul_flops(path, batch=10) == 10 * 2 * 8 * 4


def test_broken_model_is_refused_by_onnxruntime(tmp_path: Path) -> None:
    path = make_broken_model(tmp_path / "broken.onnx")
    assert path.stat().st_size > 0
    with pytest.raises(ORT_ERRORS, match=r"(?i)protobuf|load|invalid"):
        session(path)


def test_failing_warmup_model_loads_but_fails_on_shape_derived_inputs(tmp_path: Path) -> None:
    sess = session(make_failing_warmup_model(tmp_path / "f.onnx"))
    assert io_signature(sess) == (
        [("input", [BATCH_DIM, 8], "tensor(float)")],
        [("probs", [BATCH_DIM, 4], "tensor(float)")],
    )
    # Symbolic dimensions set to 1, as a generic warm-up would do.
    with pytest.raises(ORT_ERRORS, match=r"(?i)reshape"):
        sess.run(None, {"input": np.zeros((1, 8), np.float32)})
    # A declared warm-up input with a batch of 3 runs.
    (probs,) = sess.run(None, {"input": np.zeros((3, 8), np.float32)})
    assert probs.shape == (3, 4)


def test_failing_warmup_model_rejects_a_divisible_width(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        make_failing_warmup_model(tmp_path / "f.onnx", n_in=9, batch_multiple=3)


def test_int64_model_declares_a_scalar_int64_input(tmp_path: Path) -> None:
    sess = session(make_int64_model(tmp_path / "i.onnx"))
    assert io_signature(sess) == (
        [
            ("input", [BATCH_DIM, 8], "tensor(float)"),
            ("sample_rate", [], "tensor(int64)"),
        ],
        [("probs", [BATCH_DIM, 4], "tensor(float)")],
    )
    x = np.ones((2, 8), np.float32)
    (probs,) = sess.run(None, {"input": x, "sample_rate": np.array(16000, np.int64)})
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    (flat,) = sess.run(None, {"input": x, "sample_rate": np.array(1, np.int64)})
    assert not np.allclose(flat, probs)  # the scalar really feeds the computation
    with pytest.raises(ORT_ERRORS, match=r"(?i)gather|indices|bounds"):
        sess.run(None, {"input": x, "sample_rate": np.array(0, np.int64)})
