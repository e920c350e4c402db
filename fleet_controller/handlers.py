"""The operator API's handlers: one method per operation, each taking its typed request.

:meth:`OperatorHandlers.routes` is the dispatch table (built with
:func:`fleet_controller.operator_api.bind`, so a type checker holds every
handler to its operation's request model). Handlers get requests that already
validated (:mod:`shared.operations`), so they check only what needs the store,
the trust list or the broker, and raise:

* ``UsageError`` / ``DecodeError`` for input that is wrong in itself
  (answered with code 2, audited as ``refused``);
* ``EdgeFleetError`` for an operation that cannot be done now or here
  (code 1, ``failed``).

A rollout's state changes go through ``store.rollouts.step`` (the same
transaction discipline as the ticker), then the broadcast of a rollout that
ended is cleared and its nodes still working get a ``cancel``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from edgefleet_io.files import atomic_write
from fleet_controller import rollout_core as core
from fleet_controller.actions import ActionExecutor, CommandSender
from fleet_controller.artifacts import Artifacts
from fleet_controller.commands import plan_trust_update
from fleet_controller.dynsec import revoke_node
from fleet_controller.operator_api import Route, bind, route_table
from fleet_controller.plan_core import Plan
from fleet_controller.plans import load_plan
from fleet_controller.steps import event_step, logged
from fleet_controller.store import ACTIVE_ROLLOUT_STATES, NodeInfo, Store
from fleet_controller.views import rollout_view
from shared import operations as ops
from shared.envelope import Envelope, b64decode
from shared.errors import EdgeFleetError, UsageError
from shared.labels import format_labels, format_selector
from shared.messages import ModelManifest, ModelRef, decode
from shared.trust import Role, TrustStore

__all__ = ["OperatorHandlers"]

log = logging.getLogger(__name__)


class OperatorHandlers:
    def __init__(
        self,
        *,
        store: Store,
        artifacts: Artifacts,
        executor: ActionExecutor,
        sender: CommandSender,
        trust: TrustStore,
        trust_file: Path,
        clock: Callable[[], float],
        metrics: Counter[str],
        broker_control: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None,
    ) -> None:
        self._broker_control = broker_control
        self._store = store
        self._artifacts = artifacts
        self._executor = executor
        self._sender = sender
        self._trust = trust
        self._trust_file = trust_file
        self._clock = clock
        self._metrics = metrics

    @property
    def trust(self) -> TrustStore:
        """The trust list the controller believes now (it changes on ``trust.push``)."""
        return self._trust

    def routes(self) -> dict[str, Route[Any]]:
        """The dispatch table: every operation of :data:`shared.operations.OPERATIONS`."""
        return route_table(
            bind(ops.MODEL_UPLOAD, self.model_upload),
            bind(ops.MODEL_ADD, self.model_add),
            bind(ops.MODEL_LIST, self.model_list),
            bind(ops.ROLLOUT_START, self.rollout_start),
            bind(ops.ROLLOUT_STATUS, self.rollout_status),
            bind(ops.ROLLOUT_LIST, self.rollout_list),
            bind(ops.ROLLOUT_EVENTS, self.rollout_events),
            bind(ops.ROLLOUT_PAUSE, self.rollout_pause),
            bind(ops.ROLLOUT_RESUME, self.rollout_resume),
            bind(ops.ROLLOUT_ABORT, self.rollout_abort),
            bind(ops.ROLLOUT_ROLLBACK, self.rollout_rollback),
            bind(ops.NODES_LIST, self.nodes_list),
            bind(ops.NODE_REVOKE, self.node_revoke),
            bind(ops.NODE_FORGET, self.node_forget),
            bind(ops.NODE_LABEL, self.node_label),
            bind(ops.TRUST_PUSH, self.trust_push),
            bind(ops.AUDIT_LIST, self.audit_list),
            bind(ops.REPORT, self.report),
        )

    # ----- models ------------------------------------------------------------------------

    async def model_upload(self, request: ops.ModelUpload, operator: str) -> dict[str, Any]:
        data = b64decode(request.data, "data")
        return await asyncio.to_thread(
            self._artifacts.receive_upload, request.sha256, request.offset, request.size, data
        )

    async def model_add(self, request: ops.ModelAdd, operator: str) -> dict[str, Any]:
        envelope = Envelope.from_bytes(request.envelope.encode())
        payload = self._trust.open(envelope, Role.RELEASE, now=self._clock())
        manifest = decode(ModelManifest, payload)
        same = await asyncio.to_thread(self._store.models.by_sha, manifest.sha256)
        if same is not None:
            raise EdgeFleetError(
                f"this file is registered already as {same.name}@{same.version}; "
                "a new version must be a new file"
            )
        blobs = self._artifacts.blobs
        if not blobs.has(manifest.sha256) or blobs.size(manifest.sha256) != manifest.size:
            raise EdgeFleetError(f"blob {manifest.sha256[:12]} has not been uploaded")
        info = await asyncio.to_thread(
            self._store.models.add, manifest, request.envelope, operator, self._clock()
        )
        return info.to_dict()

    async def model_list(self, request: ops.ModelList, operator: str) -> list[dict[str, Any]]:
        return [m.to_dict() for m in await asyncio.to_thread(self._store.models.list)]

    # ----- rollouts ----------------------------------------------------------------------

    async def rollout_start(self, request: ops.RolloutStart, operator: str) -> dict[str, Any]:
        info = await asyncio.to_thread(self._store.models.get, request.name, request.version)
        if info is None:
            raise EdgeFleetError(f"unknown model {request.model}: add it with `fleetctl model add`")
        selector = request.selector
        nodes = await asyncio.to_thread(self._store.nodes.list, selector)
        if not [n for n in nodes if not n.revoked]:
            raise EdgeFleetError(
                f"selection {format_selector(selector) or '(all)'} matches no known node"
            )
        rollout_id = request.rollout_id or f"r-{secrets.token_hex(4)}"
        if await asyncio.to_thread(self._store.rollouts.load, rollout_id) is not None:
            raise UsageError(f"rollout {rollout_id} exists already")
        spec = core.RolloutSpec.from_policy(
            request,
            rollout_id=rollout_id,
            model=ModelRef(name=info.name, version=info.version, sha256=info.sha256),
            selector=selector,
        )
        plan = await asyncio.to_thread(self._plan, spec, info.manifest, nodes)
        if request.dry_run:
            return {"dry_run": True, **plan.to_dict(spec)}
        if (why := plan.refusal(force=request.force)) is not None:
            raise EdgeFleetError(f"rollout not started: {why}")
        record = core.RolloutRecord(spec=spec)
        await asyncio.to_thread(self._store.rollouts.create, record, operator, self._clock())
        return rollout_view(record)

    def _plan(self, spec: core.RolloutSpec, manifest: ModelManifest, nodes: list[NodeInfo]) -> Plan:
        """The plan of ``spec`` (:func:`plan_rollout`), from the store (blocking)."""
        return load_plan(self._store, spec, manifest, nodes)

    async def _record(self, rollout_id: str) -> core.RolloutRecord:
        record = await asyncio.to_thread(self._store.rollouts.load, rollout_id)
        if record is None:
            raise EdgeFleetError(f"unknown rollout {rollout_id}")
        return record

    async def rollout_status(self, request: ops.RolloutRef, operator: str) -> dict[str, Any]:
        return rollout_view(await self._record(request.rollout_id), nodes=True)

    async def rollout_list(self, request: ops.RolloutList, operator: str) -> list[dict[str, Any]]:
        infos = await asyncio.to_thread(self._store.rollouts.list, request.active_only)
        # Waves count from 1 for operators, as in rollout.status.
        return [{**i.to_dict(), "wave": i.wave + 1} for i in infos]

    async def rollout_events(self, request: ops.RolloutRef, operator: str) -> list[dict[str, Any]]:
        """Per-node state changes, oldest first."""
        events = await asyncio.to_thread(self._store.rollouts.events, request.rollout_id)
        if not events:
            await self._record(request.rollout_id)  # unknown: say so rather than []
        return [e.to_dict() for e in events]

    async def rollout_pause(self, request: ops.RolloutRef, operator: str) -> dict[str, Any]:
        return await self._change(request.rollout_id, core.RolloutEvent.PAUSE, operator)

    async def rollout_resume(self, request: ops.RolloutRef, operator: str) -> dict[str, Any]:
        return await self._change(request.rollout_id, core.RolloutEvent.RESUME, operator)

    async def rollout_abort(self, request: ops.RolloutRef, operator: str) -> dict[str, Any]:
        return await self._change(request.rollout_id, core.RolloutEvent.ABORT, operator)

    async def rollout_rollback(self, request: ops.RolloutRef, operator: str) -> dict[str, Any]:
        return await self._change(request.rollout_id, core.RolloutEvent.ROLLBACK, operator)

    async def _change(
        self, rollout_id: str, event: core.RolloutEvent, operator: str
    ) -> dict[str, Any]:
        now = self._clock()
        changes: list[str] = []
        decide = logged(event_step(event, now), changes, operator=operator)
        try:
            new, _ = await asyncio.to_thread(self._store.rollouts.step, rollout_id, decide, now)
        except core.IllegalTransitionError as exc:
            raise EdgeFleetError(str(exc)) from None
        for line in changes:
            log.info("%s", line)
        if new.state not in ACTIVE_ROLLOUT_STATES:
            await self._executor.execute(new, core.ClearBroadcast(), now)
            for progress in new.nodes.values():
                if progress.state in core.IN_FLIGHT:
                    await self._executor.execute(
                        new, core.SendNode(progress.node_id, "cancel"), now
                    )
        return rollout_view(new)

    # ----- nodes, trust, audit, report ---------------------------------------------------

    async def nodes_list(self, request: ops.NodesList, operator: str) -> list[dict[str, Any]]:
        nodes = await asyncio.to_thread(self._store.nodes.list, request.selector)
        return [n.to_dict() for n in nodes]

    async def node_revoke(self, request: ops.NodeRevoke, operator: str) -> dict[str, Any]:
        """Mark the node revoked (rollouts no longer select it) and, behind a broker
        with dynamic security, remove its broker account: the broker disconnects it."""
        await asyncio.to_thread(
            functools.partial(self._store.nodes.set_revoked, request.node_id, revoked=True)
        )
        if self._broker_control is not None:
            try:
                await self._broker_control(revoke_node(request.node_id))
            except EdgeFleetError as exc:
                raise EdgeFleetError(
                    f"node {request.node_id} is marked revoked, but its broker account "
                    f"was not removed: {exc}"
                ) from None
            # The broker disconnected it and dropped its Will along with its account.
            await asyncio.to_thread(
                functools.partial(
                    self._store.nodes.set_revoked, request.node_id, revoked=True, offline=True
                )
            )
        log.info("node %s revoked by %s", request.node_id, operator)
        return {
            "node_id": request.node_id,
            "revoked": True,
            "broker_account_removed": self._broker_control is not None,
        }

    async def node_forget(self, request: ops.NodeForget, operator: str) -> dict[str, Any]:
        """Remove a node that is gone for good; its retained birth is cleared too,
        so no controller learns it again at start."""
        info = await asyncio.to_thread(self._store.nodes.forget, request.node_id)
        await self._executor.clear_node_state(request.node_id)
        log.info("node %s forgotten by %s", request.node_id, operator)
        return {"node_id": info.node_id, "forgotten": True}

    async def node_label(self, request: ops.NodeLabel, operator: str) -> dict[str, Any]:
        """Set, hide or reset the labels operators give a node; returns the node."""
        changes: dict[str, str | Literal[False] | None] = dict(request.set)
        changes.update(dict.fromkeys(request.hide, None))
        changes.update(dict.fromkeys(request.reset, False))
        info = await asyncio.to_thread(self._store.nodes.set_labels, request.node_id, changes)
        log.info(
            "node %s relabelled by %s: labels now %s",
            request.node_id,
            operator,
            format_labels(info.labels) or "(none)",
        )
        return info.to_dict()

    async def trust_push(self, request: ops.TrustPush, operator: str) -> dict[str, Any]:
        """Adopt a rotated trust list, keep it in the controller's ``trust.json``
        and broadcast it (retained) to every node.

        The list must be a valid rotation of the controller's own (signed by the
        current and the new root, newer, not expired), exactly as nodes check it.
        """
        envelope = Envelope.from_bytes(request.trust.encode())
        now = self._clock()
        rotated = self._trust.rotate(envelope, now=now)
        rollout_id = f"trust-v{rotated.version}"
        await self._sender.send(plan_trust_update(envelope), rollout_id=rollout_id, now=now)
        self._trust = rotated
        try:
            await asyncio.to_thread(
                atomic_write, self._trust_file, rotated.envelope_bytes(), mode=0o644
            )
        except OSError as exc:
            raise EdgeFleetError(
                f"trust v{rotated.version} is in force and sent, but {self._trust_file} "
                f"was not updated ({exc.strerror}): copy it there before a restart"
            ) from None
        return {"version": rotated.version, "rollout_id": rollout_id}

    async def audit_list(self, request: ops.AuditList, operator: str) -> list[dict[str, Any]]:
        entries = await asyncio.to_thread(self._store.audit.list, request.limit)
        return [e.to_dict() for e in entries]

    async def report(self, request: ops.Report, operator: str) -> dict[str, Any]:
        report = await asyncio.to_thread(self._store.results.report)
        return {**report, "controller": dict(self._metrics)}
