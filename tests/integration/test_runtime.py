"""ModelRuntime against a real onnxruntime and real .onnx files.

The models are built here with onnx.helper (a float32 classifier: "input" [N, 8]
→ MatMul → Add → Softmax → "probs" [N, 4]) so that every output can be
recomputed with numpy from the known weights. No test waits on the clock:
ordering comes from asyncio's FIFO scheduling, events set where the runtime
hands work to its executor, and callbacks fired when a session closes.
"""

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
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_node.runtime import (
    ActivationResult,
    InferenceError,
    InferenceOutcome,
    LoadedModel,
    ModelLoadError,
    ModelMismatchError,
    ModelRetiredError,
    ModelRuntime,
    NoModelError,
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


@pytest.fixture
def v1(tmp_path: Path) -> Model:
    return write_model(tmp_path, "1.0.0", seed=1)


@pytest.fixture
def v2(tmp_path: Path) -> Model:
    return write_model(tmp_path, "2.0.0", seed=2)


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


# ----- load and infer --------------------------------------------------------


def test_load_and_infer(v1: Model, v2: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            assert runtime.active is None
            with pytest.raises(NoModelError):
                await runtime.infer({"input": x_rows(0, 1)})
            result = await runtime.activate(v1.path, v1.manifest)
            assert result.model == v1.ref
            assert result.previous is None
            assert result.mode == "availability"
            assert result.providers == ("CPUExecutionProvider",)
            assert result.load_ms > 0
            assert result.warmup_ms > 0
            assert result.gap_ms == 0.0
            assert runtime.active == v1.ref
            handle = runtime.handle
            assert handle is not None
            assert [s.name for s in handle.inputs] == ["input"]
            assert handle.inputs[0].shape == ("N", 8)
            assert handle.outputs[0].dtype is DType.FLOAT32
            assert handle.dynamic_batch
            for seed, rows in ((1, 1), (2, 5)):
                x = x_rows(seed, rows)
                outcome = await runtime.infer({"input": x})
                check_outcome(outcome, x, {v1.ref: v1, v2.ref: v2})
                assert outcome.model == v1.ref
                assert outcome.latency_ms >= 0
            assert runtime.inferences == 2
            assert len(runtime.latency) == 2
            assert handle.refcount == 0
            assert handle.served == 2
        finally:
            await runtime.close()
        assert handle.closed
        with pytest.raises(NoModelError, match="closed"):
            await runtime.infer({"input": x_rows(0, 1)})

    run(main)


def test_bad_inputs_raise_inference_error_and_release(v1: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, v1.manifest)
            handle = runtime.handle
            assert handle is not None
            bad = [
                {"input": np.zeros((1, 8), np.float64)},  # dtype
                {"input": np.zeros((1, 7), np.float32)},  # shape
                {"x": np.zeros((1, 8), np.float32)},  # name
            ]
            for feed in bad:
                with pytest.raises(InferenceError, match=r"clf 1\.0\.0") as info:
                    await runtime.infer(feed)
                assert "\n" not in str(info.value)
            assert runtime.errors == 3
            assert handle.refcount == 0
            outcome = await runtime.infer({"input": x_rows(3, 2)})
            assert outcome.model == v1.ref
        finally:
            await runtime.close()

    run(main)


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_graph_optimization_levels_load(v1: Model, level: Any) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=SessionOptionsConfig(graph_optimization=level))
        try:
            await runtime.activate(v1.path, v1.manifest)
            x = x_rows(4, 3)
            check_outcome(await runtime.infer({"input": x}), x, {v1.ref: v1})
        finally:
            await runtime.close()

    run(main)


def test_unavailable_providers_fall_back_to_cpu_without_warning(v1: Model) -> None:
    # pytest turns warnings into errors: onnxruntime warns on unknown providers.
    manifest = v1.manifest.model_copy(
        update={"providers": ("TensorrtExecutionProvider", "CUDAExecutionProvider")}
    )
    options = SessionOptionsConfig(providers=("NoSuchExecutionProvider",))

    async def main() -> None:
        for opts in (OPTIONS, options):
            runtime = ModelRuntime(options=opts)
            try:
                result = await runtime.activate(v1.path, manifest)
                assert result.providers == ("CPUExecutionProvider",)
            finally:
                await runtime.close()

    run(main)


def test_session_options_config_validates() -> None:
    with pytest.raises(ValueError, match="thread"):
        SessionOptionsConfig(intra_op_threads=-1)
    with pytest.raises(ValueError, match="graph_optimization"):
        SessionOptionsConfig(graph_optimization="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="swap_mode"):
        ModelRuntime(options=OPTIONS, swap_mode="eager")  # type: ignore[arg-type]


# ----- refused models: the previous one keeps serving ------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_corrupt_file_is_refused_and_the_previous_model_serves(
    tmp_path: Path, v1: Model, v2: Model, damage: str
) -> None:
    blob = v2.path.read_bytes()
    bad = tmp_path / f"{damage}.onnx"
    if damage == "garbage":
        bad.write_bytes(b"this is not an onnx model\n" * 10)
    elif damage == "truncated":
        bad.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, v1.manifest)
            before = runtime.handle
            with pytest.raises(ModelLoadError) as info:
                await runtime.activate(bad, v2.manifest)
            assert info.value.code == "model_invalid"
            message = str(info.value)
            assert "\n" not in message
            assert "clf 2.0.0" in message
            assert runtime.active == v1.ref
            assert runtime.handle is before
            assert before is not None
            assert not before.retired
            x = x_rows(5, 2)
            check_outcome(await runtime.infer({"input": x}), x, {v1.ref: v1, v2.ref: v2})
        finally:
            await runtime.close()

    run(main)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ((TensorSpec(name="x", dtype=DType.FLOAT32, shape=("N", 8)),), "'x'"),
        ((TensorSpec(name="input", dtype=DType.FLOAT64, shape=("N", 8)),), "float64"),
        ((TensorSpec(name="input", dtype=DType.FLOAT32, shape=("N", 9)),), "dimension 1"),
        ((TensorSpec(name="input", dtype=DType.FLOAT32, shape=(8,)),), "rank"),
    ],
)
def test_manifest_that_does_not_match_the_file_is_refused(
    v1: Model, v2: Model, inputs: tuple[TensorSpec, ...], message: str
) -> None:
    wrong = make_manifest(v2.path.read_bytes(), "2.0.0", inputs=inputs)

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, v1.manifest)
            with pytest.raises(ModelMismatchError, match=message) as info:
                await runtime.activate(v2.path, wrong)
            assert info.value.code == "model_mismatch"
            assert runtime.active == v1.ref
            x = x_rows(6, 1)
            check_outcome(await runtime.infer({"input": x}), x, {v1.ref: v1})
        finally:
            await runtime.close()

    run(main)


