"""Rollout engine overhead at fleet scale: N simulated nodes, one controller, one rollout.

Everything runs on this machine: Mosquitto (``broker_config/dev.conf`` on a
free port on 127.0.0.1, plus ``sys_interval 1`` so its ``$SYS`` counters are
fresh), a :class:`ControllerService` with a SQLite database in a temp dir, and
``--nodes`` full :class:`NodeAgent` instances (source ``none``: no inference
traffic, only the control plane) in this one process, built by
:func:`edge_node.simulate.simulated_agents` exactly as ``edge-node simulate``
runs them (one shared ``session.run`` pool, one onnxruntime thread each). One
small classifier (the demo's) is published, signed and rolled out in waves
``--waves`` (cumulative percentages) with a ``--health-window`` of 1 s. It
prints:

* how long the fleet took to come online (every node known to the controller);
* per wave: its nodes and the time from the wave starting (as seen by polling
  ``rollout.status`` every 0.1 s over the operator API) to the next wave
  starting or the rollout ending, and the median and slowest node time from
  the wave starting to the node reporting ``activated`` (command, download,
  verify, load and warm-up); the rest of a wave is the health window and the
  controller's tick (``--tick``, 1 s by default as in ``fleetctl serve``);
* total rollout time; the controller's counters (``ControllerService.metrics``:
  messages stored, artifact chunks served) during the rollout; and MQTT PUBLISH
  messages received and sent by the broker during the rollout (``$SYS``; they
  include the polling, telemetry and up to 1 s of idle traffic after the end);
* RSS of this process before the nodes start, once they are online, after the
  rollout (each node then holds an onnxruntime session), and its peak.

    .venv/bin/python benchmarks/bench_rollout.py [--nodes N] [--tick S]

Runs in about 30 s with the defaults (50 nodes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sys_counters import SysCounters

from edge_node.simulate import shared_pool, simulated_agents
from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.demo import build_classifier, local_mosquitto
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import prepare_manifest, publish, sign_release
from fleet_controller.service import ControllerConfig, ControllerService
from fleet_controller.store import RolloutEventInfo
from shared.broker import BrokerAddress
from shared.errors import EdgeFleetError
from shared.trust import Role

FLEET = "bench"
POLL_S = 0.1
SYS_RECEIVED = "$SYS/broker/publish/messages/received"
SYS_SENT = "$SYS/broker/publish/messages/sent"
ENDED = ("succeeded", "failed", "aborted", "rolled_back")
POOL = shared_pool()  # the simulated nodes' one session.run pool


class LoopLag:
    """How late a 50 ms sleep on the shared event loop wakes up: is the loop saturated?"""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.recording = False
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.05)
            if self.recording:
                self.lags.append(loop.time() - before - 0.05)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def rss_mib() -> float:
    with Path("/proc/self/statm").open() as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    # ru_maxrss (KiB on Linux) is a high-water mark the kernel updates lazily.
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib())


async def wait_online(ctl: CtlClient, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = await ctl.call("nodes.list")
        if sum(1 for n in nodes if n["online"]) >= count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the {count} nodes did not all come online in {timeout_s:g} s")


async def follow(
    ctl: CtlClient, rollout_id: str, timeout_s: float
) -> tuple[dict[str, Any], dict[int, float], int]:
    """Poll until the rollout ends: (final status, wave -> first time seen, polls)."""
    seen: dict[int, float] = {}
    polls = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await ctl.call("rollout.status", {"rollout_id": rollout_id})
        polls += 1
        now = time.time()
        if status["state"] in ENDED:
            seen.setdefault(len(status["waves"]) + 1, now)
            return status, seen, polls
        if status["state"] == "running":
            seen.setdefault(status["wave"], now)
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"rollout {rollout_id} did not end in {timeout_s:g} s")


@dataclass
class Measured:
    """What one rollout run measured (see the module docstring)."""

    status: dict[str, Any]
    seen: dict[int, float]
    polls: int
    start_wall: float
    total_s: float
    cpu_s: float
    metrics: Counter[str]
    sys_before: dict[str, int]
    sys_after: dict[str, int]
    events: list[RolloutEventInfo]
    rss_before: float
    rss_after: float
    lags: list[float]


async def bench(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> None:
    measured = await measure(root, broker, args)
    print_report(measured, args)


async def measure(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> Measured:
    keys = root / "keys"
    init_keys(keys, now=time.time(), force=True)
    path = build_classifier(root / "classifier.onnx", seed=1)
    manifest = await prepare_manifest(path, name="classifier", version="1.0.0", now=time.time())
    release = sign_release(path, manifest, load_key(keys, Role.RELEASE, None))
    controller = ControllerService(
        ControllerConfig(
            broker=broker,
            db_url=str(root / "controller" / "fleet.db"),
            keys_dir=keys,
            fleet=FLEET,
            tick_s=args.tick,
        )
    )
    agents = simulated_agents(
        count=args.nodes,
        prefix="sim",
        base_dir=root / "nodes",
        trust_file=keys / "trust.json",
        broker=broker,
        fleet=FLEET,
        labels={},
        executor=POOL,
    )
    rss_before = rss_mib()
    loop = asyncio.get_running_loop()
    controller_task = loop.create_task(controller.run())
    tasks: list[asyncio.Task[None]] = []
    lag = LoopLag()
    try:
        async with asyncio.timeout(30):
            await controller.connected.wait()
        async with (
            CtlClient(
                MqttTransport(broker), fleet=FLEET, identity=OperatorIdentity.load(keys)
            ) as ctl,
            SysCounters(broker, {SYS_RECEIVED: SYS_RECEIVED, SYS_SENT: SYS_SENT}) as counters,
        ):
            await publish(ctl, release)
            started = time.perf_counter()
            tasks = [loop.create_task(agent.run()) for agent in agents]
            await wait_online(ctl, args.nodes)
            online_s = time.perf_counter() - started
            rss_online = rss_mib()
            print(
                f"{args.nodes} nodes online in {online_s:.1f} s; RSS {rss_before:,.0f} MiB "
                f"before them, {rss_online:,.0f} MiB now "
                f"({(rss_online - rss_before) / args.nodes * 1024:,.0f} KiB per idle node), "
                f"{threading.active_count()} threads"
            )

            sys_before = await counters.fresh()
            metrics_before = Counter(controller.metrics)
            lag.start()
            lag.recording = True
            cpu_before = time.process_time()
            start_wall = time.time()
            reply = await ctl.call(
                "rollout.start",
                {
                    "model": "classifier@1.0.0",
                    "waves": args.waves,
                    "health_window_s": args.health_window,
                    "wave_timeout_s": 60.0,
                },
            )
            status, seen, polls = await follow(ctl, reply["rollout_id"], 60.0)
            total_s = time.time() - start_wall
            cpu_s = time.process_time() - cpu_before
            lag.recording = False
            metrics = Counter(controller.metrics)
            metrics.subtract(metrics_before)
            sys_after = await counters.fresh()
            events = await asyncio.to_thread(controller.store.rollouts.events, reply["rollout_id"])
            rss_after = rss_mib()
    finally:
        lag.stop()
        for agent in agents:
            agent.stop()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=30)
            for task in stuck:
                task.cancel()
        controller.stop()
        with contextlib.suppress(asyncio.CancelledError, EdgeFleetError):
            await asyncio.wait_for(controller_task, 30)

    return Measured(
        status=status,
        seen=seen,
        polls=polls,
        start_wall=start_wall,
        total_s=total_s,
        cpu_s=cpu_s,
        metrics=metrics,
        sys_before=sys_before,
        sys_after=sys_after,
        events=events,
        rss_before=rss_before,
        rss_after=rss_after,
        lags=lag.lags,
    )


def print_report(m: Measured, args: argparse.Namespace) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(m.status["counts"].items()))
    print(
        f"\nrollout {m.status['state']} in {m.total_s:.2f} s ({counts}); waves {args.waves}, "
        f"health window {args.health_window:g} s, controller tick {args.tick:g} s"
    )
    # Event times are when the controller stored a status (statuses arrive in batches).
    first_status: dict[str, float] = {}
    activated: dict[str, float] = {}
    for event in m.events:
        if event.state.value != "queued":
            first_status.setdefault(event.node_id, event.ts)
        if event.state.value in ("activated", "succeeded"):
            activated.setdefault(event.node_id, event.ts)
    begin = m.start_wall
    for wave in range(1, len(args.waves) + 1):
        end = m.seen.get(wave + 1, m.seen[len(args.waves) + 1])
        wave_start = m.seen.get(wave, begin)
        nodes = [n["node"] for n in m.status["nodes"] if n["wave"] == wave]
        firsts = [first_status[n] - wave_start for n in nodes if n in first_status]
        actives = [activated[n] - wave_start for n in nodes if n in activated]
        node_part = (
            f"first node status stored after {min(firsts):.2f} s, "
            f"last node activated after {max(actives):.2f} s"
            if firsts and actives
            else "no node"
        )
        print(
            f"  wave {wave} ({args.waves[wave - 1]:g}%): {len(nodes):3d} nodes, "
            f"{end - begin:5.2f} s (from {'start' if wave == 1 else 'previous wave'}); "
            f"{node_part}"
        )
        begin = end
    lags = sorted(m.lags) or [0.0]
    print(
        f"this process during the rollout: {m.cpu_s:.1f} s CPU in {m.total_s:.1f} s "
        f"({m.cpu_s / m.total_s:.0%} of one core); event loop lag (50 ms probe) "
        f"median {statistics.median(lags) * 1e3:.0f} ms, max {lags[-1] * 1e3:.0f} ms"
    )
    received = m.sys_after[SYS_RECEIVED] - m.sys_before[SYS_RECEIVED]
    sent = m.sys_after[SYS_SENT] - m.sys_before[SYS_SENT]
    print(
        f"controller during the rollout: {dict(sorted(m.metrics.items()))} "
        f"(stored = statuses, telemetry, states; chunks_sent = artifact chunks broadcast)"
    )
    print(
        f"broker PUBLISH during the rollout: {received:,} received, {sent:,} sent "
        f"({received / args.nodes:.1f} received per node; {m.polls} status polls = "
        f"{2 * m.polls} of them)"
    )
    print(
        f"RSS after the rollout {m.rss_after:,.0f} MiB "
        f"({(m.rss_after - m.rss_before) / args.nodes * 1024:,.0f} KiB per node with its model), "
        f"peak {peak_rss_mib():,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument(
        "--waves",
        type=lambda text: [float(p) for p in text.split(",")],
        default=[10.0, 50.0, 100.0],
        help="cumulative percentages, e.g. 10,50,100",
    )
    parser.add_argument("--health-window", type=float, default=1.0, help="seconds")
    parser.add_argument("--tick", type=float, default=1.0, help="controller tick, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load1, _, _ = os.getloadavg()
    print(f"{os.cpu_count()} CPUs (load average {load1:.1f}), {args.nodes} simulated nodes")
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp,
        local_mosquitto(Path(tmp), ["sys_interval 1"]) as broker,
    ):
        asyncio.run(bench(Path(tmp), broker, args))
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
