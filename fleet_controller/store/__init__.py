"""The controller's database: nodes, models, rollouts, telemetry, results, audit log.

One :class:`Store` per process, opened with :meth:`Store.open` on any supported
URL (:func:`~fleet_controller.store.database.parse_database_url`): a plain path
or ``sqlite:///path`` (a SQLite file) or ``postgresql+psycopg://user@host/db``
(``postgresql://`` and ``postgres://`` mean the same).

The store is a facade over one :class:`~fleet_controller.store.database.Database`
(engine, transactions, schema) and one repository per concern, as attributes:

=================  =====================================================  ================
``store.nodes``    births/deaths, touch, get, list, revoke                :mod:`.nodes`
``store.models``   add, get, by sha256, list                              :mod:`.models`
``store.rollouts`` create, step, force_state, save, load, list, events    :mod:`.rollouts`
``store.ingest``   the ingest transaction (``write``), health samples     :mod:`.ingest`
``store.results``  list results, report, table counts, prune              :mod:`.results`
``store.audit``    append, list                                           :mod:`.audit`
``store.leases``   acquire or renew, release, get: who drives rollouts    :mod:`.leases`
=================  =====================================================  ================

Table classes live in :mod:`.tables`, never in ``shared/`` (the wire format
and the schema change for different reasons); what callers get back, frozen
dataclasses (``*Info``), in :mod:`.records`. Each module states its own
invariants; these hold for the whole store:

* **Synchronous and thread-safe.** Every method runs in its own transaction on
  its own pooled connection, so the asyncio service calls it from worker
  threads (:func:`asyncio.to_thread`). Rows never leave a method.
* **Durable before ack.** ``store.ingest.write`` stores a node's results,
  statuses and telemetry in ONE transaction and returns the acks to publish
  only after it committed; each outbox slot is stored once
  (:class:`shared.rules.SlotLedger`). On SQLite every commit is fsynced (WAL,
  ``synchronous=FULL`` by default): an ack lets the node delete the data, so
  "committed" must survive a power loss, not only a process crash.
* **Safe with two controllers on PostgreSQL.** Writers lock the rows they
  decide on (``SELECT ... FOR UPDATE``, node rows in sorted order so two
  ingests never deadlock); the command sequence is one ``UPDATE ... RETURNING``.
  On SQLite every write transaction is ``BEGIN IMMEDIATE`` (one writer at a
  time, waiting up to ``busy_timeout``), so no write ever fails half-way with
  "database is locked".
* **Sparkplug-style node state** (:func:`shared.rules.accept_node_state`): a
  death whose session is older than the stored one is stale and ignored; a
  birth always wins.
* **Schema versioned.** ``meta.schema_version`` is written on creation; a
  database written by a newer controller is refused, never modified.
* **One-line errors.** Every database failure surfaces as :class:`StoreError`
  (a :class:`~shared.errors.EdgeFleetError`) whose message is one line, with
  any password in the URL hidden.
"""

from __future__ import annotations

from fleet_controller.store.database import SCHEMA_VERSION, DatabaseUrl, parse_database_url
from fleet_controller.store.deployments import DeploymentInfo
from fleet_controller.store.errors import (
    DuplicateModelError,
    DuplicateRolloutError,
    LeaseLostError,
    RecordError,
    StoreError,
    UnknownNodeError,
    UnknownRolloutError,
)
from fleet_controller.store.facade import Store
from fleet_controller.store.leases import Fence, LeaseInfo
from fleet_controller.store.records import (
    ACTIVE_ROLLOUT_STATES,
    AuditInfo,
    ModelInfo,
    NodeInfo,
    PendingStatus,
    ResultInfo,
    RolloutEventInfo,
    RolloutInfo,
)
from fleet_controller.store.rollouts import RolloutReader

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "SCHEMA_VERSION",
    "AuditInfo",
    "DatabaseUrl",
    "DeploymentInfo",
    "DuplicateModelError",
    "DuplicateRolloutError",
    "Fence",
    "LeaseInfo",
    "LeaseLostError",
    "ModelInfo",
    "NodeInfo",
    "PendingStatus",
    "RecordError",
    "ResultInfo",
    "RolloutEventInfo",
    "RolloutInfo",
    "RolloutReader",
    "Store",
    "StoreError",
    "UnknownNodeError",
    "UnknownRolloutError",
    "parse_database_url",
]