def test_warmup_inputs_are_used_and_checked(tmp_path: Path, v1: Model) -> None:
    blob = v1.path.read_bytes()
    good = make_manifest(
        blob, "1.0.0", warmup=(WarmupInput(name="input", shape=(3, 8), fill=0.25),)
    )
    bad = make_manifest(blob, "1.0.1", warmup=(WarmupInput(name="input", shape=(1, 7)),))

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, good)
            with pytest.raises(ModelLoadError, match=r"warm-up inputs of clf 1\.0\.1"):
                await runtime.activate(v1.path, bad)
            assert runtime.active == good.ref
        finally:
            await runtime.close()

    run(main)


# ----- reference counting ----------------------------------------------------


def test_loaded_model_refcount_and_close(v1: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            handle = await runtime.load(v1.path, v1.manifest)
            assert runtime.active is None  # loading does not activate
            closes: list[int] = []
            handle.on_closed(lambda: closes.append(handle.refcount))
            handle.acquire()
            handle.acquire()
            handle.retire()
            handle.retire()  # idempotent
            assert handle.retired
            assert not handle.closed
            with pytest.raises(ModelRetiredError):
                handle.acquire()
            handle.release()
            assert not handle.closed
            assert handle.session is not None
            handle.release()
            assert handle.closed
            assert closes == [0]
            with pytest.raises(ModelRetiredError):
                _ = handle.session
            with pytest.raises(RuntimeError):
                handle.release()
            late: list[bool] = []
            handle.on_closed(lambda: late.append(True))  # already closed: called now
            assert late == [True]
        finally:
            await runtime.close()

    run(main)


def test_in_flight_request_finishes_on_the_old_model(v1: Model, v2: Model) -> None:
    async def main() -> None:
        executor = GatedExecutor()
        runtime = ModelRuntime(options=OPTIONS, executor=executor)
        try:
            await runtime.activate(v1.path, v1.manifest)
            old = runtime.handle
            assert old is not None
            executor.gate.clear()
            executor.submitted = asyncio.Event()
            x = x_rows(7, 2)
            in_flight = asyncio.create_task(runtime.infer({"input": x}))
            await executor.submitted.wait()
            assert old.refcount == 1

            result = await runtime.activate(v2.path, v2.manifest)
            assert result.previous == v1.ref
            assert runtime.active == v2.ref
            assert old.retired
            assert not old.closed  # its request is still running
            assert old.refcount == 1

            closed = closed_future(old)
            executor.gate.set()
            outcome = await in_flight
            await closed
            assert outcome.model == v1.ref
            check_outcome(outcome, x, {v1.ref: v1, v2.ref: v2})
            assert old.closed
            assert old.refcount == 0
            after = await runtime.infer({"input": x})
            assert after.model == v2.ref
            check_outcome(after, x, {v1.ref: v1, v2.ref: v2})
        finally:
            executor.gate.set()
            await runtime.close()
            executor.shutdown()

    run(main)


def test_cancelled_request_holds_its_model_until_run_returns(v1: Model, v2: Model) -> None:
    async def main() -> None:
        executor = GatedExecutor()
        runtime = ModelRuntime(options=OPTIONS, executor=executor)
        try:
            await runtime.activate(v1.path, v1.manifest)
            old = runtime.handle
            assert old is not None
            executor.gate.clear()
            executor.submitted = asyncio.Event()
            task = asyncio.create_task(runtime.infer({"input": x_rows(8, 1)}))
            await executor.submitted.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # session.run has not returned (it has not even started): still held.
            assert old.refcount == 1
            await runtime.activate(v2.path, v2.manifest)
            assert not old.closed
            closed = closed_future(old)
            executor.gate.set()
            await closed
            assert old.refcount == 0
        finally:
            executor.gate.set()
            await runtime.close()
            executor.shutdown()

    run(main)


# ----- hot-swap under load ---------------------------------------------------


CLIENTS = 6
SWAPS = 20
PER_PHASE = 15  # requests completed on each model before the next swap


def test_hot_swap_under_load(v1: Model, v2: Model) -> None:
    models = {v1.ref: v1, v2.ref: v2}

    async def main() -> None:
        executor = ThreadPoolExecutor(max_workers=4)
        runtime = ModelRuntime(options=OPTIONS, executor=executor)
        records: list[tuple[np.ndarray, InferenceOutcome]] = []
        failures: list[BaseException] = []
        progress = asyncio.Condition()
        stop = asyncio.Event()

        async def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.normal(size=(int(rng.integers(1, 4)), 8)).astype(np.float32)
                try:
                    outcome = await runtime.infer({"input": x})
                except Exception as exc:  # counted, and the client stops: no busy loop
                    failures.append(exc)
                    return
                records.append((x, outcome))
                async with progress:
                    progress.notify_all()

        async def completed(count: int) -> None:
            async with progress:
                await progress.wait_for(lambda: len(records) >= count or bool(failures))

        try:
            await runtime.activate(v1.path, v1.manifest)
            handles: list[LoadedModel] = []
            first = runtime.handle
            assert first is not None
            handles.append(first)
            clients = [asyncio.create_task(client(seed)) for seed in range(CLIENTS)]
            in_flight_at_swap: list[int] = []
            for i in range(SWAPS):
                target = v2 if i % 2 == 0 else v1
                await completed(len(records) + PER_PHASE)
                old = runtime.handle
                assert old is not None
                result = await runtime.activate(target.path, target.manifest)
                assert result.previous == old.ref
                assert result.model == target.ref
                assert old.retired
                assert old.in_flight_at_retire is not None
                in_flight_at_swap.append(old.in_flight_at_retire)
                new = runtime.handle
                assert new is not None
                handles.append(new)
            await completed(len(records) + PER_PHASE)
            stop.set()
            await asyncio.gather(*clients)

            assert failures == []
            assert len(records) >= (SWAPS + 1) * PER_PHASE
            for x, outcome in records:
                check_outcome(outcome, x, models)
            assert {o.model for _, o in records} == {v1.ref, v2.ref}
            # Every request was counted by exactly one handle.
            assert sum(h.served for h in handles) == len(records)
            for h in handles[:-1]:
                assert h.retired
                assert h.refcount == 0
                assert h.closed
            # The test did swap under load: requests were in flight at the swaps,
            # and those sessions were closed by their last request, not the swap.
            assert sum(in_flight_at_swap) > 0, in_flight_at_swap
            assert runtime.handle is handles[-1]
            assert not handles[-1].closed
        finally:
            stop.set()
            await runtime.close()
            executor.shutdown()
        assert handles[-1].closed

    run(main)


# ----- resource mode ---------------------------------------------------------


def test_resource_mode_requests_wait_through_the_gap(v1: Model, v2: Model) -> None:
    models = {v1.ref: v1, v2.ref: v2}

    async def main() -> None:
        executor = GatedExecutor()
        runtime = ModelRuntime(options=OPTIONS, swap_mode="resource", executor=executor)
        try:
            first = await runtime.activate(v1.path, v1.manifest)
            assert first.mode == "resource"
            old = runtime.handle
            assert old is not None

            # One request in flight on v1, held in the executor.
            executor.gate.clear()
            executor.submitted = asyncio.Event()
            x0 = x_rows(10, 1)
            in_flight = asyncio.create_task(runtime.infer({"input": x0}))
            await executor.submitted.wait()

            # The swap starts: it retires v1 and waits for that request (the gap).
            swap = asyncio.create_task(runtime.activate(v2.path, v2.manifest))
            entered = 0
            all_entered = asyncio.Event()

            async def late(x: np.ndarray) -> tuple[ModelRef | None, InferenceOutcome]:
                nonlocal entered
                seen = runtime.active
                entered += 1
                if entered == 5:
                    all_entered.set()
                return seen, await runtime.infer({"input": x})

            xs = [x_rows(20 + i, 1 + i % 3) for i in range(5)]
            lates = [asyncio.create_task(late(x)) for x in xs]
            await all_entered.wait()
            assert runtime.active is None  # in the gap
            assert not old.closed  # draining: its request is held in the executor

            executor.gate.set()
            result = await swap
            outcome0 = await in_flight
            gap_results = await asyncio.gather(*lates)

            assert outcome0.model == v1.ref
            check_outcome(outcome0, x0, models)
            for x, (seen, outcome) in zip(xs, gap_results, strict=True):
                assert seen is None  # arrived during the gap ...
                assert outcome.model == v2.ref  # ... waited, and ran on the new model
                check_outcome(outcome, x, models)
            assert old.closed
            assert old.refcount == 0
            assert result.mode == "resource"
            assert result.previous == v1.ref
            assert result.model == v2.ref
            # The gap covers drain, load and warm-up (same clock, by construction).
            assert result.gap_ms >= result.drain_ms + result.load_ms + result.warmup_ms
            assert result.drain_ms > 0
            assert runtime.active == v2.ref
        finally:
            executor.gate.set()
            await runtime.close()
            executor.shutdown()

    run(main)


def test_resource_mode_back_to_back_swaps_do_not_starve_waiters(v1: Model, v2: Model) -> None:
    """Requests that waited through a gap run on the model that ended it.

    A second activation queued right behind the first must not open its own gap
    before they got that model (they are handed a reference, not woken to race).
    """
    models = {v1.ref: v1, v2.ref: v2}

    async def main() -> None:
        executor = GatedExecutor()
        runtime = ModelRuntime(options=OPTIONS, swap_mode="resource", executor=executor)
        try:
            await runtime.activate(v1.path, v1.manifest)
            executor.gate.clear()
            executor.submitted = asyncio.Event()
            x0 = x_rows(60, 1)
            in_flight = asyncio.create_task(runtime.infer({"input": x0}))
            await executor.submitted.wait()

            async def swap_twice() -> list[ActivationResult]:
                # The second activation starts in the same step the first returns.
                return [
                    await runtime.activate(v2.path, v2.manifest),
                    await runtime.activate(v1.path, v1.manifest),
                ]

            swaps = asyncio.create_task(swap_twice())
            xs = [x_rows(61 + i, 1) for i in range(4)]
            waiting = [asyncio.create_task(runtime.infer({"input": x})) for x in xs]
            cancelled = asyncio.create_task(runtime.infer({"input": x0}))
            entered = asyncio.Event()

            async def mark() -> None:  # runs after every task above took its first step
                entered.set()

            marker = asyncio.create_task(mark())
            await entered.wait()
            await marker
            assert runtime.active is None
            cancelled.cancel()
            executor.gate.set()
            results = await swaps
            assert [r.model for r in results] == [v2.ref, v1.ref]
            assert (await in_flight).model == v1.ref
            for x, task in zip(xs, waiting, strict=True):
                outcome = await task
                assert outcome.model == v2.ref
                check_outcome(outcome, x, models)
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert runtime.active == v1.ref
            assert runtime.handle is not None
            assert runtime.handle.refcount == 0
        finally:
            executor.gate.set()
            await runtime.close()
            executor.shutdown()

    run(main)


def test_resource_mode_failed_load_restores_the_old_model(tmp_path: Path, v1: Model) -> None:
    bad = write_blob(tmp_path, "bad.onnx", b"\x00\x01 definitely not protobuf")
    bad_manifest = make_manifest(b"bad", "2.0.0")

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS, swap_mode="resource")
        try:
            await runtime.activate(v1.path, v1.manifest)
            old = runtime.handle
            assert old is not None
            swap = asyncio.create_task(runtime.activate(bad, bad_manifest))
            xs = [x_rows(30 + i, 2) for i in range(3)]

            async def late(x: np.ndarray) -> tuple[ModelRef | None, InferenceOutcome]:
                return runtime.active, await runtime.infer({"input": x})

            lates = [asyncio.create_task(late(x)) for x in xs]
            with pytest.raises(ModelLoadError, match=r"clf 2\.0\.0"):
                await swap
            results = await asyncio.gather(*lates)
            for x, (seen, outcome) in zip(xs, results, strict=True):
                assert seen is None
                assert outcome.model == v1.ref
                check_outcome(outcome, x, {v1.ref: v1})
            assert runtime.active == v1.ref
            assert runtime.handle is not old  # reloaded from its path
            assert old.closed
        finally:
            await runtime.close()

    run(main)


