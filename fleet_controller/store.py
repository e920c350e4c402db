"""The controller's database: nodes, models, rollouts, telemetry, results, audit log.

One :class:`Store` per process, opened with :meth:`Store.open` on any supported
SQLAlchemy URL: a plain path or ``sqlite:///path`` (a SQLite file) or
``postgresql+psycopg://user@host/db`` (``postgresql://`` and ``postgres://``
mean the same). Table classes (SQLModel, ``table=True``) live here, never in
``shared/``: the wire format and the schema change for different reasons.

Invariants:

* **Synchronous and thread-safe.** Every method runs in its own transaction on
  its own pooled connection (``pool_pre_ping``), so the asyncio service calls
  it from worker threads (:func:`asyncio.to_thread`). Rows never leave a
  method: callers get frozen dataclasses (``*Info``) or engine records.
* **Durable before ack.** :meth:`Store.ingest` stores a node's results,
  statuses and telemetry in ONE transaction and returns the acks to publish
  only after it committed. Each result is stored once per (node, result seq),
  each status once per (node, outbox slot), however often the node re-sends
  them; an outbox slot at or below the node's ``acked_seq``, or already held in
  ``stored_slots``, was committed with its whole content and is skipped (so
  results pruned since cannot come back). On SQLite every commit is fsynced
  (WAL, ``synchronous=FULL`` by default): an ack lets the node delete the data,
  so "committed" must survive a power loss, not only a process crash.
* **Safe with two controllers on PostgreSQL.** Writers lock the rows they
  decide on (``SELECT ... FOR UPDATE``, node rows in sorted order so two
  ingests never deadlock); the command sequence is one ``UPDATE ... RETURNING``.
  On SQLite every write transaction is ``BEGIN IMMEDIATE`` (one writer at a
  time, waiting up to ``busy_timeout``), so no write ever fails half-way with
  "database is locked".
* **Sparkplug-style node state.** A death whose session is older than the
  stored one is stale and ignored; a birth always wins.
* **Schema versioned.** ``meta.schema_version`` is written on creation; a
  database written by a newer controller is refused, never modified.
* **One-line errors.** Every database failure surfaces as :class:`StoreError`
  (a :class:`~shared.errors.EdgeFleetError`) whose message is one line, with
  any password in the URL hidden.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    text,
    update,
)
from sqlalchemy import (
    select as sa_select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, select

from fleet_controller.rollout_codec import record_from_json, record_to_json
from fleet_controller.rollout_core import HealthSample, RolloutRecord
from shared.errors import DecodeError, EdgeFleetError
from shared.messages import (
    Capabilities,
    InferenceResult,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    ResultBatch,
    RolloutState,
    Telemetry,
    TensorData,
    TopK,
    decode,
    encode,
)
from shared.version import SemVer

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "SCHEMA_VERSION",
    "AuditInfo",
    "AuditRow",
    "DuplicateModelError",
    "DuplicateRolloutError",
    "MetaRow",
    "ModelInfo",
    "ModelRow",
    "NodeInfo",
    "NodeRow",
    "PendingStatus",
    "ResultInfo",
    "ResultRow",
    "RolloutEventInfo",
    "RolloutEventRow",
    "RolloutInfo",
    "RolloutNodeRow",
    "RolloutRow",
    "StatusRow",
    "Store",
    "StoreError",
    "StoredSlotRow",
    "TelemetryRow",
    "UnknownRolloutError",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
ACTIVE_ROLLOUT_STATES = frozenset(
    {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)

SQLITE_BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another writer's lock
PG_CONNECT_TIMEOUT_S = 10  # unless the URL says otherwise (``?connect_timeout=N``)
_MAX_MESSAGE_CHARS = 300  # of a driver error, in the one-line StoreError
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_WRITE = "edgefleet_write"  # execution option: this transaction writes (SQLite: IMMEDIATE)
_OPEN_LOCK_KEY = 0x45_46_4C_45_45_54  # pg_advisory_xact_lock key serializing schema creation


class StoreError(EdgeFleetError):
    """The database cannot be opened or failed an operation. The message is one line."""


class DuplicateModelError(StoreError):
    """A model of that name and version is registered already."""


class DuplicateRolloutError(StoreError):
    """A rollout with that id exists already."""


class UnknownRolloutError(StoreError):
    """No rollout with that id is stored."""


# ----- tables -----------------------------------------------------------------------
# Counters, sequences and sizes are 64-bit on the wire: BIGINT columns. Surrogate
# ids are BIGINT on PostgreSQL but INTEGER on SQLite, where only "INTEGER
# PRIMARY KEY" is the auto-incrementing rowid. Times are UNIX seconds (floats):
# no time zones, no datetime adapters.

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
    labels: str = Field(default="{}", sa_type=Text)  # JSON object
    capabilities: str | None = Field(default=None, sa_type=Text)  # JSON of Capabilities
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = Field(default=None, max_length=64)
    previous: str | None = Field(default=None, sa_type=Text)  # JSON of ModelRef
    last_seen: float = 0.0
    acked_seq: int = Field(default=0, sa_type=_BIG)  # highest contiguous stored slot
    revoked: bool = False


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


def _table(model: type[SQLModel]) -> Table:
    table = model.__dict__.get("__table__")
    if not isinstance(table, Table):  # pragma: no cover - every class above is a table
        raise TypeError(f"{model.__name__} is not a table class")
    return table


_META = _table(MetaRow)
_NODES = _table(NodeRow)
_MODELS = _table(ModelRow)
_ROLLOUTS = _table(RolloutRow)
_ROLLOUT_NODES = _table(RolloutNodeRow)
_ROLLOUT_EVENTS = _table(RolloutEventRow)
_TELEMETRY = _table(TelemetryRow)
_RESULTS = _table(ResultRow)
_SLOTS = _table(StoredSlotRow)
_STATUSES = _table(StatusRow)
_AUDIT = _table(AuditRow)
_TABLES = (
    _META,
    _NODES,
    _MODELS,
    _ROLLOUTS,
    _ROLLOUT_NODES,
    _ROLLOUT_EVENTS,
    _TELEMETRY,
    _RESULTS,
    _SLOTS,
    _STATUSES,
    _AUDIT,
)


# ----- what callers get ---------------------------------------------------------------


def _ref_dict(ref: ModelRef | None) -> dict[str, str] | None:
    return None if ref is None else ref.model_dump(mode="json")


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingStatus:
    """A stored node status not yet folded into its rollout's record."""

    node_id: str
    seq: int
    state: NodeRolloutState
    code: str | None
    reason: str | None
    duplicate: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    node_id: str
    online: bool
    session: int
    agent_version: str
    labels: Mapping[str, str]
    capabilities: Capabilities | None
    model: ModelRef | None
    previous_model: ModelRef | None
    last_seen: float  # UNIX seconds
    acked_seq: int
    revoked: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "node_id": self.node_id,
            "online": self.online,
            "session": self.session,
            "agent_version": self.agent_version,
            "labels": dict(self.labels),
            "capabilities": None
            if self.capabilities is None
            else self.capabilities.model_dump(mode="json"),
            "model": _ref_dict(self.model),
            "previous_model": _ref_dict(self.previous_model),
            "last_seen": self.last_seen,
            "acked_seq": self.acked_seq,
            "revoked": self.revoked,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    id: int
    name: str
    version: str
    sha256: str
    size: int  # bytes
    manifest_json: str  # the manifest as signed (the envelope's payload)
    envelope: str  # the DSSE envelope JSON, exactly as received
    added_by: str
    added_at: float

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)

    @property
    def manifest(self) -> ModelManifest:
        """The parsed manifest. Raises: StoreError if the stored text is corrupt."""
        try:
            return decode(ModelManifest, self.manifest_json.encode())
        except DecodeError as exc:
            raise StoreError(f"model {self.name}@{self.version}: stored manifest: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the manifest and envelope texts."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "added_by": self.added_by,
            "added_at": self.added_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutInfo:
    rollout_id: str
    model: ModelRef
    state: RolloutState
    wave: int  # 0-based, as in the record
    created_by: str
    created_at: float
    updated_at: float
    reason: str | None
    node_counts: Mapping[str, int] = field(default_factory=dict)  # per-node state -> nodes

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "model": _ref_dict(self.model),
            "state": self.state.value,
            "wave": self.wave,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "node_counts": dict(self.node_counts),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutEventInfo:
    id: int
    rollout_id: str
    node_id: str
    state: NodeRolloutState
    code: str | None
    reason: str | None
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rollout_id": self.rollout_id,
            "node_id": self.node_id,
            "state": self.state.value,
            "code": self.code,
            "reason": self.reason,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditInfo:
    id: int
    ts: float
    operator: str
    action: str
    args: Mapping[str, Any]
    outcome: str
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "operator": self.operator,
            "action": self.action,
            "args": dict(self.args),
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultInfo:
    node_id: str
    seq: int
    model: ModelRef
    input_digest: str
    latency_ms: float
    ts: float
    topk: tuple[TopK, ...] | None
    tensors: tuple[TensorData, ...] | None
    corner_case: bool
    source: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "seq": self.seq,
            "model": _ref_dict(self.model),
            "input_digest": self.input_digest,
            "latency_ms": self.latency_ms,
            "ts": self.ts,
            "topk": None if self.topk is None else [t.model_dump(mode="json") for t in self.topk],
            "tensors": None
            if self.tensors is None
            else [t.model_dump(mode="json") for t in self.tensors],
            "corner_case": self.corner_case,
            "source": self.source,
        }


