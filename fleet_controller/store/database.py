"""The connection to the database: URL, engine, schema setup, transactions.

:func:`parse_database_url` is the one place a database URL is read (the store,
the service's blob folder and the command line agree on what a URL means).
:class:`Database` owns the SQLAlchemy engine; every repository of the store
takes it and opens its transactions with :meth:`Database.session`.

Invariants:

* **One transaction per session, errors on one line.** :meth:`Database.session`
  is one transaction on one pooled connection (``pool_pre_ping``); any
  SQLAlchemy error inside it becomes a :class:`StoreError` whose message is the
  driver's first line, with the URL's password hidden.
* **Writers never fail half-way on SQLite.** Every write session is ``BEGIN
  IMMEDIATE`` (one writer at a time, waiting up to ``busy_timeout``); the file
  is in WAL mode and, by default, ``synchronous=FULL``: every commit is fsynced,
  because an ack lets a node delete what was committed.
* **Schema versioned.** Opening checks ``meta.schema_version`` and creates
  missing tables in one transaction (on PostgreSQL under an advisory lock, so
  two controllers starting together never both create them); a database
  written by a newer controller is refused, never modified.
* **One identity per store.** The first opening writes a random
  ``meta.store_id``; it never changes afterwards, so controllers sharing one
  database share it, and controllers on different databases never do.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Float,
    Table,
    cast,
    create_engine,
    event,
    func,
    inspect,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Session, SQLModel, select

from fleet_controller.store.errors import StoreError
from fleet_controller.store.tables import ALL_TABLES, META

__all__ = [
    "PG_CONNECT_TIMEOUT_S",
    "SCHEMA_VERSION",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Database",
    "DatabaseUrl",
    "describe_error",
    "parse_database_url",
]

_log = logging.getLogger(__name__)

# 2: telemetry keeps each period's runs for the health gate;
# 3: operators' labels on nodes (nodes.central_labels) and deployments
# 4: request_nonces; 5: leases (both created like any missing table)
SCHEMA_VERSION = 5
_PERIOD_COLUMNS = 2  # the schema version that added telemetry's period columns
_CENTRAL_LABELS = 3  # the schema version that added nodes.central_labels
_PERIOD_COLUMN_TYPES = (
    ("period_inferences", "BIGINT"),
    ("period_errors", "BIGINT"),
    ("latency_hist", "TEXT"),
)
SQLITE_BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another writer's lock
PG_CONNECT_TIMEOUT_S = 10  # unless the URL says otherwise (``?connect_timeout=N``)
# A controller frozen in the middle of a transaction (SIGSTOP, a VM paused) would
# hold its row locks, the rollout lease's among them, until it resumes: the
# server ends such a session after this long, so another replica can take over.
# The controller's own transactions never idle anywhere near it.
PG_STALLED_TRANSACTION_S = 5
_MAX_MESSAGE_CHARS = 300  # of a driver error, in the one-line StoreError
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_WRITE = "edgefleet_write"  # execution option: this transaction writes (SQLite: IMMEDIATE)
_JULIAN_UNIX_EPOCH = 2_440_587.5  # julianday('1970-01-01')
_OPEN_LOCK_KEY = 0x45_46_4C_45_45_54  # pg_advisory_xact_lock key serializing schema creation

Dialect = Literal["postgresql", "sqlite"]
Synchronous = Literal["FULL", "NORMAL"]


# ----- URLs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A database URL as the store understands it.

    ``url`` is normalised (``postgresql+psycopg`` for any PostgreSQL spelling;
    ``sqlite`` for a plain path); ``display`` is safe to print (no password);
    ``sqlite_path`` is the SQLite file, None for PostgreSQL.
    """

    url: URL
    display: str
    sqlite_path: Path | None

    @property
    def dialect(self) -> Dialect:
        return "postgresql" if self.sqlite_path is None else "sqlite"


