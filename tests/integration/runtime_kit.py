"""Models and helpers for the runtime tests: small classifiers whose outputs numpy
can recompute, a gated executor, inputs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_node.runtime import (
    InferenceOutcome,
    LoadedModel,
    SessionOptionsConfig,
)
from shared.messages import DType, ModelManifest, ModelRef, TensorSpec, WarmupInput

OPSET = 17

IR_VERSION = 9  # opset 17 needs IR >= 8; onnxruntime 1.17+ reads 9
OPTIONS = SessionOptionsConfig(intra_op_threads=1)


# ----- models ----------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    path: Path
    manifest: ModelManifest
    w: np.ndarray
    b: np.ndarray

    @property
    def ref(self) -> ModelRef:
        return self.manifest.ref

    def expected(self, x: np.ndarray) -> np.ndarray:
        logits = x.astype(np.float64) @ self.w.astype(np.float64) + self.b.astype(np.float64)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def classifier_bytes(w: np.ndarray, b: np.ndarray, *, batch: int | str = "N") -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_manifest(
    blob: bytes,
    version: str,
    *,
    inputs: tuple[TensorSpec, ...] | None = None,
    warmup: tuple[WarmupInput, ...] = (),
    batch: int | str = "N",
) -> ModelManifest:
    return ModelManifest(
        name="clf",
        version=version,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=max(1, len(blob)),
        inputs=inputs or (TensorSpec(name="input", dtype=DType.FLOAT32, shape=(batch, 8)),),
        outputs=(TensorSpec(name="probs", dtype=DType.FLOAT32, shape=(batch, 4)),),
        warmup=warmup,
        class_labels=("a", "b", "c", "d"),
        created_at=1_700_000_000.0,
    )


def write_model(tmp_path: Path, version: str, seed: int, *, batch: int | str = "N") -> Model:
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, size=(8, 4)).astype(np.float32)
    b = rng.normal(0.0, 1.0, size=(4,)).astype(np.float32)
    blob = classifier_bytes(w, b, batch=batch)
    path = tmp_path / f"clf-{version}.onnx"
    path.write_bytes(blob)
    return Model(path=path, manifest=make_manifest(blob, version, batch=batch), w=w, b=b)


def write_blob(tmp_path: Path, name: str, blob: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def check_outcome(outcome: InferenceOutcome, x: np.ndarray, models: dict[ModelRef, Model]) -> None:
    """The outputs are what the model named in the outcome computes, not the other one."""
    assert outcome.model in models, outcome.model
    probs = outcome.outputs["probs"]
    assert probs.shape == (x.shape[0], 4)
    own = models[outcome.model]
    np.testing.assert_allclose(probs, own.expected(x), rtol=1e-4, atol=1e-6)
    for ref, other in models.items():
        if ref != outcome.model:
            assert not np.allclose(probs, other.expected(x), rtol=1e-3, atol=1e-4)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


def closed_future(handle: LoadedModel) -> asyncio.Future[None]:
    """A future resolved (on this loop) when ``handle``'s session is dropped."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    handle.on_closed(done)
    return fut


class GatedExecutor(ThreadPoolExecutor):
    """Runs jobs only while ``gate`` is open; ``submitted`` is set on every submit.

    ``submit`` is called by the runtime on the event loop thread, right after a
    request acquired its model: awaiting ``submitted`` is how a test knows a
    request is in flight.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.gate = threading.Event()
        self.gate.set()
        self.submitted: asyncio.Event | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        gate = self.gate

        def gated() -> Any:
            # A safety net so a broken test fails instead of hanging; not a sync point.
            if not gate.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")
            return fn(*args, **kwargs)

        future = super().submit(gated)
        if self.submitted is not None:
            self.submitted.set()
        return future


def x_rows(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
