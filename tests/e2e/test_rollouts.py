"""Rollouts end to end, with every part a real process.

Each test runs its own Mosquitto, ``fleetctl serve`` on its own database
(a SQLite file, or a fresh PostgreSQL schema), simulated nodes in one
``edge-node simulate`` process (and, where a test needs to stop and start one
node, an ``edge-node run`` process), and drives the fleet as an operator does:
``fleetctl ... --json``. Waiting is polling the operator API against deadlines;
every process is killed when the test ends. Failures carry the tail of every
process's log.

Wave membership is a hash of (rollout id, node id), so a test that needs a
given shape (a non-empty first wave, a node in the last wave) picks its rollout
id by computing membership exactly as controller and nodes do.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from fleet_controller.keys import load_key
from fleet_controller.registry import describe_model, sign_manifest
from shared.messages import ModelManifest
from shared.trust import Role
from tests.e2e.conftest import ModelFiles, PgDatabase
from tests.e2e.rollout_kit import (
    QUICK_GATE,
    RATE_HZ,
    ROLLOUT_DEADLINE_S,
    TELEMETRY_S,
    assert_all_on,
    bring_up,
    deploy,
    final_status,
    node_models,
    pick_rollout_id,
    sqlite_url,
    start_rollout,
    wait_for_baseline,
)
from tests.support.fleet import Fleet
from tests.support.stored import model_of, statuses

pytestmark = pytest.mark.e2e

MODEL = "classifier"
V1 = f"{MODEL}@1.0.0"
V2 = f"{MODEL}@2.0.0"
LARGE_FLEET = 24
SMALL_FLEET = 8
STAGED_WAVES = (10.0, 50.0, 100.0)


# ----- helpers ---------------------------------------------------------------------


def staged(membership: dict[str, int | None]) -> bool:
    """Every wave adds at least one node (so each wave really is a stage)."""
    sizes = Counter(membership.values())
    return None not in sizes and all(sizes[i] >= 1 for i in range(len(STAGED_WAVES)))


def first_wave_of_few(membership: dict[str, int | None]) -> bool:
    """A first wave of one or two nodes, the rest in later waves."""
    return 1 <= sum(1 for w in membership.values() if w == 0) <= 2


def staged_rollout(fleet: Fleet, db_url: str, models: ModelFiles) -> str:
    """Issue item 1 (and 5): 24 nodes on v1 take v2 in three waves; checks and audit.
    Returns the rollout id."""
    ids = bring_up(fleet, db_url, LARGE_FLEET, [(models.v1, V1), (models.v2, V2)])
    deploy(fleet, V1, "r-base", ids)

    rollout_id, membership = pick_rollout_id("r-staged", ids, STAGED_WAVES, staged)
    start_rollout(fleet, V2, rollout_id, waves=STAGED_WAVES, health_window="2s", extra=QUICK_GATE)
    seen_waves: list[int] = []

    def ended() -> dict[str, Any] | None:
        status = fleet.rollout_status(rollout_id)
        if not seen_waves or seen_waves[-1] != status["wave"]:
            seen_waves.append(status["wave"])
        return status if status["state"] not in ("pending", "running") else None

    fleet.wait_until(ended, timeout_s=ROLLOUT_DEADLINE_S, what=f"rollout {rollout_id} to end")
    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "succeeded", context
    assert status["wave"] == len(STAGED_WAVES), context
    assert status["nodes_total"] == LARGE_FLEET, context
    assert status["counts"] == {"succeeded": LARGE_FLEET}, context
    assert seen_waves == sorted(seen_waves), f"waves went backwards: {seen_waves}"
    # Each node was enrolled in the wave its hash bucket puts it in.
    assert {n["node"]: n["wave"] - 1 for n in status["nodes"]} == membership, context
    assert {n["node"]: n["from"] for n in status["nodes"]} == dict.fromkeys(ids, V1), context

    rows = node_models(fleet)
    assert {node: model_of(rows[node]) for node in ids} == dict.fromkeys(ids, V2), rows
    assert all(rows[node]["online"] for node in ids), rows
    previous = {node: rows[node]["previous_model"]["version"] for node in ids}
    assert previous == dict.fromkeys(ids, "1.0.0"), rows

    # Staged: no node of a later wave started before every node of the wave
    # before it was activated (and then healthy for the 2 s window).
    stored = statuses(db_url, rollout_id)
    first_seen: dict[str, float] = {}
    activated: dict[str, float] = {}
    for row in stored:
        first_seen.setdefault(row["node_id"], row["ts"])
        if row["state"] == "activated":
            activated.setdefault(row["node_id"], row["ts"])
    assert set(activated) == set(ids), f"nodes never activated: {set(ids) - set(activated)}"
    for wave in range(1, len(STAGED_WAVES)):
        before = [activated[n] for n, w in membership.items() if w is not None and w < wave]
        later = [first_seen[n] for n, w in membership.items() if w == wave]
        assert min(later) >= max(before), f"wave {wave + 1} started before wave {wave} was done"

    audit = fleet.fleetctl("audit", "--limit", "50")
    starts = [e for e in audit if e["action"] == "rollout.start" and e["outcome"] == "ok"]
    mine = [e for e in starts if e["args"].get("rollout_id") == rollout_id]
    assert len(mine) == 1, audit
    assert mine[0]["operator"] == "e2e-operator", mine
    return rollout_id


# ----- 1. a staged rollout over 24 nodes ------------------------------------------------


def test_staged_rollout_over_24_nodes_succeeds(fleet: Fleet, e2e_models: ModelFiles) -> None:
    assert staged_rollout(fleet, sqlite_url(fleet), e2e_models).startswith("r-staged")


# ----- 2. bad versions halt in the first wave and roll back -------------------------------


def test_slower_version_halts_in_first_wave_and_rolls_back(
    fleet: Fleet, e2e_models: ModelFiles
) -> None:
    db_url = sqlite_url(fleet)
    slow = f"{MODEL}@2.1.0"
    ids = bring_up(fleet, db_url, SMALL_FLEET, [(e2e_models.v1, V1), (e2e_models.slow, slow)])
    deploy(fleet, V1, "r-base", ids)
    v1_sha = fleet.call("model.list")[0]["sha256"]
    wait_for_baseline(fleet, db_url, ids, v1_sha)

    rollout_id, membership = pick_rollout_id("r-slow", ids, STAGED_WAVES, first_wave_of_few)
    first_wave = sorted(n for n, w in membership.items() if w == 0)
    # The window outlasts a telemetry period (TELEMETRY_S for simulated nodes), so
    # the gate sees the new model's latency: 20 runs a side are enough for a verdict.
    start_rollout(
        fleet, slow, rollout_id, waves=STAGED_WAVES, health_window="10s",
        extra=["--max-latency-regression", "50%", "--min-samples", "20",
               "--breach-evaluations", "2"],
    )  # fmt: skip
    fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "rolled_back", context
    assert status["wave"] == 1, context
    assert "wave 1" in (status["reason"] or ""), context
    assert sorted(n["node"] for n in status["nodes"]) == first_wave, context
    for node in status["nodes"]:
        assert node["state"] == "rolled_back", context
        assert node["code"] == "unhealthy", context
        assert "median latency" in (node["reason"] or ""), context
        assert "control group of" in (node["reason"] or ""), context
    assert_all_on(fleet, ids, V1)
    # Only the first wave ever saw the slow version.
    touched = {row["node_id"] for row in statuses(db_url, rollout_id)}
    assert touched == set(first_wave), touched
    # The per-node history tells the same story, oldest first.
    events = fleet.fleetctl("rollout", "events", rollout_id)
    assert {e["node_id"] for e in events} == set(first_wave), events
    for node_id in first_wave:
        states = [e["state"] for e in events if e["node_id"] == node_id]
        assert states[0] == "queued", states
        assert states[-3:] == ["activated", "failed", "rolled_back"], states
        failed = next(e for e in events if e["node_id"] == node_id and e["state"] == "failed")
        assert failed["code"] == "unhealthy", failed
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


def register_unvalidated(fleet: Fleet, path: Path, *, like: Path, name: str, version: str) -> str:
    """Register ``path`` bypassing ``fleetctl model add``'s validation: a manifest made
    by hand (the file's real sha256 and size, ``like``'s inputs and outputs), signed
    with the release key, uploaded and added through the operator API."""
    data = path.read_bytes()
    good = describe_model(like, name=name, version=version, now=time.time())
    manifest = ModelManifest(
        name=name,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=good.inputs,
        outputs=good.outputs,
        created_at=time.time(),
        created_by="e2e-test",
    )
    envelope = sign_manifest(manifest, load_key(fleet.keys_dir, Role.RELEASE, None))
    uploaded = fleet.call(
        "model.upload",
        {
            "sha256": manifest.sha256,
            "offset": 0,
            "size": manifest.size,
            "data": base64.b64encode(data).decode("ascii"),
        },
    )
    assert uploaded == {"received": manifest.size, "complete": True}, uploaded
    added = fleet.call("model.add", {"envelope": envelope.to_bytes().decode()})
    assert added["sha256"] == manifest.sha256, added
    return manifest.sha256


def test_version_that_fails_to_load_halts_in_first_wave_and_rolls_back(
    fleet: Fleet, e2e_models: ModelFiles
) -> None:
    db_url = sqlite_url(fleet)
    broken = f"{MODEL}@3.0.0"
    ids = bring_up(fleet, db_url, SMALL_FLEET, [(e2e_models.v1, V1)])
    refused = fleet.fleetctl(
        "model", "add", str(e2e_models.broken), "--name", MODEL, "--version", "3.0.0",
        "--keys", str(fleet.keys_dir), as_json=False, expect_rc=None,
    )  # fmt: skip
    # `model add` loads the file as a node would and refuses it, in one line.
    assert refused.returncode in (1, 2), refused
    assert refused.stdout == "", refused
    assert refused.stderr.startswith("fleetctl: "), refused
    assert len(refused.stderr.strip().splitlines()) == 1, refused
    register_unvalidated(fleet, e2e_models.broken, like=e2e_models.v1, name=MODEL, version="3.0.0")
    deploy(fleet, V1, "r-base", ids)

    rollout_id, membership = pick_rollout_id("r-broken", ids, STAGED_WAVES, first_wave_of_few)
    first_wave = sorted(n for n, w in membership.items() if w == 0)
    start_rollout(fleet, broken, rollout_id, waves=STAGED_WAVES, health_window="2s")
    fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "rolled_back", context
    assert status["wave"] == 1, context
    assert sorted(n["node"] for n in status["nodes"]) == first_wave, context
    assert [n["code"] for n in status["nodes"]] == ["model_invalid"] * len(first_wave), context
    assert_all_on(fleet, ids, V1)
    stored = statuses(db_url, rollout_id)
    assert {row["node_id"] for row in stored} == set(first_wave), stored
    failed = {
        row["node_id"]
        for row in stored
        if (row["state"], row["code"]) == ("failed", "model_invalid")
    }
    assert failed == set(first_wave), stored


# ----- 3. the controller is killed mid-rollout ----------------------------------------------


def test_rollout_survives_kill_9_of_the_controller(fleet: Fleet, e2e_models: ModelFiles) -> None:
    db_url = sqlite_url(fleet)
    ids = bring_up(fleet, db_url, SMALL_FLEET, [(e2e_models.v1, V1)])
    waves = (50.0, 100.0)
    rollout_id, _ = pick_rollout_id(
        "r-crash", ids, waves, lambda m: 1 <= sum(1 for w in m.values() if w == 0) < len(m)
    )
    start_rollout(fleet, V1, rollout_id, waves=waves, health_window="6s", extra=QUICK_GATE)
    # Mid-wave: a first-wave node is activated and inside its health window.
    fleet.wait_rollout(
        rollout_id,
        timeout_s=60.0,
        until=lambda s: s["state"] == "running" and s["counts"].get("activated", 0) >= 1,
        what="a node of the first wave to be activated",
    )
    controller = fleet.procs[-1]
    assert controller.name == "controller", fleet.procs
    os.kill(controller.pid, signal.SIGKILL)
    assert controller.kill() == -signal.SIGKILL

    fleet.serve(db_url)  # the same database and keys
    fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "succeeded", context
    assert status["counts"] == {"succeeded": len(ids)}, context
    assert "resuming 1 rollout(s)" in fleet.procs[-1].log_text(), context
    assert_all_on(fleet, ids, V1)
    # No node was sent the same step twice: each queued one deploy and activated once
    # (a repeated broadcast is answered as a duplicate "activated", without a new "queued").
    stored = statuses(db_url, rollout_id)
    for step in ("queued", "activated"):
        seen = Counter(
            row["node_id"] for row in stored if row["state"] == step and not row["duplicate"]
        )
        assert seen == dict.fromkeys(ids, 1), f"{step}: {seen}\n{fleet.diagnostics()}"
    assert not any(row["duplicate"] for row in stored if row["state"] == "queued")


# ----- 4. a node offline at the start catches up ----------------------------------------------


def test_node_offline_at_start_gets_the_model_when_it_returns(
    fleet: Fleet, e2e_models: ModelFiles
) -> None:
    db_url = sqlite_url(fleet)
    late = "late-1"
    # Boots beside the others: the controller learns it.
    fleet.node(late, rate_hz=RATE_HZ, telemetry_interval_s=TELEMETRY_S)
    sims = bring_up(fleet, db_url, 4, [(e2e_models.v1, V1)])
    fleet.wait_nodes([late])
    first = fleet.procs[0]
    assert first.name == late, fleet.procs
    assert first.terminate() == 0, first.tail()
    fleet.wait_nodes([late], online=False, timeout_s=30.0)

    waves = (50.0, 100.0)
    # The returning node is in the last wave; the first holds some of the others.
    rollout_id, membership = pick_rollout_id(
        "r-late",
        [*sims, late],
        waves,
        lambda m: m[late] == 1 and any(m[s] == 0 for s in sims),
    )
    start_rollout(fleet, V1, rollout_id, waves=waves, health_window="1s", extra=QUICK_GATE)

    def waits_on_late(status: dict[str, Any]) -> bool:
        nodes = {n["node"]: n["state"] for n in status["nodes"]}
        others = {k: v for k, v in nodes.items() if k != late}
        return (
            status["state"] == "running"
            and status["wave"] == 2
            and nodes.get(late) == "queued"
            and set(others) == set(sims)
            and set(others.values()) == {"succeeded"}
        )

    fleet.wait_rollout(
        rollout_id,
        timeout_s=ROLLOUT_DEADLINE_S,
        until=waits_on_late,
        what=f"the rollout to wait on {late} alone",
    )
    assert model_of(node_models(fleet)[late]) is None

    # Back, with its data directory and session.
    fleet.node(late, rate_hz=RATE_HZ, telemetry_interval_s=TELEMETRY_S)
    fleet.wait_rollout(rollout_id, timeout_s=ROLLOUT_DEADLINE_S)
    status = final_status(fleet, rollout_id)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "succeeded", context
    assert status["counts"] == {"succeeded": len(sims) + 1}, context
    assert_all_on(fleet, [*sims, late], V1)
    assert membership[late] == 1


# ----- 5. the same staged rollout on PostgreSQL ----------------------------------------------


def test_staged_rollout_on_postgresql(
    pg_database: PgDatabase, pg_admin: Engine, fleet: Fleet, e2e_models: ModelFiles
) -> None:
    try:
        rollout_id = staged_rollout(fleet, pg_database.url, e2e_models)
    finally:
        fleet.close()  # before the schema is dropped: the controller holds connections
    with pg_admin.connect() as conn:
        state = conn.execute(
            text(f'SELECT state FROM "{pg_database.schema}".rollouts WHERE rollout_id = :r'),
            {"r": rollout_id},
        ).scalar_one_or_none()
    assert state == "succeeded", f"rollout {rollout_id} not in schema {pg_database.schema}"
