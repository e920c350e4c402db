"""What a rollout would do before anything moves: the plan of ``rollout start``.

:func:`plan_rollout` takes the rollout's spec and the new model's manifest, the
selected nodes as the controller knows them (labels, online, the model each
runs and its manifest, the capabilities of each one's last birth) and the
active rollouts, and returns the :class:`Plan`: the nodes of each wave, those
offline, those that would refuse and why, and the active rollouts that already
target some of the same nodes. ``rollout start --dry-run`` prints it; without
``--dry-run`` the controller refuses a rollout every selected node would refuse,
or one that overlaps an active rollout (unless forced). Pure: no I/O, no clock.

A node would refuse (or could not run the model) when:

* the model has the name of the one it runs and is not newer: a downgrade,
  which only a signed rollback may do (the node's own rule, ``edge_node.core``);
* the manifest names execution providers, not the CPU one, and the node has
  none of them;
* its inputs differ from those of the model it runs under the same name (the
  node's input source feeds the old spec);
* its last birth reported less free disk than the model's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet_controller.rollout_core import RolloutRecord, RolloutSpec, wave_of
from shared.labels import matches
from shared.messages import Capabilities, ModelManifest, ModelRef
from shared.version import SemVer

__all__ = ["CPU_PROVIDER", "NodeFacts", "Plan", "plan_rollout", "refusal"]

CPU_PROVIDER = "CPUExecutionProvider"
_SHOWN = 3  # nodes named in a one-line refusal


class NodeFacts(Protocol):
    """What the plan reads of a node (the store's ``NodeFacts`` has it all)."""

    @property
    def node_id(self) -> str: ...
    @property
    def online(self) -> bool: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def model(self) -> ModelRef | None: ...
    @property
    def capabilities(self) -> Capabilities | None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    waves: tuple[tuple[str, ...], ...]  # the nodes each wave adds
    offline: tuple[str, ...]
    refusing: Mapping[str, str] = field(default_factory=dict)  # node -> why
    overlapping: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rollout -> nodes

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for wave in self.waves for n in wave)

    def to_dict(self, spec: RolloutSpec) -> dict[str, Any]:
        """JSON-ready: what ``rollout start --dry-run --json`` prints."""
        return {
            "rollout_id": spec.rollout_id,
            "model": f"{spec.model.name}@{spec.model.version}",
            "waves": [
                {"wave": i + 1, "percent": percent, "nodes": list(nodes)}
                for i, (percent, nodes) in enumerate(zip(spec.waves, self.waves, strict=True))
            ],
            "offline": list(self.offline),
            "refusing": [{"node": n, "reason": r} for n, r in sorted(self.refusing.items())],
            "overlapping": [
                {"rollout_id": r, "nodes": list(n)} for r, n in sorted(self.overlapping.items())
            ],
        }

    def refusal(self, *, force: bool = False) -> str | None:
        """Why the controller refuses to start this rollout, or None. ``force``
        allows an overlap with active rollouts, never a rollout all would refuse."""
        if self.nodes and set(self.nodes) <= set(self.refusing):
            first = sorted(self.refusing.items())[0]
            return (
                f"every selected node ({len(self.nodes)}) would refuse it, "
                f"e.g. {first[0]}: {first[1]}"
            )
        if self.overlapping and not force:
            rollout_id, nodes = sorted(self.overlapping.items())[0]
            shown = ", ".join(nodes[:_SHOWN]) + (", ..." if len(nodes) > _SHOWN else "")
            return (
                f"rollout {rollout_id} is active on {len(nodes)} of these nodes ({shown}): "
                "wait for it, abort it, or start with --force"
            )
        return None


def refusal(manifest: ModelManifest, node: NodeFacts, running: ModelManifest | None) -> str | None:
    """Why ``node`` would refuse or could not run ``manifest``, or None."""
    active = node.model
    if active is not None and _downgrade(manifest, active):
        return (
            f"downgrade: {manifest.version} is not newer than {active.version} "
            "(only a rollback may)"
        )
    if _no_provider(manifest, node.capabilities):
        return f"no execution provider of {', '.join(manifest.providers)} on the node"
    if running is not None and running.name == manifest.name and running.inputs != manifest.inputs:
        return "inputs differ from the running model's: its input source would not fit"
    if node.capabilities is not None and node.capabilities.disk_free_bytes < manifest.size:
        return (
            f"{node.capabilities.disk_free_bytes} bytes free by its last birth, "
            f"the model needs {manifest.size}"
        )
    return None


def _downgrade(manifest: ModelManifest, active: ModelRef) -> bool:
    """The node's own rule (``edge_node.core``): same name, other build, not newer."""
    if active.name != manifest.name or active.sha256 == manifest.sha256:
        return False
    return SemVer.parse(manifest.version) <= SemVer.parse(active.version)


def _no_provider(manifest: ModelManifest, capabilities: Capabilities | None) -> bool:
    """The manifest asks for accelerators only, and the node has none of them."""
    wanted = set(manifest.providers)
    if capabilities is None or not wanted or CPU_PROVIDER in wanted:
        return False
    return not wanted & set(capabilities.providers)


def _targets(record: RolloutRecord, nodes: Sequence[NodeFacts]) -> set[str]:
    """The nodes an active rollout has enrolled or will enrol among ``nodes``."""
    selected = {
        n.node_id
        for n in nodes
        if matches(record.spec.selector, n.labels) and wave_of(record.spec, n.node_id) is not None
    }
    return selected | set(record.nodes)


def plan_rollout(
    spec: RolloutSpec,
    manifest: ModelManifest,
    nodes: Sequence[NodeFacts],
    running: Mapping[str, ModelManifest],
    active: Sequence[RolloutRecord],
) -> Plan:
    """The plan of ``spec`` over ``nodes`` (the selected, unrevoked ones).

    ``running``: manifests of the models the nodes run, by sha256 (a model the
    controller does not know is missing); ``active``: the active rollouts.
    """
    by_wave: list[list[str]] = [[] for _ in spec.waves]
    refusing: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n.node_id):
        wave = wave_of(spec, node.node_id)
        if wave is None:
            continue
        by_wave[wave].append(node.node_id)
        current = running.get(node.model.sha256) if node.model is not None else None
        why = refusal(manifest, node, current)
        if why is not None:
            refusing[node.node_id] = why
    planned = {n for wave in by_wave for n in wave}
    overlapping = {}
    for record in active:
        if record.spec.rollout_id == spec.rollout_id:
            continue
        shared = sorted(planned & _targets(record, nodes))
        if shared:
            overlapping[record.spec.rollout_id] = tuple(shared)
    offline = tuple(n.node_id for n in sorted(nodes, key=lambda n: n.node_id) if not n.online)
    return Plan(
        waves=tuple(tuple(w) for w in by_wave),
        offline=tuple(n for n in offline if n in planned),
        refusing=refusing,
        overlapping=overlapping,
    )
