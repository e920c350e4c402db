"""Typed, frozen models of every payload on the wire, and their strict decoder.

Every message has ``v`` (its kind's schema version: 2 for :class:`Command` and
:class:`ArtifactRequest`, 1 for every other kind) and ``type`` (its kind), so a
payload on the wrong topic, or of a version the receiver does not know, fails
to decode instead of being misread. Unknown fields are refused
(``extra="forbid"``), numbers must be finite, and every list, map and string is
bounded. :func:`decode` is the only way bytes become a
message: size limit first, then strict JSON (:mod:`shared.codec`), then the
model. It raises :class:`~shared.errors.DecodeError` and nothing else.
"""

from __future__ import annotations

from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from shared.codec import DEFAULT_MAX_PAYLOAD_BYTES, decode_json, encode_json
from shared.envelope import Envelope
from shared.errors import DecodeError
from shared.histogram import NUM_BUCKETS
from shared.labels import WireSelector
from shared.version import SEMVER_PATTERN, SemVer, VersionError

__all__ = [
    "ARTIFACT_REQUEST_SCHEMA_VERSION",
    "COMMAND_SCHEMA_VERSION",
    "CONTROLLER_STATE_SCHEMA_VERSION",
    "MAX_EXCLUDED_NODES",
    "MAX_REQUEST_RANGES",
    "MESSAGE_TYPES",
    "Ack",
    "ArtifactRequest",
    "CancelAction",
    "Capabilities",
    "Command",
    "ControllerState",
    "DType",
    "DeployAction",
    "InferReply",
    "InferRequest",
    "InferenceResult",
    "LatencyStats",
    "Message",
    "ModelManifest",
    "ModelRef",
    "NodeRolloutState",
    "NodeState",
    "NodeStatus",
    "NodeTarget",
    "OperatorReply",
    "OperatorRequest",
    "PeriodStats",
    "RollbackAction",
    "RolloutState",
    "Telemetry",
    "TensorData",
    "TensorSpec",
    "TopK",
    "TrustUpdateAction",
    "WarmupInput",
    "WaveTarget",
    "decode",
    "encode",
]

SCHEMA_VERSION: Literal[1] = 1
# Version 2: a wave target's selector is a list of typed requirements, and it
# may exclude nodes by id (version 1 had a label map and no exclusions).
COMMAND_SCHEMA_VERSION: Literal[2] = 2
MAX_EXCLUDED_NODES = 4096  # ids in one wave target's ``exclude``
# Version 2: a node asks for byte ranges it lacks, answered by a broadcast of
# binary chunks (version 1 asked for one chunk, answered in JSON to it alone).
ARTIFACT_REQUEST_SCHEMA_VERSION: Literal[2] = 2
MAX_REQUEST_RANGES = 64  # byte ranges in one artifact request
# Version 2: a controller replica says whether it leads (``leader``, ``term``),
# and each replica also keeps its own state on ``controller/state/{id}``.
CONTROLLER_STATE_SCHEMA_VERSION: Literal[2] = 2


