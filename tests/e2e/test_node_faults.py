"""Node faults end to end, every part a real process: kill -9 while answering, a full disk.

Real Mosquitto, ``fleetctl serve`` on a SQLite file, ``edge-node run`` serving
infer requests (``--source mqtt``) from an application talking through the
project's transport (:class:`tests.support.infer_client.InferClient`), or its
synthetic source. Kill moments are chosen by counts of answers seen, waits poll
against deadlines; nothing sleeps to synchronise.

* **An answered result is a durable result.** The node is killed with SIGKILL
  a few times while it answers, and restarted on the same data directory;
  once its outbox has delivered, every result the application saw is in the
  controller's store, exactly once, as it was answered.
* **A full disk is a state, not a crash.** A node whose ``--data`` filesystem
  fills up keeps running, and one started on a full disk runs and serves.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ModelFiles
from tests.e2e.rollout_kit import deploy, sqlite_url
from tests.support.disk import fill
from tests.support.fleet import Fleet, Proc
from tests.support.infer_client import InferClient

pytestmark = pytest.mark.e2e

V1 = "classifier@1.0.0"
NODE = "n1"
# Answers seen before each kill, counted from the previous restart: well into
# a run, at the first answer after a restart, and in between.
KILL_AFTER = (30, 1, 12)
ANSWERS_AT_END = 20  # answers after the last restart before the client stops
RATE_HZ = 20.0  # synthetic inputs per second in the disk-full test
FULL_ROUNDS = 5  # "disk full" log lines (one a second at least) a node must live through
GROWTH = 20  # new stored results that show a node still serves
DEADLINE_S = 60.0  # a restarted node answering or its outbox delivering, on a loaded machine


def stored_results(db: Path, node: str) -> list[tuple[int, str, str, float]]:
    """``(seq, input_digest, model_sha256, ts)`` of every result the controller stored."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq, input_digest, model_sha256, ts FROM results WHERE node_id = ?", (node,)
        ).fetchall()
    return [(int(seq), str(d), str(sha), float(ts)) for seq, d, sha, ts in rows]


def results_grow(db: Path, since: int, node: Proc | None = None) -> Callable[[], bool]:
    """A probe: the store holds ``GROWTH`` results of the node more than ``since``;
    raises once ``node`` (when given) has exited."""

    def probe() -> bool:
        if node is not None and not node.running:
            raise AssertionError(f"the node exited with {node.popen.returncode}:\n{node.tail()}")
        return len(stored_results(db, NODE)) >= since + GROWTH

    return probe


def full_for_a_while(node: Proc) -> Callable[[], bool]:
    """A probe: ``node`` has met the full disk ``FULL_ROUNDS`` times (its log says
    so) and is still running (raises once it has exited)."""

    def probe() -> bool:
        if not node.running:
            raise AssertionError(f"the node exited with {node.popen.returncode}:\n{node.tail()}")
        return node.log_text().count("disk full") >= FULL_ROUNDS

    return probe


def answers(client: InferClient, wanted: int) -> Callable[[], bool]:
    """A probe: the client has seen ``wanted`` answers."""
    return lambda: client.answered() >= wanted


def start_serving(fleet: Fleet, models: ModelFiles) -> None:
    """The controller on a SQLite file, with the model registered."""
    fleet.serve(sqlite_url(fleet))
    fleet.fleetctl(
        "model", "add", str(models.v1), "--name", "classifier", "--version", "1.0.0",
        "--keys", str(fleet.keys_dir),
    )  # fmt: skip


