"""The database tables (SQLModel, ``table=True``) and their SQLAlchemy ``Table`` objects.

Tables live here, never in ``shared/``: the wire format and the schema change
for different reasons. A change here changes stored data: it needs a new
:data:`~fleet_controller.store.database.SCHEMA_VERSION`.

Counters, sequences and sizes are 64-bit on the wire: BIGINT columns. Surrogate
ids are BIGINT on PostgreSQL but INTEGER on SQLite, where only "INTEGER PRIMARY
KEY" is the auto-incrementing rowid. Times are UNIX seconds (floats): no time
zones, no datetime adapters.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, Table, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = [
    "ALL_TABLES",
    "AUDIT",
    "DEPLOYMENTS",
    "LEASES",
    "META",
    "MODELS",
    "NODES",
    "NONCES",
    "RESULTS",
    "ROLLOUTS",
    "ROLLOUT_EVENTS",
    "ROLLOUT_NODES",
    "SLOTS",
    "STATUSES",
    "TELEMETRY",
    "AuditRow",
    "DeploymentRow",
    "LeaseRow",
    "MetaRow",
    "ModelRow",
    "NodeRow",
    "RequestNonceRow",
    "ResultRow",
    "RolloutEventRow",
    "RolloutNodeRow",
    "RolloutRow",
    "StatusRow",
    "StoredSlotRow",
    "TelemetryRow",
]

_BIG = BigInteger()
_ID = BigInteger().with_variant(Integer(), "sqlite")


class MetaRow(SQLModel, table=True):
    """``schema_version`` and ``command_seq`` (the last command sequence issued)."""

    __tablename__ = "meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=Text)


class NodeRow(SQLModel, table=True):
    __tablename__ = "nodes"

    node_id: str = Field(primary_key=True, max_length=64)
    online: bool = False
    session: int = Field(default=0, sa_type=_BIG)
    agent_version: str = ""
    labels: str = Field(default="{}", sa_type=Text)  # JSON object: what the node announces
    # JSON object: operators' labels on top (a value sets, null hides the node's own)
    central_labels: str = Field(default="{}", sa_type=Text)
    capabilities: str | None = Field(default=None, sa_type=Text)  # JSON of Capabilities
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = Field(default=None, max_length=64)
    previous: str | None = Field(default=None, sa_type=Text)  # JSON of ModelRef
    last_seen: float = 0.0
    acked_seq: int = Field(default=0, sa_type=_BIG)  # highest contiguous stored slot
    revoked: bool = False


class DeploymentRow(SQLModel, table=True):
    """What a group of nodes should run (``fleetctl deployment set``)."""

    __tablename__ = "deployments"

    name: str = Field(primary_key=True, max_length=64)
    selector: str = Field(sa_type=Text)  # canonical selector text
    model_name: str
    model_version: str
    model_sha256: str = Field(max_length=64)
    policy_json: str = Field(sa_type=Text)  # the RolloutPolicy new rollouts get
    rollout_id: str | None = Field(default=None, max_length=64)  # the latest one started
    held: str = Field(default="{}", sa_type=Text)  # JSON {node: reason}: given up on target
    created_by: str
    created_at: float
    updated_at: float


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    name: str
    version: str
    sha256: str = Field(index=True, max_length=64)
    size: int = Field(sa_type=_BIG)  # bytes
    manifest_json: str = Field(sa_type=Text)
    envelope: str = Field(sa_type=Text)  # the release-signed DSSE envelope, as received
    added_by: str
    added_at: float


class RolloutRow(SQLModel, table=True):
    __tablename__ = "rollouts"

    rollout_id: str = Field(primary_key=True, max_length=64)
    model_name: str
    model_version: str
    model_sha256: str = Field(max_length=64)
    state: str
    wave: int
    record_json: str = Field(sa_type=Text)
    created_by: str
    created_at: float
    updated_at: float
    reason: str | None = Field(default=None, sa_type=Text)


class RolloutNodeRow(SQLModel, table=True):
    __tablename__ = "rollout_nodes"

    rollout_id: str = Field(primary_key=True, max_length=64)
    node_id: str = Field(primary_key=True, max_length=64)
    state: str
    wave: int
    attempts: int
    code: str | None = None
    reason: str | None = Field(default=None, sa_type=Text)
    updated_at: float


class RolloutEventRow(SQLModel, table=True):
    __tablename__ = "rollout_events"

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    rollout_id: str = Field(index=True, max_length=64)
    node_id: str = Field(max_length=64)
    state: str
    code: str | None = None
    reason: str | None = Field(default=None, sa_type=Text)
    ts: float


class TelemetryRow(SQLModel, table=True):
    __tablename__ = "telemetry"
    # (node_id, ts) serves both "this node" and "these nodes since t" (health samples).
    __table_args__ = (Index("ix_telemetry_node_ts", "node_id", "ts"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    node_id: str = Field(max_length=64)
    ts: float = Field(index=True)
    inferences: int = Field(sa_type=_BIG)
    errors: int = Field(sa_type=_BIG)
    skips: int = Field(sa_type=_BIG)
    queue_depth: int = Field(sa_type=_BIG)
    outbox_depth: int = Field(sa_type=_BIG)
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_percent: float
    memory_bytes: int = Field(sa_type=_BIG)
    model_sha256: str | None = Field(default=None, max_length=64)
    # The period's runs for the health gate (schema version 2; NULL when the node
    # sent no period): successful runs, failed runs, and the latency histogram as
    # compact JSON ``[[bucket, count], ...]`` in the scheme of shared.histogram.
    period_inferences: int | None = Field(default=None, sa_type=_BIG)
    period_errors: int | None = Field(default=None, sa_type=_BIG)
    latency_hist: str | None = Field(default=None, sa_type=Text)


class ResultRow(SQLModel, table=True):
    __tablename__ = "results"

    node_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(primary_key=True, sa_type=_BIG, sa_column_kwargs={"autoincrement": False})
    model_name: str
    model_version: str
    model_sha256: str = Field(max_length=64)
    input_digest: str = Field(max_length=64)
    latency_ms: float
    ts: float = Field(index=True)
    topk_json: str | None = Field(default=None, sa_type=Text)
    tensors_json: str | None = Field(default=None, sa_type=Text)
    corner_case: bool = False
    source: str | None = Field(default=None, sa_type=Text)


class StoredSlotRow(SQLModel, table=True):
    """Outbox slots stored above the node's contiguous ``acked_seq`` (a gap below them)."""

    __tablename__ = "stored_slots"

    node_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(primary_key=True, sa_type=_BIG, sa_column_kwargs={"autoincrement": False})