def _semver(text: str) -> str:
    # The pattern alone (a Rust regex here) lets Unicode digits and leading-zero
    # pre-release numbers through; accept exactly what SemVer.parse accepts.
    try:
        SemVer.parse(text)
    except VersionError as exc:
        raise ValueError(str(exc)) from None
    return text


Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Field(pattern=SEMVER_PATTERN, max_length=128), AfterValidator(_semver)]
Name = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(max_length=512)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
Seq = Annotated[int, Field(ge=1, le=2**63 - 1)]
Timestamp = Annotated[float, Field(ge=0, description="UNIX seconds")]
Bucket = Annotated[int, Field(ge=0, lt=NUM_BUCKETS, description="shared.histogram bucket")]
Labels = Annotated[dict[Id, Id], Field(max_length=64)]
Dim = int | Annotated[str, Field(max_length=64)] | None
ByteRange = tuple[Count, Annotated[int, Field(ge=1, le=2**63 - 1, description="bytes")]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Message(_Frozen):
    """Base of every top-level payload; each kind pins its schema version ``v``."""

    v: int


class _MessageV1(Message):
    v: Literal[1] = SCHEMA_VERSION


# ----- models ---------------------------------------------------------------


class DType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    FLOAT64 = "float64"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    BOOL = "bool"


class TensorSpec(_Frozen):
    """An input or output of a model. Symbolic dimensions are strings or null."""

    name: Name
    dtype: DType
    shape: tuple[Dim, ...] = Field(max_length=16)


class WarmupInput(_Frozen):
    """A warm-up value for one input: ``values`` (row-major) or every element ``fill``."""

    name: Name
    shape: tuple[Annotated[int, Field(ge=0, le=1_000_000)], ...] = Field(max_length=16)
    fill: float = 0.0
    values: tuple[float, ...] | None = Field(default=None, max_length=65_536)


class ModelRef(_Frozen):
    name: Name
    version: Version
    sha256: Sha256


class ModelManifest(_MessageV1):
    """What the release role vouches for; signed as a DSSE envelope."""

    type: Literal["manifest"] = "manifest"
    name: Name
    version: Version
    sha256: Sha256
    size: int = Field(ge=1, le=2**40, description="bytes")
    inputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)
    warmup: tuple[WarmupInput, ...] = Field(default=(), max_length=64)
    providers: tuple[Name, ...] = Field(default=("CPUExecutionProvider",), max_length=8)
    class_labels: tuple[Text, ...] = Field(default=(), max_length=10_000)
    created_at: Timestamp
    created_by: Text = ""
    metadata: dict[Name, Text] = Field(default_factory=dict, max_length=64)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)


# ----- node state (birth and death) ------------------------------------------


class Capabilities(_Frozen):
    providers: tuple[Name, ...] = Field(max_length=16)
    cpus: Count
    memory_bytes: Count
    disk_free_bytes: Count
    swap_modes: tuple[Literal["availability", "resource"], ...] = ("availability", "resource")


class NodeState(_MessageV1):
    """Retained on ``node/{node}/state``: birth on connect, death as the Will.

    ``session`` grows with every connect; a death whose session is older than
    the newest birth seen is stale and ignored.
    """

    type: Literal["state"] = "state"
    node: Id
    online: bool
    session: Count
    agent_version: Text = ""
    model: ModelRef | None = None
    previous_model: ModelRef | None = None
    labels: Labels = Field(default_factory=dict)
    capabilities: Capabilities | None = None
    outbox_floor: Count | None = Field(
        default=None,
        description="lowest outbox slot the node still holds: every lower one is settled",
    )
    ts: Timestamp


# ----- commands (signed by the rollout role) --------------------------------


class NodeTarget(_Frozen):
    kind: Literal["node"] = "node"
    node: Id


class WaveTarget(_Frozen):
    """Every node matching ``selector``, not named in ``exclude``, whose bucket is
    below ``bucket_limit``.

    ``exclude`` lists nodes whose own labels match but which the controller has
    relabelled out of the selection (see the protocol's wave targets).
    """

    kind: Literal["wave"] = "wave"
    selector: WireSelector = ()
    exclude: tuple[Id, ...] = Field(default=(), max_length=MAX_EXCLUDED_NODES)
    bucket_limit: int = Field(ge=0, le=10_000)
    wave: int = Field(ge=0, le=64)


class DeployAction(_Frozen):
    """Download (unless present), verify, load and activate the manifest's model."""

    action: Literal["deploy"] = "deploy"
    manifest: Envelope
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)] | None = None
    activate_at: Timestamp | None = None
    health_window_s: float = Field(default=0.0, ge=0, le=86_400)


class RollbackAction(_Frozen):
    """Activate the (release-signed) previous model; a signed downgrade."""

    action: Literal["rollback"] = "rollback"
    manifest: Envelope
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)] | None = None
    reason: Text = ""


class TrustUpdateAction(_Frozen):
    """A new root-signed trust list to rotate to."""

    action: Literal["trust_update"] = "trust_update"
    trust: Envelope


class CancelAction(_Frozen):
    """Stop work on ``rollout_id`` that has not been activated yet."""

    action: Literal["cancel"] = "cancel"


