"""``top``'s pure aggregation and the tables of operator API answers (console.py)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from fleet_controller.console import FleetView, NodeRow, format_value, records_table
from shared.messages import (
    LatencyStats,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    Telemetry,
    encode,
)

NOW = 1_800_000_000.0
SHA = "ab" * 32


def _state(node: str, *, online: bool, session: int, model: ModelRef | None = None) -> NodeState:
    return NodeState(node=node, online=online, session=session, model=model, ts=NOW)


def _telemetry(node: str, *, ts: float, inferences: int, errors: int = 0) -> Telemetry:
    return Telemetry(
        node=node,
        ts=ts,
        uptime_s=ts - NOW + 1,
        inferences=inferences,
        errors=errors,
        skips=0,
        queue_depth=0,
        outbox_depth=3,
        latency=LatencyStats(p50_ms=1.0, p95_ms=4.5, p99_ms=9.0),
        cpu_percent=10.0,
        memory_bytes=1 << 20,
        model=ModelRef(name="c", version="1.0.0", sha256=SHA),
    )


def test_top_rates_come_from_counter_deltas() -> None:
    view = FleetView("f")
    assert view.apply(_state("n1", online=True, session=1), NOW)
    view.apply(_telemetry("n1", ts=NOW, inferences=100, errors=1), NOW)
    [row] = view.rows(NOW + 1)
    assert row.inferences_per_s is None  # one sample is no rate
    view.apply(_telemetry("n1", ts=NOW + 10, inferences=350, errors=2), NOW + 10)
    [row] = view.rows(NOW + 12)
    assert row == NodeRow(
        node="n1",
        online=True,
        model="c@1.0.0",
        inferences_per_s=25.0,
        p95_ms=4.5,
        errors=2,
        outbox_depth=3,
        status=None,
        age_s=2.0,
    )


def test_top_counter_reset_and_old_samples() -> None:
    view = FleetView("f")
    view.apply(_telemetry("n1", ts=NOW, inferences=100), NOW)
    view.apply(_telemetry("n1", ts=NOW + 10, inferences=200), NOW)
    assert not view.apply(_telemetry("n1", ts=NOW + 5, inferences=150), NOW)  # out of order
    assert view.rows(NOW)[0].inferences_per_s == 10.0
    view.apply(_telemetry("n1", ts=NOW + 20, inferences=5), NOW)  # the agent restarted
    assert view.rows(NOW)[0].inferences_per_s is None
    view.apply(_telemetry("n1", ts=NOW + 30, inferences=55), NOW)
    assert view.rows(NOW)[0].inferences_per_s == 5.0


def test_top_ignores_a_late_death_of_an_older_session() -> None:
    view = FleetView("f")
    view.apply(_state("n1", online=True, session=2), NOW)
    assert not view.apply(_state("n1", online=False, session=1), NOW)
    assert view.rows(NOW)[0].online is True
    assert view.apply(_state("n1", online=False, session=2), NOW)
    assert view.rows(NOW)[0].online is False


def test_top_shows_a_reinstalled_node_whose_sessions_start_again() -> None:
    """The same rule as the controller's store: a birth always wins."""
    view = FleetView("f")
    view.apply(_state("n1", online=False, session=40), NOW)
    assert view.apply(_state("n1", online=True, session=1), NOW)
    assert view.rows(NOW)[0].online is True
    assert not view.apply(_state("n1", online=False, session=0), NOW)


def test_top_feed_decodes_checks_topics_and_counts_malformed() -> None:
    view = FleetView("f")
    state = encode(_state("n1", online=True, session=1))
    status = NodeStatus(
        node="n2", seq=1, rollout_id="r1", state=NodeRolloutState.DOWNLOADING, ts=NOW
    )
    assert view.feed("fleet/v1/f/node/n1/state", state, NOW)
    assert view.feed("fleet/v1/f/node/n2/status", encode(status), NOW)
    assert not view.feed("fleet/v1/other/node/n3/state", state, NOW)  # another fleet
    assert not view.feed("fleet/v1/f/node/n9/state", state, NOW)  # names n1 on n9's topic
    assert not view.feed("fleet/v1/f/node/n1/telemetry", b"{not json", NOW)
    assert not view.feed("fleet/v1/f/node/n1/results", state, NOW)  # not a leaf top reads
    assert not view.feed("not/an/edgefleet/topic", state, NOW)
    assert view.malformed == 2
    rows = {r.node: r for r in view.rows(NOW)}
    assert set(rows) == {"n1", "n2"}
    assert rows["n2"].status == "downloading r1"
    assert rows["n2"].online is None
    assert view.feed("fleet/v1/f/node/n1/state", b"", NOW)  # retained birth cleared
    assert [r.node for r in view.rows(NOW)] == ["n2"]


def test_top_snapshot_is_json() -> None:
    view = FleetView("f")
    view.apply(_state("n1", online=True, session=1), NOW)
    view.apply(_state("n2", online=False, session=1), NOW)
    view.apply(_telemetry("n1", ts=NOW, inferences=0), NOW)
    view.apply(_telemetry("n1", ts=NOW + 2, inferences=40), NOW + 2)
    snapshot = json.loads(json.dumps(view.snapshot(NOW + 2)))
    assert snapshot["summary"] == {"nodes": 2, "online": 1, "inferences_per_s": 20.0, "errors": 0}
    assert [n["node"] for n in snapshot["nodes"]] == ["n1", "n2"]


def test_table_cells_are_not_markup() -> None:
    assert format_value("sha256", SHA) == SHA[:12]
    assert format_value("model", {"name": "c", "version": "1.0.0", "sha256": SHA}) == "c@1.0.0"
    assert format_value("size", 2048) == "2.0 KiB"
    assert format_value("online", None) == "-"
    out = io.StringIO()
    table = records_table([{"reason": "[bold]x[/bold]"}], columns=("reason",))
    Console(file=out, width=80).print(table)
    assert "[bold]x[/bold]" in out.getvalue()
