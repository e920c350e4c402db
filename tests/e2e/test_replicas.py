"""Two real ``fleetctl serve`` replicas on one database: one leads, the other takes over.

Each test runs simulated nodes and two controllers sharing one database (a
SQLite file, or a PostgreSQL schema when a server is reachable) with a short
rollout lease. Mid-rollout the leader goes: on PostgreSQL it is paused
(SIGSTOP) past its lease, and once resumed steps down without writing; on
SQLite it is killed and started again (a replica frozen in the middle of a
SQLite write holds the file's lock until it resumes or dies, so nobody can
take over from it: docs/operations.md). Either way the other replica takes
the lease and drives on. Then the new leader is killed (SIGKILL): the first
one takes the lease back and finishes the rollout. Every node ends on the new
model, having queued and activated it exactly once, on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from edge_node.simulate import node_ids
from tests.e2e.conftest import ModelFiles, PgDatabase
from tests.e2e.rollout_kit import (
    ROLLOUT_DEADLINE_S,
    assert_all_on,
    final_status,
    pick_rollout_id,
    sqlite_url,
    start_rollout,
)
from tests.support.fleet import Fleet, Proc
from tests.support.load import cpu_hogs
from tests.support.stored import statuses

pytestmark = pytest.mark.e2e

MODEL = "classifier"
V1 = f"{MODEL}@1.0.0"
NODES = 6
WAVES = (50.0, 100.0)
LEASE_S = 2.0
TICK = "0.2s"
TAKEOVER_S = LEASE_S + LEASE_S / 3 + 10.0  # expiry, one try, and slack for a loaded machine
RATE_HZ = 2.0
# Each wave lasts its health window at least: long enough for both hand-overs
# (about LEASE_S each) to fall inside the rollout. A verdict needs 10 runs
# (5 s at RATE_HZ), within the window, not the default 100 (50 s).
WINDOW = "8s"
GATE = ("--min-samples", "10")
LEADING = "leading: took the rollout lease"
STEPPED_DOWN = "no longer leading"


def _replica(fleet: Fleet, db_url: str, name: str) -> Proc:
    return fleet.serve(db_url, name=name, tick=TICK, extra=("--lease-s", f"{LEASE_S:g}"))


def _replicas(fleet: Fleet, db_url: str) -> tuple[Proc, Proc]:
    """Nodes, then two controllers on ``db_url``; the model registered; every node known."""
    fleet.simulate(NODES, rate_hz=RATE_HZ)
    return _replica(fleet, db_url, "ctl-a"), _replica(fleet, db_url, "ctl-b")


def _leader(
    fleet: Fleet, replicas: tuple[Proc, Proc], taken: dict[str, int], *, exclude: Proc | None = None
) -> Proc:
    """The replica (other than ``exclude``) that takes the lease next, within the takeover
    time; ``taken``: how many terms each one had taken so far (updated)."""

    def new_term() -> Proc | None:
        found = [
            p
            for p in replicas
            if p is not exclude and p.log_text().count(LEADING) > taken.get(p.name, 0)
        ]
        return found[0] if len(found) == 1 else None

    leader = fleet.wait_until(new_term, timeout_s=TAKEOVER_S, what="a replica to take the lease")
    taken[leader.name] = leader.log_text().count(LEADING)
    return leader


def _check_hand_over(fleet: Fleet, db_url: str, models: ModelFiles, *, stall: bool) -> None:
    taken: dict[str, int] = {}
    replicas = _replicas(fleet, db_url)
    add = ["model", "add", str(models.v1), "--name", MODEL, "--version", "1.0.0"]
    fleet.fleetctl(*add, "--keys", str(fleet.keys_dir))
    ids = node_ids("sim", NODES)
    fleet.wait_nodes(ids, timeout_s=60.0)
    first = _leader(fleet, replicas, taken)
    follower = replicas[1] if first is replicas[0] else replicas[0]
    assert STEPPED_DOWN not in first.log_text()
    assert LEADING not in follower.log_text()

    rollout_id, _ = pick_rollout_id(
        "r-replicas", ids, WAVES, lambda m: all(list(m.values()).count(w) >= 1 for w in (0, 1))
    )
    start_rollout(fleet, V1, rollout_id, waves=WAVES, health_window=WINDOW, extra=GATE)
    fleet.wait_rollout(
        rollout_id,
        timeout_s=60.0,
        until=lambda s: s["state"] == "running" and s["counts"].get("activated", 0) >= 1,
        what="a node of the first wave to be activated",
    )
    with cpu_hogs():
        if stall:  # the leader stalls past its lease: the follower takes over
            os.kill(first.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                second = _leader(fleet, replicas, taken, exclude=first)
                takeover_s = time.monotonic() - stopped_at
            finally:
                os.kill(first.pid, signal.SIGCONT)
            assert second is follower
            # Resumed, the old leader steps down (its term ran out while it slept).
            fleet.wait_until(
                lambda: STEPPED_DOWN in first.log_text() or None,
                timeout_s=TAKEOVER_S,
                what="the resumed replica to step down",
            )
        else:  # the leader dies: the follower takes over; the first comes back as a follower
            assert first.kill() == -signal.SIGKILL
            stopped_at = time.monotonic()
            second = _leader(fleet, replicas, taken, exclude=first)
            takeover_s = time.monotonic() - stopped_at
            assert second is follower
            first = _replica(fleet, db_url, "ctl-a2")
            replicas = (first, second)
            assert LEADING not in first.log_text(), first.tail()
        # The new leader dies mid-wave too: the first one takes the lease back.
        os.kill(second.pid, signal.SIGKILL)
        assert second.kill() == -signal.SIGKILL
        killed_at = time.monotonic()
        assert _leader(fleet, replicas, taken, exclude=second) is first
        retaken_s = time.monotonic() - killed_at
    fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    how = "SIGSTOP" if stall else "SIGKILL"
    print(f"takeover after {how} {takeover_s:.1f} s, after SIGKILL {retaken_s:.1f} s")

    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "succeeded", context
    assert status["counts"] == {"succeeded": NODES}, context
    assert_all_on(fleet, ids, V1)
    stored = statuses(db_url, rollout_id)
    for step in ("queued", "activated"):
        seen = Counter(
            row["node_id"] for row in stored if row["state"] == step and not row["duplicate"]
        )
        assert seen == dict.fromkeys(ids, 1), f"{step}: {seen}\n{fleet.diagnostics()}"
    assert not any(row["duplicate"] for row in stored if row["state"] == "queued"), context


def test_replicas_hand_the_rollout_over_on_sqlite(fleet: Fleet, e2e_models: ModelFiles) -> None:
    _check_hand_over(fleet, sqlite_url(fleet), e2e_models, stall=False)


def test_replicas_hand_the_rollout_over_on_postgresql(
    pg_database: PgDatabase, fleet: Fleet, e2e_models: ModelFiles
) -> None:
    try:
        _check_hand_over(fleet, pg_database.url, e2e_models, stall=True)
    finally:
        fleet.close()  # before the schema is dropped: the controllers hold connections