def test_resource_mode_under_load_has_no_failures(v1: Model, v2: Model) -> None:
    models = {v1.ref: v1, v2.ref: v2}

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS, swap_mode="resource")
        records: list[tuple[np.ndarray, InferenceOutcome]] = []
        failures: list[BaseException] = []
        progress = asyncio.Condition()
        stop = asyncio.Event()

        async def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.normal(size=(1, 8)).astype(np.float32)
                try:
                    outcome = await runtime.infer({"input": x})
                except Exception as exc:
                    failures.append(exc)
                    return
                records.append((x, outcome))
                async with progress:
                    progress.notify_all()

        async def completed(count: int) -> None:
            async with progress:
                await progress.wait_for(lambda: len(records) >= count or bool(failures))

        try:
            await runtime.activate(v1.path, v1.manifest)
            clients = [asyncio.create_task(client(seed)) for seed in range(4)]
            gaps = []
            for i in range(6):
                target = v2 if i % 2 == 0 else v1
                await completed(len(records) + 10)
                gaps.append((await runtime.activate(target.path, target.manifest)).gap_ms)
            await completed(len(records) + 10)
            stop.set()
            await asyncio.gather(*clients)
            assert failures == []
            for x, outcome in records:
                check_outcome(outcome, x, models)
            assert all(g > 0 for g in gaps)
        finally:
            stop.set()
            await runtime.close()

    run(main)


