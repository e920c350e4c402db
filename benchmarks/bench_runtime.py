"""ModelRuntime overhead and hot-swap timings on real onnxruntime sessions.

For two models (the tiny 8→4 classifier the tests use, where per-call overhead
dominates, and a 256→1024→1024→10 MLP, closer to real work) it prints:

* inferences/s of a bare ``session.run`` loop (same file, same session options);
* inferences/s of ``await ModelRuntime.infer`` one request at a time, and with
  4 concurrent callers; the ratio to the bare loop is the figure that matters,
  and the added cost per call (the thread hop to the executor and back);
  bare and runtime runs are interleaved over ``--rounds`` and the medians kept,
  so a noisy neighbour on a shared machine skews both alike; for scale, the
  rate of a bare asyncio thread hop (``run_in_executor`` of a no-op), the floor
  any off-loop inference pays;
* availability-mode swaps: load, warm-up and (zero) gap times;
* resource-mode swaps: gap (drain + load + warm-up) times;
* swaps under load (4 callers): failed requests (must be 0) and throughput.

    .venv/bin/python benchmarks/bench_runtime.py [--seconds S] [--swaps N]

Runs in about 20 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_node.runtime import ActivationResult, ModelRuntime, SessionOptionsConfig
from shared.messages import DType, ModelManifest, TensorSpec

CONCURRENCY = 4


@dataclass(frozen=True)
class Built:
    path: Path
    manifest: ModelManifest
    feed: dict[str, np.ndarray]


def mlp_bytes(sizes: list[int], seed: int) -> bytes:
    """float32 "input" [N, sizes[0]] → (MatMul, Add, Relu)* → Softmax → "probs"."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}"),
        ]
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]))
        last = i == len(sizes) - 2
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
        prev = f"a{i}" if last else f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    blob: bytes = model.SerializeToString()
    return blob


def build(directory: Path, name: str, sizes: list[int], version: str, seed: int) -> Built:
    blob = mlp_bytes(sizes, seed)
    path = directory / f"{name}-{version}.onnx"
    path.write_bytes(blob)
    manifest = ModelManifest(
        name=name,
        version=version,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        inputs=(TensorSpec(name="input", dtype=DType.FLOAT32, shape=("N", sizes[0])),),
        outputs=(TensorSpec(name="probs", dtype=DType.FLOAT32, shape=("N", sizes[-1])),),
        created_at=time.time(),
    )
    feed = {"input": np.random.default_rng(seed).normal(size=(1, sizes[0])).astype(np.float32)}
    return Built(path=path, manifest=manifest, feed=feed)


def bare_rate(model: Built, options: SessionOptionsConfig, seconds: float) -> float:
    session = ort.InferenceSession(
        str(model.path),
        sess_options=options.session_options(),
        providers=list(options.providers_for(model.manifest)),
    )
    session.run(None, model.feed)
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            session.run(None, model.feed)
        count += 50
    return count / (time.perf_counter() - start)


async def runtime_rates(
    model: Built, options: SessionOptionsConfig, seconds: float
) -> tuple[float, float]:
    runtime = ModelRuntime(options=options)
    try:
        await runtime.activate(model.path, model.manifest)
        count, start = 0, time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await runtime.infer(model.feed)
            count += 1
        sequential = count / (time.perf_counter() - start)

        done = 0
        start = time.perf_counter()
        deadline = start + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await runtime.infer(model.feed)
                done += 1

        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        concurrent = done / (time.perf_counter() - start)
    finally:
        await runtime.close()
    return sequential, concurrent


async def hop_rate(seconds: float) -> float:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=4) as executor:
        count, start = 0, time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await loop.run_in_executor(executor, int)
            count += 1
        return count / (time.perf_counter() - start)


