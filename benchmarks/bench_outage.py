"""Bytes a controller outage costs: result batches re-sent vs new ones, time-scaled.

Mosquitto (``dev.conf``, free loopback port), a :class:`ControllerService` on
SQLite, and ``--nodes`` :class:`NodeAgent` instances with a synthetic source,
all in this process. Once a rollout has made the nodes infer, the controller
stops cleanly (its retained state goes offline, as after a crash once the
broker publishes its Will) for ``--outage`` seconds, then starts again on the
same database. A bystander subscribed to ``node/+/results`` counts every
batch published: the first copy of a slot is new bytes, every later copy is
re-sent bytes. Printed: both, from the outage's start until every outbox is
empty again, their ratio, and whether every result made is stored once.

Durations are scaled by ``--scale`` (default 0.1): the nodes' re-send delay
(15 s at scale 1), batch interval (1 s) and the outage (120 s) shrink
together, so the ratio is that of a 2-minute outage with the defaults.

    .venv/bin/python benchmarks/bench_outage.py [--nodes N] [--scale S]

Runs in about 40 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_node.agent import AgentConfig, NodeAgent
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.demo import build_classifier, local_mosquitto
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import Release, prepare_manifest, publish, sign_release
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.broker import BrokerAddress
from shared.result_batch import decode_results
from shared.trust import Role

FLEET = "outage"


class Tally:
    """Result batches seen on the broker: first copies and re-sent copies, in bytes."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.new_bytes = 0
        self.resent_bytes = 0
        self.resent = Counter[str]()

    def add(self, node: str, slot: int, size: int) -> None:
        if (node, slot) in self.seen:
            self.resent_bytes += size
            self.resent[node] += 1
        else:
            self.seen.add((node, slot))
            self.new_bytes += size

    def reset(self) -> None:
        self.new_bytes = self.resent_bytes = 0
        self.resent.clear()


async def watch(broker: BrokerAddress, tally: Tally, ready: asyncio.Event) -> None:
    async with MqttTransport(broker).connect(Session(client_id="outage-watch")) as link:
        await link.subscribe([(topics.node_filter(FLEET, "results"), 1)])
        ready.set()
        async for message in link.messages():
            node = topics.parse_topic(message.topic).node
            assert node is not None
            tally.add(node, decode_results(message.payload).seq, len(message.payload))


async def until(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    """Until the operator API says ``check`` holds, or the timeout (then report what is)."""
    for _ in range(int(timeout_s / 0.2)):
        if await check():
            return
        await asyncio.sleep(0.2)  # polling the controller against the deadline


def make_agents(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> list[NodeAgent]:
    scale = args.scale
    return [
        NodeAgent(
            AgentConfig(
                node_id=f"n{index}",
                data_dir=root / f"n{index}",
                trust_file=root / "keys" / "trust.json",
                broker=broker,
                fleet=FLEET,
                source="synthetic",
                rate_hz=args.rate,
                batch_interval_s=1.0 * scale,
                telemetry_interval_s=10.0 * scale,
                resend_after_s=15.0 * scale,
            )
        )
        for index in range(args.nodes)
    ]


async def release_of(root: Path) -> Release:
    keys = root / "keys"
    init_keys(keys, now=time.time(), force=True)
    path = build_classifier(root / "classifier.onnx", seed=1)
    manifest = await prepare_manifest(path, name="classifier", version="1.0.0", now=time.time())
    return sign_release(path, manifest, load_key(keys, Role.RELEASE, None))


async def measure(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> None:
    release = await release_of(root)
    keys = root / "keys"
    config = ControllerConfig(
        broker=broker, db_url=str(root / "fleet.db"), keys_dir=keys, fleet=FLEET, tick_s=0.2
    )
    scale = args.scale
    agents = make_agents(root, broker, args)
    loop = asyncio.get_running_loop()
    tally = Tally()
    ready = asyncio.Event()
    watcher = loop.create_task(watch(broker, tally, ready))
    outage_s = 120.0 * scale
    controller = ControllerService(config)
    running = loop.create_task(controller.run())
    node_tasks = [loop.create_task(agent.run()) for agent in agents]
    ctl_client = CtlClient(MqttTransport(broker), fleet=FLEET, identity=OperatorIdentity.load(keys))
    try:
        await ready.wait()
        await until(controller.connected.is_set, "the controller")
        async with ctl_client as ctl:
            await publish(ctl, release)
            await until(lambda: all(a.connected.is_set() for a in agents), "the nodes")

            async def all_online() -> bool:
                nodes = await ctl.call("nodes.list")
                return bool(sum(1 for n in nodes if n["online"]) >= args.nodes)

            await poll(all_online)
            await ctl.call("rollout.start", {"model": "classifier@1.0.0", "waves": [100]})
        await until(lambda: all(a.stats()["inferences"] > 0 for a in agents), "inference")
        controller.stop()
        await running
        tally.reset()
        started = time.monotonic()
        await asyncio.sleep(outage_s)  # the outage itself: a duration, not a wait for state
        during_new, during_resent = tally.new_bytes, tally.resent_bytes
        controller = ControllerService(config)
        running = loop.create_task(controller.run())
        await until(lambda: all(a.outbox_stats().depth == 0 for a in agents), "the drain")
        drained_s = time.monotonic() - started - outage_s
        for agent in agents:
            agent.stop()
        await asyncio.gather(*node_tasks)
        produced, count = await settle(agents, broker, keys)
    finally:
        controller.stop()
        with contextlib.suppress(Exception):
            await running
        watcher.cancel()
        for task in node_tasks:
            task.cancel()
        await asyncio.gather(watcher, *node_tasks, return_exceptions=True)
    print(f"nodes {args.nodes}, scale {scale}: outage {outage_s:.1f} s (= 120 s at scale 1)")
    print(f"  during the outage: new result bytes {during_new:,}, re-sent {during_resent:,}")
    report(tally, drained_s, produced, count)


async def settle(agents: list[NodeAgent], broker: BrokerAddress, keys: Path) -> tuple[int, int]:
    """(results the stopped nodes made, results the controller stored), once all are in."""
    produced = sum(agent.stats()["inferences"] for agent in agents)
    count = 0
    async with CtlClient(
        MqttTransport(broker), fleet=FLEET, identity=OperatorIdentity.load(keys)
    ) as ctl:

        async def all_stored() -> bool:
            nonlocal count
            count = int((await ctl.call("report"))["totals"]["results"])
            return bool(count >= produced)

        await poll(all_stored)
    return produced, count


def report(tally: Tally, drained_s: float, produced: int, count: int) -> None:
    new, resent = tally.new_bytes, tally.resent_bytes
    print(f"  outage + drain ({drained_s:.1f} s after it): new {new:,}, re-sent {resent:,}")
    print(f"  re-sent / new: {resent / max(new, 1):.2f}x")
    print(f"  re-sent batches per node: {dict(sorted(tally.resent.items()))}")
    print(f"  results made {produced}, stored {count} (exactly once: {count == produced})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.1, help="time scale (1 = real)")
    parser.add_argument("--rate", type=float, default=20.0, help="inferences/s per node")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, local_mosquitto(Path(tmp)) as broker:
        asyncio.run(measure(Path(tmp), broker, args))


if __name__ == "__main__":
    main()
