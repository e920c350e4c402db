"""The operator API's requests: one frozen, bounded model per operation.

``fleetctl`` sends an :class:`~shared.messages.OperatorRequest` whose ``op``
names an entry of :data:`OPERATIONS` and whose ``args`` must validate as that
entry's request model. The controller parses ``args`` exactly once, with
:func:`parse_request`, and hands its handler the typed request; anything that
does not validate is refused with a :class:`RequestError` naming the field.

Invariants:

* **Strict.** Numbers are numbers (``"10"`` and ``true`` are not), unknown
  fields are refused, every string, list and number is bounded, and no value is
  NaN or infinite.
* **Defaults once.** The rollout tunables and their defaults are the fields of
  :class:`RolloutPolicy`; the controller's ``RolloutSpec`` takes its defaults
  from :data:`DEFAULT_POLICY` and ``fleetctl`` sends only the flags an operator
  gave, so a default is written nowhere else.
* **Times in the future.** ``activate_at`` is checked against the reference time
  passed as ``now`` to :func:`parse_request` (the controller's clock), with
  :data:`CLOCK_SKEW_S` of tolerance, and at most :data:`MAX_ACTIVATE_AHEAD_S`
  ahead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.errors import DecodeError, UsageError
from shared.labels import MAX_LABELS, MAX_SELECTOR_CHARS, Selector, parse_selector
from shared.topics import check_id
from shared.trust import OperatorRole
from shared.version import SemVer
from shared.waves import buckets_for_percent

__all__ = [
    "CLOCK_SKEW_S",
    "DEFAULT_POLICY",
    "MAX_ACTIVATE_AHEAD_S",
    "OPERATIONS",
    "AuditList",
    "DeploymentList",
    "DeploymentRef",
    "DeploymentSet",
    "ModelAdd",
    "ModelList",
    "ModelUpload",
    "NodeForget",
    "NodeLabel",
    "NodeRevoke",
    "NodesList",
    "Operation",
    "Report",
    "Request",
    "RequestError",
    "RolloutList",
    "RolloutPolicy",
    "RolloutRef",
    "RolloutStart",
    "TrustPush",
    "lookup",
    "parse_request",
]

CLOCK_SKEW_S = 60.0  # an activation time this far in the past is still "now"
MAX_ACTIVATE_AHEAD_S = 366 * 86_400.0
MAX_WAVE_TIMEOUT_S = 7 * 86_400.0
MAX_HEALTH_WINDOW_S = 86_400.0
MAX_RETRY_BACKOFF_S = 86_400.0
UPLOAD_DATA_MAX_CHARS = 700_000  # base64 of one 512 KiB upload chunk
SIGNED_TEXT_MAX_CHARS = 512 * 1024  # a DSSE envelope (manifest or trust list) as JSON text

Float = Annotated[float, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Id = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Sha256 = Annotated[str, Strict(), Field(pattern=r"^[0-9a-f]{64}$")]
Timestamp = Annotated[float, Strict(), Field(ge=0, description="UNIX seconds")]


def _selector(text: str) -> str:
    try:
        parse_selector(text)
    except DecodeError as exc:
        raise ValueError(str(exc)) from None
    return text


SelectorText = Annotated[
    str,
    Strict(),
    Field(max_length=MAX_SELECTOR_CHARS, description="label selector, e.g. site in (a,b),!canary"),
    AfterValidator(_selector),
]


class RequestError(UsageError):
    """An operator request names no operation or its arguments do not validate."""


class Request(BaseModel):
    """Base of every operation's arguments."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


# ----- models -------------------------------------------------------------------------


class ModelUpload(Request):
    """One chunk of a blob upload; an empty ``data`` asks how much is stored (resume)."""

    sha256: Sha256
    offset: Annotated[int, Strict(), Field(ge=0, le=2**40)]
    size: Annotated[int, Strict(), Field(ge=1, le=2**40, description="bytes")]
    data: Annotated[str, Strict(), Field(max_length=UPLOAD_DATA_MAX_CHARS)] = ""


