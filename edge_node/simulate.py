"""Many edge nodes in one process, for load and rollout tests.

Every simulated node is a full :class:`~edge_node.agent.NodeAgent` — its own
MQTT connection, id, labels, verifier, outbox and model store — sharing one
event loop and one thread pool for ``session.run`` (a pool per node would be
thousands of threads for a large fleet). Node ``i`` (1-based) is
``{prefix}-{i:04d}`` with data in ``base_dir/{id}``; labels given to all nodes
are extended with ``sim-group`` (``a`` for odd, ``b`` for even nodes) so
selectors can split the fleet. Each sends telemetry every 10 s by default, as a
real node does (``--telemetry-interval``: tests take shorter periods). Nodes
start together and load the models they hold, like those a rollout brings,
concurrently: each on its runtime's loader thread, warm-ups in parallel (the
runtime serialises only onnxruntime's session constructor, process-wide).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_node.agent import AgentConfig, NodeAgent, SourceKind
from edge_node.sessions import SessionOptionsConfig
from shared.broker import BrokerAddress

__all__ = ["node_ids", "run_agents", "run_simulation", "shared_pool", "simulated_agents"]


def node_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{index:04d}" for index in range(1, count + 1)]


def shared_pool() -> ThreadPoolExecutor:
    """The one pool the simulated nodes run ``session.run`` on: a thread per core."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="sim-ort")


def simulated_agents(
    *,
    count: int,
    prefix: str,
    base_dir: Path,
    trust_file: Path,
    broker: BrokerAddress,
    fleet: str,
    labels: dict[str, str],
    executor: ThreadPoolExecutor,
    source: SourceKind = "none",
    rate_hz: float | None = 1.0,
    telemetry_interval_s: float = 10.0,  # as a real node's (edge-node run)
) -> list[NodeAgent]:
    """``count`` agents as :func:`run_simulation` runs them, sharing ``executor``."""
    return [
        NodeAgent(
            AgentConfig(
                node_id=node_id,
                data_dir=base_dir / node_id,
                trust_file=trust_file,
                broker=broker,
                fleet=fleet,
                labels={**labels, "sim-group": "a" if index % 2 else "b"},
                source=source,
                rate_hz=rate_hz,
                telemetry_interval_s=telemetry_interval_s,
                batch_interval_s=1.0,
                # Many simulated devices share this machine's cores: one onnxruntime
                # thread each, as on a small device, not a spinning pool per node.
                session_options=SessionOptionsConfig(intra_op_threads=1, inter_op_threads=1),
            ),
            executor=executor,
        )
        for index, node_id in enumerate(node_ids(prefix, count), start=1)
    ]


async def run_agents(agents: Sequence[NodeAgent]) -> None:
    """Run ``agents`` together until SIGINT/SIGTERM, then stop them all cleanly."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for agent in agents:
            agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    try:
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run(), name=f"node-{agent.config.node_id}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_simulation(
    *,
    count: int,
    prefix: str,
    base_dir: Path,
    trust_file: Path,
    broker: BrokerAddress,
    fleet: str,
    labels: dict[str, str],
    source: SourceKind = "none",
    rate_hz: float | None = 1.0,
    telemetry_interval_s: float = 10.0,
) -> None:
    """Run ``count`` nodes until SIGINT/SIGTERM, then stop them all cleanly."""
    with shared_pool() as pool:
        agents = simulated_agents(
            count=count,
            prefix=prefix,
            base_dir=base_dir,
            trust_file=trust_file,
            broker=broker,
            fleet=fleet,
            labels=labels,
            executor=pool,
            source=source,
            rate_hz=rate_hz,
            telemetry_interval_s=telemetry_interval_s,
        )
        await run_agents(agents)