def test_every_answered_result_is_stored_once_across_kill_9(
    fleet: Fleet, e2e_models: ModelFiles
) -> None:
    start_serving(fleet, e2e_models)
    node = fleet.node(NODE, source="mqtt")
    fleet.wait_nodes([NODE], timeout_s=DEADLINE_S)
    deploy(fleet, V1, "r1", [NODE])

    killed: list[int] = []
    with InferClient(fleet.broker_url, fleet.fleet_id, NODE) as client:
        for after in KILL_AFTER:
            wanted = client.answered() + after
            fleet.wait_until(
                answers(client, wanted), timeout_s=DEADLINE_S, what=f"{wanted} answers"
            )
            killed.append(node.kill())
            node = fleet.node(NODE, source="mqtt")
        wanted = client.answered() + ANSWERS_AT_END
        fleet.wait_until(answers(client, wanted), timeout_s=DEADLINE_S, what="answers at the end")
    assert killed == [-9] * len(KILL_AFTER)
    with client.lock:
        seen = dict(client.seen)
        sent = dict(client.sent)
    assert len(seen) >= sum(KILL_AFTER) + ANSWERS_AT_END
    for request_id, result in seen.items():  # each reply answers the input it was asked
        assert result.input_digest == sent[request_id], request_id

    db = fleet.root / "fleet.db"
    wanted_seqs = {result.seq for result in seen.values()}
    rows: list[tuple[int, str, str, float]] = []

    def delivered() -> bool:
        nonlocal rows
        rows = stored_results(db, NODE)
        return wanted_seqs <= {seq for seq, *_ in rows}

    fleet.wait_until(
        delivered,
        timeout_s=DEADLINE_S,
        what="every answered result in the store",
        describe=lambda: f"missing seqs: {sorted(wanted_seqs - {s for s, *_ in rows})[:50]}",
    )
    by_seq: dict[int, Any] = {seq: (digest, sha, ts) for seq, digest, sha, ts in rows}
    per_digest = Counter(digest for _, digest, _, _ in rows)
    for request_id, result in seen.items():
        digest, sha, ts = by_seq[result.seq]
        assert (digest, sha) == (result.input_digest, result.model.sha256), request_id
        assert ts == pytest.approx(result.ts, abs=1e-6), request_id
        assert per_digest[result.input_digest] == 1, f"{request_id} stored {per_digest}"
    assert node.running, fleet.diagnostics()
    assert_no_crash(node)


def assert_no_crash(proc: Proc) -> None:
    assert "Traceback" not in proc.log_text(), proc.tail()


def test_a_full_data_disk_neither_ends_a_node_nor_keeps_one_from_starting(
    fleet: Fleet, e2e_models: ModelFiles, small_disk: Path
) -> None:
    data = small_disk / NODE
    start_serving(fleet, e2e_models)
    node = fleet.node(NODE, data=data, rate_hz=RATE_HZ, telemetry_interval_s=1.0)
    fleet.wait_nodes([NODE], timeout_s=DEADLINE_S)
    deploy(fleet, V1, "r1", [NODE])
    db = fleet.root / "fleet.db"
    fleet.wait_until(results_grow(db, 0, node), timeout_s=DEADLINE_S, what="first results")

    # The disk fills up under a running node: it lives through it (inference
    # pauses, telemetry is dropped: nothing can be stored), then crashes.
    filler = fill(small_disk)
    fleet.wait_until(full_for_a_while(node), timeout_s=DEADLINE_S, what="the node on a full disk")
    assert node.kill() == -9
    fleet.wait_nodes([NODE], online=False, timeout_s=DEADLINE_S)

    # Started again on the still full disk (a supervisor's restart): it runs,
    # connects and loads its model, and serves once space returns.
    node = fleet.node(NODE, data=data, rate_hz=RATE_HZ, telemetry_interval_s=1.0)
    fleet.wait_nodes([NODE], model=V1, timeout_s=DEADLINE_S)
    fleet.wait_until(
        full_for_a_while(node), timeout_s=DEADLINE_S, what="the restart on a full disk"
    )
    before = len(stored_results(db, NODE))
    filler.unlink()
    fleet.wait_until(
        results_grow(db, before, node), timeout_s=DEADLINE_S, what="results once space returned"
    )
    assert node.running, node.tail()
    assert_no_crash(node)
    # The disk's doing is not counted as the model's failures (a health gate reads those).
    assert "inference(s) failed" not in node.log_text(), node.tail()