class ModelAdd(Request):
    """Register a release-signed manifest (a DSSE envelope as JSON text)."""

    envelope: Annotated[str, Strict(), Field(min_length=2, max_length=SIGNED_TEXT_MAX_CHARS)]


class ModelList(Request):
    pass


class RolloutPolicy(Request):
    """How a rollout proceeds. Fractions are 0..1; durations are seconds."""

    waves: Annotated[
        tuple[Float, ...],
        Field(strict=False, min_length=1, max_length=64, description="cumulative percentages"),
    ] = (1.0, 10.0, 50.0, 100.0)
    max_failures: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.10
    wave_timeout_s: Annotated[float, Strict(), Field(gt=0, le=MAX_WAVE_TIMEOUT_S)] = 300.0
    health_window_s: Annotated[float, Strict(), Field(ge=0, le=MAX_HEALTH_WINDOW_S)] = 60.0
    max_latency_regression: Annotated[float, Strict(), Field(ge=0, le=100)] = 0.50
    min_latency_regression_ms: Annotated[float, Strict(), Field(ge=0, le=60_000)] = 1.0
    """Below this absolute p95 increase a "regression" is scheduling noise, not the model."""
    max_error_increase: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.01
    gates: Annotated[
        tuple[Literal["errors", "latency"], ...],
        Field(strict=False, min_length=1, max_length=2, description="health gates to apply"),
    ] = ("errors", "latency")
    confidence: Annotated[float, Strict(), Field(ge=0.5, le=0.9999)] = 0.95
    """How sure the health gate must be that a node breaches before it counts."""
    min_samples: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] = 100
    """Runs each side of a health comparison needs before the gate judges."""
    breach_evaluations: Annotated[int, Strict(), Field(ge=1, le=100)] = 3
    """Consecutive breaching judgements (one per telemetry period) that fail a node."""
    auto_rollback: Bool = True
    activate_at: Timestamp | None = None
    max_retries: Annotated[int, Strict(), Field(ge=0, le=100)] = 2
    retry_backoff_s: Annotated[float, Strict(), Field(ge=0, le=MAX_RETRY_BACKOFF_S)] = 10.0

    @field_validator("waves")
    @classmethod
    def _waves_grow(cls, waves: tuple[float, ...]) -> tuple[float, ...]:
        for percent in waves:
            if not 0 < percent <= 100:
                raise ValueError(f"wave {percent:g} must be in (0, 100] percent")
        limits = [buckets_for_percent(p) for p in waves]
        if any(b <= a for a, b in pairwise(limits)):
            raise ValueError("waves must be increasing percentages, e.g. 1,10,50,100")
        return waves

    @field_validator("gates")
    @classmethod
    def _gates_unique(cls, gates: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(gates)) != len(gates):
            raise ValueError("gates repeat")
        return gates

    @field_validator("activate_at")
    @classmethod
    def _in_the_future(cls, when: float | None, info: ValidationInfo) -> float | None:
        now = info.context.get("now") if isinstance(info.context, Mapping) else None
        if when is None or not isinstance(now, float | int):
            return when
        if when < now - CLOCK_SKEW_S:
            raise ValueError("activation time is in the past")
        if when > now + MAX_ACTIVATE_AHEAD_S:
            days = MAX_ACTIVATE_AHEAD_S / 86_400
            raise ValueError(f"activation time is more than {days:g} days ahead")
        return when


DEFAULT_POLICY = RolloutPolicy()


