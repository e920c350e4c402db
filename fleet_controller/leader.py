"""Leadership: the one replica that drives rollouts, through a lease in the database.

Every replica runs :meth:`Leadership.run`. While it is connected to the broker
it tries, every third of ``lease_s``, to take or renew the rollout lease
(:meth:`~fleet_controller.store.leases.LeaseRepository.acquire`); a replica
that does not hold it tries again as soon as the holder's term runs out. The
holder is the leader: it ticks rollouts and reconciles deployments with the
lease's :class:`~fleet_controller.store.Fence`, which every rollout write
checks in its own transaction. So:

* **At most one replica writes rollout steps.** A leader that stalls (paused,
  swapped out, cut off from the database) past its lease loses it to another
  replica; when it wakes, its next fenced write is refused
  (:class:`~fleet_controller.store.LeaseLostError`) and it steps down.
* **It also steps down on its own**, without asking the database: once
  ``lease_s`` has passed (monotonic clock) since it last started a renewal that
  succeeded, and at once when it loses the broker (a leader that cannot
  publish commands must not hold the rollouts back: noticed at its next
  renewal) or stops cleanly (the lease is released, so a successor need not
  wait).
* **A successor takes over within ``lease_s`` plus one attempt** of the old
  leader's last renewal (a ``kill -9``), and at its next attempt after a clean
  stop.

Renewing at a third of the lease leaves two renewals' slack for a loaded
machine or a slow database before the term can run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shared.errors import EdgeFleetError

if TYPE_CHECKING:  # the command line reads the constants without loading the store
    from fleet_controller.store import Fence, Store

__all__ = ["DEFAULT_LEASE_S", "MIN_LEASE_S", "ROLLOUT_LEASE", "Leadership"]

log = logging.getLogger(__name__)

ROLLOUT_LEASE = "rollouts"  # the lease that lets one replica drive rollouts
DEFAULT_LEASE_S = 10.0
MIN_LEASE_S = 1.0
_AFTER_EXPIRY_S = 0.05  # a follower's next try, after the holder's term should have ended


class Leadership:
    """Holds (or waits for) the rollout lease; :attr:`fence` is what fenced writes present."""

    def __init__(
        self,
        store: Store,
        *,
        holder: str,
        lease_s: float,
        connected: asyncio.Event,
        on_change: Callable[[int], Awaitable[None]],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._holder = holder
        self._lease_s = lease_s
        self._renew_s = lease_s / 3
        self._connected = connected
        self._on_change = on_change
        self._monotonic = monotonic
        self._fence: Fence | None = None
        self.leading = asyncio.Event()  # set while a term is held (for those who wait on it)
        self._deadline = 0.0  # monotonic: the held term surely ends by then

    @property
    def fence(self) -> Fence | None:
        """The held term, or None when this replica is not (or may no longer be) the leader."""
        if self._fence is not None and self._monotonic() >= self._deadline:
            return None
        return self._fence

    @property
    def term(self) -> int:
        """The held term's fencing token; 0 when not the leader."""
        fence = self.fence
        return 0 if fence is None else fence.token

    async def run(self, stopping: asyncio.Event) -> None:
        """Take, renew or wait for the lease until ``stopping`` (see the module)."""
        while not stopping.is_set():
            if not self._connected.is_set():
                await self.release()
                await _first(stopping, self._connected)
                continue
            pause = await self.attempt()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stopping.wait()

    async def attempt(self) -> float:
        """One try to take or renew the lease; returns how long to wait before the next."""
        started = self._monotonic()
        try:
            info = await asyncio.to_thread(
                self._store.leases.acquire, ROLLOUT_LEASE, self._holder, self._lease_s
            )
        except EdgeFleetError as exc:
            log.warning("cannot renew or take the rollout lease: %s", exc)
            await self._become(self.fence)  # steps down once the term surely ran out
            return self._renew_s
        if info.held_by(self._holder):
            self._deadline = started + self._lease_s
            await self._become(info.fence)
            return self._renew_s
        await self._become(None)
        return min(max(info.remaining_s + _AFTER_EXPIRY_S, _AFTER_EXPIRY_S), self._renew_s)

    async def lost(self, fence: Fence) -> None:
        """A fenced write found ``fence`` over: step down (unless a newer term is held)."""
        if self._fence == fence:
            await self._become(None)

    async def release(self) -> None:
        """Step down and end the held term in the database (best effort)."""
        fence = self._fence
        if fence is None:
            return
        await self._become(None)
        try:
            await asyncio.to_thread(self._store.leases.release, fence)
        except EdgeFleetError as exc:
            log.warning("cannot release the rollout lease (it runs out by itself): %s", exc)

    async def _become(self, fence: Fence | None) -> None:
        if fence == self._fence:
            return
        before, self._fence = self._fence, fence
        if fence is None:
            self.leading.clear()
        else:
            self.leading.set()
        if fence is not None:
            log.info("leading: took the rollout lease, term %d", fence.token)
        elif before is not None:
            log.info("no longer leading: term %d of the rollout lease is over", before.token)
        await self._on_change(0 if fence is None else fence.token)


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
