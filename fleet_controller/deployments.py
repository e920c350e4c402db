"""Deployments: the operator operations and the reconciler that keeps groups on target.

``deployment.set`` records what the nodes a selector matches should run. A new
deployment, or a changed model or selector, starts a staged rollout over the
group at once (an active rollout of the deployment's previous target is
aborted first); a changed policy alone applies to the rollouts started from
then on. The reconciler (:meth:`Deployments.run`) then calls
:func:`fleet_controller.deployment_core.reconcile` for every deployment each
``interval_s`` while connected, records the nodes to hold and starts one
rollout to exactly the drifted nodes (late joiners, nodes back online after
the rollout ended, nodes that gained the group's labels), with the
deployment's policy: the same signatures, verification and health gate as any
rollout.

Failure isolation: a deployment whose step fails is logged and tried again at
the next pass; the others go on. Only the replica that leads
(:mod:`fleet_controller.leader`) reconciles; should two ever overlap (a
leader stalled past its lease), a rollout is started only after
:meth:`~fleet_controller.store.deployments.DeploymentRepository.claim` moved the
deployment from the rollout it read to the new one, which only one of them can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fleet_controller import rollout_core as core
from fleet_controller.deployment_core import (
    ACTIVE,
    Reconcile,
    busy_nodes,
    claimed_by_others,
    membership,
    reconcile,
)
from fleet_controller.handlers import OperatorHandlers
from fleet_controller.operator_api import Route, bind, route_table
from fleet_controller.plans import active_records, load_plan, running_manifests
from fleet_controller.store import DeploymentInfo, NodeInfo, Store
from fleet_controller.ticker import wait_or_stop
from fleet_controller.views import rollout_view
from shared import operations as ops
from shared.errors import EdgeFleetError, TransportError
from shared.labels import format_selector
from shared.messages import ModelManifest, ModelRef

__all__ = ["RECONCILE_EVERY_S", "Deployments"]

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 5.0
_SHOWN = 5  # node ids named in one log line
_RECONCILER = "deployment-reconciler"  # who the audit and the rollouts name


def _policy(request: ops.DeploymentSet) -> ops.RolloutPolicy:
    """The rollout tunables of ``request`` (its other fields are the deployment's)."""
    return ops.RolloutPolicy.model_validate(
        request.model_dump(include=set(ops.RolloutPolicy.model_fields))
    )


def _spec(info: DeploymentInfo, nodes: tuple[str, ...] = ()) -> core.RolloutSpec:
    """A new rollout of the deployment: over its group, or to ``nodes`` of it."""
    return core.RolloutSpec.from_policy(
        info.policy,
        rollout_id=f"{info.name[:48]}-{secrets.token_hex(4)}",
        model=info.model,
        selector=info.selector,
        nodes=nodes,
        deployment=info.name,
    )


def _shown(nodes: tuple[str, ...]) -> str:
    return ", ".join(nodes[:_SHOWN]) + (", ..." if len(nodes) > _SHOWN else "")


class Deployments:
    """The ``deployment.*`` operations and the reconciler."""

    def __init__(
        self,
        *,
        store: Store,
        handlers: OperatorHandlers,
        connected: asyncio.Event,
        leading: Callable[[], bool],
        clock: Callable[[], float],
        interval_s: float = RECONCILE_EVERY_S,
    ) -> None:
        self._store = store
        self._handlers = handlers
        self._connected = connected
        self._leading = leading
        self._clock = clock
        self._interval_s = interval_s

    def routes(self) -> dict[str, Route[Any]]:
        return route_table(
            bind(ops.DEPLOYMENT_SET, self.deployment_set),
            bind(ops.DEPLOYMENT_LIST, self.deployment_list),
            bind(ops.DEPLOYMENT_SHOW, self.deployment_show),
            bind(ops.DEPLOYMENT_DELETE, self.deployment_delete),
        )

    # ----- operations --------------------------------------------------------------------

    async def deployment_set(self, request: ops.DeploymentSet, operator: str) -> dict[str, Any]:
        model = await asyncio.to_thread(self._store.models.get, request.name, request.version)
        if model is None:
            raise EdgeFleetError(f"unknown model {request.model}: add it with `fleetctl model add`")
        now = self._clock()
        info = DeploymentInfo(
            name=request.deployment,
            selector=request.selector,
            model=ModelRef(name=model.name, version=model.version, sha256=model.sha256),
            policy=_policy(request),
            created_by=operator,
            created_at=now,
            updated_at=now,
        )
        old = await asyncio.to_thread(self._store.deployments.get, request.deployment)
        if old is not None and old.model == info.model and old.selector == info.selector:
            kept = await asyncio.to_thread(
                self._store.deployments.put, replace(info, rollout_id=old.rollout_id)
            )
            log.info("deployment %s: policy changed by %s", info.name, operator)
            return {**kept.to_dict(), "started": None}
        nodes = await asyncio.to_thread(self._store.nodes.list, info.selector)
        nodes = [n for n in nodes if not n.revoked]
        await asyncio.to_thread(self._refuse_conflicts, info, nodes)
        rollout: core.RolloutRecord | None = None
        if nodes:
            rollout = await self._staged(info, model.manifest, nodes, old, request.force)
        if old is not None and old.rollout_id is not None:
            await self._supersede(old.rollout_id, operator)
        if rollout is not None:
            await asyncio.to_thread(self._store.rollouts.create, rollout, operator, now)
            info = replace(info, rollout_id=rollout.spec.rollout_id)
        stored = await asyncio.to_thread(self._store.deployments.put, info)
        log.info(
            "deployment %s: %s on %s set by %s%s",
            info.name,
            request.model,
            format_selector(info.selector) or "(every node)",
            operator,
            f", rollout {info.rollout_id} started" if rollout is not None else "",
        )
        return {**stored.to_dict(), "started": None if rollout is None else rollout_view(rollout)}

    def _refuse_conflicts(self, info: DeploymentInfo, nodes: list[NodeInfo]) -> None:
        """Raises: EdgeFleetError when another deployment with another model selects
        some of ``nodes`` (a node follows one deployment); StoreError."""
        others = [(d.name, d.selector, d.model) for d in self._store.deployments.list()]
        claimed = claimed_by_others(info.name, info.model, others, nodes)
        if claimed:
            node, other = sorted(claimed.items())[0]
            raise EdgeFleetError(
                f"deployment not set: {len(claimed)} of its nodes (e.g. {node}) are in "
                f"deployment {other} too, with another model; a node follows one deployment"
            )

    async def _staged(
        self,
        info: DeploymentInfo,
        manifest: ModelManifest,
        nodes: list[NodeInfo],
        old: DeploymentInfo | None,
        force: bool,
    ) -> core.RolloutRecord:
        """The staged rollout of a new target over the group, checked like ``rollout start``
        (the deployment's own previous rollout, aborted next, is no overlap)."""
        spec = _spec(info)
        plan = await asyncio.to_thread(load_plan, self._store, spec, manifest, nodes)
        if old is not None and old.rollout_id is not None:
            others = {k: v for k, v in plan.overlapping.items() if k != old.rollout_id}
            plan = replace(plan, overlapping=others)
        if (why := plan.refusal(force=force)) is not None:
            raise EdgeFleetError(f"deployment not set: {why}")
        return core.RolloutRecord(spec=spec)

    async def _supersede(self, rollout_id: str, operator: str) -> None:
        """Abort the deployment's previous rollout if it is still active."""
        record = await asyncio.to_thread(self._store.rollouts.load, rollout_id)
        if record is None or record.state not in ACTIVE:
            return
        with contextlib.suppress(EdgeFleetError):  # it ended meanwhile
            await self._handlers.rollout_abort(ops.RolloutRef(rollout_id=rollout_id), operator)

    async def deployment_list(
        self, request: ops.DeploymentList, operator: str
    ) -> list[dict[str, Any]]:
        deployments = await asyncio.to_thread(self._store.deployments.list)
        nodes = await asyncio.to_thread(self._store.nodes.list) if deployments else []
        rows: list[dict[str, Any]] = []
        for d in deployments:
            group = membership(d.selector, d.model, d.held, nodes)
            rows.append(
                {
                    "name": d.name,
                    "selector": format_selector(d.selector),
                    "model": f"{d.model.name}@{d.model.version}",
                    "nodes": len(group.members),
                    "on_target": len(group.on_target),
                    "drifted": len(group.drifted),
                    "offline": len(group.offline),
                    "held": len(group.held),
                    "rollout_id": d.rollout_id,
                }
            )
        return rows

    async def deployment_show(self, request: ops.DeploymentRef, operator: str) -> dict[str, Any]:
        info = await self._get(request.deployment)
        nodes = await asyncio.to_thread(self._store.nodes.list, info.selector)
        group = membership(info.selector, info.model, info.held, nodes)
        last = None
        if info.rollout_id is not None:
            last = await asyncio.to_thread(self._store.rollouts.load, info.rollout_id)
        every = await asyncio.to_thread(self._store.deployments.list)
        step, _ = await asyncio.to_thread(self._decide, info, every)
        return {
            **info.to_dict(),
            **group.to_dict(),
            "rollout_state": None if last is None else last.state.value,
            "waiting": step.waiting,
            "conflicts": dict(step.conflicts),
        }

    async def deployment_delete(self, request: ops.DeploymentRef, operator: str) -> dict[str, Any]:
        await self._get(request.deployment)
        await asyncio.to_thread(self._store.deployments.delete, request.deployment)
        log.info(
            "deployment %s deleted by %s (its nodes keep their models)",
            request.deployment,
            operator,
        )
        return {"name": request.deployment, "deleted": True}

    async def _get(self, name: str) -> DeploymentInfo:
        info = await asyncio.to_thread(self._store.deployments.get, name)
        if info is None:
            raise EdgeFleetError(f"unknown deployment {name}")
        return info

    # ----- the reconciler ------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile every deployment each ``interval_s`` while connected and leading,
        until ``stopping``."""
        while not await wait_or_stop(stopping, self._interval_s):
            if self._connected.is_set() and self._leading():
                await self.reconcile_all()

    async def reconcile_all(self) -> None:
        """One pass over every deployment; a failure stays with its deployment."""
        try:
            deployments = await asyncio.to_thread(self._store.deployments.list)
        except EdgeFleetError as exc:
            log.warning("cannot list deployments to reconcile: %s", exc)
            return
        for info in deployments:
            try:
                await self.reconcile_one(info, deployments)
            except (EdgeFleetError, TransportError) as exc:
                log.warning("deployment %s: reconcile postponed: %s", info.name, exc)

    async def reconcile_one(self, info: DeploymentInfo, every: list[DeploymentInfo]) -> None:
        """Hold the nodes the deployment failed on; bring drifted members to the target
        (``every``: all deployments, to leave alone the nodes another one claims)."""
        step, manifest = await asyncio.to_thread(self._decide, info, every)
        now = self._clock()
        if step.hold:
            for node_id, why in sorted(step.hold.items()):
                log.info("deployment %s: holding node %s: %s", info.name, node_id, why)
            await asyncio.to_thread(
                lambda: self._store.deployments.hold(
                    info.name, info.model.sha256, step.hold, now=now
                )
            )
        if not step.start or manifest is None:
            return
        spec = _spec(info, step.start)
        claimed = await asyncio.to_thread(
            lambda: self._store.deployments.claim(info, spec.rollout_id, now=now)
        )
        if not claimed:
            return  # changed meanwhile (an operator, or another controller): next pass
        record = core.RolloutRecord(spec=spec)
        await asyncio.to_thread(self._store.rollouts.create, record, _RECONCILER, now)
        log.info(
            "deployment %s: rollout %s brings %d node(s) to %s@%s: %s",
            info.name,
            spec.rollout_id,
            len(step.start),
            info.model.name,
            info.model.version,
            _shown(step.start),
        )

    def _decide(
        self, info: DeploymentInfo, every: list[DeploymentInfo]
    ) -> tuple[Reconcile, ModelManifest | None]:
        """Read what :func:`reconcile` needs and ask it (blocking). Raises: StoreError."""
        last = None
        if info.rollout_id is not None:
            last = self._store.rollouts.load(info.rollout_id)
        if last is not None and last.state in ACTIVE:
            return Reconcile(), None
        model = self._store.models.by_sha(info.model.sha256)
        if model is None:
            return Reconcile(waiting=f"model {info.model.sha256[:12]} is not registered"), None
        nodes = self._store.nodes.list()
        active = active_records(self._store)
        others = [(d.name, d.selector, d.model) for d in every]
        step = reconcile(
            selector=info.selector,
            target=info.model,
            manifest=model.manifest,
            held=info.held,
            last=last,
            nodes=nodes,
            running=running_manifests(self._store, nodes),
            busy=busy_nodes(active, nodes),
            claimed=claimed_by_others(info.name, info.model, others, nodes),
        )
        return step, model.manifest
