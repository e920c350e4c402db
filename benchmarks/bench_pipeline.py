"""End-to-end pipeline: one node flat out against a real controller, and swaps under load.

Everything runs on this machine: Mosquitto (``broker_config/dev.conf`` on a
free port on 127.0.0.1), a :class:`ControllerService` with a SQLite database
in a temp dir, and one :class:`NodeAgent` with the synthetic source at full
speed (``rate_hz=None``) running the demo's small classifier (float32 [N, 16]
-> 4 classes), deployed the real way: published, signed, rolled out. The node
and the controller share this process (one GIL) and, with Mosquitto, the
machine's cores, as ``fleetctl demo`` runs them.

For node concurrency 1 and 2, after a 1 s warm-up, over ``--seconds`` it prints:

* inferences/s on the node, and results/s durably stored by the controller
  (rows of the ``results`` table counted before and after);
* delay from inference (the result's ``ts``) to its commit in the controller's
  store, sampled by wrapping ``store.ingest.write`` of the running controller
  (measurement only; re-sent results are not counted twice); it includes the
  node's ``batch_interval_s`` wait, so it is dominated by that setting;
* the outbox depth (entries not yet acknowledged) and results not yet in the
  outbox at the end of the window;
* the ratio to a bare ``session.run`` loop on the same model file, same
  session options, as many threads as the node has workers, for the same
  duration, run while the node is stopped.

Then, with :class:`ModelRuntime` alone (no MQTT), it measures hot swaps under
load: two callers flat out for ``--swap-seconds`` without swaps, then as long
again with ten availability-mode swaps between two versions spread over it:
inferences/s of both, the ratio, and failed requests (expected 0).

    .venv/bin/python benchmarks/bench_pipeline.py [--seconds S] [--swap-seconds S]

Runs in about 40 s with the defaults (``--seconds 8``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_node.agent import AgentConfig, NodeAgent
from edge_node.runtime import ModelRuntime, SessionOptionsConfig
from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.demo import N_IN, build_classifier, local_mosquitto, running
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import prepare_manifest, publish, sign_release
from fleet_controller.service import ControllerConfig, ControllerService
from fleet_controller.store import Store
from shared.broker import BrokerAddress
from shared.messages import ModelManifest
from shared.result_batch import ResultBatch
from shared.trust import Role

FLEET = "bench"
NODE = "bench-node"
LABELS = ("cat", "dog", "bird", "fish")
SWAPS = 10
SWAP_CALLERS = 2


@dataclass(frozen=True)
class Model:
    path: Path
    manifest: ModelManifest


class CommitClock:
    """Wraps the controller's ``store.ingest.write``: inference-to-commit delay per new result."""

    def __init__(self, store: Store) -> None:
        self.delays: list[float] = []
        self.recording = False
        self._top: dict[str, int] = {}
        inner = store.ingest.write

        def ingest(
            statuses: Sequence[Any],
            batches: Sequence[ResultBatch],
            telemetry: Sequence[Any],
            now: float,
        ) -> dict[str, int]:
            acks = inner(statuses, batches, telemetry, now)
            committed = time.time()  # the node stamps results with time.time() too
            for batch in batches:
                top = self._top.get(batch.node, 0)
                for seq, ts in zip(batch.result_seq, batch.ts, strict=True):
                    if seq > top:  # a re-sent result is not a new sample
                        top = seq
                        if self.recording:
                            self.delays.append(committed - ts)
                self._top[batch.node] = top
            return acks

        store.ingest.write = ingest  # type: ignore[method-assign]


def stored_results(store: Store) -> int:
    return store.results.table_counts()["results"]


