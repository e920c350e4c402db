"""Keys, signed commands and scenarios for the tests of the node's command verifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

from hypothesis import HealthCheck, settings

from edge_node.core import (
    Accepted,
    NodeIdentity,
    Outcome,
    Rejected,
    VerifierState,
    record,
    verify_command,
)
from shared.codec import encode_json
from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    Envelope,
    SigningKey,
    b64encode,
    sign_envelope,
)
from shared.labels import parse_selector
from shared.messages import (
    CancelAction,
    Command,
    DeployAction,
    DType,
    ModelManifest,
    ModelRef,
    NodeTarget,
    RollbackAction,
    TensorSpec,
    TrustUpdateAction,
    WaveTarget,
    decode,
    encode,
)
from shared.trust import Role, TrustList, TrustStore, sign_trust_list
from shared.waves import BUCKETS, bucket

NOW = 1_700_000_000.0  # UNIX seconds; the only clock the verifier ever sees
TRUST_EXPIRES = NOW + 365 * 86_400.0
FLEET = "plant-7"
NODE = "node-1"
ROLLOUT = "ro-42"
MODEL = "resnet"
SHA_ACTIVE = "a" * 64  # the model the node runs (version 2.0.0) in the downgrade rows
SHA_NEW = "b" * 64
SHA_OTHER = "c" * 64

ME = NodeIdentity(node_id=NODE, fleet=FLEET, labels={"site": "berlin", "hw": "jetson"})
FRESH = VerifierState()
RUNNING_2_0 = VerifierState(
    last_seq=5,
    active=ModelRef(name=MODEL, version="2.0.0", sha256=SHA_ACTIVE),
    previous=ModelRef(name=MODEL, version="1.5.0", sha256=SHA_OTHER),  # what it ran before
)
APPLIED_10 = VerifierState(last_seq=10)

# Modest and deadline-free: signature checks are slow-ish on a small CI machine.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----- helpers ---------------------------------------------------------------


def node_ids_by_bucket(rollout_id: str, *, below: int, want: bool) -> str:
    """The first ``node-N`` whose bucket in ``rollout_id`` is (``want``) below ``below``."""
    for i in count():
        node_id = f"node-{i}"
        if (bucket(rollout_id, node_id) < below) is want:
            return node_id
    raise AssertionError("unreachable")


def node_in_wave(bucket_limit: int, rollout_id: str = ROLLOUT) -> str:
    return node_ids_by_bucket(rollout_id, below=bucket_limit, want=True)


def node_outside_wave(bucket_limit: int, rollout_id: str = ROLLOUT) -> str:
    return node_ids_by_bucket(rollout_id, below=bucket_limit, want=False)


def as_node(node_id: str, **labels: str) -> NodeIdentity:
    return NodeIdentity(node_id=node_id, fleet=FLEET, labels=labels or dict(ME.labels))


def make_manifest(version: str = "2.1.0", sha: str = SHA_NEW, name: str = MODEL) -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        sha256=sha,
        size=4096,
        inputs=(TensorSpec(name="x", dtype=DType.FLOAT32, shape=(1, 3, 224, 224)),),
        outputs=(TensorSpec(name="y", dtype=DType.FLOAT32, shape=(1, 1000)),),
        created_at=NOW - 3600,
    )


def command_of(data: bytes) -> Command:
    """The command inside a signed envelope (no checks: what the signer meant)."""
    return decode(Command, Envelope.from_bytes(data).payload_bytes())


def tamper_payload(data: bytes, **changes: object) -> bytes:
    """Change the signed command's fields but keep the original signatures."""
    envelope = Envelope.from_bytes(data)
    payload = command_of(data).model_dump(mode="json") | changes
    return replace_envelope(envelope, payload=b64encode(encode_json(payload)))


def replace_envelope(envelope: Envelope, **changes: object) -> bytes:
    return envelope.model_copy(update=changes).to_bytes()


