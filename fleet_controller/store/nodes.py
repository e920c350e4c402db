"""Nodes: what each node last said of itself, when it was heard from, whether it is revoked.

Invariants:

* **Sparkplug-style node state** (:func:`shared.rules.accept_node_state`): a
  birth always wins; a death whose session is older than the stored one is the
  late Will of a replaced connection and is ignored.
* **A birth's outbox floor settles slots** (:meth:`shared.rules.SlotLedger.settle_floor`):
  ``acked_seq`` rises to just below the floor, never falls, and the held slots
  it covers are dropped. The node row is locked (``SELECT ... FOR UPDATE``)
  before deciding, so a concurrent ingest sees the result.
* ``revoked`` is only changed by :meth:`NodeRepository.set_revoked`, so a node
  revoked before it ever connected stays revoked when it does.
* **Two layers of labels.** ``labels`` is what the node announced in its last
  birth (replaced by every birth); ``central_labels`` is what operators set
  (:meth:`NodeRepository.set_labels`, never touched by a birth). A node's
  effective labels, which every selection uses, are the announced ones with
  the central ones on top (:func:`shared.labels.overlay`).
* ``last_seen`` never goes back. A birth or death counts as heard at its own
  ``ts`` (never later than now): one retained on the broker, which a
  controller reads at start, says when the node was last there, not when the
  controller started.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from fleet_controller.store.database import Database
from fleet_controller.store.errors import StoreError, UnknownNodeError
from fleet_controller.store.records import NodeInfo, model_ref
from fleet_controller.store.tables import NODES, SLOTS, NodeRow
from shared.labels import MAX_LABELS, Selector, matches, overlay
from shared.messages import Capabilities, ModelRef, NodeState
from shared.rules import SlotLedger, accept_node_state

__all__ = ["NodeRepository", "ensure_nodes", "select_nodes"]

LabelChanges = Mapping[str, "str | Literal[False] | None"]
"""Per key: a value sets it, None hides the node's own, False drops the operators' entry."""


class NodeRepository:
    """``store.nodes``: births and deaths, liveness, revocation, listing."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def apply_state(self, state: NodeState, now: float) -> bool:
        """Apply a birth or death. Returns False when it was ignored (a stale death).

        A birth (``online``) replaces everything the node reports and marks it
        online; its ``outbox_floor`` settles every slot below it. A death marks
        the node offline and keeps the agent version it names. Either moves
        ``last_seen`` up to the message's ``ts`` (at most ``now``). ``revoked``
        is never touched here.

        Raises: StoreError.
        """
        heard = min(state.ts, now)
        with self._db.session(write=True) as s:
            ensure_nodes(self._db, s, [state.node], heard)
            session, last_seen, acked = s.exec(
                select(col(NodeRow.session), col(NodeRow.last_seen), col(NodeRow.acked_seq))
                .where(col(NodeRow.node_id) == state.node)
                .with_for_update()
            ).one()
            if not accept_node_state(session, state):
                return False
            seen = max(last_seen, heard)
            if not state.online:
                values: dict[str, Any] = {"online": False, "session": state.session}
                if state.agent_version:
                    values["agent_version"] = state.agent_version
            else:
                values = _birth_values(state)
                if state.outbox_floor is not None:
                    values |= self._settle_floor(s, state.node, acked, state.outbox_floor)
            s.exec(
                update(NODES).where(NODES.c.node_id == state.node).values(**values, last_seen=seen)
            )
        return True

    @staticmethod
    def _settle_floor(s: Session, node_id: str, acked: int, floor: int) -> dict[str, Any]:
        """Drop the held slots below ``floor``; the ``acked_seq`` to write, if it rises.

        Slots below a node's floor were acknowledged or never existed (a wiped
        node numbers its outbox from its clock): nothing below can arrive.
        """
        ledger = SlotLedger(acked)
        ledger.settle_floor(floor)
        s.exec(delete(SLOTS).where(SLOTS.c.node_id == node_id, SLOTS.c.seq <= ledger.acked))
        return {"acked_seq": ledger.acked} if ledger.advanced else {}

    def touch(self, node_id: str, now: float) -> None:
        """Record that ``node_id`` was heard from at ``now`` (creating it if unknown).

        Raises: StoreError.
        """
        with self._db.session(write=True) as s:
            ensure_nodes(self._db, s, [node_id], now)
            s.exec(
                update(NODES)
                .where(NODES.c.node_id == node_id, NODES.c.last_seen < now)
                .values(last_seen=now)
            )

    def get(self, node_id: str) -> NodeInfo | None:
        """Raises: StoreError."""
        with self._db.session(write=False) as s:
            row = s.get(NodeRow, node_id)
            return None if row is None else node_info(row)

    def set_revoked(self, node_id: str, *, revoked: bool, offline: bool = False) -> None:
        """Mark a node revoked (or not), and ``offline`` when the broker has cut it off
        (its Last Will is dropped with its account). An unknown node gets a row, so
        a node revoked before it ever connected stays revoked.

        Raises: StoreError.
        """
        values: dict[str, Any] = {"revoked": revoked}
        if offline:
            values["online"] = False
        with self._db.session(write=True) as s:
            ensure_nodes(self._db, s, [node_id], 0.0)
            s.exec(update(NODES).where(NODES.c.node_id == node_id).values(**values))

    def set_labels(self, node_id: str, changes: LabelChanges) -> NodeInfo:
        """Change the operators' labels of a known node; returns it as it is now.

        Raises:
            UnknownNodeError: no node has that id.
            StoreError: the effective labels would exceed ``MAX_LABELS``, or the
                database failed.
        """
        with self._db.session(write=True) as s:
            row = _locked(s, node_id)
            info = node_info(row)
            central = dict(info.central)
            for key, value in changes.items():
                if value is False:
                    central.pop(key, None)
                else:
                    central[key] = value
            if len(overlay(info.announced, central)) > MAX_LABELS:
                raise StoreError(f"node {node_id} would have more than {MAX_LABELS} labels")
            s.exec(
                update(NODES)
                .where(NODES.c.node_id == node_id)
                .values(central_labels=_json(central))
            )
        return replace(info, central=central, labels=overlay(info.announced, central))

    def forget(self, node_id: str) -> NodeInfo:
        """Remove an offline node: its row and its held slots (its stored results,
        telemetry and rollout history stay). Returns what was removed.

        Raises:
            UnknownNodeError: no node has that id.
            StoreError: the node is online (it would be learnt again at once), or
                the database failed.
        """
        with self._db.session(write=True) as s:
            row = _locked(s, node_id)
            if row.online:
                raise StoreError(
                    f"node {node_id} is online: only a node that is gone can be forgotten "
                    "(revoke it to shut it out)"
                )
            info = node_info(row)
            s.exec(delete(SLOTS).where(SLOTS.c.node_id == node_id))
            s.exec(delete(NODES).where(NODES.c.node_id == node_id))
        return info

    def list(self, selector: Selector = ()) -> builtins.list[NodeInfo]:
        """Every node (revoked ones too) whose labels match ``selector``, by node id.

        Raises: StoreError.
        """
        with self._db.session(write=False) as s:
            return select_nodes(s, selector)


