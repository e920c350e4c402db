"""JSON views of rollout records for operator replies (``fleetctl ... --json`` prints them).

Waves count from 1 for operators; the engine counts from 0.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fleet_controller.rollout_core import NodeProgress, RolloutRecord
from shared.labels import format_selector

__all__ = ["rollout_view"]


def _node_view(p: NodeProgress) -> dict[str, Any]:
    return {
        "node": p.node_id,
        "wave": p.wave + 1,
        "state": p.state.value,
        "attempts": p.attempts,
        "code": p.code,
        "reason": p.reason,
        "from": f"{p.from_model.name}@{p.from_model.version}" if p.from_model else None,
    }


def rollout_view(record: RolloutRecord, *, nodes: bool = False) -> dict[str, Any]:
    """A rollout's summary; with ``nodes``, every node's progress by wave and id."""
    spec = record.spec
    counts = Counter(p.state.value for p in record.nodes.values())
    result: dict[str, Any] = {
        "rollout_id": spec.rollout_id,
        "model": f"{spec.model.name}@{spec.model.version}",
        "sha256": spec.model.sha256,
        "state": record.state.value,
        "wave": record.wave + 1,
        "waves": list(spec.waves),
        "selector": format_selector(spec.selector),
        "deployment": spec.deployment,
        "reason": record.reason,
        "nodes_total": len(record.nodes),
        "counts": dict(counts),
    }
    if nodes:
        ordered = sorted(record.nodes.values(), key=lambda p: (p.wave, p.node_id))
        result["nodes"] = [_node_view(p) for p in ordered]
    return result
