"""The node's command verifier: every decision about a command, and no I/O.

``verify_command`` takes the exact bytes received, the node's trust store, its
identity, its persisted :class:`VerifierState` and an explicit ``now``, and
returns one outcome:

* :class:`Accepted` — act on it, then persist :func:`record` of it *before*
  acting, so a restart cannot apply it twice;
* :class:`Duplicate` — already attempted (QoS 1 redelivery, a retained wave
  command seen again on reconnect, a later wave of a rollout this node took
  part in): acknowledge, do not re-run;
* :class:`Ignored` — a broadcast not meant for this node (outside the wave or
  the selector, excluded by id, or superseded by a newer command): nothing is
  reported;
* :class:`Rejected` — refused with a machine-readable ``code``; nothing changes.

Rules, in order: a well-formed DSSE envelope; a threshold of rollout-role
signatures; a well-formed command for this fleet; addressed to this node
(explicit id, or the wave's selector, exclusions and hash bucket); not expired; a
release-role signature on the embedded manifest; not already attempted; not
issued ahead of the node's clock (:data:`CLOCK_SKEW_S`), living at most
:data:`MAX_COMMAND_LIFETIME_S`, with a ``seq`` neither ahead of the clock in
milliseconds nor at or below the highest applied (replay; a stored counter
beyond the clock is taken as the clock, :func:`effective_last_seq`); no
downgrade unless it is a signed rollback, and a rollback only to the node's own
previous model; a trust update must rotate (newer, signed by old and new root)
and is ordered by its version alone, never by ``seq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.envelope import Envelope
from shared.errors import (
    DecodeError,
    DowngradeError,
    ExpiredError,
    NotAddressedError,
    OutOfBoundsError,
    ReplayError,
    RollbackTargetError,
    TrustError,
)
from shared.labels import matches
from shared.messages import (
    Command,
    DeployAction,
    ModelManifest,
    ModelRef,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
    decode,
)
from shared.trust import Role, TrustStore
from shared.version import SemVer
from shared.waves import in_wave

__all__ = [
    "CLOCK_SKEW_S",
    "MAX_COMMAND_LIFETIME_S",
    "MAX_REMEMBERED_KEYS",
    "Accepted",
    "Duplicate",
    "Ignored",
    "NodeIdentity",
    "Outcome",
    "Rejected",
    "VerifierState",
    "effective_last_seq",
    "record",
    "verify_command",
]

MAX_REMEMBERED_KEYS = 512
CLOCK_SKEW_S = 300.0
"""How far ahead of this node's clock a command's ``issued_at`` and ``seq`` may be.