# ----- helpers -------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _first_line(text: str) -> str:
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            return (
                line if len(line) <= _MAX_MESSAGE_CHARS else line[: _MAX_MESSAGE_CHARS - 3] + "..."
            )
    return ""


def _describe(exc: BaseException) -> str:
    """One line for a database error: the driver's own first line, not SQLAlchemy's dump."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        line = _first_line(str(exc.orig))
        return line or type(exc.orig).__name__
    return _first_line(str(exc)) or type(exc).__name__


def _ref(name: str | None, version: str | None, sha256: str | None, what: str) -> ModelRef | None:
    if name is None or version is None or sha256 is None:
        return None
    try:
        return ModelRef(name=name, version=version, sha256=sha256)
    except ValidationError:
        raise StoreError(f"{what}: stored model reference is invalid") from None


def _node_info(row: NodeRow) -> NodeInfo:
    what = f"node {row.node_id}"
    try:
        labels = json.loads(row.labels)
        capabilities = (
            None if row.capabilities is None else Capabilities.model_validate_json(row.capabilities)
        )
        previous = None if row.previous is None else ModelRef.model_validate_json(row.previous)
    except ValueError:  # JSONDecodeError and pydantic's ValidationError both are
        raise StoreError(f"{what}: stored labels, capabilities or model are corrupt") from None
    return NodeInfo(
        node_id=row.node_id,
        online=row.online,
        session=row.session,
        agent_version=row.agent_version,
        labels=labels,
        capabilities=capabilities,
        model=_ref(row.model_name, row.model_version, row.model_sha256, what),
        previous_model=previous,
        last_seen=row.last_seen,
        acked_seq=row.acked_seq,
        revoked=row.revoked,
    )


def _model_info(row: ModelRow) -> ModelInfo:
    if row.id is None:  # pragma: no cover - a stored row always has its id
        raise StoreError(f"model {row.name}@{row.version} has no id")
    return ModelInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        manifest_json=row.manifest_json,
        envelope=row.envelope,
        added_by=row.added_by,
        added_at=row.added_at,
    )


def _rollout_info(row: RolloutRow, counts: Mapping[str, int]) -> RolloutInfo:
    what = f"rollout {row.rollout_id}"
    model = _ref(row.model_name, row.model_version, row.model_sha256, what)
    if model is None:  # pragma: no cover - the columns are NOT NULL
        raise StoreError(f"{what}: no model")
    try:
        state = RolloutState(row.state)
    except ValueError:
        raise StoreError(f"{what}: unknown state {row.state!r}") from None
    return RolloutInfo(
        rollout_id=row.rollout_id,
        model=model,
        state=state,
        wave=row.wave,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reason=row.reason,
        node_counts=dict(counts),
    )


# Results are the hot path: one reused encoder (the C one), keys in a fixed order.
_ROW_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _topk_json(topk: Sequence[TopK] | None) -> str | None:
    if topk is None:
        return None
    return _ROW_JSON.encode([{"index": t.index, "label": t.label, "score": t.score} for t in topk])


def _tensors_json(tensors: Sequence[TensorData] | None) -> str | None:
    if tensors is None:
        return None
    return _ROW_JSON.encode(
        [
            {"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape), "data": list(t.data)}
            for t in tensors
        ]
    )


def _result_info(row: ResultRow) -> ResultInfo:
    what = f"result {row.node_id}/{row.seq}"
    model = _ref(row.model_name, row.model_version, row.model_sha256, what)
    if model is None:  # pragma: no cover - the columns are NOT NULL
        raise StoreError(f"{what}: no model")
    try:
        topk = (
            None
            if row.topk_json is None
            else tuple(TopK.model_validate(t) for t in json.loads(row.topk_json))
        )
        tensors = (
            None
            if row.tensors_json is None
            else tuple(TensorData.model_validate(t) for t in json.loads(row.tensors_json))
        )
    except (ValueError, TypeError):
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


def _normalize_url(url: str) -> URL:
    """Raises: StoreError for a malformed URL or an unsupported database."""
    if "://" not in url:
        if not url.strip():
            raise StoreError("no database given: pass a file path or a database URL")
        return URL.create("sqlite", database=str(Path(url).expanduser()))
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise StoreError(f"invalid database URL: {_describe(exc)}") from None
    except ValueError as exc:  # e.g. a port that is not a number
        raise StoreError(f"invalid database URL: {_first_line(str(exc))}") from None
    # Split the name ourselves: URL.get_driver_name() loads the dialect to find its default.
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql":
        # psycopg (3) is the driver we ship; "postgresql://" alone would ask for psycopg2.
        return parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise StoreError("an in-memory SQLite database is not supported: give a file path")
        return parsed
    raise StoreError(
        f"unsupported database {backend!r}: use a SQLite file or a postgresql+psycopg:// URL"
    )


# ----- the store -----------------------------------------------------------------------


class Store:
    """The controller's store. See the module docstring for what it guarantees.

    ``Store(url)`` and ``Store.open(url)`` are the same: both connect, create
    the tables, check the schema version and raise :class:`StoreError` if any
    of that fails.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        """Open the database at ``url`` (a path or a SQLAlchemy URL).

        ``schema`` (PostgreSQL only) puts every table in that schema, created
        if missing (``search_path`` is set per connection): separate test
        runs, or several fleets, in one database. ``sqlite_synchronous`` trades
        the fsync per commit (FULL, the default) for speed (NORMAL: a power
        loss may undo the last commits, which nodes have already been acked).

        Raises:
            StoreError: malformed or unsupported URL, unreachable server, bad
                credentials, a file that is not a database, a ``schema`` that is
                not a plain identifier or given for SQLite, a database whose
                schema version is newer than :data:`SCHEMA_VERSION`, or a bad
                ``sqlite_synchronous``.
        """
        if sqlite_synchronous not in ("FULL", "NORMAL"):
            raise StoreError(
                f"sqlite_synchronous must be FULL or NORMAL, not {sqlite_synchronous!r}"
            )
        parsed = _normalize_url(url)
        self._display = parsed.render_as_string(hide_password=True)
        self.dialect: str = "postgresql" if parsed.get_backend_name() == "postgresql" else "sqlite"
        if schema is not None and (
            self.dialect != "postgresql" or not _SCHEMA_NAME.fullmatch(schema)
        ):
            raise StoreError(
                f"schema {schema!r}: a plain identifier, and only for PostgreSQL databases"
            )
        self.schema = schema
        try:
            self._engine = self._create_engine(parsed, schema, sqlite_synchronous)
        except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open database {self._display}: {_describe(exc)}") from None
        self._writer = self._engine.execution_options(**{_WRITE: True})
        try:
            self._prepare()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise StoreError(f"cannot open database {self._display}: {_describe(exc)}") from None
        except StoreError:
            self._engine.dispose()
            raise

    @classmethod
    def open(
        cls,
        url: str,
        *,
        schema: str | None = None,
        sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> Store:
        """Same as ``Store(url, ...)``. Raises: StoreError (see :class:`Store`)."""
        return cls(url, schema=schema, sqlite_synchronous=sqlite_synchronous)

    def __repr__(self) -> str:
        return f"Store({self._display!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()

    # ----- setup -----------------------------------------------------------------------

    @staticmethod
    def _create_engine(
        url: URL, schema: str | None, synchronous: Literal["FULL", "NORMAL"]
    ) -> Engine:
        if url.get_backend_name() == "sqlite":
            engine = create_engine(url, pool_pre_ping=True)

            @event.listens_for(engine, "connect")
            def _configure(dbapi_connection: Any, _record: Any) -> None:
                # We issue BEGIN ourselves (below); pysqlite's implicit BEGIN is
                # deferred, and a deferred transaction that later writes can fail
                # with "database is locked" without waiting for busy_timeout.
                dbapi_connection.isolation_level = None
                cursor = dbapi_connection.cursor()
                try:
                    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                    mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        _log.warning("store: WAL unavailable, journal_mode=%s", mode)
                    cursor.execute(f"PRAGMA synchronous={synchronous}")
                finally:
                    cursor.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                write = conn.get_execution_options().get(_WRITE, False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        connect_args: dict[str, Any] = {"application_name": "edgefleet-controller"}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if schema is not None:
            connect_args["options"] = f"-csearch_path={schema}"
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    def _prepare(self) -> None:
        """Check the schema version, create missing tables, seed ``meta``, in one transaction."""
        with self._writer.begin() as conn:
            if self.dialect == "postgresql":
                # Two controllers starting together must not both CREATE TABLE.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _OPEN_LOCK_KEY})
                if self.schema is not None:
                    exists = conn.execute(
                        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"),
                        {"name": self.schema},
                    ).first()
                    if exists is None:
                        conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
            if inspect(conn).has_table(_META.name):
                stored = conn.execute(
                    select(_META.c.value).where(_META.c.key == "schema_version")
                ).scalar_one_or_none()
                try:
                    version = int(stored) if stored is not None else SCHEMA_VERSION
                except ValueError:
                    raise StoreError(
                        f"database {self._display}: schema_version {stored!r} is not a number"
                    ) from None
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"database {self._display} has schema version {version}, newer than "
                        f"this controller's {SCHEMA_VERSION}: upgrade edgefleet"
                    )
            SQLModel.metadata.create_all(conn, tables=list(_TABLES))
            conn.execute(
                self._insert(_META).on_conflict_do_nothing(index_elements=["key"]),
                [
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": "command_seq", "value": "0"},
                ],
            )

    def _insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    @contextmanager
    def _session(self, *, write: bool) -> Iterator[Session]:
        """One transaction on one pooled connection; database errors become StoreError."""
        try:
            with (
                Session(self._writer if write else self._engine, expire_on_commit=False) as s,
                s.begin(),
            ):
                yield s
        except SQLAlchemyError as exc:
            raise StoreError(f"database error ({self._display}): {_describe(exc)}") from None

    # ----- meta ------------------------------------------------------------------------

    def next_command_seq(self, floor: int = 0) -> int:
        """The next command sequence number, unique across controllers and above ``floor``.

        One ``UPDATE ... RETURNING`` (a row lock on PostgreSQL; ``BEGIN
        IMMEDIATE`` on SQLite): two controllers never draw the same number. The
        service passes the clock in milliseconds as ``floor``, so a controller
        whose database was lost still numbers above what nodes have applied.

        Raises: StoreError.
        """
        following = cast(_META.c.value, BigInteger) + 1
        chosen = case((following > floor, following), else_=literal(floor, BigInteger))
        statement = (
            update(_META)
            .where(_META.c.key == "command_seq")
            .values(value=cast(chosen, String))
            .returning(_META.c.value)
        )
        with self._session(write=True) as s:
            value = s.exec(statement).scalar_one_or_none()
        if value is None:
            raise StoreError("database has no command_seq row")
        return int(value)

    # ----- nodes -----------------------------------------------------------------------

    def _ensure_nodes(self, s: Session, node_ids: Sequence[str], now: float) -> None:
        """Create rows for unknown nodes (offline, session 0), in sorted order."""
        rows = [
            {
                "node_id": node_id,
                "online": False,
                "session": 0,
                "agent_version": "",
                "labels": "{}",
                "last_seen": now,
                "acked_seq": 0,
                "revoked": False,
            }
            for node_id in sorted(set(node_ids))
        ]
        if rows:
            s.exec(
                self._insert(_NODES).on_conflict_do_nothing(index_elements=["node_id"]), params=rows
            )

    def upsert_node_state(self, state: NodeState, now: float) -> bool:
        """Apply a birth or death (Sparkplug-style). Returns False when it was ignored.

        A birth (``online``) replaces everything the node reports and marks it
        online. A death marks it offline unless its ``session`` is older than the
        stored one (a late Will of a previous connection: ignored, False).
        A birth's ``outbox_floor`` raises ``acked_seq`` to just below it (never
        lowers it); ``revoked`` is never touched here.

        Raises: StoreError.
        """
        with self._session(write=True) as s:
            self._ensure_nodes(s, [state.node], now)
            stored = s.exec(
                select(col(NodeRow.session), col(NodeRow.last_seen))
                .where(col(NodeRow.node_id) == state.node)
                .with_for_update()
            ).one()
            session, last_seen = stored
            seen = max(last_seen, now)
            if state.online:
                model = state.model
                values: dict[str, Any] = {
                    "online": True,
                    "session": state.session,
                    "agent_version": state.agent_version,
                    "labels": _json(state.labels),
                    "capabilities": None
                    if state.capabilities is None
                    else state.capabilities.model_dump_json(),
                    "model_name": None if model is None else model.name,
                    "model_version": None if model is None else model.version,
                    "model_sha256": None if model is None else model.sha256,
                    "previous": None
                    if state.previous_model is None
                    else state.previous_model.model_dump_json(),
                    "last_seen": seen,
                }
                if state.outbox_floor is not None:
                    # Slots below the node's floor were acknowledged or never
                    # existed (a wiped node numbers from its clock): settled.
                    settled = state.outbox_floor - 1
                    values["acked_seq"] = case(
                        (_NODES.c.acked_seq < settled, settled), else_=_NODES.c.acked_seq
                    )
                    s.exec(
                        delete(_SLOTS).where(
                            _SLOTS.c.node_id == state.node, _SLOTS.c.seq <= settled
                        )
                    )
            elif state.session < session:
                return False
            else:
                values = {"online": False, "session": state.session, "last_seen": seen}
            s.exec(update(_NODES).where(_NODES.c.node_id == state.node).values(**values))
        return True

    def touch_node(self, node_id: str, now: float) -> None:
        """Record that ``node_id`` was heard from at ``now`` (creating it if unknown).

        Raises: StoreError.
        """
        with self._session(write=True) as s:
            self._ensure_nodes(s, [node_id], now)
            s.exec(
                update(_NODES)
                .where(_NODES.c.node_id == node_id, _NODES.c.last_seen < now)
                .values(last_seen=now)
            )

    def get_node(self, node_id: str) -> NodeInfo | None:
        """Raises: StoreError."""
        with self._session(write=False) as s:
            row = s.get(NodeRow, node_id)
            return None if row is None else _node_info(row)

    def list_nodes(self, selector: Mapping[str, str] | None = None) -> list[NodeInfo]:
        """Every node (revoked ones too) whose labels hold every ``key=value`` of
        ``selector``, by node id.

        Raises: StoreError.
        """
        with self._session(write=False) as s:
            rows = s.exec(select(NodeRow).order_by(col(NodeRow.node_id))).all()
            nodes = [_node_info(row) for row in rows]
        if not selector:
            return nodes
        return [n for n in nodes if all(n.labels.get(k) == v for k, v in selector.items())]

    def set_revoked(self, node_id: str, revoked: bool) -> None:
        """Mark a node revoked (or not). An unknown node gets a row, so a node
        revoked before it ever connected stays revoked.

        Raises: StoreError.
        """
        with self._session(write=True) as s:
            self._ensure_nodes(s, [node_id], 0.0)
            s.exec(update(_NODES).where(_NODES.c.node_id == node_id).values(revoked=revoked))

    # ----- models ----------------------------------------------------------------------

    def add_model(
        self, manifest: ModelManifest, envelope_json: str, added_by: str, now: float
    ) -> ModelInfo:
        """Register a release-signed manifest (the caller verified the envelope).

        Raises:
            DuplicateModelError: ``name@version`` is registered already.
            StoreError: the database failed.
        """
        row = ModelRow(
            name=manifest.name,
            version=manifest.version,
            sha256=manifest.sha256,
            size=manifest.size,
            manifest_json=encode(manifest).decode("utf-8"),
            envelope=envelope_json,
            added_by=added_by,
            added_at=now,
        )
        duplicate = DuplicateModelError(
            f"model {manifest.name}@{manifest.version} is registered already"
        )
        with self._session(write=True) as s:
            existing = s.exec(
                select(col(ModelRow.id)).where(
                    col(ModelRow.name) == manifest.name, col(ModelRow.version) == manifest.version
                )
            ).first()
            if existing is not None:
                raise duplicate
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # another controller added it meanwhile
                raise duplicate from None
            return _model_info(row)

    def get_model(self, name: str, version: str) -> ModelInfo | None:
        """Raises: StoreError."""
        with self._session(write=False) as s:
            row = s.exec(
                select(ModelRow).where(col(ModelRow.name) == name, col(ModelRow.version) == version)
            ).first()
            return None if row is None else _model_info(row)

    def get_model_by_sha(self, sha256: str) -> ModelInfo | None:
        """The first model registered with that digest. Raises: StoreError."""
        with self._session(write=False) as s:
            row = s.exec(
                select(ModelRow).where(col(ModelRow.sha256) == sha256).order_by(col(ModelRow.id))
            ).first()
            return None if row is None else _model_info(row)

    def list_models(self) -> list[ModelInfo]:
        """By name, then semantic version (oldest first). Raises: StoreError."""
        with self._session(write=False) as s:
            models = [_model_info(row) for row in s.exec(select(ModelRow)).all()]
        return sorted(models, key=_model_order)

    # ----- rollouts ----------------------------------------------------------------------

    def create_rollout(self, record: RolloutRecord, created_by: str, now: float) -> RolloutInfo:
        """Store a new rollout (and its nodes, if any, each with a first event).

        Raises:
            DuplicateRolloutError: a rollout with that id exists.
            StoreError: the database failed or the record cannot be encoded.
        """
        spec = record.spec
        row = RolloutRow(
            rollout_id=spec.rollout_id,
            model_name=spec.model.name,
            model_version=spec.model.version,
            model_sha256=spec.model.sha256,
            state=record.state.value,
            wave=record.wave,
            record_json=_encode_record(record),
            created_by=created_by,
            created_at=now,
            updated_at=now,
            reason=record.reason,
        )
        duplicate = DuplicateRolloutError(f"rollout {spec.rollout_id} exists already")
        with self._session(write=True) as s:
            if s.get(RolloutRow, spec.rollout_id) is not None:
                raise duplicate
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise duplicate from None
            self._write_rollout_nodes(s, record, {}, now)
            counts = _count_states(record)
            return _rollout_info(row, counts)

    def save_rollout(self, record: RolloutRecord, now: float) -> None:
        """Persist ``record``: its JSON, state, wave and reason; upsert its per-node
        rows; append an event for each node whose state or code changed versus
        what was stored (all in one transaction).

        Raises:
            UnknownRolloutError: no rollout with that id (use create_rollout).
            StoreError: the database failed or the record cannot be encoded.
        """
        with self._session(write=True) as s:
            self._lock_rollout(s, record.spec.rollout_id)
            self._save_locked(s, record, now)

    def step_rollout(
        self,
        rollout_id: str,
        fold: Callable[[RolloutRecord, list[PendingStatus]], tuple[RolloutRecord, T]],
        now: float,
    ) -> tuple[RolloutRecord, T]:
        """Advance one rollout atomically: lock it, load it with the node statuses
        not yet folded into it, let ``fold`` (pure) compute the new record, save
        it and mark those statuses applied, in one transaction.

        Only statuses at or below their node's contiguous ``acked_seq`` are
        handed over, in ``(node, seq)`` order: with several controllers ingesting,
        a status is folded only once every earlier slot of its node is stored,
        and exactly once, whichever controller ingested it.

        Raises:
            UnknownRolloutError: no rollout with that id.
            StoreError: the database failed or the stored record is unreadable.
        """
        with self._session(write=True) as s:
            self._lock_rollout(s, rollout_id)
            text_ = s.exec(
                select(col(RolloutRow.record_json)).where(col(RolloutRow.rollout_id) == rollout_id)
            ).one()
            try:
                record = record_from_json(text_)
            except DecodeError as exc:
                raise StoreError(f"rollout {rollout_id}: stored record unreadable: {exc}") from None
            rows = (
                s.connection()
                .execute(
                    sa_select(
                        _STATUSES.c.id,
                        _STATUSES.c.node_id,
                        _STATUSES.c.seq,
                        _STATUSES.c.state,
                        _STATUSES.c.code,
                        _STATUSES.c.reason,
                        _STATUSES.c.duplicate,
                    )
                    .join(_NODES, _NODES.c.node_id == _STATUSES.c.node_id)
                    .where(
                        _STATUSES.c.rollout_id == rollout_id,
                        _STATUSES.c.applied.is_(False),
                        _STATUSES.c.seq <= _NODES.c.acked_seq,
                    )
                    .order_by(_STATUSES.c.node_id, _STATUSES.c.seq)
                )
                .all()
            )
            pending = [
                PendingStatus(
                    node_id=r.node_id,
                    seq=r.seq,
                    state=NodeRolloutState(r.state),
                    code=r.code,
                    reason=r.reason,
                    duplicate=bool(r.duplicate),
                )
                for r in rows
            ]
            new, extra = fold(record, pending)
            if new != record:
                self._save_locked(s, new, now)
            if rows:
                s.exec(
                    update(_STATUSES)
                    .where(_STATUSES.c.id.in_([r.id for r in rows]))
                    .values(applied=True)
                )
            return new, extra

    def _lock_rollout(self, s: Session, rollout_id: str) -> None:
        found = s.exec(
            select(col(RolloutRow.rollout_id))
            .where(col(RolloutRow.rollout_id) == rollout_id)
            .with_for_update()
        ).first()
        if found is None:
            raise UnknownRolloutError(f"unknown rollout {rollout_id}")

    def _save_locked(self, s: Session, record: RolloutRecord, now: float) -> None:
        rollout_id = record.spec.rollout_id
        record_json = _encode_record(record)
        s.exec(
            update(_ROLLOUTS)
            .where(_ROLLOUTS.c.rollout_id == rollout_id)
            .values(
                state=record.state.value,
                wave=record.wave,
                reason=record.reason,
                record_json=record_json,
                updated_at=now,
            )
        )
        stored = {
            node_id: (state, wave, attempts, code, reason)
            for node_id, state, wave, attempts, code, reason in s.connection()
            .execute(
                sa_select(
                    col(RolloutNodeRow.node_id),
                    col(RolloutNodeRow.state),
                    col(RolloutNodeRow.wave),
                    col(RolloutNodeRow.attempts),
                    col(RolloutNodeRow.code),
                    col(RolloutNodeRow.reason),
                ).where(col(RolloutNodeRow.rollout_id) == rollout_id)
            )
            .all()
        }
        self._write_rollout_nodes(s, record, stored, now)

    def _write_rollout_nodes(
        self,
        s: Session,
        record: RolloutRecord,
        stored: Mapping[str, tuple[str, int, int, str | None, str | None]],
        now: float,
    ) -> None:
        rollout_id = record.spec.rollout_id
        rows: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for node_id in sorted(record.nodes):
            p = record.nodes[node_id]
            current = (p.state.value, p.wave, p.attempts, p.code, p.reason)
            before = stored.get(node_id)
            if before == current:
                continue
            rows.append(
                {
                    "rollout_id": rollout_id,
                    "node_id": node_id,
                    "state": p.state.value,
                    "wave": p.wave,
                    "attempts": p.attempts,
                    "code": p.code,
                    "reason": p.reason,
                    "updated_at": now,
                }
            )
            if before is None or (before[0], before[3]) != (p.state.value, p.code):
                events.append(
                    {
                        "rollout_id": rollout_id,
                        "node_id": node_id,
                        "state": p.state.value,
                        "code": p.code,
                        "reason": p.reason,
                        "ts": now,
                    }
                )
        if rows:
            insert = self._insert(_ROLLOUT_NODES)
            s.exec(
                insert.on_conflict_do_update(
                    index_elements=["rollout_id", "node_id"],
                    set_={
                        name: insert.excluded[name]
                        for name in ("state", "wave", "attempts", "code", "reason", "updated_at")
                    },
                ),
                params=rows,
            )
        if events:
            s.exec(_ROLLOUT_EVENTS.insert(), params=events)

    def load_rollout(self, rollout_id: str) -> RolloutRecord | None:
        """Raises: StoreError (also when the stored record is unreadable)."""
        with self._session(write=False) as s:
            text_ = s.exec(
                select(col(RolloutRow.record_json)).where(col(RolloutRow.rollout_id) == rollout_id)
            ).first()
        if text_ is None:
            return None
        try:
            return record_from_json(text_)
        except DecodeError as exc:
            raise StoreError(f"rollout {rollout_id}: stored record unreadable: {exc}") from None

    def list_rollouts(self, active_only: bool = False) -> list[RolloutInfo]:
        """Oldest first; ``active_only``: pending, running, paused or rolling back.

        Raises: StoreError.
        """
        query = select(RolloutRow).order_by(col(RolloutRow.created_at), col(RolloutRow.rollout_id))
        if active_only:
            query = query.where(
                col(RolloutRow.state).in_(sorted(s.value for s in ACTIVE_ROLLOUT_STATES))
            )
        with self._session(write=False) as s:
            rows = s.exec(query).all()
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            ids = [row.rollout_id for row in rows]
            if ids:
                for rollout_id, state, count in s.exec(
                    select(
                        col(RolloutNodeRow.rollout_id),
                        col(RolloutNodeRow.state),
                        func.count(),
                    )
                    .where(col(RolloutNodeRow.rollout_id).in_(ids))
                    .group_by(col(RolloutNodeRow.rollout_id), col(RolloutNodeRow.state))
                ).all():
                    counts[rollout_id][state] = count
            return [_rollout_info(row, counts[row.rollout_id]) for row in rows]

    def rollout_events(self, rollout_id: str) -> list[RolloutEventInfo]:
        """Per-node state changes of a rollout, oldest first. Raises: StoreError."""
        with self._session(write=False) as s:
            rows = s.exec(
                select(RolloutEventRow)
                .where(col(RolloutEventRow.rollout_id) == rollout_id)
                .order_by(col(RolloutEventRow.id))
            ).all()
            events: list[RolloutEventInfo] = []
            for row in rows:
                try:
                    state = NodeRolloutState(row.state)
                except ValueError:
                    raise StoreError(
                        f"rollout {rollout_id}: event has unknown state {row.state!r}"
                    ) from None
                events.append(
                    RolloutEventInfo(
                        id=row.id or 0,
                        rollout_id=row.rollout_id,
                        node_id=row.node_id,
                        state=state,
                        code=row.code,
                        reason=row.reason,
                        ts=row.ts,
                    )
                )
            return events

    # ----- ingest ------------------------------------------------------------------------

    def ingest(
        self,
        statuses: Sequence[NodeStatus],
        batches: Sequence[ResultBatch],
        telemetry: Sequence[Telemetry],
        now: float,
    ) -> dict[str, int]:
        """Store what nodes sent, in ONE transaction, and say which acks to publish.

        Results are stored once per (node, result seq), statuses once per
        (node, outbox slot); telemetry is appended. Each status and result batch
        occupies one outbox slot: its slot is recorded, and the node's
        ``acked_seq`` advances through contiguous stored slots. Nodes never seen
        get a row (offline); every node heard from gets ``last_seen = now``.

        Returns ``{node_id: acked_seq}`` for every node whose ``acked_seq``
        advanced, and for every node that re-sent a slot at or below its
        ``acked_seq`` (its Ack was lost: acking again lets its outbox delete the
        slot). Publish these only after this method returned.

        Raises: StoreError (nothing was stored; the nodes will re-send).
        """
        seq_nodes = {m.node for m in statuses} | {b.node for b in batches}
        touched = sorted(seq_nodes | {t.node for t in telemetry})
        if not touched:
            return {}
        with self._session(write=True) as s:
            self._ensure_nodes(s, touched, now)
            # Lock the node rows, sorted, before deciding: a second controller
            # ingesting for the same node waits here (PostgreSQL) and then sees
            # the slots this one committed, so acked_seq never goes backwards.
            acked: dict[str, int] = dict(
                s.exec(
                    select(col(NodeRow.node_id), col(NodeRow.acked_seq))
                    .where(col(NodeRow.node_id).in_(touched))
                    .order_by(col(NodeRow.node_id))
                    .with_for_update()
                ).all()
            )
            held: dict[str, set[int]] = defaultdict(set)
            if seq_nodes:
                for node_id, seq in s.exec(
                    select(col(StoredSlotRow.node_id), col(StoredSlotRow.seq)).where(
                        col(StoredSlotRow.node_id).in_(sorted(seq_nodes))
                    )
                ).all():
                    held[node_id].add(seq)
            new_slots: dict[str, set[int]] = defaultdict(set)
            reack: set[str] = set()

            def fresh(node_id: str, slot: int) -> bool:
                """A slot not stored before (nor earlier in this call)."""
                if slot <= acked[node_id]:
                    reack.add(node_id)
                    return False
                if slot in held[node_id] or slot in new_slots[node_id]:
                    return False
                new_slots[node_id].add(slot)
                return True

            status_rows = [_status_row(m) for m in statuses if fresh(m.node, m.seq)]
            result_rows = [
                _result_row(b.node, r) for b in batches if fresh(b.node, b.seq) for r in b.results
            ]
            telemetry_rows = [_telemetry_row(t) for t in telemetry]
            if status_rows:
                s.exec(self._insert(_STATUSES).on_conflict_do_nothing(), params=status_rows)
            if result_rows:
                s.exec(
                    self._insert(_RESULTS).on_conflict_do_nothing(
                        index_elements=["node_id", "seq"]
                    ),
                    params=result_rows,
                )
            if telemetry_rows:
                s.exec(_TELEMETRY.insert(), params=telemetry_rows)
            s.exec(
                update(_NODES)
                .where(_NODES.c.node_id.in_(touched), _NODES.c.last_seen < now)
                .values(last_seen=now)
            )
            advanced: dict[str, int] = {}
            for node_id, slots in new_slots.items():
                present = held[node_id] | slots
                top = acked[node_id]
                while top + 1 in present:
                    top += 1
                if top > acked[node_id]:
                    advanced[node_id] = top
            above = [
                {"node_id": node_id, "seq": slot}
                for node_id, slots in sorted(new_slots.items())
                for slot in sorted(slots)
                if slot > advanced.get(node_id, 0)
            ]
            if above:
                s.exec(
                    self._insert(_SLOTS).on_conflict_do_nothing(index_elements=["node_id", "seq"]),
                    params=above,
                )
            if advanced:
                moves = [{"b_node": n, "b_acked": a} for n, a in sorted(advanced.items())]
                s.exec(
                    update(_NODES)
                    .where(
                        _NODES.c.node_id == bindparam("b_node"),
                        _NODES.c.acked_seq < bindparam("b_acked"),
                    )
                    .values(acked_seq=bindparam("b_acked")),
                    params=moves,
                )
                s.exec(
                    delete(_SLOTS).where(
                        _SLOTS.c.node_id == bindparam("b_node"),
                        _SLOTS.c.seq <= bindparam("b_acked"),
                    ),
                    params=moves,
                )
        acks = {node_id: acked[node_id] for node_id in reack if acked[node_id] > 0}
        acks.update(advanced)
        return acks

    def samples(self, node_ids: Iterable[str], since: float) -> dict[str, list[HealthSample]]:
        """Health samples from telemetry at or after ``since``, oldest first, for
        each of ``node_ids`` (an empty list for a node without any).

        Raises: StoreError.
        """
        wanted = sorted(set(node_ids))
        found: dict[str, list[HealthSample]] = {node_id: [] for node_id in wanted}
        if not wanted:
            return found
        with self._session(write=False) as s:
            rows = (
                s.connection()
                .execute(
                    sa_select(
                        col(TelemetryRow.node_id),
                        col(TelemetryRow.ts),
                        col(TelemetryRow.model_sha256),
                        col(TelemetryRow.inferences),
                        col(TelemetryRow.errors),
                        col(TelemetryRow.p95_ms),
                    )
                    .where(col(TelemetryRow.node_id).in_(wanted), col(TelemetryRow.ts) >= since)
                    .order_by(col(TelemetryRow.node_id), col(TelemetryRow.ts), col(TelemetryRow.id))
                )
                .all()
            )
        for node_id, ts, sha, inferences, errors, p95 in rows:
            found[node_id].append(HealthSample(ts, sha, inferences, errors, p95))
        return found

    # ----- audit -------------------------------------------------------------------------

    def audit(  # noqa: PLR0917 - positional, as the service calls it
        self,
        operator: str,
        action: str,
        args: Mapping[str, Any],
        outcome: str,
        detail: str | None,
        now: float,
    ) -> None:
        """Append to the audit log (``args`` as JSON; values JSON cannot hold as text).

        Raises: StoreError.
        """
        row = {
            "ts": now,
            "operator": operator,
            "action": action,
            "args_json": json.dumps(
                dict(args), separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str
            ),
            "outcome": outcome,
            "detail": detail,
        }
        with self._session(write=True) as s:
            s.exec(_AUDIT.insert(), params=[row])

    def list_audit(self, limit: int = 100) -> list[AuditInfo]:
        """The ``limit`` newest entries, newest first. Raises: StoreError."""
        with self._session(write=False) as s:
            rows = s.exec(
                select(AuditRow)
                .order_by(col(AuditRow.ts).desc(), col(AuditRow.id).desc())
                .limit(max(0, limit))
            ).all()
            entries: list[AuditInfo] = []
            for row in rows:
                try:
                    args = json.loads(row.args_json)
                except ValueError:
                    args = {"_unreadable": row.args_json}
                entries.append(
                    AuditInfo(
                        id=row.id or 0,
                        ts=row.ts,
                        operator=row.operator,
                        action=row.action,
                        args=args,
                        outcome=row.outcome,
                        detail=row.detail,
                    )
                )
            return entries

    # ----- results and reports -------------------------------------------------------------

    def list_results(self, node_id: str | None = None, limit: int = 100) -> list[ResultInfo]:
        """The ``limit`` newest results (of one node, or all), newest first.

        Raises: StoreError.
        """
        query = select(ResultRow).order_by(
            col(ResultRow.ts).desc(), col(ResultRow.node_id), col(ResultRow.seq).desc()
        )
        if node_id is not None:
            query = query.where(col(ResultRow.node_id) == node_id)
        with self._session(write=False) as s:
            rows = s.exec(query.limit(max(0, limit))).all()
            return [_result_info(row) for row in rows]

    def report(self) -> dict[str, Any]:
        """Counts per node and per model: results, corner cases, mean latency (ms).

        ``{"totals": {...}, "nodes": [{node_id, results, corner_cases,
        mean_latency_ms}], "models": [{name, version, sha256, results,
        corner_cases, mean_latency_ms}]}``, JSON-ready, nodes by id and models by
        name then version. Raises: StoreError.
        """
        corner = func.sum(case((col(ResultRow.corner_case), 1), else_=0))
        count = func.count()
        latency = func.avg(col(ResultRow.latency_ms))
        with self._session(write=False) as s:
            per_node = s.exec(
                select(col(ResultRow.node_id), count, corner, latency)
                .group_by(col(ResultRow.node_id))
                .order_by(col(ResultRow.node_id))
            ).all()
            per_model = (
                s.connection()
                .execute(
                    sa_select(
                        col(ResultRow.model_name),
                        col(ResultRow.model_version),
                        col(ResultRow.model_sha256),
                        count,
                        corner,
                        latency,
                    ).group_by(
                        col(ResultRow.model_name),
                        col(ResultRow.model_version),
                        col(ResultRow.model_sha256),
                    )
                )
                .all()
            )
            total = s.exec(select(count, corner, latency).select_from(_RESULTS)).one()
            nodes_known = s.exec(select(func.count()).select_from(_NODES)).one()
            nodes_online = s.exec(
                select(func.count()).select_from(_NODES).where(col(NodeRow.online))
            ).one()
            telemetry = s.exec(select(func.count()).select_from(_TELEMETRY)).one()

        def mean(value: Any) -> float | None:
            return None if value is None else round(float(value), 3)

        models = [
            {
                "name": name,
                "version": version,
                "sha256": sha,
                "results": int(n),
                "corner_cases": int(c or 0),
                "mean_latency_ms": mean(lat),
            }
            for name, version, sha, n, c, lat in per_model
        ]
        models.sort(key=lambda m: (str(m["name"]), _semver_key(str(m["version"])), m["sha256"]))
        return {
            "totals": {
                "results": int(total[0]),
                "corner_cases": int(total[1] or 0),
                "mean_latency_ms": mean(total[2]),
                "nodes": int(nodes_known),
                "nodes_online": int(nodes_online),
                "telemetry": int(telemetry),
            },
            "nodes": [
                {
                    "node_id": node_id,
                    "results": int(n),
                    "corner_cases": int(c or 0),
                    "mean_latency_ms": mean(lat),
                }
                for node_id, n, c, lat in per_node
            ],
            "models": models,
        }

    def table_counts(self) -> dict[str, int]:
        """Rows per table, by table name (for operators and tests). Raises: StoreError."""
        with self._session(write=False) as s:
            conn = s.connection()
            return {
                table.name: int(
                    conn.execute(sa_select(func.count()).select_from(table)).scalar_one()
                )
                for table in _TABLES
            }

    def prune(self, telemetry_before: float, results_before: float) -> tuple[int, int]:
        """Delete telemetry and results older than the given times (UNIX seconds).

        Returns (telemetry rows deleted, results deleted). A pruned result never
        comes back: its outbox slot is acked, so a re-send is skipped.

        Raises: StoreError.
        """
        with self._session(write=True) as s:
            telemetry = s.exec(delete(_TELEMETRY).where(_TELEMETRY.c.ts < telemetry_before))
            results = s.exec(delete(_RESULTS).where(_RESULTS.c.ts < results_before))
            return max(0, telemetry.rowcount), max(0, results.rowcount)


# ----- row builders (plain dicts for executemany) ----------------------------------------


def _status_row(m: NodeStatus) -> dict[str, Any]:
    return {
        "node_id": m.node,
        "seq": m.seq,
        "command_id": m.command_id,
        "rollout_id": m.rollout_id,
        "state": m.state.value,
        "code": m.code,
        "reason": m.reason,
        "progress": m.progress,
        "duplicate": m.duplicate,
        "applied": False,
        "ts": m.ts,
    }


def _result_row(node_id: str, r: InferenceResult) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "seq": r.seq,
        "model_name": r.model.name,
        "model_version": r.model.version,
        "model_sha256": r.model.sha256,
        "input_digest": r.input_digest,
        "latency_ms": r.latency_ms,
        "ts": r.ts,
        "topk_json": _topk_json(r.topk),
        "tensors_json": _tensors_json(r.tensors),
        "corner_case": r.corner_case,
        "source": r.source,
    }