class Command(Message):
    """The signed payload of a command envelope (rollout role).

    ``seq`` comes from one counter in the controller's store; a node applies a
    command only when its ``seq`` is above the highest it has applied.
    """

    v: Literal[2] = COMMAND_SCHEMA_VERSION
    type: Literal["command"] = "command"
    command_id: Id
    seq: Seq
    fleet: Id
    rollout_id: Id | None = None
    issued_at: Timestamp
    expires_at: Timestamp
    target: NodeTarget | WaveTarget = Field(discriminator="kind")
    body: DeployAction | RollbackAction | TrustUpdateAction | CancelAction = Field(
        discriminator="action"
    )


# ----- node → controller ----------------------------------------------------


class NodeRolloutState(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVATED = "activated"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    ROLLED_BACK = "rolled_back"


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class NodeStatus(_MessageV1):
    """Progress of one command on one node (through the outbox: ``seq`` is its slot)."""

    type: Literal["status"] = "status"
    node: Id
    seq: Seq
    command_id: Id | None = None
    rollout_id: Id | None = None
    state: NodeRolloutState
    code: Text | None = None
    reason: Text | None = None
    progress: float | None = Field(default=None, ge=0, le=100)
    model: ModelRef | None = None
    duplicate: bool = False
    ts: Timestamp


class LatencyStats(_Frozen):
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)


class PeriodStats(_Frozen):
    """What the serving model did since ``since``: the samples of the health gate.

    The period starts at the previous telemetry message or at the last model
    swap, whichever is later, so it never mixes two models. ``latency`` is a
    sparse histogram of successful runs in the scheme of :mod:`shared.histogram`:
    ``(bucket, count)`` pairs, buckets ascending and unique.
    """

    since: Timestamp
    inferences: Count
    errors: Count
    latency: tuple[tuple[Bucket, Count], ...] = Field(default=(), max_length=NUM_BUCKETS)

    @model_validator(mode="after")
    def _buckets_ascend(self) -> PeriodStats:
        buckets = [b for b, _ in self.latency]
        if any(later <= earlier for earlier, later in pairwise(buckets)):
            raise ValueError("latency buckets must be ascending and unique")
        if sum(c for _, c in self.latency) > self.inferences:
            raise ValueError("latency histogram counts more runs than inferences")
        return self


class Telemetry(_MessageV1):
    """Periodic metrics; counters are totals since the agent started, ``period``
    covers only the time since the previous message (or the last swap)."""

    type: Literal["telemetry"] = "telemetry"
    node: Id
    ts: Timestamp
    uptime_s: float = Field(ge=0)
    inferences: Count
    errors: Count
    skips: Count
    queue_depth: Count
    outbox_depth: Count
    latency: LatencyStats
    cpu_percent: float = Field(ge=0)
    memory_bytes: Count
    model: ModelRef | None = None
    period: PeriodStats | None = None
    # Received messages the node refused unanswered (malformed, or commands that
    # are no verifiable envelope) and those its inbox dropped (bounds, rates).
    malformed: Count = 0
    dropped: Count = 0


class TopK(_Frozen):
    index: Count
    label: Text | None = None
    score: float


class TensorData(_Frozen):
    """A small tensor, row-major."""

    name: Name
    dtype: DType = DType.FLOAT32
    shape: tuple[Annotated[int, Field(ge=0)], ...] = Field(max_length=16)
    data: tuple[float, ...] = Field(max_length=65_536)


class InferenceResult(_Frozen):
    seq: Seq
    model: ModelRef
    input_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{16,64}$")]
    latency_ms: float = Field(ge=0)
    ts: Timestamp
    topk: tuple[TopK, ...] | None = Field(default=None, max_length=100)
    tensors: tuple[TensorData, ...] | None = Field(default=None, max_length=16)
    corner_case: bool = False
    source: Text | None = None


class Ack(_MessageV1):
    """Controller → node: every outbox slot up to ``seq`` is durably stored."""

    type: Literal["ack"] = "ack"
    node: Id
    seq: Count
    ts: Timestamp


class InferRequest(_MessageV1):
    """A local application asks the node to infer; the reply goes to ``client``."""

    type: Literal["infer_request"] = "infer_request"
    id: Id
    client: Id
    inputs: tuple[TensorData, ...] = Field(min_length=1, max_length=64)


class InferReply(_MessageV1):
    type: Literal["infer_reply"] = "infer_reply"
    id: Id
    ok: bool
    result: InferenceResult | None = None
    error: Text | None = None


# ----- artifacts ------------------------------------------------------------