class _Targeted(RolloutPolicy):
    """A model (``NAME@VERSION``) for the nodes ``select`` matches, and the policy."""

    model: Annotated[str, Strict(), Field(min_length=3, max_length=200)]
    select: SelectorText = ""

    @field_validator("model")
    @classmethod
    def _model_ref(cls, text: str) -> str:
        name, sep, version = text.partition("@")
        if not sep:
            raise ValueError("must be NAME@VERSION, e.g. classifier@1.2.0")
        try:
            check_id(name, "model name")
            SemVer.parse(version)
        except DecodeError as exc:
            raise ValueError(str(exc)) from None
        return text

    @property
    def name(self) -> str:
        return self.model.partition("@")[0]

    @property
    def version(self) -> str:
        return self.model.partition("@")[2]

    @property
    def selector(self) -> Selector:
        return parse_selector(self.select)


class RolloutStart(_Targeted):
    """Start a rollout of ``model`` (``NAME@VERSION``) to the nodes ``select`` matches."""

    rollout_id: Id | None = None
    dry_run: Bool = False
    """Only say what would happen: the plan, nothing started."""
    force: Bool = False
    """Start even though another active rollout targets some of the same nodes."""


class DeploymentSet(_Targeted):
    """What the group ``deployment`` (the nodes ``select`` matches) should run.

    A new group or a changed target starts a staged rollout with this policy;
    nodes that join the group later get the model by rollouts of their own.
    """

    deployment: Id
    force: Bool = False
    """Set it even though another active rollout targets some of the group's nodes."""

    @field_validator("activate_at")
    @classmethod
    def _no_activation_time(cls, when: float | None) -> float | None:
        if when is not None:
            raise ValueError("a deployment has no activation time: its rollouts start at once")
        return when

    @field_validator("waves")
    @classmethod
    def _whole_group(cls, waves: tuple[float, ...]) -> tuple[float, ...]:
        if waves and waves[-1] != 100:
            raise ValueError("a deployment's last wave must be 100 (the whole group)")
        return waves


class DeploymentRef(Request):
    """One deployment, by name (show, delete)."""

    deployment: Id


class DeploymentList(Request):
    pass


class RolloutRef(Request):
    """One rollout, by id (status, pause, resume, abort, rollback, events)."""

    rollout_id: Id


class RolloutList(Request):
    active_only: Bool = False


class NodesList(Request):
    select: SelectorText = ""

    @property
    def selector(self) -> Selector:
        return parse_selector(self.select)


class NodeRevoke(Request):
    node_id: Id


class NodeForget(Request):
    node_id: Id


class NodeLabel(Request):
    """Change the labels operators give a node, on top of those it announces.

    ``set`` adds or overrides labels, ``hide`` hides labels the node announces,
    ``reset`` drops the operators' entry for a key (the node's own value, if
    any, shows again). A key may appear in only one of them.
    """

    node_id: Id
    set: Annotated[dict[Id, Id], Field(max_length=MAX_LABELS)] = Field(default_factory=dict)
    hide: Annotated[tuple[Id, ...], Field(strict=False, max_length=MAX_LABELS)] = ()
    reset: Annotated[tuple[Id, ...], Field(strict=False, max_length=MAX_LABELS)] = ()

    @model_validator(mode="after")
    def _each_key_once(self) -> NodeLabel:
        keys = [*self.set, *self.hide, *self.reset]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"label {repeated[0]!r} is changed twice")
        if not keys:
            raise ValueError("no label to change")
        return self


class TrustPush(Request):
    """A rotated, root-signed trust list (a DSSE envelope as JSON text)."""

    trust: Annotated[str, Strict(), Field(min_length=2, max_length=SIGNED_TEXT_MAX_CHARS)]


class AuditList(Request):
    limit: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 100


class Report(Request):
    pass


# ----- the table ------------------------------------------------------------------------

R = TypeVar("R", bound=Request)


@dataclass(frozen=True, slots=True)
class Operation(Generic[R]):
    """One operation: its name on the wire, its arguments, whether it is audited,
    and the least operator role that may run it."""

    name: str
    request: type[R]
    mutating: bool
    role: OperatorRole


_VIEW, _DEPLOY, _ADMIN = OperatorRole.VIEWER, OperatorRole.DEPLOYER, OperatorRole.ADMIN

