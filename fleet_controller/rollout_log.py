"""What an operator reads in the controller's log about a rollout: one line per change.

:func:`rollout_log_lines` compares a rollout's record before and after one step
(a tick, or an operator's pause, resume, abort or rollback) and says what
happened, in order: the rollout's own state (started, paused, resumed, halted,
rolling back, ended), each wave that starts, and each node's verdict (succeeded,
failed, unhealthy, timed out, rejected, canceled), retry, rollback sent and
rolled back, with the reason the engine recorded. It only reads the two records:
what the engine decides stays in :mod:`fleet_controller.rollout_core`.

Pure: no clock, no I/O; the caller logs the lines once the step is saved.
"""

from __future__ import annotations

from fleet_controller.rollout_core import NodeProgress, RolloutRecord
from shared.messages import ModelRef, NodeRolloutState, RolloutState

__all__ = ["ENDED", "VERDICTS", "rollout_log_lines"]

N = NodeRolloutState
R = RolloutState

ENDED = frozenset({R.SUCCEEDED, R.FAILED, R.ABORTED, R.ROLLED_BACK})
"""Rollout states nothing follows but an operator's rollback."""

VERDICTS = frozenset({N.SUCCEEDED, N.FAILED, N.TIMED_OUT, N.REJECTED, N.CANCELED})
"""Per-node states that settle a node's attempt (``rolled_back`` is logged apart)."""


def rollout_log_lines(
    old: RolloutRecord, new: RolloutRecord, *, operator: str | None = None
) -> list[str]:
    """One line per change from ``old`` to ``new`` (the same rollout), in order.

    ``operator``: the step was that operator's pause, resume, abort or rollback
    (None: a tick, where a move to ``failed`` or ``rolling_back`` is a halt).
    """
    prefix = f"rollout {new.spec.rollout_id}"
    lines = [f"{prefix}: {line}" for line in _rollout_lines(old, new, operator)]
    for node_id, progress in sorted(new.nodes.items()):
        before = old.nodes.get(node_id)
        lines += [
            f"{prefix}: node {node_id} {line}"
            for line in _node_lines(before, progress, new.spec.max_retries)
        ]
    if new.state is not old.state and new.state in ENDED:
        lines.append(f"{prefix} ended: {new.state.value}{_why(new.reason)}")
    return lines


_OPERATOR_WORDS = {
    R.PAUSED: "paused",
    R.RUNNING: "resumed",
    R.ABORTED: "aborted",
    R.ROLLING_BACK: "rollback requested",
}


def _rollout_lines(old: RolloutRecord, new: RolloutRecord, operator: str | None) -> list[str]:
    lines = []
    if new.state is not old.state:
        if old.state is R.PENDING and new.state is not R.ABORTED:
            model = new.spec.model
            lines.append(f"started: {model.name}@{model.version}, waves {_waves(new)}")
        if operator is not None and new.state in _OPERATOR_WORDS:
            lines.append(f"{_OPERATOR_WORDS[new.state]} by {operator}")
        elif operator is None and new.state is R.ROLLING_BACK:
            lines.append(f"halted, rolling back{_why(new.reason)}")
        elif operator is None and new.state is R.FAILED:
            lines.append(f"halted{_why(new.reason)}")
    if new.wave_started_at is not None and (new.wave != old.wave or old.wave_started_at is None):
        waves = new.spec.waves
        lines.append(
            f"wave {new.wave + 1}/{len(waves)} started ({waves[new.wave]:g}% of the selection)"
        )
    return lines


def _node_lines(old: NodeProgress | None, new: NodeProgress, max_retries: int) -> list[str]:
    if old is None:
        return []
    lines = []
    if new.attempts > old.attempts:
        after = f" after {_verdict(old)}{_why(old.reason)}" if old.state in VERDICTS else ""
        lines.append(f"retry {new.attempts - 1} of {max_retries}{after}")
    elif new.state is not old.state and new.state in VERDICTS:
        lines.append(f"{_verdict(new)}{_why(new.reason)}")
    if new.rollback_sent and not old.rollback_sent:
        lines.append(f"rolling back to {_model(new.from_model)}")
    elif old.rollback_sent and not new.rollback_sent and new.state is not N.ROLLED_BACK:
        lines.append("no answer to its rollback: sending it again")
    if new.state is N.ROLLED_BACK and old.state is not N.ROLLED_BACK:
        lines.append(f"rolled back to {_model(new.from_model)}")
    return lines


def _verdict(progress: NodeProgress) -> str:
    if progress.state is N.FAILED and progress.code == "unhealthy":
        return "unhealthy"
    if progress.state is N.FAILED and progress.code:
        return f"failed ({progress.code})"
    return progress.state.value.replace("_", " ")


def _waves(record: RolloutRecord) -> str:
    return ",".join(f"{percent:g}%" for percent in record.spec.waves)


def _model(ref: ModelRef | None) -> str:
    return "its previous model" if ref is None else f"{ref.name}@{ref.version}"


def _why(reason: str | None) -> str:
    return f": {reason}" if reason else ""
