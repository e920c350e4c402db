"""What the controller logs of a rollout step (:mod:`fleet_controller.rollout_log`).

Table-driven on hand-made before/after records, plus the lines of a whole
rollout driven through the real engine (``tick``), so a change in what the
engine records shows up here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_controller.rollout_core import NodeProgress, RolloutRecord, apply_node_status, tick
from fleet_controller.rollout_log import rollout_log_lines
from tests.unit.fleet_controller.rollout_kit import (
    NOW,
    OLD,
    N,
    R,
    fleet_of,
    make_spec,
)

SPEC = make_spec(waves=(10.0, 50.0, 100.0), max_retries=2)


def _record(state: R = R.RUNNING, **nodes: NodeProgress) -> RolloutRecord:
    return RolloutRecord(spec=SPEC, state=state, wave=0, wave_started_at=NOW, nodes=nodes)


def _node(state: N = N.QUEUED, **changes: object) -> NodeProgress:
    fields: dict[str, object] = {"node_id": "n1", "wave": 0, "state": state, "from_model": OLD}
    fields.update(changes)
    return NodeProgress(**fields)


RUNNING_N1 = _record(n1=_node(N.ACTIVATED))

CASES: list[tuple[str, RolloutRecord, RolloutRecord, str | None, list[str]]] = [
    ("nothing changed", RUNNING_N1, RUNNING_N1, None, []),
    (
        "start and first wave",
        RolloutRecord(spec=SPEC),
        replace(_record(), wave_started_at=NOW),
        None,
        [
            "rollout r-1: started: detector@2.0.0, waves 10%,50%,100%",
            "rollout r-1: wave 1/3 started (10% of the selection)",
        ],
    ),
    (
        "next wave",
        _record(),
        replace(_record(), wave=1, wave_started_at=NOW + 5),
        None,
        ["rollout r-1: wave 2/3 started (50% of the selection)"],
    ),
    (
        "succeeded",
        RUNNING_N1,
        _record(n1=_node(N.SUCCEEDED, reason="healthy: p95 +3%")),
        None,
        ["rollout r-1: node n1 succeeded: healthy: p95 +3%"],
    ),
    (
        "unhealthy",
        RUNNING_N1,
        _record(n1=_node(N.FAILED, code="unhealthy", reason="error rate 5% > 1%")),
        None,
        ["rollout r-1: node n1 unhealthy: error rate 5% > 1%"],
    ),
    (
        "failed with a code",
        _record(n1=_node(N.DOWNLOADING)),
        _record(n1=_node(N.FAILED, code="artifact", reason="download gave up")),
        None,
        ["rollout r-1: node n1 failed (artifact): download gave up"],
    ),
    (
        "timed out",
        _record(n1=_node(N.QUEUED)),
        _record(n1=_node(N.TIMED_OUT, code="timeout", reason="no progress")),
        None,
        ["rollout r-1: node n1 timed out: no progress"],
    ),
    (
        "rejected",
        _record(n1=_node(N.QUEUED)),
        _record(n1=_node(N.REJECTED, code="downgrade", reason="1.0.0 is older")),
        None,
        ["rollout r-1: node n1 rejected: 1.0.0 is older"],
    ),
    (
        "progress is not a verdict",
        _record(n1=_node(N.QUEUED)),
        _record(n1=_node(N.DOWNLOADING)),
        None,
        [],
    ),
    (
        "a retry scheduled is not news, a retry sent is",
        _record(n1=_node(N.TIMED_OUT, code="timeout", reason="no progress", retry_at=NOW + 10)),
        _record(n1=_node(N.QUEUED, attempts=2)),
        None,
        ["rollout r-1: node n1 retry 1 of 2 after timed out: no progress"],
    ),
    (
        "halt",
        _record(n1=_node(N.FAILED, code="model_invalid", reason="bad")),
        replace(_record(R.FAILED, n1=_node(N.FAILED)), reason="1 of 1 nodes failed in wave 1"),
        None,
        [
            "rollout r-1: halted: 1 of 1 nodes failed in wave 1",
            "rollout r-1 ended: failed: 1 of 1 nodes failed in wave 1",
        ],
    ),
    (
        "halt with rollback",
        RUNNING_N1,
        replace(
            _record(R.ROLLING_BACK, n1=_node(N.ACTIVATED, rollback_sent=True)),
            reason="1 of 1 nodes failed in wave 1",
        ),
        None,
        [
            "rollout r-1: halted, rolling back: 1 of 1 nodes failed in wave 1",
            "rollout r-1: node n1 rolling back to detector@1.0.0",
        ],
    ),
    (
        "a rollback resent",
        _record(R.ROLLING_BACK, n1=_node(N.ACTIVATED, rollback_sent=True)),
        _record(R.ROLLING_BACK, n1=_node(N.ACTIVATED)),
        None,
        ["rollout r-1: node n1 no answer to its rollback: sending it again"],
    ),
    (
        "rolled back and done",
        replace(_record(R.ROLLING_BACK, n1=_node(N.ACTIVATED, rollback_sent=True)), reason="x"),
        replace(_record(R.ROLLED_BACK, n1=_node(N.ROLLED_BACK, rollback_sent=True)), reason="x"),
        None,
        [
            "rollout r-1: node n1 rolled back to detector@1.0.0",
            "rollout r-1 ended: rolled_back: x",
        ],
    ),
    (
        "paused by an operator",
        RUNNING_N1,
        replace(_record(R.PAUSED, n1=_node(N.ACTIVATED)), reason="pause by operator"),
        "alice",
        ["rollout r-1: paused by alice"],
    ),
    (
        "resumed, with a status folded in the same step",
        replace(_record(R.PAUSED, n1=_node(N.LOADING))),
        _record(n1=_node(N.FAILED, code="model_invalid", reason="warm-up failed")),
        "bob",
        [
            "rollout r-1: resumed by bob",
            "rollout r-1: node n1 failed (model_invalid): warm-up failed",
        ],
    ),
    (
        "aborted by an operator",
        RUNNING_N1,
        replace(_record(R.ABORTED, n1=_node(N.ACTIVATED)), reason="abort by operator"),
        "alice",
        ["rollout r-1: aborted by alice", "rollout r-1 ended: aborted: abort by operator"],
    ),
    (
        "an operator's rollback",
        _record(R.SUCCEEDED, n1=_node(N.SUCCEEDED)),
        _record(R.ROLLING_BACK, n1=_node(N.SUCCEEDED, rollback_sent=True)),
        "alice",
        [
            "rollout r-1: rollback requested by alice",
            "rollout r-1: node n1 rolling back to detector@1.0.0",
        ],
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "operator", "lines"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_rollout_log_lines(
    old: RolloutRecord, new: RolloutRecord, operator: str | None, lines: list[str]
) -> None:
    assert rollout_log_lines(old, new, operator=operator) == lines


def test_a_rollout_through_the_engine() -> None:
    """Start, wave, a node's refusal, the halt and the end, as the real engine records them."""
    fleet = fleet_of("a", "b")
    record = RolloutRecord(spec=make_spec())
    lines: list[str] = []
    for change in (
        lambda r: tick(r, fleet, now=NOW)[0],
        lambda r: apply_node_status(
            r, "a", N.REJECTED, now=NOW + 1, code="downgrade", reason="older than 2.0.0"
        ),
        lambda r: tick(r, fleet, now=NOW + 2)[0],
    ):
        new = change(record)
        lines += rollout_log_lines(record, new)
        record = new
    assert lines == [
        "rollout r-1: started: detector@2.0.0, waves 100%",
        "rollout r-1: wave 1/1 started (100% of the selection)",
        "rollout r-1: node a rejected: older than 2.0.0",
        f"rollout r-1: halted: {record.reason}",
        f"rollout r-1 ended: failed: {record.reason}",
    ]
    assert record.reason is not None
    assert "failed in wave 1" in record.reason
