"""Deployments: what a group of nodes should run (``fleetctl deployment set``).

Invariants:

* One row per deployment name: its selector (canonical text), its target
  model, the rollout policy its rollouts get, the latest rollout it started,
  and the nodes it gave up on for the current target (``held``: a node that
  failed, was rejected or rolled back is not sent the same model again).
* A new target empties ``held``; the same target keeps it. The reconciler
  changes ``held`` (:meth:`DeploymentRepository.hold`) and ``rollout_id``
  (:meth:`DeploymentRepository.claim`) only while the target is still the one
  it read, so an operator's change made meanwhile is never overwritten.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from fleet_controller.store.database import Database
from fleet_controller.store.errors import StoreError
from fleet_controller.store.records import model_ref
from fleet_controller.store.tables import DEPLOYMENTS, DeploymentRow
from shared.errors import DecodeError
from shared.labels import Selector, format_selector, parse_selector
from shared.messages import ModelRef
from shared.operations import RolloutPolicy

__all__ = ["DeploymentInfo", "DeploymentRepository"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentInfo:
    name: str
    selector: Selector
    model: ModelRef
    policy: RolloutPolicy
    rollout_id: str | None = None  # the latest rollout it started
    held: Mapping[str, str] = field(default_factory=dict)  # node -> why it is left alone
    created_by: str
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "selector": format_selector(self.selector),
            "model": f"{self.model.name}@{self.model.version}",
            "sha256": self.model.sha256,
            "policy": self.policy.model_dump(mode="json"),
            "rollout_id": self.rollout_id,
            "held": dict(self.held),
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class DeploymentRepository:
    """``store.deployments``: put, get, list, delete; the reconciler's hold and claim."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(self, info: DeploymentInfo) -> DeploymentInfo:
        """Create or replace the deployment ``info.name``. A changed target (model
        or selector) empties ``held``; ``created_*`` of an existing one are kept.

        Raises: StoreError.
        """
        with self._db.session(write=True) as s:
            row = self._locked(s, info.name)
            if row is not None:
                old = _info(row)
                same = old.model == info.model and old.selector == info.selector
                info = replace(
                    info,
                    created_by=old.created_by,
                    created_at=old.created_at,
                    held=info.held if not same else {**old.held, **info.held},
                )
                s.exec(
                    update(DEPLOYMENTS)
                    .where(DEPLOYMENTS.c.name == info.name)
                    .values(**_row(info).model_dump())
                )
            else:
                s.add(_row(info))
        return info

    def get(self, name: str) -> DeploymentInfo | None:
        """Raises: StoreError (also when the stored row is corrupt)."""
        with self._db.session(write=False) as s:
            row = s.get(DeploymentRow, name)
            return None if row is None else _info(row)

    def list(self) -> builtins.list[DeploymentInfo]:
        """Every deployment, by name. Raises: StoreError."""
        with self._db.session(write=False) as s:
            rows = s.exec(select(DeploymentRow).order_by(col(DeploymentRow.name))).all()
            return [_info(row) for row in rows]

    def delete(self, name: str) -> bool:
        """Forget a deployment (its nodes keep what they run). Raises: StoreError."""
        with self._db.session(write=True) as s:
            gone = s.exec(delete(DEPLOYMENTS).where(DEPLOYMENTS.c.name == name))
            return bool(gone.rowcount)

    def hold(self, name: str, sha256: str, held: Mapping[str, str], *, now: float) -> bool:
        """Add ``held`` (node -> why) to the deployment's held nodes, only if it
        still targets ``sha256``. Returns whether it did. Raises: StoreError."""
        with self._db.session(write=True) as s:
            row = self._locked(s, name)
            if row is None or row.model_sha256 != sha256:
                return False
            s.exec(
                update(DEPLOYMENTS)
                .where(DEPLOYMENTS.c.name == name)
                .values(held=_json({**_held(row), **held}), updated_at=now)
            )
        return True

    def claim(self, read: DeploymentInfo, rollout_id: str, *, now: float) -> bool:
        """Make ``rollout_id`` the deployment's latest rollout, only if its target
        (model and selector) and latest rollout are still those of ``read``: of two
        controllers reconciling together, exactly one wins. Raises: StoreError."""
        with self._db.session(write=True) as s:
            row = self._locked(s, read.name)
            if (
                row is None
                or row.model_sha256 != read.model.sha256
                or row.selector != format_selector(read.selector)
                or row.rollout_id != read.rollout_id
            ):
                return False
            s.exec(
                update(DEPLOYMENTS)
                .where(DEPLOYMENTS.c.name == read.name)
                .values(rollout_id=rollout_id, updated_at=now)
            )
        return True

    @staticmethod
    def _locked(s: Session, name: str) -> DeploymentRow | None:
        return s.exec(
            select(DeploymentRow).where(col(DeploymentRow.name) == name).with_for_update()
        ).one_or_none()


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _row(info: DeploymentInfo) -> DeploymentRow:
    return DeploymentRow(
        name=info.name,
        selector=format_selector(info.selector),
        model_name=info.model.name,
        model_version=info.model.version,
        model_sha256=info.model.sha256,
        policy_json=info.policy.model_dump_json(),
        rollout_id=info.rollout_id,
        held=_json(info.held),
        created_by=info.created_by,
        created_at=info.created_at,
        updated_at=info.updated_at,
    )


def _held(row: DeploymentRow) -> dict[str, str]:
    held = json.loads(row.held)
    if not isinstance(held, dict) or not all(isinstance(v, str) for v in held.values()):
        raise ValueError("held is not a map of reasons")
    return held


def _info(row: DeploymentRow) -> DeploymentInfo:
    """Raises: StoreError when the stored selector, policy or held nodes are corrupt."""
    what = f"deployment {row.name}"
    model = model_ref(row.model_name, row.model_version, row.model_sha256, what)
    try:
        selector = parse_selector(row.selector)
        policy = RolloutPolicy.model_validate_json(row.policy_json)
        held = _held(row)
    except (DecodeError, ValidationError, ValueError):
        raise StoreError(f"{what}: stored selector, policy or held nodes are corrupt") from None
    assert model is not None  # the three columns are NOT NULL
    return DeploymentInfo(
        name=row.name,
        selector=selector,
        model=model,
        policy=policy,
        rollout_id=row.rollout_id,
        held=held,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
