"""Models: release-signed manifests, each with the DSSE envelope exactly as received.

Invariants:

* ``name@version`` is registered once (a unique constraint; a second
  controller adding it meanwhile gets :class:`DuplicateModelError` too).
* The caller verified the envelope; the store keeps its text unchanged, so
  nodes can verify the same bytes again.
* Listing orders versions semantically (``1.9.0`` before ``1.10.0-rc.1``
  before ``1.10.0``).
"""

from __future__ import annotations

import builtins

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from fleet_controller.store.database import Database
from fleet_controller.store.errors import DuplicateModelError, StoreError
from fleet_controller.store.records import ModelInfo, version_key
from fleet_controller.store.tables import ModelRow
from shared.messages import ModelManifest, encode

__all__ = ["ModelRepository"]


class ModelRepository:
    """``store.models``: the model registry."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
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
        with self._db.session(write=True) as s:
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

    def get(self, name: str, version: str) -> ModelInfo | None:
        """Raises: StoreError."""
        with self._db.session(write=False) as s:
            row = s.exec(
                select(ModelRow).where(col(ModelRow.name) == name, col(ModelRow.version) == version)
            ).first()
            return None if row is None else _model_info(row)

    def by_sha(self, sha256: str) -> ModelInfo | None:
        """The first model registered with that digest. Raises: StoreError."""
        with self._db.session(write=False) as s:
            row = s.exec(
                select(ModelRow).where(col(ModelRow.sha256) == sha256).order_by(col(ModelRow.id))
            ).first()
            return None if row is None else _model_info(row)

    def list(self) -> builtins.list[ModelInfo]:
        """By name, then semantic version (oldest first). Raises: StoreError."""
        with self._db.session(write=False) as s:
            models = [_model_info(row) for row in s.exec(select(ModelRow)).all()]
        return sorted(models, key=lambda m: (m.name, version_key(m.version)))


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
