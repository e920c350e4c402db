"""Carrying out rollout actions: draw a sequence number, sign, publish.

The decisions are elsewhere: the engine (:mod:`fleet_controller.rollout_core`)
chooses the action, :func:`fleet_controller.commands.plan_command` turns it
into a command. This shell loads the manifests a plan needs, signs it with the
rollout key under the next number of the store's command counter, and
publishes it.

Failure policy of :meth:`ActionExecutor.execute`: a broker failure or a
missing manifest is logged and swallowed, because the engine recovers (a node
that never got its command times out and is retried with a fresh one);
anything else propagates, so the caller can fail the rollout.
"""

from __future__ import annotations

import asyncio
import logging

from fleet_controller import rollout_core as core
from fleet_controller.commands import CommandPlan, manifests_needed, plan_command
from fleet_controller.link import ControllerLink
from fleet_controller.signing import sign_command
from fleet_controller.store import Store
from shared import topics
from shared.envelope import Envelope, SigningKey
from shared.errors import EdgeFleetError, TransportError

__all__ = ["ActionExecutor", "CommandSender"]

log = logging.getLogger(__name__)


class CommandSender:
    """Signs command plans with the rollout key and publishes them."""

    def __init__(self, *, link: ControllerLink, store: Store, key: SigningKey, fleet: str) -> None:
        self._link = link
        self._store = store
        self._key = key
        self._fleet = fleet

    async def send(self, plan: CommandPlan, *, rollout_id: str, now: float) -> None:
        """Raises: TransportError (not sent), StoreError (no sequence number)."""
        # Never below the clock in ms: a controller whose database was lost
        # still numbers above what nodes have applied.
        seq = await asyncio.to_thread(self._store.next_command_seq, int(now * 1000))
        _, envelope = sign_command(
            self._key,
            fleet=self._fleet,
            seq=seq,
            target=plan.target,
            body=plan.body,
            now=now,
            rollout_id=rollout_id,
        )
        await self._link.publish(
            plan.topic(self._fleet, rollout_id), envelope.to_bytes(), qos=1, retain=plan.retained
        )


class ActionExecutor:
    """Carries out the engine's actions for one rollout record."""

    def __init__(
        self,
        *,
        sender: CommandSender,
        link: ControllerLink,
        store: Store,
        fleet: str,
        artifact_base: str | None,
    ) -> None:
        self._sender = sender
        self._link = link
        self._store = store
        self._fleet = fleet
        self._artifact_base = artifact_base

    async def clear_broadcast(self, rollout_id: str) -> None:
        """Clear the rollout's retained command. Raises: TransportError."""
        await self._link.publish(topics.rollout_cmd(self._fleet, rollout_id), b"", retain=True)

    async def clear_node_state(self, node_id: str) -> None:
        """Clear a node's retained birth or death (a forgotten node is not learnt
        again from it at the next start). Raises: TransportError."""
        await self._link.publish(topics.state(self._fleet, node_id), b"", retain=True)

    async def execute(
        self, record: core.RolloutRecord, action: core.RolloutAction, now: float
    ) -> None:
        """Carry out ``action``; see the module docstring for which failures propagate."""
        rollout_id = record.spec.rollout_id
        try:
            if isinstance(action, core.ClearBroadcast):
                await self.clear_broadcast(rollout_id)
                return
            manifests = await asyncio.to_thread(self._manifests, manifests_needed(record, action))
            plan = plan_command(record, action, manifests, self._artifact_base)
            if plan is None:
                return
            await self._sender.send(plan, rollout_id=rollout_id, now=now)
        except TransportError as exc:
            log.warning("rollout %s: publish failed (%s); the engine retries", rollout_id, exc)
            return
        except EdgeFleetError as exc:
            log.error("rollout %s: cannot send %s: %s", rollout_id, action, exc)
            return
        if isinstance(action, core.SendWave):
            log.info("rollout %s: wave %d sent", rollout_id, action.wave + 1)

    def _manifests(self, shas: tuple[str, ...]) -> dict[str, Envelope]:
        """The registered manifests of ``shas`` (unknown ones left out). Raises: StoreError."""
        found: dict[str, Envelope] = {}
        for sha in shas:
            info = self._store.models.by_sha(sha)
            if info is not None:
                found[sha] = Envelope.from_bytes(info.envelope.encode())
        return found