The controller numbers commands from its clock in milliseconds, so a ``seq``
above ``(now + CLOCK_SKEW_S) * 1000`` cannot be honest: accepting it would make
every later command a replay."""
MAX_COMMAND_LIFETIME_S = 30 * 86_400.0  # expires_at - issued_at (the controller uses 7 days)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    node_id: str
    fleet: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerifierState:
    """What the node persists between commands (and across restarts)."""

    last_seq: int = 0
    attempted: tuple[str, ...] = ()
    active: ModelRef | None = None
    previous: ModelRef | None = None  # what a rollback may go back to


@dataclass(frozen=True, slots=True)
class Accepted:
    command: Command
    manifest: ModelManifest | None
    keys: tuple[str, ...]
    new_trust: TrustStore | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    command: Command
    reason: str
    manifest: ModelManifest | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    error: TrustError | DecodeError
    command: Command | None = None

    @property
    def code(self) -> str:
        return self.error.code if isinstance(self.error, TrustError) else "malformed"


Outcome = Accepted | Duplicate | Ignored | Rejected


def _keys(command: Command, manifest: ModelManifest | None) -> tuple[str, ...]:
    """Keys recorded for an attempted command: the command, and its rollout step.

    The step key (rollout, action, model) makes every later wave of the same
    rollout a duplicate, whether this node took part through a wave or through a
    per-node command (a late joiner or a retry).
    """
    keys = [f"c:{command.command_id}"]
    if command.rollout_id is not None:
        sha = manifest.sha256 if manifest is not None else "-"
        keys.append(f"r:{command.rollout_id}:{command.body.action}:{sha}")
    return tuple(keys)


def _dedupe_key(command: Command, keys: tuple[str, ...]) -> str:
    """The key that makes ``command`` a duplicate: its step for waves, else its id.

    A per-node command with a new id re-runs the step: that is how the
    controller retries a node that failed or timed out.
    """
    return keys[-1] if isinstance(command.target, WaveTarget) else keys[0]


def _addressed(command: Command, me: NodeIdentity) -> Ignored | Rejected | None:
    target = command.target
    if command.fleet != me.fleet:
        return Rejected(NotAddressedError(f"command is for fleet {command.fleet}"), command)
    if isinstance(target, WaveTarget):
        if command.rollout_id is None:
            return Rejected(NotAddressedError("wave command without a rollout id"), command)
        if not matches(target.selector, me.labels):
            return Ignored("labels do not match the rollout's selector")
        if me.node_id in target.exclude:
            return Ignored("excluded by the controller (relabelled out of the selection)")
        if not in_wave(command.rollout_id, me.node_id, target.bucket_limit):
            return Ignored(f"not in wave {target.wave}")
        return None
    if target.node != me.node_id:
        return Rejected(NotAddressedError(f"command is addressed to node {target.node}"), command)
    return None


def _open_manifest(envelope: Envelope, trust: TrustStore, now: float) -> ModelManifest:
    return decode(ModelManifest, trust.open(envelope, Role.RELEASE, now=now))


def verify_command(
    data: bytes,
    *,
    trust: TrustStore,
    me: NodeIdentity,
    state: VerifierState,
    now: float,
) -> Outcome:
    """Decide what to do with a command envelope received as ``data``. Never raises."""
    command: Command | None = None
    try:
        envelope = Envelope.from_bytes(data)
        # An expired trust list refuses everything but a root-signed rotation,
        # so a node that was offline past its list's expiry can still recover.
        expired = trust.expired(now)
        command = decode(
            Command, trust.open(envelope, Role.ROLLOUT, now=now, allow_expired=expired)
        )
        if expired and not isinstance(command.body, TrustUpdateAction):
            raise ExpiredError(f"trust list v{trust.version} has expired")
        not_for_me = _addressed(command, me)
        if not_for_me is not None:
            return not_for_me
        body = command.body
        manifest: ModelManifest | None = None
        if isinstance(body, DeployAction | RollbackAction):
            manifest = _open_manifest(body.manifest, trust, now)
        keys = _keys(command, manifest)
        if _dedupe_key(command, keys) in state.attempted:
            return Duplicate(command, f"already attempted ({_dedupe_key(command, keys)})", manifest)
        if command.expires_at <= now:
            raise ExpiredError(f"command {command.command_id} expired")
        _check_bounds(command, now)
        # A trust update is ordered by the list's own version (rotate() below),
        # never by the command counter, so a wrong counter cannot block it.
        last_seq = effective_last_seq(state.last_seq, now)
        if command.seq <= last_seq and not isinstance(body, TrustUpdateAction):
            if isinstance(command.target, WaveTarget):
                return Ignored(f"wave command seq {command.seq} superseded")
            raise ReplayError(f"command seq {command.seq} is not above the last applied {last_seq}")
        if isinstance(body, DeployAction) and manifest is not None:
            _check_upgrade(manifest, state.active)
        if isinstance(body, RollbackAction) and manifest is not None:
            _check_rollback(manifest, state.active, state.previous)
        new_trust = None
        if isinstance(body, TrustUpdateAction):
            new_trust = trust.rotate(body.trust, now=now)
        return Accepted(command, manifest, keys, new_trust)
    except (TrustError, DecodeError) as exc:
        return Rejected(exc, command)


def effective_last_seq(last_seq: int, now: float) -> int:
    """The highest applied ``seq``, or the clock in milliseconds when the stored
    one is beyond the clock and its skew (no honest command could have set it:
    a node whose counter went wrong recovers by itself, and commands issued
    before now, all numbered below the clock, stay replays)."""
    ceiling = int((now + CLOCK_SKEW_S) * 1000)
    return int(now * 1000) if last_seq > ceiling else last_seq


def _check_bounds(command: Command, now: float) -> None:
    """Raises: OutOfBoundsError for a command from the future or living too long."""
    if command.issued_at > now + CLOCK_SKEW_S:
        raise OutOfBoundsError(
            f"command {command.command_id} is issued {command.issued_at - now:.0f} s "
            f"ahead of this node's clock (at most {CLOCK_SKEW_S:g} s)"
        )
    if command.expires_at - command.issued_at > MAX_COMMAND_LIFETIME_S:
        raise OutOfBoundsError(
            f"command {command.command_id} lives longer than "
            f"{MAX_COMMAND_LIFETIME_S / 86_400:g} days"
        )
    if command.seq > (now + CLOCK_SKEW_S) * 1000 and not isinstance(
        command.body, TrustUpdateAction
    ):
        raise OutOfBoundsError(
            f"command seq {command.seq} is ahead of this node's clock in milliseconds"
        )


def _check_rollback(
    manifest: ModelManifest, active: ModelRef | None, previous: ModelRef | None
) -> None:
    """A rollback goes back to this node's own previous model (or stays on the
    active one: a rollback resumed after it was applied), nothing else."""
    if active is not None and manifest.sha256 == active.sha256:
        return
    if previous is not None and manifest.sha256 == previous.sha256:
        return
    had = f"{previous.name} {previous.version}" if previous is not None else "none"
    raise RollbackTargetError(
        f"rollback to {manifest.name} {manifest.version} is not this node's previous model ({had})"
    )


def _check_upgrade(manifest: ModelManifest, active: ModelRef | None) -> None:
    """A deploy of the active model's name must move forward (or be that very model).

    Deploying a different model name replaces the active one and is no downgrade.
    """
    if active is None or manifest.sha256 == active.sha256 or manifest.name != active.name:
        return
    if SemVer.parse(manifest.version) <= SemVer.parse(active.version):
        raise DowngradeError(
            f"{manifest.name} {manifest.version} is not newer than active {active.version}; "
            "a downgrade must be a signed rollback"
        )


def record(state: VerifierState, accepted: Accepted, *, now: float) -> VerifierState:
    """The state to persist once ``accepted`` (verified at ``now``) is about to be acted on.

    A trust update leaves ``last_seq`` alone: it is ordered by its own version."""
    attempted = (state.attempted + accepted.keys)[-MAX_REMEMBERED_KEYS:]
    command = accepted.command
    counted = not isinstance(command.body, TrustUpdateAction)  # not ordered by seq
    last_seq = effective_last_seq(state.last_seq, now)
    return VerifierState(
        last_seq=max(last_seq, command.seq) if counted else state.last_seq,
        attempted=attempted,
        active=state.active,
        previous=state.previous,
    )
