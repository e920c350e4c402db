"""ModelRuntime against a real onnxruntime and real .onnx files.

The models are built here with onnx.helper (a float32 classifier: "input" [N, 8]
→ MatMul → Add → Softmax → "probs" [N, 4]) so that every output can be
recomputed with numpy from the known weights. No test waits on the clock:
ordering comes from asyncio's FIFO scheduling, events set where the runtime
hands work to its executor, and callbacks fired when a session closes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node.runtime import (
    InferenceError,
    ModelLoadError,
    ModelMismatchError,
    ModelRetiredError,
    ModelRuntime,
    NoModelError,
    SessionOptionsConfig,
)
from shared.messages import DType, TensorSpec, WarmupInput
from tests.integration.runtime_kit import (
    OPTIONS,
    GatedExecutor,
    Model,
    check_outcome,
    closed_future,
    make_manifest,
    run,
    x_rows,
)

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


# ----- batching --------------------------------------------------------------


def test_run_rows_stacks_a_dynamic_batch_into_one_run(v1: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        try:
            await runtime.activate(v1.path, v1.manifest)
            halt = threading.Event()
            handle = await asyncio.to_thread(runtime.acquire_blocking, halt)
            assert handle is not None
            assert handle.refcount == 1
            x = x_rows(40, 5)
            try:
                runs = await asyncio.to_thread(runtime.run_rows, handle, {"input": x}, 5)
                with pytest.raises(InferenceError, match="inference failed"):
                    runtime.run_rows(handle, {"input": np.zeros((2, 8), np.float64)}, 2)
            finally:
                handle.release()
            (one,) = runs  # one session.run for the five rows
            assert (one.first, one.rows) == (0, 5)
            np.testing.assert_allclose(one.outputs["probs"], v1.expected(x), rtol=1e-4, atol=1e-6)
            assert runtime.stacked_runs == 1
            assert runtime.inferences == 5
            assert runtime.errors == 2
            assert handle.refcount == 0
        finally:
            await runtime.close()

    run(main)


def test_acquire_blocking_waits_for_a_model_and_ends_on_halt_or_close(v1: Model) -> None:
    async def main() -> None:
        runtime = ModelRuntime(options=OPTIONS)
        halt = threading.Event()
        waiting = asyncio.create_task(asyncio.to_thread(runtime.acquire_blocking, halt))
        # No model yet: the thread keeps waiting (a bounded check that nothing happens).
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done
        await runtime.activate(v1.path, v1.manifest)
        async with asyncio.timeout(10):
            handle = await waiting
        assert handle is not None
        assert handle.ref == v1.ref
        handle.release()
        halt.set()
        assert runtime.acquire_blocking(halt) is None
        await runtime.close()
        assert runtime.acquire_blocking(threading.Event()) is None

    run(main)