@dataclass(frozen=True)
class Kit:
    """One key per role plus a key no trust list names, and the node's trust store."""

    root: SigningKey = field(default_factory=SigningKey.generate)
    release: SigningKey = field(default_factory=SigningKey.generate)
    rollout: SigningKey = field(default_factory=SigningKey.generate)
    stranger: SigningKey = field(default_factory=SigningKey.generate)

    def trust_list(
        self,
        *,
        version: int = 1,
        expires_at: float = TRUST_EXPIRES,
        root: SigningKey | None = None,
    ) -> TrustList:
        return TrustList.build(
            version=version,
            expires_at=expires_at,
            roles={
                Role.ROOT: [root or self.root],
                Role.RELEASE: [self.release],
                Role.ROLLOUT: [self.rollout],
            },
        )

    def store(self, *, expires_at: float = TRUST_EXPIRES) -> TrustStore:
        """The node's store: trust v1, bootstrapped from its root-signed envelope."""
        envelope = sign_trust_list(self.trust_list(expires_at=expires_at), [self.root])
        return TrustStore.bootstrap(envelope.to_bytes(), now=NOW)

    def signed_manifest(
        self, version: str = "2.1.0", sha: str = SHA_NEW, *, signer: SigningKey | None = None
    ) -> Envelope:
        payload = encode(make_manifest(version, sha))
        return sign_envelope(payload, PAYLOAD_MANIFEST, [signer or self.release])

    def deploy(self, version: str = "2.1.0", sha: str = SHA_NEW, **kw: SigningKey) -> DeployAction:
        return DeployAction(manifest=self.signed_manifest(version, sha, **kw))

    def rollback(self, version: str, sha: str = SHA_OTHER) -> RollbackAction:
        return RollbackAction(manifest=self.signed_manifest(version, sha), reason="canary failed")

    def trust_update(self, trust: TrustList, signers: list[SigningKey]) -> TrustUpdateAction:
        return TrustUpdateAction(trust=sign_trust_list(trust, signers))

    def make_command(
        self,
        body: DeployAction | RollbackAction | TrustUpdateAction | CancelAction | None = None,
        *,
        target: NodeTarget | WaveTarget | None = None,
        command_id: str = "cmd-1",
        seq: int = 10,
        fleet: str = FLEET,
        rollout_id: str | None = ROLLOUT,
        expires_at: float = NOW + 600,
        issued_at: float = NOW - 60,
        signers: list[SigningKey] | None = None,
        payload_type: str = PAYLOAD_COMMAND,
    ) -> bytes:
        """The exact bytes of a signed command envelope (a deploy to ``NODE`` by default)."""
        command = Command(
            command_id=command_id,
            seq=seq,
            fleet=fleet,
            rollout_id=rollout_id,
            issued_at=issued_at,
            expires_at=expires_at,
            target=target or NodeTarget(node=NODE),
            body=body or self.deploy(),
        )
        envelope = sign_envelope(encode(command), payload_type, signers or [self.rollout])
        return envelope.to_bytes()

    def wave(
        self,
        bucket_limit: int = BUCKETS,
        *,
        wave: int = 0,
        selector: str = "",
        exclude: tuple[str, ...] = (),
        **kw: object,
    ) -> bytes:
        """A broadcast deploy of ``ROLLOUT`` to the first ``bucket_limit`` buckets."""
        target = WaveTarget(
            selector=parse_selector(selector),
            exclude=exclude,
            bucket_limit=bucket_limit,
            wave=wave,
        )
        return self.make_command(target=target, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Delivery:
    """One command arriving at a node: the bytes and everything else the verifier is given."""

    data: bytes
    me: NodeIdentity = ME
    state: VerifierState = FRESH
    now: float = NOW

    def verify(self, store: TrustStore) -> Outcome:
        return verify_command(self.data, trust=store, me=self.me, state=self.state, now=self.now)


Scenario = Callable[[Kit], Delivery]


def send(data: Callable[[Kit], bytes], **delivery: object) -> Scenario:
    """A scenario: build the bytes with the kit, deliver them with ``delivery``'s overrides."""
    return lambda k: Delivery(data(k), **delivery)  # type: ignore[arg-type]


def assert_rejected(
    outcome: Outcome, error: type[Exception], code: str, command: Command | None
) -> None:
    assert isinstance(outcome, Rejected), outcome
    assert type(outcome.error) is error, outcome.error
    assert outcome.code == code
    assert outcome.command == command


def accept(delivery: Delivery, store: TrustStore) -> VerifierState:
    """Verify ``delivery``, insist it is accepted, and return the state to persist."""
    outcome = delivery.verify(store)
    assert isinstance(outcome, Accepted), outcome
    return record(delivery.state, outcome, now=delivery.now)