def _telemetry_row(t: Telemetry) -> dict[str, Any]:
    return {
        "node_id": t.node,
        "ts": t.ts,
        "inferences": t.inferences,
        "errors": t.errors,
        "skips": t.skips,
        "queue_depth": t.queue_depth,
        "outbox_depth": t.outbox_depth,
        "p50_ms": t.latency.p50_ms,
        "p95_ms": t.latency.p95_ms,
        "p99_ms": t.latency.p99_ms,
        "cpu_percent": t.cpu_percent,
        "memory_bytes": t.memory_bytes,
        "model_sha256": None if t.model is None else t.model.sha256,
    }


def _encode_record(record: RolloutRecord) -> str:
    try:
        return record_to_json(record)
    except ValueError as exc:
        raise StoreError(f"rollout {record.spec.rollout_id}: cannot encode record: {exc}") from None


def _count_states(record: RolloutRecord) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for progress in record.nodes.values():
        counts[progress.state.value] += 1
    return dict(counts)


def _semver_key(version: str) -> tuple[int, SemVer | None, str]:
    try:
        return (0, SemVer.parse(version), version)
    except DecodeError:
        return (1, None, version)  # not a semantic version: after the ones that are


def _model_order(info: ModelInfo) -> tuple[str, tuple[int, SemVer | None, str]]:
    return (info.name, _semver_key(info.version))