async def wait_for(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def deploy(ctl: CtlClient, model: str) -> None:
    """Roll ``model`` out to the (single) node and wait until it succeeded."""

    async def online() -> bool:
        nodes = await ctl.call("nodes.list")
        return any(n["node_id"] == NODE and n["online"] for n in nodes)

    await wait_for("the node to come online", online)
    started = await ctl.call(
        "rollout.start", {"model": model, "waves": [100], "health_window_s": 0.0}
    )

    async def done() -> bool:
        status = await ctl.call("rollout.status", {"rollout_id": started["rollout_id"]})
        if status["state"] in ("failed", "aborted", "rolled_back"):
            raise RuntimeError(f"rollout ended {status['state']}: {status['reason']}")
        return bool(status["state"] == "succeeded")

    await wait_for("the rollout", done)


def bare_rate(model: Model, threads: int, seconds: float) -> float:
    """session.run flat out from ``threads`` threads on one session (node defaults)."""
    options = SessionOptionsConfig()
    session = ort.InferenceSession(
        str(model.path),
        sess_options=options.session_options(),
        providers=list(options.providers_for(model.manifest)),
    )
    feed = {"input": np.random.default_rng(0).standard_normal((1, N_IN)).astype(np.float32)}
    session.run(None, feed)
    counts = [0] * threads
    start = time.perf_counter()
    deadline = start + seconds

    def loop(index: int) -> None:
        done = 0
        while time.perf_counter() < deadline:
            for _ in range(50):
                session.run(None, feed)
            done += 50
        counts[index] = done

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - start)


def agent_for(
    root: Path,
    broker: BrokerAddress,
    concurrency: int,
    args: argparse.Namespace,
    micro_batch: int = 1,
) -> NodeAgent:
    return NodeAgent(
        AgentConfig(
            node_id=NODE,
            data_dir=root / "node",
            trust_file=root / "keys" / "trust.json",
            broker=broker,
            fleet=FLEET,
            source="synthetic",
            rate_hz=None,
            concurrency=concurrency,
            micro_batch=micro_batch,
            batch_max=args.batch_max,
            batch_interval_s=args.batch_interval,
        )
    )


def ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"p50 {statistics.median(ordered) * 1e3:,.0f} ms, p95 {p95 * 1e3:,.0f} ms, "
        f"max {ordered[-1] * 1e3:,.0f} ms ({len(ordered):,} results)"
    )


async def node_run(
    agent: NodeAgent,
    *,
    controller: ControllerService,
    clock: CommitClock,
    ctl: CtlClient,
    model: Model,
    args: argparse.Namespace,
) -> None:
    concurrency = agent.config.concurrency
    base = await asyncio.to_thread(stored_results, controller.store)
    async with running(agent):
        if agent.active is None:
            await deploy(ctl, f"classifier@{model.manifest.version}")

        async def inferring() -> bool:
            return agent.stats()["inferences"] > 0

        await wait_for("the first inference", inferring)
        await asyncio.sleep(1.0)  # warm-up: batcher, outbox, acks reach a steady state
        rows0 = await asyncio.to_thread(stored_results, controller.store)
        inferences0 = agent.stats()["inferences"]
        cpu0, start = time.process_time(), time.perf_counter()
        clock.delays.clear()
        clock.recording = True
        await asyncio.sleep(args.seconds)
        inferences1 = agent.stats()["inferences"]
        elapsed = time.perf_counter() - start
        cpu = (time.process_time() - cpu0) / elapsed
        clock.recording = False
        rows1 = await asyncio.to_thread(stored_results, controller.store)
        depth, pending = agent.outbox_stats().depth, agent.stats()["pending"]
    # Inferred by this agent but not stored yet (batching, outbox, MQTT, writer queue).
    in_flight0, in_flight1 = base + inferences0 - rows0, base + inferences1 - rows1
    node_rate = (inferences1 - inferences0) / elapsed
    stored_rate = (rows1 - rows0) / elapsed
    bare = await asyncio.to_thread(bare_rate, model, concurrency, args.seconds)
    batch = agent.config.micro_batch
    print(
        f"\n== node concurrency {concurrency}, micro-batch {batch} "
        f"({elapsed:.1f} s, this process {cpu:.0%} CPU)"
    )
    print(f"node inferences              {node_rate:10,.0f} /s")
    print(
        f"results stored (controller)  {stored_rate:10,.0f} /s  "
        f"({stored_rate / node_rate:.2f} of inferred)"
    )
    print(f"inference -> stored delay    {ms(clock.delays)}")
    print(
        f"inferred, not yet stored     {in_flight0:,} at the start, {in_flight1:,} at the end "
        f"(then {depth} outbox entries unacknowledged, {pending} results not yet batched)"
    )
    print(
        f"bare session.run, {concurrency} thread(s) {bare:10,.0f} /s  -> node at "
        f"{node_rate / bare:.3f}x bare ({1e6 / node_rate - 1e6 / bare:,.0f} us added per inference)"
    )


