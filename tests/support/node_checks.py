"""Small helpers for node tests on the :class:`~tests.support.harness.Harness`.

Waits are on messages the harness records, or polls of node-side state
against a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.messages import InferenceResult, NodeStatus
from tests.support.harness import Harness, Registered, RunningNode

DEADLINE_S = 20.0


def statuses(harness: Harness, node: str, command_id: str | None = None) -> list[NodeStatus]:
    """Statuses ``node`` sent (for ``command_id`` when given), in arrival order."""
    return [
        s
        for s in harness.statuses
        if s.node == node and (command_id is None or s.command_id == command_id)
    ]


def states(harness: Harness, node: str, command_id: str) -> list[str]:
    return [s.state.value for s in statuses(harness, node, command_id)]


async def wait_node_state(harness: Harness, node: str, command_id: str, state: str) -> None:
    await harness.wait_for(
        lambda: state in states(harness, node, command_id),
        timeout_s=DEADLINE_S,
        what=f"{node} to report {state} for {command_id} "
        f"(seen {states(harness, node, command_id)})",
    )


async def wait_status(
    harness: Harness, node: str, predicate: Callable[[NodeStatus], bool], *, after: int, what: str
) -> NodeStatus:
    """The first status of ``node`` past ``harness.statuses[after]`` matching ``predicate``."""

    def found() -> NodeStatus | None:
        return next((s for s in harness.statuses[after:] if s.node == node and predicate(s)), None)

    await harness.wait_for(lambda: found() is not None, timeout_s=DEADLINE_S, what=what)
    status = found()
    assert status is not None
    return status


def requests_for(harness: Harness, sha256: str, *, after: int = 0) -> list[int]:
    """Where each chunk request for ``sha256`` past ``harness.chunk_requests[after]`` starts."""
    return [r.ranges[0][0] for r in harness.chunk_requests[after:] if r.sha256 == sha256]


def store_files(data: Path) -> set[str]:
    return {p.name for p in (data / "models").iterdir()}


async def deploy_and_wait(harness: Harness, node: str, model: Registered, rollout: str) -> str:
    """Deploy ``model`` to ``node`` and wait for its job's last status, ``activated``."""
    command = await harness.deploy(node, model, rollout_id=rollout)
    await wait_node_state(harness, node, command, "activated")
    return command


async def poll_until(
    predicate: Callable[[], bool], *, timeout_s: float = 30.0, what: str, every_s: float = 0.01
) -> None:
    """Re-check ``predicate`` every ``every_s`` until it holds or ``timeout_s`` passes.

    For node-side state (outbox depth, counters) that no harness message announces.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(every_s)  # poll against the deadline


# ----- results and the outbox ----------------------------------------------------

NODE = "n1"


def results_of(harness: Harness, node: str = NODE) -> dict[int, InferenceResult]:
    return harness.results.get(node, {})


def assert_contiguous(seqs: list[int], what: str) -> None:
    assert seqs, f"no {what}"
    ordered = sorted(seqs)
    missing = sorted(set(range(ordered[0], ordered[-1] + 1)) - set(ordered))
    assert not missing, f"{what}: {len(missing)} missing, first {missing[:10]}"
    assert len(ordered) == len(set(ordered)), f"{what}: duplicates"


def first_arrivals(seqs: list[int]) -> list[int]:
    """``seqs`` without repeats, each at its first arrival (QoS 1 may deliver twice)."""
    return list(dict.fromkeys(seqs))


async def wait_drained(node: RunningNode, *, what: str) -> tuple[int, int]:
    """Poll until the node's outbox is empty: every slot written so far is acknowledged.

    Returns ``(results, last_slot)`` read in the same step as the depth: how many
    results had reached the outbox by then, and the last slot assigned. (A node's
    stop only sends what it can, so tests check delivery on a running node.)
    """
    seen: list[tuple[int, int]] = []

    def drained() -> bool:
        outbox = node.agent.outbox_stats()
        if outbox.depth:
            return False
        stats = node.agent.stats()
        seen.append((stats["inferences"] - stats["pending"], outbox.last_seq))
        return True

    await poll_until(drained, what=what)
    return seen[-1]


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write atomically: the directory source must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")  # dot files are ignored by the source
    with tmp.open("wb") as handle:
        np.save(handle, array)
    tmp.replace(path)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