class ArtifactRequest(Message):
    """Ask for the byte ranges of blob ``sha256`` that ``node`` still lacks.

    ``ranges`` are ``[offset, length]`` pairs, sorted and disjoint. The
    controller answers by broadcasting the chunks that cover them on
    ``artifact/{sha256}/data`` (binary frames, :mod:`shared.chunks`), once for
    every node asking at about the same time, except those it sent after
    ``ts`` (the node was subscribed by then). Version 2: version 1 asked for
    one chunk by request id and was answered on the node's own topic in JSON.
    """

    v: Literal[2] = ARTIFACT_REQUEST_SCHEMA_VERSION
    type: Literal["artifact_request"] = "artifact_request"
    node: Id
    sha256: Sha256
    ranges: tuple[ByteRange, ...] = Field(min_length=1, max_length=MAX_REQUEST_RANGES)
    ts: Timestamp = Field(description="sent, after subscribing to the broadcast")

    @model_validator(mode="after")
    def _sorted_and_disjoint(self) -> ArtifactRequest:
        for (offset, length), (following, _) in pairwise(self.ranges):
            if following < offset + length:
                raise ValueError("ranges must be sorted and must not overlap")
        return self


# ----- controller and operator API ------------------------------------------


class ControllerState(Message):
    """Retained on ``controller/state`` (the fleet's controller service: online while
    any replica is) and on ``controller/state/{controller_id}`` (one replica):
    online on connect, offline as the Will.

    ``store_id`` names the controller's database: replicas sharing one database
    publish the same one, and a controller finding a live one with another
    refuses to start (empty: a controller that does not say). ``leader``: the
    replica holds the rollout lease, in term ``term`` (0 when not leading).
    Version 2: version 1 had neither field, and one retained topic for all.
    """

    v: Literal[2] = CONTROLLER_STATE_SCHEMA_VERSION
    type: Literal["controller_state"] = "controller_state"
    controller_id: Id
    online: bool
    session: Count
    version: Text = ""
    store_id: Text = Field(default="", description="identity of the controller's database")
    leader: bool = Field(default=False, description="this replica drives the rollouts")
    term: Count = Field(default=0, description="its rollout lease's term (0: not leading)")
    ts: Timestamp


class OperatorRequest(_MessageV1):
    """``fleetctl`` → controller, as the payload of a DSSE envelope the operator
    signs; the reply goes to ``ctl/reply/{operator}``.

    ``operator`` must name the signer; ``nonce`` is never accepted twice while
    the request is live (``issued_at`` to ``expires_at``).
    """

    type: Literal["ctl_request"] = "ctl_request"
    id: Id
    operator: Id
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    op: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    args: dict[Name, Any] = Field(default_factory=dict, max_length=64)
    issued_at: Timestamp
    expires_at: Timestamp


class OperatorReply(_MessageV1):
    """``code`` follows the CLI: 0 ok, 1 operation failed, 2 usage or input error."""

    type: Literal["ctl_reply"] = "ctl_reply"
    id: Id
    ok: bool
    code: Literal[0, 1, 2] = 0
    error: Text | None = None
    result: Any = None


MESSAGE_TYPES: tuple[type[Message], ...] = (
    ModelManifest,
    NodeState,
    Command,
    NodeStatus,
    Telemetry,
    Ack,
    InferRequest,
    InferReply,
    ArtifactRequest,
    ControllerState,
    OperatorRequest,
    OperatorReply,
)

M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> M:
    """Decode ``payload`` strictly into ``model``.

    Raises:
        DecodeError: the payload is too big, not strict JSON, or not a valid ``model``.
    """
    value = decode_json(payload, max_bytes=max_bytes)
    if issubclass(model, Message) and isinstance(value, dict):
        # Senders always write the header; a payload without it could fit several models.
        missing = [key for key in ("v", "type") if key not in value]
        if missing:
            raise DecodeError(f"invalid {model.__name__}: {missing[0]}: field required")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise DecodeError(f"invalid {model.__name__}: {where}: {first['msg']}") from None


def encode(message: BaseModel) -> bytes:
    """Compact, key-sorted JSON of ``message`` (what gets signed or published)."""
    return encode_json(message.model_dump(mode="json", exclude_none=False))
