"""What callers get from the store: frozen dataclasses, never rows.

Rows never leave a repository method: each converts what it read into these
records (or engine records) inside its transaction, so a caller can hold them
on any thread, after the session closed. Converting a stored value that is
corrupt raises :class:`~fleet_controller.store.errors.StoreError`, naming the
row, rather than handing a half-valid record on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fleet_controller.store.errors import StoreError
from shared.errors import DecodeError
from shared.messages import (
    Capabilities,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    RolloutState,
    TensorData,
    TopK,
    decode,
)
from shared.version import SemVer

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "AuditInfo",
    "ModelInfo",
    "NodeInfo",
    "PendingStatus",
    "ResultInfo",
    "RolloutEventInfo",
    "RolloutInfo",
    "model_ref",
    "version_key",
]

ACTIVE_ROLLOUT_STATES = frozenset(
    {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)


def _ref_dict(ref: ModelRef | None) -> dict[str, str] | None:
    return None if ref is None else ref.model_dump(mode="json")


def model_ref(
    name: str | None, version: str | None, sha256: str | None, what: str
) -> ModelRef | None:
    """The stored model reference of ``what`` (None when any column is NULL).

    Raises: StoreError when the stored values are not a valid reference.
    """
    if name is None or version is None or sha256 is None:
        return None
    try:
        return ModelRef(name=name, version=version, sha256=sha256)
    except ValidationError:
        raise StoreError(f"{what}: stored model reference is invalid") from None


def version_key(version: str) -> tuple[int, SemVer | None, str]:
    """Orders versions semantically; a text that is not a semantic version sorts after."""
    try:
        return (0, SemVer.parse(version), version)
    except DecodeError:
        return (1, None, version)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingStatus:
    """A stored node status not yet folded into its rollout's record."""

    node_id: str
    seq: int
    state: NodeRolloutState
    code: str | None
    reason: str | None
    duplicate: bool
    ts: float  # when the node sent it, by the node's clock


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    node_id: str
    online: bool
    session: int
    agent_version: str
    labels: Mapping[str, str]  # effective: ``announced`` with ``central`` on top
    capabilities: Capabilities | None
    model: ModelRef | None
    previous_model: ModelRef | None
    last_seen: float  # UNIX seconds
    acked_seq: int
    revoked: bool
    announced: Mapping[str, str] = field(default_factory=dict)  # the node's own labels
    central: Mapping[str, str | None] = field(default_factory=dict)  # operators' labels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "node_id": self.node_id,
            "online": self.online,
            "session": self.session,
            "agent_version": self.agent_version,
            "labels": dict(self.labels),
            "announced_labels": dict(self.announced),
            "central_labels": dict(self.central),
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