class StatusRow(SQLModel, table=True):
    __tablename__ = "statuses"
    __table_args__ = (UniqueConstraint("node_id", "seq", name="uq_statuses_node_seq"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    node_id: str = Field(max_length=64)
    seq: int = Field(sa_type=_BIG)  # the node's outbox slot
    command_id: str | None = Field(default=None, max_length=64)
    rollout_id: str | None = Field(default=None, index=True, max_length=64)
    state: str
    code: str | None = None
    reason: str | None = Field(default=None, sa_type=Text)
    progress: float | None = None
    duplicate: bool = False
    # Folded into its rollout's record (in the transaction that saved the record).
    applied: bool = Field(default=False, index=True)
    ts: float


class AuditRow(SQLModel, table=True):
    __tablename__ = "audit"

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    ts: float = Field(index=True)
    operator: str
    action: str
    args_json: str = Field(sa_type=Text)
    outcome: str
    detail: str | None = Field(default=None, sa_type=Text)


class RequestNonceRow(SQLModel, table=True):
    """Nonces of operator requests still live: a request seen twice is a replay."""

    __tablename__ = "request_nonces"

    nonce: str = Field(primary_key=True, max_length=32)
    operator: str = Field(max_length=64)
    expires_at: float = Field(index=True)


class LeaseRow(SQLModel, table=True):
    """Who may drive rollouts (schema version 5): one row per lease ``name``.

    ``expires_at`` is in the database's clock (UNIX seconds); ``token`` grows by
    one at every acquisition, never at a renewal, so it names one term.
    """

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=64)
    token: int = Field(sa_type=_BIG)
    expires_at: float
    acquired_at: float


def _table(model: type[SQLModel]) -> Table:
    table = model.__dict__.get("__table__")
    if not isinstance(table, Table):  # pragma: no cover - every class above is a table
        raise TypeError(f"{model.__name__} is not a table class")
    return table


META = _table(MetaRow)
NODES = _table(NodeRow)
MODELS = _table(ModelRow)
ROLLOUTS = _table(RolloutRow)
ROLLOUT_NODES = _table(RolloutNodeRow)
ROLLOUT_EVENTS = _table(RolloutEventRow)
TELEMETRY = _table(TelemetryRow)
RESULTS = _table(ResultRow)
SLOTS = _table(StoredSlotRow)
STATUSES = _table(StatusRow)
AUDIT = _table(AuditRow)
DEPLOYMENTS = _table(DeploymentRow)
NONCES = _table(RequestNonceRow)
LEASES = _table(LeaseRow)
ALL_TABLES = (
    META,
    NODES,
    MODELS,
    ROLLOUTS,
    ROLLOUT_NODES,
    ROLLOUT_EVENTS,
    TELEMETRY,
    RESULTS,
    SLOTS,
    STATUSES,
    AUDIT,
    DEPLOYMENTS,
    NONCES,
    LEASES,
)
