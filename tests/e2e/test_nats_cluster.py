"""EdgeFleet on a clustered broker: a three-member NATS cluster (JetStream, MQTT 3.1.1).

The controller connects to member A, the nodes to members B and C, so every
command, chunk, status, result and ack crosses the cluster's routes; the
nodes' persistent sessions and the retained messages live in JetStream. On
MQTT 3.1.1 the controller subscribes without ``$share`` (NATS has no shared
subscriptions) and persistent sessions are ``clean_session=False``; the rest
of the protocol is in the payloads. Skipped only when ``nats-server`` cannot
be found (``scripts/bootstrap`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from edge_node.outbox import read_depths
from edge_node.simulate import node_ids
from tests.e2e.conftest import ModelFiles
from tests.e2e.rollout_kit import (
    ROLLOUT_DEADLINE_S,
    assert_all_on,
    deploy,
    sqlite_url,
    start_rollout,
)
from tests.support.fleet import Fleet
from tests.support.nats import NatsCluster, NatsNotInstalledError, find_nats_server
from tests.support.stored import statuses

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

A, B, C = 0, 1, 2  # cluster members: the controller's, and the nodes'
V1 = "classifier@1.0.0"
V2 = "classifier@2.0.0"


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    try:
        find_nats_server()
    except NatsNotInstalledError as exc:
        pytest.skip(str(exc))
    with NatsCluster(tmp_path_factory.mktemp("nats")) as cluster:
        yield cluster


@pytest.fixture
def nats_fleet(
    tmp_path: Path, nats_cluster: NatsCluster, fleet_id: str, e2e_keys: Path
) -> Iterator[Fleet]:
    """A fleet whose operator tools and controller use member A."""
    fleet = Fleet(tmp_path, broker_url=nats_cluster.url(A), fleet_id=fleet_id, keys_dir=e2e_keys)
    try:
        yield fleet
    finally:
        fleet.close()


def _add_models(fleet: Fleet, models: dict[str, Path]) -> None:
    commands = []
    for ref, path in models.items():
        name, _, version = ref.partition("@")
        commands.append(
            ["model", "add", str(path), "--name", name, "--version", version,
             "--keys", str(fleet.keys_dir)]
        )  # fmt: skip
    rows = fleet.fleetctl_many(commands)
    assert [f"{r['name']}@{r['version']}" for r in rows] == list(models)


def _result_seqs(db_url: str, node_id: str) -> list[int]:
    """Every result seq stored for ``node_id``, duplicates included, in order."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT seq FROM results WHERE node_id = :node ORDER BY seq"),
                {"node": node_id},
            )
            return [int(seq) for (seq,) in rows]
    finally:
        engine.dispose()


def test_rollout_reaches_nodes_on_other_members(
    nats_fleet: Fleet, nats_cluster: NatsCluster, e2e_models: ModelFiles
) -> None:
    """A two-version rollout from a controller on A reaches nodes on B and C."""
    fleet = nats_fleet
    db_url = sqlite_url(fleet)
    # No inference traffic: each node passes its (empty) health window on activation,
    # instead of waiting for enough runs of the new model for a verdict.
    fleet.simulate(2, prefix="sim", source="none", broker_url=nats_cluster.url(B))
    fleet.node("edge-c1", source="none", broker_url=nats_cluster.url(C))
    fleet.serve(db_url)
    _add_models(fleet, {V1: e2e_models.v1, V2: e2e_models.v2})
    nodes = [*node_ids("sim", 2), "edge-c1"]
    fleet.wait_nodes(nodes, timeout_s=60.0)

    deploy(fleet, V1, "nats-v1", nodes)
    # The second one in two waves: the retained broadcast command moves on across members.
    start_rollout(fleet, V2, "nats-v2", waves=(50.0, 100.0))
    done = fleet.wait_rollout("nats-v2", timeout_s=ROLLOUT_DEADLINE_S)
    assert done["state"] == "succeeded", f"{done}\n{fleet.diagnostics()}"
    fleet.wait_nodes(nodes, model=V2, timeout_s=30.0)
    assert_all_on(fleet, nodes, V2)
    activated = {s["node_id"] for s in statuses(db_url, "nats-v2") if s["state"] == "activated"}
    assert activated == set(nodes), statuses(db_url, "nats-v2")


def test_results_through_another_member_are_stored_exactly_once(
    nats_fleet: Fleet, nats_cluster: NatsCluster, e2e_models: ModelFiles
) -> None:
    """A node's results sent through B (and after a restart, through C) are stored
    by the controller on A once each, and every outbox slot is acknowledged."""
    fleet = nats_fleet
    db_url = sqlite_url(fleet)
    node_id = "edge-b1"
    node = fleet.node(node_id, rate_hz=20.0, resend_after_s=2.0, broker_url=nats_cluster.url(B))
    fleet.serve(db_url)
    _add_models(fleet, {V1: e2e_models.v1})
    fleet.wait_nodes([node_id], timeout_s=60.0)
    deploy(fleet, V1, "nats-ingest", [node_id])

    fleet.wait_until(
        lambda: len(_result_seqs(db_url, node_id)) >= 40,
        timeout_s=30.0,
        what="40 results of the node stored",
    )
    assert node.terminate() == 0, node.tail()
    # Back on another member with nothing new to infer: what the outbox still holds
    # goes out again, and each acknowledged slot leaves it.
    fleet.node(node_id, source="none", resend_after_s=1.0, broker_url=nats_cluster.url(C))
    outbox = fleet.root / "nodes" / node_id / "outbox.db"
    fleet.wait_until(
        lambda: read_depths(outbox)[0] == 0,
        timeout_s=30.0,
        what="the node's outbox to be acknowledged to the last slot",
        describe=lambda: f"outbox depth {read_depths(outbox)}",
    )
    seqs = _result_seqs(db_url, node_id)
    assert len(seqs) >= 40
    # Result seqs run on from where the node's numbering started: no gap, no repeat.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gaps or duplicates: {seqs}"
