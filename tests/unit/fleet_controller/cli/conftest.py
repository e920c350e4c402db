"""Fixtures for ``fleetctl`` without a broker.

Every command that could reach a broker points ``--broker`` at a closed port
(:func:`closed_broker`), so a check that wrongly runs after connecting shows up
as exit code 1 and a "cannot reach the broker" line instead of the expected
answer. :func:`calls` replaces the operator API client with a recording fake.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fleet_controller.cli import common
from fleet_controller.keys import init_keys
from shared.operations import Operation
from tests.support.broker import free_port
from tests.unit.fleet_controller.cli._kit import EVENTS, SHA


@pytest.fixture
def closed_broker() -> str:
    """A broker URL nothing listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record operator API calls; answer like the controller would."""
    seen: list[tuple[str, dict[str, Any]]] = []
    rollout = {
        "rollout_id": "r1",
        "model": "c@1.0.0",
        "sha256": SHA,
        "state": "pending",
        "wave": 1,
        "waves": [1.0, 100.0],
        "selector": "site=a",
        "reason": None,
        "nodes_total": 0,
        "counts": {},
    }

    async def fake(settings: common.Settings, op: Operation[Any], args: Any = None) -> Any:
        seen.append((op.name, dict(args or {})))
        if op.name == "nodes.list":
            return [{"node_id": "n1", "online": True, "labels": {"site": "a"}, "model": None}]
        if op.name == "rollout.events":
            return EVENTS
        if op.name in ("audit.list", "deployment.list"):
            return []
        if op.name == "node.label":
            return {
                "node_id": "n1",
                "labels": {"site": "b"},
                "announced_labels": {"site": "a", "gpu": "1"},
                "central_labels": {"site": "b", "gpu": None},
            }
        if op.name.startswith("deployment."):
            return {"name": "cams", "model": "c@1.0.0", "held": {"n9": "rejected in r0"}}
        return rollout

    monkeypatch.setattr(common, "call", fake)
    return seen


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    init_keys(directory, now=time.time())
    return directory
