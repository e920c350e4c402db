"""The rollout ticker and the pruner: the controller's clockwork.

Every ``tick_s`` while connected and leading (:mod:`fleet_controller.leader`),
each active rollout takes one step (:func:`fleet_controller.steps.tick_step`
inside ``store.rollouts.step``: its record is loaded once, new node statuses
are folded in, the engine decides, and the new record is saved in one
transaction) and only then are the step's actions carried out, so a restart
resumes every rollout and never sends a node the same step twice. Of several
replicas only the holder of the rollout lease ticks: each step presents the
lease's fence, checked in the step's transaction, so a replica that lost the
lease (stalled past it, say) writes nothing and steps down
(:class:`~fleet_controller.store.LeaseLostError`).

Failure isolation, per rollout:

* a passing trouble (the database or the broker is away: ``StoreError``,
  ``TransportError``) is logged and the rollout ticks again next time;
* anything else (a record that cannot be decoded, the engine raising, a bug)
  ends that rollout as ``failed`` with the reason, its retained broadcast
  cleared, logged with its id; the other rollouts keep ticking. If even that
  cannot be done now, it is tried again next tick.

Once an hour, telemetry and results older than ``retention_days`` are pruned;
a failed pruning is logged and tried again an hour later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleet_controller.actions import ActionExecutor
from fleet_controller.steps import logged, tick_step
from fleet_controller.store import (
    Fence,
    LeaseLostError,
    RecordError,
    Store,
    StoreError,
    UnknownRolloutError,
)
from shared.errors import EdgeFleetError, TransportError
from shared.messages import RolloutState

if TYPE_CHECKING:
    from fleet_controller.leader import Leadership

__all__ = ["PRUNE_EVERY_S", "RolloutTicker", "wait_or_stop"]

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
_REASON_MAX_CHARS = 500


class RolloutTicker:
    def __init__(
        self,
        store: Store,
        executor: ActionExecutor,
        *,
        leadership: Leadership,
        connected: asyncio.Event,
        clock: Callable[[], float],
        metrics: Counter[str],
        tick_s: float,
        retention_days: float,
    ) -> None:
        self._store = store
        self._executor = executor
        self._leadership = leadership
        self._connected = connected
        self._clock = clock
        self._metrics = metrics
        self._tick_s = tick_s
        self._retention_days = retention_days

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick every active rollout each ``tick_s`` while connected and leading,
        until ``stopping``."""
        while not await wait_or_stop(stopping, self._tick_s):
            if not self._connected.is_set() or self._leadership.fence is None:
                continue
            try:
                await self.tick_all()
            except Exception:  # tick_all isolates rollouts; this is a last resort
                log.exception("rollout tick failed")

    async def tick_all(self) -> None:
        """One step of every active rollout, under the held lease term (none: nothing)."""
        fence = self._leadership.fence
        if fence is None:
            return
        try:
            infos = await asyncio.to_thread(self._store.rollouts.list, active_only=True)
        except EdgeFleetError as exc:
            log.error("cannot list rollouts to tick: %s", exc)
            return
        for info in infos:
            if self._leadership.fence != fence:
                return  # the term ended: the new leader ticks the rest
            await self.tick_one(info.rollout_id, fence)

    async def tick_one(self, rollout_id: str, fence: Fence) -> None:
        """One step of one rollout and its actions under ``fence``; failures stay with
        this rollout (a lost lease ends this replica's leadership instead)."""
        try:
            await self._step(rollout_id, fence)
        except UnknownRolloutError:
            return
        except LeaseLostError as exc:
            self._metrics["lease_lost"] += 1
            log.warning("rollout %s: step not taken: %s", rollout_id, exc)
            await self._leadership.lost(fence)
        except RecordError as exc:
            await self._fail(rollout_id, str(exc), fence)
        except (StoreError, TransportError) as exc:
            log.warning("rollout %s: tick postponed: %s", rollout_id, exc)
        except Exception as exc:
            log.exception("rollout %s: tick raised", rollout_id)
            await self._fail(rollout_id, f"internal error: {type(exc).__name__}: {exc}", fence)

    async def _step(self, rollout_id: str, fence: Fence) -> None:
        now = self._clock()
        changes: list[str] = []
        decide = logged(tick_step(now), changes)
        new, actions = await asyncio.to_thread(
            lambda: self._store.rollouts.step(rollout_id, decide, now, fence=fence)
        )
        for line in changes:
            log.info("%s", line)
        for action in actions:
            await self._executor.execute(new, action, now)

    async def _fail(self, rollout_id: str, reason: str, fence: Fence) -> None:
        """End a rollout that cannot tick: clear its broadcast, then mark it failed
        (under ``fence``: a replica that lost the lease leaves it to the leader)."""
        reason = reason[:_REASON_MAX_CHARS]
        log.error("rollout %s: marking it failed: %s", rollout_id, reason)
        try:
            await self._executor.clear_broadcast(rollout_id)
            now = self._clock()
            await asyncio.to_thread(
                lambda: self._store.rollouts.force_state(
                    rollout_id, RolloutState.FAILED, reason, now, fence=fence
                )
            )
        except LeaseLostError as exc:
            log.warning("rollout %s: not marked failed here: %s", rollout_id, exc)
            await self._leadership.lost(fence)
            return
        except Exception:
            log.exception("rollout %s: cannot mark it failed yet (next tick)", rollout_id)
            return
        self._metrics["rollouts_failed_internally"] += 1

    async def prune(self, stopping: asyncio.Event) -> None:
        """Once an hour, drop telemetry and results older than the retention, until ``stopping``."""
        while not await wait_or_stop(stopping, PRUNE_EVERY_S):
            cutoff = self._clock() - self._retention_days * 86_400
            try:
                telemetry, results = await asyncio.to_thread(
                    self._store.results.prune, cutoff, cutoff
                )
            except Exception:
                log.exception("pruning failed (next try in %g s)", PRUNE_EVERY_S)
                continue
            if telemetry or results:
                log.info("pruned %d telemetry rows and %d results", telemetry, results)


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stopping``; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
    return stopping.is_set()
