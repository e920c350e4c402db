"""ModelRuntime hot-swaps against a real onnxruntime: under load, and in resource mode
(unload first). No test waits on the clock."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge_node.runtime import (
    ActivationResult,
    InferenceOutcome,
    LoadedModel,
    ModelLoadError,
    ModelRuntime,
)
from shared.messages import ModelRef
from tests.integration.runtime_kit import (
    OPTIONS,
    GatedExecutor,
    Model,
    check_outcome,
    make_manifest,
    run,
    write_blob,
    x_rows,
)

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
