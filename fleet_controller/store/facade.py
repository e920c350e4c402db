"""The :class:`Store` facade: one :class:`Database`, one repository per concern.

Invariants:

* The facade owns the database; the repositories share it and hold nothing
  else, so every one of them is as thread-safe as :class:`Database` is.
* Command sequence numbers are drawn by one ``UPDATE ... RETURNING`` (a row
  lock on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite): two controllers never
  draw the same number.
* The blob directory's identity (``meta.blob_dir_id``) is written once, by the
  first replica that marks its blob directory (:meth:`Store.claim_blob_dir`);
  every other replica must find the same one in its directory.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy import BigInteger, String, case, cast, literal, select, update

from fleet_controller.store.audit import AuditRepository
from fleet_controller.store.database import Database, Dialect, Synchronous
from fleet_controller.store.deployments import DeploymentRepository
from fleet_controller.store.errors import StoreError
from fleet_controller.store.ingest import IngestRepository
from fleet_controller.store.leases import LeaseRepository
from fleet_controller.store.models import ModelRepository
from fleet_controller.store.nodes import NodeRepository
from fleet_controller.store.results import ResultRepository
from fleet_controller.store.rollouts import RolloutRepository
from fleet_controller.store.tables import META

__all__ = ["Store"]


class Store:
    """The controller's store. See :mod:`fleet_controller.store` for what it guarantees.

    Attributes:
        nodes: births and deaths, liveness, revocation (:class:`NodeRepository`).
        models: the model registry (:class:`ModelRepository`).
        rollouts: rollout records, steps and events (:class:`RolloutRepository`).
        ingest: the ingest transaction and health samples (:class:`IngestRepository`).
        results: stored results, the report, table counts, pruning (:class:`ResultRepository`).
        audit: the audit log (:class:`AuditRepository`).
        deployments: what groups of nodes should run (:class:`DeploymentRepository`).
        leases: which replica drives rollouts (:class:`LeaseRepository`).
    """

    def __init__(self, database: Database) -> None:
        self._db = database
        self.nodes = NodeRepository(database)
        self.models = ModelRepository(database)
        self.rollouts = RolloutRepository(database)
        self.ingest = IngestRepository(database)
        self.results = ResultRepository(database)
        self.audit = AuditRepository(database)
        self.deployments = DeploymentRepository(database)
        self.leases = LeaseRepository(database)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        schema: str | None = None,
        sqlite_synchronous: Synchronous = "FULL",
    ) -> Store:
        """Open the database at ``url`` (a path or a SQLAlchemy URL): connect,
        create the tables, check the schema version.

        ``schema`` and ``sqlite_synchronous``: see :class:`Database`.

        Raises: StoreError (see :class:`Database`).
        """
        return cls(Database(url, schema=schema, sqlite_synchronous=sqlite_synchronous))

    @property
    def dialect(self) -> Dialect:
        return self._db.dialect

    @property
    def store_id(self) -> str:
        """This database's identity, written once when it was created (``meta.store_id``)."""
        return self._db.store_id

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the tables (None: the default one)."""
        return self._db.schema

    def __repr__(self) -> str:
        return f"Store({self._db.url.display!r})"

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
        self._db.close()

    def next_command_seq(self, floor: int = 0) -> int:
        """The next command sequence number, unique across controllers and above ``floor``.

        The service passes the clock in milliseconds as ``floor``, so a
        controller whose database was lost still numbers above what nodes have
        applied.

        Raises: StoreError.
        """
        following = cast(META.c.value, BigInteger) + 1
        chosen = case((following > floor, following), else_=literal(floor, BigInteger))
        statement = (
            update(META)
            .where(META.c.key == "command_seq")
            .values(value=cast(chosen, String))
            .returning(META.c.value)
        )
        with self._db.session(write=True) as s:
            value = s.exec(statement).scalar_one_or_none()
        if value is None:
            raise StoreError("database has no command_seq row")
        return int(value)

    def claim_blob_dir(self, dir_id: str) -> str:
        """The identity of the blob directory this store's replicas share: ``dir_id``
        if none was recorded yet (it is recorded now), else the recorded one.

        Raises: StoreError.
        """
        with self._db.session(write=True) as s:
            s.exec(
                self._db.insert(META)
                .values(key="blob_dir_id", value=dir_id)
                .on_conflict_do_nothing(index_elements=["key"])
            )
            stored = s.connection().execute(select(META.c.value).where(META.c.key == "blob_dir_id"))
            return str(stored.scalar_one())