async def swap_phase(
    runtime: ModelRuntime, models: tuple[Model, Model], seconds: float, swaps: int
) -> tuple[float, int, list[float]]:
    """Callers flat out for ``seconds``, with ``swaps`` spread over it: (inf/s, failed, load ms)."""
    feed = {"input": np.random.default_rng(1).standard_normal((1, N_IN)).astype(np.float32)}
    done = failed = 0
    stop = asyncio.Event()

    async def caller() -> None:
        nonlocal done, failed
        while not stop.is_set():
            try:
                await runtime.infer(feed)
            except Exception:
                failed += 1
                continue
            done += 1

    loads: list[float] = []
    start = time.perf_counter()
    callers = [asyncio.create_task(caller()) for _ in range(SWAP_CALLERS)]
    try:
        if swaps:
            for index in range(swaps):
                await asyncio.sleep(seconds / swaps)
                target = models[(index + 1) % 2]
                result = await runtime.activate(target.path, target.manifest)
                loads.append(result.load_ms + result.warmup_ms)
        else:
            await asyncio.sleep(seconds)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    return done / (time.perf_counter() - start), failed, loads


async def swaps_under_load(models: tuple[Model, Model], seconds: float) -> None:
    runtime = ModelRuntime(options=SessionOptionsConfig(), swap_mode="availability")
    try:
        await runtime.activate(models[0].path, models[0].manifest)
        steady, failed0, _ = await swap_phase(runtime, models, seconds, 0)
        swapping, failed, loads = await swap_phase(runtime, models, seconds, SWAPS)
    finally:
        await runtime.close()
    print(f"\n== hot swap under load: ModelRuntime, {SWAP_CALLERS} callers, availability mode")
    print(f"no swaps                     {steady:10,.0f} inf/s  ({failed0} failed)")
    print(
        f"{SWAPS} swaps in {seconds:g} s            {swapping:10,.0f} inf/s  ({failed} failed), "
        f"{swapping / steady:.2f}x the rate without swaps"
    )
    print(
        f"load + warm-up per swap      median {statistics.median(loads):.2f} ms, "
        f"max {max(loads):.2f} ms"
    )


async def bench(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> None:
    keys = root / "keys"
    init_keys(keys, now=time.time(), force=True)
    controller = ControllerService(
        ControllerConfig(
            broker=broker,
            db_url=str(root / "controller" / "fleet.db"),
            keys_dir=keys,
            fleet=FLEET,
            tick_s=0.5,
        )
    )
    clock = CommitClock(controller.store)
    release_key = load_key(keys, Role.RELEASE, None)
    models = []
    for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
        path = build_classifier(root / f"classifier-{version}.onnx", seed=seed)
        manifest = await prepare_manifest(
            path, name="classifier", version=version, now=time.time(), labels=LABELS
        )
        models.append(Model(path, manifest))
    async with running(controller):
        async with asyncio.timeout(30):
            await controller.connected.wait()
        async with CtlClient(
            MqttTransport(broker), fleet=FLEET, identity=OperatorIdentity.load(keys)
        ) as ctl:
            first = models[0]
            await publish(ctl, sign_release(first.path, first.manifest, release_key))
            for concurrency, micro_batch in ((1, 1), (2, 1), (1, 16)):
                agent = agent_for(root, broker, concurrency, args, micro_batch)
                await node_run(
                    agent, controller=controller, clock=clock, ctl=ctl, model=first, args=args
                )
    await swaps_under_load((models[0], models[1]), args.swap_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per node measurement")
    parser.add_argument("--swap-seconds", type=float, default=2.0, help="per swap phase")
    parser.add_argument("--batch-max", type=int, default=100, help="results per message")
    parser.add_argument("--batch-interval", type=float, default=1.0, help="node's batch_interval_s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load1, _, _ = os.getloadavg()
    print(
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs (load average {load1:.1f}); "
        f"node: synthetic source flat out, batch_max {args.batch_max}, "
        f"batch_interval_s {args.batch_interval:g}; controller: SQLite (synchronous=FULL)"
    )
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
        local_mosquitto(Path(tmp)) as broker,
    ):
        asyncio.run(bench(Path(tmp), broker, args))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