async def swap_timings(
    a: Built, b: Built, options: SessionOptionsConfig, swaps: int, mode: str
) -> list[ActivationResult]:
    runtime = ModelRuntime(options=options, swap_mode=mode)  # type: ignore[arg-type]
    try:
        await runtime.activate(a.path, a.manifest)
        results = []
        for i in range(swaps):
            target = b if i % 2 == 0 else a
            results.append(await runtime.activate(target.path, target.manifest))
        return results
    finally:
        await runtime.close()


async def swaps_under_load(
    a: Built, b: Built, options: SessionOptionsConfig, swaps: int, mode: str
) -> tuple[int, int, float]:
    runtime = ModelRuntime(options=options, swap_mode=mode)  # type: ignore[arg-type]
    done = failed = 0
    stop = asyncio.Event()

    async def caller() -> None:
        nonlocal done, failed
        while not stop.is_set():
            try:
                await runtime.infer(a.feed)
            except Exception:
                failed += 1
                return
            done += 1

    try:
        await runtime.activate(a.path, a.manifest)
        start = time.perf_counter()
        callers = [asyncio.create_task(caller()) for _ in range(CONCURRENCY)]
        for i in range(swaps):
            target = b if i % 2 == 0 else a
            await runtime.activate(target.path, target.manifest)
        stop.set()
        await asyncio.gather(*callers)
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        await runtime.close()
    return done, failed, done / elapsed


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f} ms  max {max(values):7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()
    options = SessionOptionsConfig()  # what an edge node uses by default
    load1, _, _ = os.getloadavg()
    print(
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs (load average {load1:.1f}), "
        f"graph optimization {options.graph_optimization}, intra-op threads auto"
    )
    hops = [asyncio.run(hop_rate(args.seconds)) for _ in range(args.rounds)]
    hop = statistics.median(hops)
    print(f"asyncio thread hop (no-op)   {hop:10,.0f} /s  ({1e6 / hop:.0f} us each)")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, sizes in (("tiny", [8, 4]), ("mlp", [256, 1024, 1024, 10])):
            a = build(directory, name, sizes, "1.0.0", seed=1)
            b = build(directory, name, sizes, "2.0.0", seed=2)
            size_kib = a.path.stat().st_size / 1024
            print(f"\n== {name} {sizes} ({size_kib:,.0f} KiB)")
            bares, seqs, concs = [], [], []
            for _ in range(args.rounds):
                bares.append(bare_rate(a, options, args.seconds))
                seq, conc = asyncio.run(runtime_rates(a, options, args.seconds))
                seqs.append(seq)
                concs.append(conc)
            bare, seq, conc = (statistics.median(v) for v in (bares, seqs, concs))
            added_us = (1 / seq - 1 / bare) * 1e6
            print(f"bare session.run loop        {bare:10,.0f} inf/s")
            print(
                f"ModelRuntime.infer, 1 caller {seq:10,.0f} inf/s  ({seq / bare:.2f}x bare, "
                f"{added_us:+.0f} us per call)"
            )
            print(
                f"ModelRuntime.infer, {CONCURRENCY} callers"
                f" {conc:9,.0f} inf/s  ({conc / bare:.2f}x bare)"
            )
            avail = asyncio.run(swap_timings(a, b, options, args.swaps, "availability"))
            print(f"availability swap: load   {ms([r.load_ms for r in avail])}")
            print(f"                   warmup {ms([r.warmup_ms for r in avail])}")
            print(f"                   gap    {ms([r.gap_ms for r in avail])}")
            res = asyncio.run(swap_timings(a, b, options, args.swaps, "resource"))
            print(f"resource swap:     gap    {ms([r.gap_ms for r in res])}")
            print(f"                   drain  {ms([r.drain_ms for r in res])}")
            for mode in ("availability", "resource"):
                done, failed, rate = asyncio.run(swaps_under_load(a, b, options, args.swaps, mode))
                print(
                    f"{args.swaps} {mode} swaps under {CONCURRENCY} callers: "
                    f"{done:,} requests, {failed} failed, {rate:,.0f} inf/s during the swaps"
                )


if __name__ == "__main__":
    main()
