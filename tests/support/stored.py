"""What the controller stored, read straight from its database, and node rows' models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import create_engine, text

__all__ = ["model_of", "statuses", "telemetry"]


def _rows(db_url: str, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(text(sql), params).mappings()]
    finally:
        engine.dispose()


def statuses(db_url: str, rollout_id: str) -> list[dict[str, Any]]:
    """The node statuses the controller stored for ``rollout_id`` (its ``statuses``
    table), oldest first: ``node_id``, ``seq``, ``command_id``, ``state``, ``code``,
    ``duplicate``, ``ts``."""
    return _rows(
        db_url,
        "SELECT node_id, seq, command_id, state, code, duplicate, ts FROM statuses "
        "WHERE rollout_id = :rollout ORDER BY ts, id",
        {"rollout": rollout_id},
    )


def telemetry(db_url: str, since: float) -> list[dict[str, Any]]:
    """Telemetry rows stored since ``since``: ``node_id``, ``ts``, ``model_sha256``,
    ``inferences``, ``errors``, ``p95_ms``; oldest first."""
    return _rows(
        db_url,
        "SELECT node_id, ts, model_sha256, inferences, errors, p95_ms FROM telemetry "
        "WHERE ts >= :since ORDER BY ts, id",
        {"since": since},
    )


def model_of(node_row: Mapping[str, Any]) -> str | None:
    """``NAME@VERSION`` of a ``nodes.list`` row's running model (None: no model)."""
    model = node_row.get("model")
    if not model:
        return None
    return f"{model['name']}@{model['version']}"
