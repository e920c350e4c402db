"""Keys, trust lists, signed documents and strategies for the unit tests of ``shared/``."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shared.envelope import PAYLOAD_COMMAND, PAYLOAD_MANIFEST, Envelope, SigningKey, sign_envelope
from shared.messages import (
    CancelAction,
    Command,
    ModelManifest,
    NodeTarget,
    TensorSpec,
    encode,
)
from shared.trust import Role, TrustList, TrustStore, sign_trust_list

NOW = 1_700_000_000.0  # UNIX seconds: every test passes this explicit clock
YEAR_S = 365 * 86_400.0
SHA = "ab" * 32

# Modest and deadline-free: the suite runs on a 2-core machine. FUZZ is for the
# tests repeated once per message type.
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Semantic versions as semver.org §9-10 allow them (no leading zeros in numbers).
_PRE_ID = st.one_of(
    st.just("0"),
    st.integers(1, 10**9).map(str),
    st.from_regex(r"[0-9]{0,3}[A-Za-z-][0-9A-Za-z-]{0,8}", fullmatch=True),
)
_BUILD_ID = st.from_regex(r"[0-9A-Za-z-]{1,8}", fullmatch=True)
_CORE = st.integers(0, 999_999_999).map(str)
VERSIONS = st.builds(
    lambda major, minor, patch, pre, build: (
        f"{major}.{minor}.{patch}"
        + (f"-{'.'.join(pre)}" if pre else "")
        + (f"+{'.'.join(build)}" if build else "")
    ),
    _CORE,
    _CORE,
    _CORE,
    st.lists(_PRE_ID, max_size=3),
    st.lists(_BUILD_ID, max_size=2),
).filter(lambda v: len(v) <= 128)


@dataclass(frozen=True)
class Keys:
    """One key per role, freshly generated."""

    root: SigningKey = field(default_factory=SigningKey.generate)
    release: SigningKey = field(default_factory=SigningKey.generate)
    rollout: SigningKey = field(default_factory=SigningKey.generate)

    def roles(self) -> dict[Role, list[SigningKey]]:
        return {Role.ROOT: [self.root], Role.RELEASE: [self.release], Role.ROLLOUT: [self.rollout]}


def trust_list(keys: Keys, *, version: int = 1, expires_at: float = NOW + YEAR_S) -> TrustList:
    return TrustList.build(version=version, expires_at=expires_at, roles=keys.roles())


def trust_bytes(trust: TrustList, signers: list[SigningKey]) -> bytes:
    return sign_trust_list(trust, signers).to_bytes()


def store_for(keys: Keys, *, version: int = 1) -> TrustStore:
    """A store bootstrapped from a trust list of ``keys`` signed by its root."""
    return TrustStore.bootstrap(
        trust_bytes(trust_list(keys, version=version), [keys.root]), now=NOW
    )


def manifest(**changes: object) -> ModelManifest:
    fields: dict[str, object] = {
        "name": "resnet",
        "version": "1.2.0",
        "sha256": SHA,
        "size": 1234,
        "inputs": (TensorSpec(name="x", dtype="float32", shape=(1, 3, None, "w")),),
        "outputs": (TensorSpec(name="y", dtype="float32", shape=(1, 1000)),),
        "created_at": NOW,
    } | changes
    return ModelManifest.model_validate(fields)


def command(**changes: object) -> Command:
    fields: dict[str, object] = {
        "command_id": "cmd-1",
        "seq": 1,
        "fleet": "plant-7",
        "issued_at": NOW,
        "expires_at": NOW + 600,
        "target": NodeTarget(node="n1"),
        "body": CancelAction(),
    } | changes
    return Command.model_validate(fields)


def sign_manifest(signers: list[SigningKey], message: ModelManifest | None = None) -> Envelope:
    return sign_envelope(encode(message or manifest()), PAYLOAD_MANIFEST, signers)


def sign_command(signers: list[SigningKey], message: Command | None = None) -> Envelope:
    return sign_envelope(encode(message or command()), PAYLOAD_COMMAND, signers)
