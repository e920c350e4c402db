"""Helpers of the end-to-end rollout tests: wave membership as controller and nodes
compute it, bringing a fleet up, starting rollouts and reading their outcome as an
operator's script does (``fleetctl ... --json``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_node.simulate import node_ids
from shared.waves import bucket, buckets_for_percent
from tests.support.fleet import Fleet
from tests.support.stored import model_of, telemetry

# Long enough for every wave of a 24-node fleet on a slow 2-core machine, short
# enough that a stuck rollout fails the test in reasonable time.
ROLLOUT_DEADLINE_S = 120.0
RATE_HZ = 5.0
# The gate judges a node on each telemetry period, and a wave waits for a verdict
# (min-samples runs of the new model, in telemetry covering the health window):
# simulated nodes in tests report every 2 s, not a real node's 10 s, so a wave
# waits seconds, not periods of 10 s.
TELEMETRY_S = 2.0
# For rollouts whose test is not about the gate's statistics: a verdict on 20 runs
# (4 s at RATE_HZ), not the default 100 (20 s), still a verdict on every node.
QUICK_GATE = ("--min-samples", "20")


def wave_index(rollout_id: str, node_id: str, waves: Sequence[float]) -> int | None:
    """The first (0-based) wave holding ``node_id``, as controller and nodes compute it."""
    node_bucket = bucket(rollout_id, node_id)
    for index, percent in enumerate(waves):
        if node_bucket < buckets_for_percent(percent):
            return index
    return None


def pick_rollout_id(
    prefix: str,
    nodes: Sequence[str],
    waves: Sequence[float],
    wanted: Callable[[dict[str, int | None]], bool],
) -> tuple[str, dict[str, int | None]]:
    """The first id ``PREFIX-N`` whose wave membership satisfies ``wanted``."""
    for n in itertools.count(1):
        rollout_id = f"{prefix}-{n}"
        membership = {node: wave_index(rollout_id, node, waves) for node in nodes}
        if wanted(membership):
            return rollout_id, membership
        if n > 10_000:  # pragma: no cover - some id among the first few always fits
            raise AssertionError(f"no rollout id with the wanted wave membership for {prefix}")
    raise AssertionError("unreachable")  # pragma: no cover


def waves_arg(waves: Sequence[float]) -> str:
    return ",".join(f"{w:g}" for w in waves)


def bring_up(
    fleet: Fleet,
    db_url: str,
    count: int,
    models: Sequence[tuple[Path, str]],
    *,
    rate_hz: float = RATE_HZ,
    labels: Mapping[str, str] | None = None,
    telemetry_interval_s: float = TELEMETRY_S,
) -> list[str]:
    """Simulated nodes and the controller (booting side by side), then register ``models``
    (``(file, NAME@VERSION)``, in parallel) and wait for every node to be known online."""
    fleet.simulate(count, rate_hz=rate_hz, labels=labels, telemetry_interval_s=telemetry_interval_s)
    fleet.serve(db_url)
    commands = []
    for path, ref in models:
        name, _, version = ref.partition("@")
        add = ["model", "add", str(path), "--name", name, "--version", version]
        commands.append([*add, "--keys", str(fleet.keys_dir)])
    rows = fleet.fleetctl_many(commands)
    assert [f"{r['name']}@{r['version']}" for r in rows] == [ref for _, ref in models]
    ids = node_ids("sim", count)
    fleet.wait_nodes(ids, timeout_s=60.0)
    return ids


def start_rollout(
    fleet: Fleet,
    model: str,
    rollout_id: str,
    *,
    waves: Sequence[float] = (100.0,),
    health_window: str = "0s",
    wave_timeout: str = "60s",
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    started = fleet.fleetctl(
        "rollout", "start", model, "--id", rollout_id, "--waves", waves_arg(waves),
        "--health-window", health_window, "--wave-timeout", wave_timeout, *extra,
    )  # fmt: skip
    assert isinstance(started, dict), started
    assert started["rollout_id"] == rollout_id
    assert started["model"] == model
    return started


def deploy(fleet: Fleet, model: str, rollout_id: str, nodes: Sequence[str]) -> None:
    """Put every node on ``model`` with a one-wave rollout (the starting point of a test)."""
    start_rollout(fleet, model, rollout_id, extra=QUICK_GATE)
    done = fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    assert done["state"] == "succeeded", f"{done}\n{fleet.diagnostics()}"
    fleet.wait_nodes(nodes, model=model, timeout_s=30.0)


def final_status(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    """``fleetctl rollout status ID --json``: what an operator's script reads."""
    status = fleet.fleetctl("rollout", "status", rollout_id)
    assert isinstance(status, dict)
    return status


def node_models(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """``fleetctl nodes --json`` by node id."""
    return {row["node_id"]: row for row in fleet.fleetctl("nodes")}


def sqlite_url(fleet: Fleet) -> str:
    return f"sqlite:///{fleet.root / 'fleet.db'}"


def wait_for_baseline(fleet: Fleet, db_url: str, nodes: Sequence[str], sha256: str) -> None:
    """Wait until every node has reported telemetry of ``sha256`` with traffic: the
    baseline the health gate compares the next version's latency with."""
    since = time.time()

    def ready() -> bool:
        good = {
            row["node_id"]
            for row in telemetry(db_url, since)
            if row["model_sha256"] == sha256 and row["inferences"] > 0 and row["p95_ms"] > 0
        }
        return good >= set(nodes)

    fleet.wait_until(ready, timeout_s=30.0, what="telemetry of the running model from every node")


def assert_all_on(fleet: Fleet, nodes: Sequence[str], model: str) -> None:
    rows = node_models(fleet)
    running = {node: model_of(rows[node]) for node in nodes}
    assert running == dict.fromkeys(nodes, model), f"{running}\n{fleet.diagnostics()}"