MODEL_UPLOAD = Operation("model.upload", ModelUpload, mutating=True, role=_DEPLOY)
MODEL_ADD = Operation("model.add", ModelAdd, mutating=True, role=_DEPLOY)
MODEL_LIST = Operation("model.list", ModelList, mutating=False, role=_VIEW)
ROLLOUT_START = Operation("rollout.start", RolloutStart, mutating=True, role=_DEPLOY)
ROLLOUT_STATUS = Operation("rollout.status", RolloutRef, mutating=False, role=_VIEW)
ROLLOUT_LIST = Operation("rollout.list", RolloutList, mutating=False, role=_VIEW)
ROLLOUT_EVENTS = Operation("rollout.events", RolloutRef, mutating=False, role=_VIEW)
ROLLOUT_PAUSE = Operation("rollout.pause", RolloutRef, mutating=True, role=_DEPLOY)
ROLLOUT_RESUME = Operation("rollout.resume", RolloutRef, mutating=True, role=_DEPLOY)
ROLLOUT_ABORT = Operation("rollout.abort", RolloutRef, mutating=True, role=_DEPLOY)
ROLLOUT_ROLLBACK = Operation("rollout.rollback", RolloutRef, mutating=True, role=_DEPLOY)
NODES_LIST = Operation("nodes.list", NodesList, mutating=False, role=_VIEW)
NODE_REVOKE = Operation("node.revoke", NodeRevoke, mutating=True, role=_ADMIN)
NODE_FORGET = Operation("node.forget", NodeForget, mutating=True, role=_ADMIN)
NODE_LABEL = Operation("node.label", NodeLabel, mutating=True, role=_DEPLOY)
DEPLOYMENT_SET = Operation("deployment.set", DeploymentSet, mutating=True, role=_DEPLOY)
DEPLOYMENT_LIST = Operation("deployment.list", DeploymentList, mutating=False, role=_VIEW)
DEPLOYMENT_SHOW = Operation("deployment.show", DeploymentRef, mutating=False, role=_VIEW)
DEPLOYMENT_DELETE = Operation("deployment.delete", DeploymentRef, mutating=True, role=_DEPLOY)
TRUST_PUSH = Operation("trust.push", TrustPush, mutating=True, role=_ADMIN)
AUDIT_LIST = Operation("audit.list", AuditList, mutating=False, role=_VIEW)
REPORT = Operation("report", Report, mutating=False, role=_VIEW)

OPERATIONS: Mapping[str, Operation[Any]] = {
    op.name: op
    for op in (
        MODEL_UPLOAD,
        MODEL_ADD,
        MODEL_LIST,
        ROLLOUT_START,
        ROLLOUT_STATUS,
        ROLLOUT_LIST,
        ROLLOUT_EVENTS,
        ROLLOUT_PAUSE,
        ROLLOUT_RESUME,
        ROLLOUT_ABORT,
        ROLLOUT_ROLLBACK,
        NODES_LIST,
        NODE_REVOKE,
        NODE_FORGET,
        NODE_LABEL,
        DEPLOYMENT_SET,
        DEPLOYMENT_LIST,
        DEPLOYMENT_SHOW,
        DEPLOYMENT_DELETE,
        TRUST_PUSH,
        AUDIT_LIST,
        REPORT,
    )
}


def parse_request(operation: Operation[R], args: Mapping[str, Any], *, now: float) -> R:
    """``args`` validated as ``operation``'s request, times checked against ``now``.

    Raises:
        RequestError: a field is missing, unknown, of the wrong type or out of range;
            the message names the operation and the field.
    """
    try:
        return operation.request.model_validate(dict(args), context={"now": now})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "arguments"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise RequestError(f"invalid {operation.name}: {where}: {message}") from None


def lookup(name: str) -> Operation[Any]:
    """Raises: RequestError for an unknown operation."""
    try:
        return OPERATIONS[name]
    except KeyError:
        raise RequestError(f"unknown operation {name[:64]!r}") from None