# ----- batching --------------------------------------------------------------


def test_infer_batch_dynamic_first_dim_runs_once(v1: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, v1.manifest)
            xs = [x_rows(40, 1), x_rows(41, 2), x_rows(42, 1)]
            outcomes = await runtime.infer_batch([{"input": x} for x in xs])
            assert len(outcomes) == 3
            for x, outcome in zip(xs, outcomes, strict=True):
                check_outcome(outcome, x, {v1.ref: v1})
            # One session.run for the whole batch: one shared latency.
            assert len({o.latency_ms for o in outcomes}) == 1
            assert await runtime.infer_batch([]) == []
            # Ragged requests cannot be stacked: run one by one, still correct.
            ragged = [{"input": x_rows(43, 1)}, {"input": np.zeros((1, 8), np.float64)}]
            with pytest.raises(InferenceError, match="batch"):
                await runtime.infer_batch(ragged)
            assert runtime.handle is not None
            assert runtime.handle.refcount == 0
        finally:
            await runtime.close()

    run(main)


def test_infer_batch_static_first_dim_falls_back(tmp_path: Path) -> None:
    static = write_model(tmp_path, "3.0.0", seed=3, batch=1)

    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(static.path, static.manifest)
            assert runtime.handle is not None
            assert not runtime.handle.dynamic_batch
            xs = [x_rows(50 + i, 1) for i in range(4)]
            outcomes = await runtime.infer_batch([{"input": x} for x in xs])
            for x, outcome in zip(xs, outcomes, strict=True):
                assert outcome.model == static.ref
                check_outcome(outcome, x, {static.ref: static})
            assert runtime.inferences == 4
        finally:
            await runtime.close()

    run(main)