def _locked(s: Session, node_id: str) -> NodeRow:
    """The node's row, locked for this transaction. Raises: UnknownNodeError."""
    row = s.exec(
        select(NodeRow).where(col(NodeRow.node_id) == node_id).with_for_update()
    ).one_or_none()
    if row is None:
        raise UnknownNodeError(f"unknown node {node_id}")
    return row


def ensure_nodes(db: Database, s: Session, node_ids: Iterable[str], now: float) -> None:
    """Create rows for unknown nodes (offline, session 0), in sorted order (lock order)."""
    rows = [
        {
            "node_id": node_id,
            "online": False,
            "session": 0,
            "agent_version": "",
            "labels": "{}",
            "central_labels": "{}",
            "last_seen": now,
            "acked_seq": 0,
            "revoked": False,
        }
        for node_id in sorted(set(node_ids))
    ]
    if rows:
        s.exec(db.insert(NODES).on_conflict_do_nothing(index_elements=["node_id"]), params=rows)


def select_nodes(s: Session, selector: Selector) -> list[NodeInfo]:
    """The nodes matching ``selector`` (all when empty), by node id. Raises: StoreError."""
    rows = s.exec(select(NodeRow).order_by(col(NodeRow.node_id))).all()
    nodes = [node_info(row) for row in rows]
    if not selector:
        return nodes
    return [n for n in nodes if matches(selector, n.labels)]


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def node_info(row: NodeRow) -> NodeInfo:
    """Raises: StoreError when the stored labels, capabilities or models are corrupt."""
    what = f"node {row.node_id}"
    try:
        announced = json.loads(row.labels)
        central = json.loads(row.central_labels)
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
        labels=overlay(announced, central),
        announced=announced,
        central=central,
        capabilities=capabilities,
        model=model_ref(row.model_name, row.model_version, row.model_sha256, what),
        previous_model=previous,
        last_seen=row.last_seen,
        acked_seq=row.acked_seq,
        revoked=row.revoked,
    )


def _birth_values(state: NodeState) -> dict[str, Any]:
    """The columns a birth replaces: everything the node reports of itself."""
    model = state.model
    return {
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
    }