def parse_database_url(url: str) -> DatabaseUrl:
    """Read ``url``: a plain path or ``sqlite:///PATH`` (a SQLite file), or
    ``postgresql+psycopg://user@host/db`` (``postgresql://`` and ``postgres://``
    mean the same). Touches nothing: no file, no server.

    A plain path may not contain ``:``: ``postgres:db`` or ``garbage:::`` is a
    mistyped URL far more often than a file name (``sqlite:///a:b`` still names
    such a file).

    Raises:
        StoreError: an empty or malformed URL, a plain path with a ``:``, an
            in-memory SQLite database, or any other database (one line, without
            the password).
    """
    if "://" not in url:
        if not url.strip():
            raise StoreError("no database given: pass a file path or a database URL")
        if ":" in url:
            raise StoreError(
                f"invalid database URL: {_first_line(url)[:60]!r} is neither a URL "
                "(sqlite:///PATH, postgresql+psycopg://...) nor a plain file path"
            )
        path = Path(url).expanduser()
        return _parsed(URL.create("sqlite", database=str(path)), path)
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise StoreError(f"invalid database URL: {describe_error(exc)}") from None
    except ValueError as exc:  # e.g. a port that is not a number
        raise StoreError(f"invalid database URL: {_first_line(str(exc))}") from None
    # Split the name ourselves: URL.get_driver_name() loads the dialect to find its default.
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        # psycopg (3) is the driver we ship; "postgresql://" alone would ask for psycopg2.
        return _parsed(parsed.set(drivername=f"postgresql+{driver or 'psycopg'}"), None)
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise StoreError("an in-memory SQLite database is not supported: give a file path")
        return _parsed(parsed, Path(str(parsed.database)))
    raise StoreError(
        f"unsupported database {backend!r}: use a SQLite file or a postgresql+psycopg:// URL"
    )


def _parsed(url: URL, sqlite_path: Path | None) -> DatabaseUrl:
    return DatabaseUrl(url, url.render_as_string(hide_password=True), sqlite_path)


def _first_line(message: str) -> str:
    for raw in message.splitlines():
        line = raw.strip()
        if line:
            if len(line) <= _MAX_MESSAGE_CHARS:
                return line
            return line[: _MAX_MESSAGE_CHARS - 3] + "..."
    return ""


