"""No failing part ends a node: each background loop's dependency broken in turn.

A real Mosquitto, real onnxruntime, a real outbox and state file; one
dependency of one loop is made to raise an unexpected error a few times (a
fault injected into the real object), then heals. The node must log and count
the failure, start the loop again, and keep serving: results reach the
controller afterwards and ``run()`` has not ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerFactory
from tests.support.harness import Harness, start_node
from tests.support.node_checks import DEADLINE_S, poll_until

pytestmark = pytest.mark.integration

FAILURES = 1  # calls that raise before the dependency heals


class InjectedFaultError(RuntimeError):
    """The unexpected error a broken dependency raises."""


def break_for(target: Any, attr: str, times: int) -> Callable[[], int]:
    """Make ``target.attr`` raise for its next ``times`` calls; returns how many raised."""
    real = getattr(target, attr)
    raised = [0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        if raised[0] < times:
            raised[0] += 1
            raise InjectedFaultError(f"{attr} broken for the test")
        return real(*args, **kwargs)

    setattr(target, attr, broken)
    return lambda: raised[0]


# (loop, where its dependency lives on the agent, method)
CASES = [
    ("sender", "_outbox", "due"),
    ("telemetry", "_outbox", "stats"),
    ("batcher", "_outbox", "put_many"),
    ("commands", "_store", "save"),
    ("inference", "_runtime", "acquire_blocking"),
]


@pytest.mark.parametrize(("loop", "part", "method"), CASES, ids=[c[0] for c in CASES])
def test_a_loop_whose_dependency_fails_is_restarted_and_the_node_keeps_serving(
    broker_factory: BrokerFactory,
    fleet_id: str,
    tmp_path: Path,
    classifier_v1: Path,
    loop: str,
    part: str,
    method: str,
) -> None:
    async def scenario() -> None:
        async with Harness(broker_factory().url, fleet_id, tmp_path / "harness") as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            async with start_node(
                harness, "n1", tmp_path / "n1", source="synthetic", rate_hz=50.0
            ) as node:
                command = await harness.deploy("n1", model)
                await harness.wait_state(command, "activated")
                raised = break_for(getattr(node.agent, part), method, FAILURES)
                if loop == "commands":  # its dependency is used on the next command
                    await harness.deploy("n1", model, rollout_id="again")
                await poll_until(lambda: raised() >= 1, timeout_s=DEADLINE_S, what="the fault")
                await poll_until(
                    lambda: node.agent.stats()["task_restarts"] >= 1,
                    timeout_s=DEADLINE_S,
                    what=f"the {loop} loop restarted",
                )
                seen = len(harness.results.get("n1", {}))
                await harness.wait_for(
                    lambda: len(harness.results.get("n1", {})) > seen + 20,
                    timeout_s=DEADLINE_S,
                    what="results after the fault",
                )
                assert not node.task.done()
                restarted = {name for name, n in node.agent.task_restarts.items() if n}
                assert any(name.startswith(loop) for name in restarted), restarted

    asyncio.run(scenario())
