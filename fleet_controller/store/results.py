"""Results and reports: stored inference results, fleet-wide counts, retention.

Invariants:

* Reads only, except :meth:`ResultRepository.prune`, which deletes telemetry
  and results by age. A pruned result never comes back: its outbox slot was
  acked, so a re-send is skipped by ingest.
* Reports are JSON-ready dicts, aggregated by the database (one read
  transaction, so the counts agree with each other).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, delete, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_controller.store.database import Database
from fleet_controller.store.errors import StoreError
from fleet_controller.store.records import ResultInfo, model_ref, version_key
from fleet_controller.store.tables import ALL_TABLES, NODES, RESULTS, TELEMETRY, NodeRow, ResultRow
from shared.messages import TensorData, TopK

__all__ = ["ResultRepository"]


class ResultRepository:
    """``store.results``: stored results, the report, table counts, pruning."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def report(self) -> dict[str, Any]:
        """Counts per node and per model: results, corner cases, mean latency (ms).

        ``{"totals": {...}, "nodes": [{node_id, results, corner_cases,
        mean_latency_ms}], "models": [{name, version, sha256, results,
        corner_cases, mean_latency_ms}]}``, JSON-ready, nodes by id and models by
        name then version. Raises: StoreError.
        """
        with self._db.session(write=False) as s:
            return _report(s)

    def table_counts(self) -> dict[str, int]:
        """Rows per table, by table name (for operators and tests). Raises: StoreError."""
        with self._db.session(write=False) as s:
            conn = s.connection()
            return {
                table.name: int(
                    conn.execute(sa_select(func.count()).select_from(table)).scalar_one()
                )
                for table in ALL_TABLES
            }

    def prune(self, telemetry_before: float, results_before: float) -> tuple[int, int]:
        """Delete telemetry and results older than the given times (UNIX seconds).

        Returns (telemetry rows deleted, results deleted). A pruned result never
        comes back: its outbox slot is acked, so a re-send is skipped.

        Raises: StoreError.
        """
        with self._db.session(write=True) as s:
            telemetry = s.exec(delete(TELEMETRY).where(TELEMETRY.c.ts < telemetry_before))
            results = s.exec(delete(RESULTS).where(RESULTS.c.ts < results_before))
            return max(0, telemetry.rowcount), max(0, results.rowcount)

    def list(self, node_id: str | None = None, limit: int = 100) -> builtins.list[ResultInfo]:
        """The ``limit`` newest results (of one node, or all), newest first.

        Raises: StoreError.
        """
        query = select(ResultRow).order_by(
            col(ResultRow.ts).desc(), col(ResultRow.node_id), col(ResultRow.seq).desc()
        )
        if node_id is not None:
            query = query.where(col(ResultRow.node_id) == node_id)
        with self._db.session(write=False) as s:
            rows = s.exec(query.limit(max(0, limit))).all()
            return [_result_info(row) for row in rows]


def _report(s: Session) -> dict[str, Any]:
    corner = func.sum(case((col(ResultRow.corner_case), 1), else_=0))
    count = func.count()
    latency = func.avg(col(ResultRow.latency_ms))
    per_node = s.exec(
        select(col(ResultRow.node_id), count, corner, latency)
        .group_by(col(ResultRow.node_id))
        .order_by(col(ResultRow.node_id))
    ).all()
    model_columns = (
        col(ResultRow.model_name),
        col(ResultRow.model_version),
        col(ResultRow.model_sha256),
    )
    per_model = (
        s.connection()
        .execute(sa_select(*model_columns, count, corner, latency).group_by(*model_columns))
        .all()
    )
    total = s.exec(select(count, corner, latency).select_from(RESULTS)).one()
    nodes_known = s.exec(select(func.count()).select_from(NODES)).one()
    nodes_online = s.exec(select(func.count()).select_from(NODES).where(col(NodeRow.online))).one()
    telemetry = s.exec(select(func.count()).select_from(TELEMETRY)).one()
    return {
        "totals": {
            **_counts(total[0], total[1], total[2]),
            "nodes": int(nodes_known),
            "nodes_online": int(nodes_online),
            "telemetry": int(telemetry),
        },
        "nodes": [{"node_id": node_id, **_counts(n, c, lat)} for node_id, n, c, lat in per_node],
        "models": _model_lines(per_model),
    }


def _model_lines(per_model: Sequence[Any]) -> list[dict[str, Any]]:
    models = [
        {"name": name, "version": version, "sha256": sha, **_counts(n, c, lat)}
        for name, version, sha, n, c, lat in per_model
    ]
    models.sort(key=lambda m: (str(m["name"]), version_key(str(m["version"])), m["sha256"]))
    return models


def _counts(results: Any, corner_cases: Any, mean_latency: Any) -> dict[str, Any]:
    """One aggregate line; SUM and AVG are NULL over no rows."""
    return {
        "results": int(results),
        "corner_cases": int(corner_cases or 0),
        "mean_latency_ms": None if mean_latency is None else round(float(mean_latency), 3),
    }


def _topk(stored: list[Any]) -> tuple[TopK, ...]:
    """A stored top-k: ``[[index, score, label], ...]`` as results arrive since
    result batch version 2, or ``[{"index", "label", "score"}, ...]`` before."""
    return tuple(
        TopK(index=t[0], score=t[1], label=t[2]) if isinstance(t, list) else TopK.model_validate(t)
        for t in stored
    )


def _result_info(row: ResultRow) -> ResultInfo:
    what = f"result {row.node_id}/{row.seq}"
    model = model_ref(row.model_name, row.model_version, row.model_sha256, what)
    if model is None:  # pragma: no cover - the columns are NOT NULL
        raise StoreError(f"{what}: no model")
    try:
        topk = None if row.topk_json is None else _topk(json.loads(row.topk_json))
        tensors = (
            None
            if row.tensors_json is None
            else tuple(TensorData.model_validate(t) for t in json.loads(row.tensors_json))
        )
    except (ValueError, TypeError, IndexError):
        raise StoreError(f"{what}: stored top-k or tensors are corrupt") from None
    return ResultInfo(
        node_id=row.node_id,
        seq=row.seq,
        model=model,
        input_digest=row.input_digest,
        latency_ms=row.latency_ms,
        ts=row.ts,
        topk=topk,
        tensors=tensors,
        corner_case=row.corner_case,
        source=row.source,
    )