def describe_error(exc: BaseException) -> str:
    """One line for a database error: the driver's own first line, not SQLAlchemy's dump."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return _first_line(str(exc.orig)) or type(exc.orig).__name__
    return _first_line(str(exc)) or type(exc).__name__


# ----- the engine --------------------------------------------------------------------


class Database:
    """One engine on one database, its tables created and its version checked.

    Thread-safe: each :meth:`session` takes its own pooled connection.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        sqlite_synchronous: Synchronous = "FULL",
    ) -> None:
        """Connect to ``url`` (see :func:`parse_database_url`) and prepare it.

        ``schema`` (PostgreSQL only) puts every table in that schema, created
        if missing (``search_path`` is set per connection): separate test runs,
        or several fleets, in one database. ``sqlite_synchronous`` trades the
        fsync per commit (FULL, the default) for speed (NORMAL: a power loss may
        undo the last commits, which nodes have already been acked).

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
        self.url = parse_database_url(url)
        self.dialect: Dialect = self.url.dialect
        if schema is not None and (
            self.dialect != "postgresql" or not _SCHEMA_NAME.fullmatch(schema)
        ):
            raise StoreError(
                f"schema {schema!r}: a plain identifier, and only for PostgreSQL databases"
            )
        self.schema = schema
        try:
            self._engine = _create_engine(self.url.url, schema, sqlite_synchronous)
        except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
            raise self._open_error(exc) from None
        self._writer = self._engine.execution_options(**{_WRITE: True})
        try:
            self.store_id = self._prepare()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise self._open_error(exc) from None
        except StoreError:
            self._engine.dispose()
            raise

    def _open_error(self, exc: BaseException) -> StoreError:
        return StoreError(f"cannot open database {self.url.display}: {describe_error(exc)}")

    def close(self) -> None:
        """Close every pooled connection. The database must not be used afterwards."""
        self._engine.dispose()

    @contextmanager
    def session(self, *, write: bool) -> Iterator[Session]:
        """One transaction on one pooled connection, committed when the block ends.

        ``write``: the transaction writes (on SQLite it then starts with ``BEGIN
        IMMEDIATE``, so it waits for the write lock up front).

        Raises: StoreError for any database error inside the block (rolled back).
        """
        try:
            with (
                Session(self._writer if write else self._engine, expire_on_commit=False) as s,
                s.begin(),
            ):
                yield s
        except SQLAlchemyError as exc:
            raise StoreError(
                f"database error ({self.url.display}): {describe_error(exc)}"
            ) from None

    def now(self) -> ColumnElement[float]:
        """The database's clock as UNIX seconds, an SQL expression (leases are timed by
        it, so replicas on hosts whose clocks disagree still agree on who holds one)."""
        if self.dialect == "postgresql":
            return cast(func.extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - _JULIAN_UNIX_EPOCH) * 86_400.0

    def insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """An INSERT with this dialect's ``on_conflict_do_*`` (both dialects have them)."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _prepare(self) -> str:
        """Check the schema version, create missing tables, seed ``meta``, in one
        transaction; returns the store's identity (``meta.store_id``)."""
        with self._writer.begin() as conn:
            if self.dialect == "postgresql":
                # Two controllers starting together must not both CREATE TABLE.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _OPEN_LOCK_KEY})
                if self.schema is not None:
                    self._create_schema(conn, self.schema)
            if inspect(conn).has_table(META.name):
                self._upgrade(conn, self._check_version(conn))
            SQLModel.metadata.create_all(conn, tables=list(ALL_TABLES))
            conn.execute(
                self.insert(META).on_conflict_do_nothing(index_elements=["key"]),
                [
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": "command_seq", "value": "0"},
                    {"key": "store_id", "value": uuid.uuid4().hex},
                ],
            )
            return str(
                conn.execute(select(META.c.value).where(META.c.key == "store_id")).scalar_one()
            )

    @staticmethod
    def _create_schema(conn: Connection, schema: str) -> None:
        exists = conn.execute(
            text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": schema}
        ).first()
        if exists is None:
            # Safe to interpolate: the name matched _SCHEMA_NAME in __init__.
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    def _upgrade(self, conn: Connection, version: int) -> None:
        """Bring a store of an older schema version up to :data:`SCHEMA_VERSION`."""
        if version < _PERIOD_COLUMNS:
            for column, kind in _PERIOD_COLUMN_TYPES:
                conn.exec_driver_sql(f"ALTER TABLE telemetry ADD COLUMN {column} {kind}")
        if version < _CENTRAL_LABELS:
            conn.exec_driver_sql(
                "ALTER TABLE nodes ADD COLUMN central_labels TEXT NOT NULL DEFAULT '{}'"
            )
        if version < SCHEMA_VERSION:
            _log.info("database %s: schema upgraded from version %d", self.url.display, version)
            conn.execute(
                update(META).where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
            )

    def _check_version(self, conn: Connection) -> int:
        """The stored schema version.

        Raises: StoreError when it is unreadable or newer than ours.
        """
        stored = conn.execute(
            select(META.c.value).where(META.c.key == "schema_version")
        ).scalar_one_or_none()
        try:
            version = int(stored) if stored is not None else SCHEMA_VERSION
        except ValueError:
            raise StoreError(
                f"database {self.url.display}: schema_version {stored!r} is not a number"
            ) from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.url.display} has schema version {version}, newer than "
                f"this controller's {SCHEMA_VERSION}: upgrade edgefleet"
            )
        return version


def _create_engine(url: URL, schema: str | None, synchronous: Synchronous) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, synchronous)
    connect_args: dict[str, Any] = {"application_name": "edgefleet-controller"}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    if schema is not None:
        connect_args["options"] = f"-csearch_path={schema}"
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _end_stalled_transactions(dbapi_conn: Any, _record: object) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute(
                f"SET idle_in_transaction_session_timeout = '{PG_STALLED_TRANSACTION_S}s'"
            )
        dbapi_conn.commit()

    return engine


def _sqlite_engine(url: URL, synchronous: Synchronous) -> Engine:
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
