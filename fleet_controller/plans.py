"""Reading what a plan needs from the store (blocking: call it in a thread).

:func:`load_plan` gathers the manifests of the models nodes run and the active
rollouts, then asks :func:`fleet_controller.plan_core.plan_rollout`; the
operator handlers and the deployment reconciler both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleet_controller.plan_core import Plan, plan_rollout
from fleet_controller.rollout_records import RolloutRecord, RolloutSpec
from fleet_controller.store import NodeInfo, Store
from shared.messages import ModelManifest

__all__ = ["active_records", "load_plan", "running_manifests"]


def running_manifests(store: Store, nodes: Iterable[NodeInfo]) -> dict[str, ModelManifest]:
    """The registered manifests of the models ``nodes`` run, by sha256. Raises: StoreError."""
    running: dict[str, ModelManifest] = {}
    for sha in {n.model.sha256 for n in nodes if n.model is not None}:
        if (known := store.models.by_sha(sha)) is not None:
            running[sha] = known.manifest
    return running


def active_records(store: Store) -> list[RolloutRecord]:
    """The records of every active rollout. Raises: StoreError."""
    return [
        record
        for info in store.rollouts.list(active_only=True)
        if (record := store.rollouts.load(info.rollout_id)) is not None
    ]


def load_plan(
    store: Store, spec: RolloutSpec, manifest: ModelManifest, nodes: Sequence[NodeInfo]
) -> Plan:
    """The plan of ``spec`` for ``nodes`` (revoked ones left out). Raises: StoreError."""
    selected = [n for n in nodes if not n.revoked]
    return plan_rollout(
        spec, manifest, selected, running_manifests(store, selected), active_records(store)
    )
