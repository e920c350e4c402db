"""The node's command verifier, one table row per rule (STYLE.md §8 (i) and (ii)).

Every scenario is built from real keys, a real trust store and really signed
envelopes; the verifier gets the exact bytes a node would receive and an
explicit clock (``NOW``), so nothing here sleeps or touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_node.core import (
    MAX_REMEMBERED_KEYS,
    Accepted,
    Duplicate,
    Ignored,
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
    PAYLOAD_TRUST,
    Envelope,
    SigningKey,
    b64encode,
    sign_envelope,
)
from shared.errors import (
    BadSignatureError,
    DecodeError,
    DowngradeError,
    ExpiredError,
    NotAddressedError,
    ReplayError,
    ThresholdError,
    TrustError,
    UnknownKeyError,
    VersionRollbackError,
    WrongRoleError,
)
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
    last_seq=5, active=ModelRef(name=MODEL, version="2.0.0", sha256=SHA_ACTIVE)
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
        signers: list[SigningKey] | None = None,
        payload_type: str = PAYLOAD_COMMAND,
    ) -> bytes:
        """The exact bytes of a signed command envelope (a deploy to ``NODE`` by default)."""
        command = Command(
            command_id=command_id,
            seq=seq,
            fleet=fleet,
            rollout_id=rollout_id,
            issued_at=NOW - 60,
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
        selector: Mapping[str, str] | None = None,
        **kw: object,
    ) -> bytes:
        """A broadcast deploy of ``ROLLOUT`` to the first ``bucket_limit`` buckets."""
        target = WaveTarget(selector=dict(selector or {}), bucket_limit=bucket_limit, wave=wave)
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


@pytest.fixture(scope="module")
def kit() -> Kit:
    return Kit()


@pytest.fixture(scope="module")
def store(kit: Kit) -> TrustStore:
    return kit.store()


def send(data: Callable[[Kit], bytes], **delivery: object) -> Scenario:
    """A scenario: build the bytes with the kit, deliver them with ``delivery``'s overrides."""
    return lambda k: Delivery(data(k), **delivery)  # type: ignore[arg-type]


# ----- accepted ---------------------------------------------------------------


def test_accepted_deploy_carries_parsed_manifest_and_keys(kit: Kit, store: TrustStore) -> None:
    data = kit.make_command(kit.deploy("2.1.0", SHA_NEW), command_id="cmd-7", seq=3)

    outcome = Delivery(data).verify(store)

    assert isinstance(outcome, Accepted)
    assert outcome.command == command_of(data)
    assert outcome.manifest == make_manifest("2.1.0", SHA_NEW)
    assert outcome.keys == ("c:cmd-7", f"r:{ROLLOUT}:deploy:{SHA_NEW}")
    assert outcome.new_trust is None


ACCEPTED: list[object] = [
    pytest.param(
        send(lambda k: k.make_command(CancelAction(), rollout_id=None)),
        ("c:cmd-1",),
        id="cancel-without-rollout-has-only-command-key",
    ),
    pytest.param(
        send(lambda k: k.make_command(CancelAction())),
        ("c:cmd-1", f"r:{ROLLOUT}:cancel:-"),
        id="cancel-in-rollout-keys-without-manifest",
    ),
    pytest.param(
        send(lambda k: k.wave(1000), me=as_node(node_in_wave(1000))),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="wave-node-inside-bucket-limit",
    ),
    pytest.param(
        send(lambda k: k.wave(selector={"site": "berlin"})),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="wave-selector-subset-of-labels",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.deploy("2.1.0")), state=RUNNING_2_0),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="upgrade-2.0.0-to-2.1.0",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.deploy("2.0.0", SHA_ACTIVE)), state=RUNNING_2_0),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_ACTIVE}"),
        id="redeploy-exactly-the-active-sha",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.rollback("1.5.0")), state=RUNNING_2_0),
        ("c:cmd-1", f"r:{ROLLOUT}:rollback:{SHA_OTHER}"),
        id="signed-rollback-2.0.0-to-1.5.0",
    ),
    pytest.param(
        send(lambda k: k.make_command(seq=11), state=APPLIED_10),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="seq-one-above-last-applied",
    ),
    pytest.param(
        send(lambda k: k.make_command(expires_at=NOW + 0.001)),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="expires-just-after-now",
    ),
]


@pytest.mark.parametrize(("scenario", "keys"), ACCEPTED)
def test_accepted(kit: Kit, store: TrustStore, scenario: Scenario, keys: tuple[str, ...]) -> None:
    delivery = scenario(kit)

    outcome = delivery.verify(store)

    assert isinstance(outcome, Accepted), outcome
    assert outcome.command == command_of(delivery.data)
    assert outcome.keys == keys


@pytest.mark.parametrize(
    "node_id", ["node-0", "node-1", "n", "edge.berlin-007", "Z" * 64, "x_y"], ids=str
)
def test_full_wave_includes_every_node(kit: Kit, store: TrustStore, node_id: str) -> None:
    outcome = Delivery(kit.wave(BUCKETS), me=as_node(node_id)).verify(store)

    assert isinstance(outcome, Accepted), outcome


# ----- rejected ---------------------------------------------------------------


def signed_then_altered(k: Kit) -> bytes:
    return tamper_payload(k.make_command(seq=10), seq=11)


def command_envelope_with_manifest_type(k: Kit) -> bytes:
    return k.make_command(payload_type=PAYLOAD_MANIFEST)


def manifest_signed_by_rollout(k: Kit) -> bytes:
    return k.make_command(k.deploy(signer=k.rollout))


def payload_not_a_command(k: Kit) -> bytes:
    """Correctly signed by the rollout key, but the payload is a manifest."""
    envelope = sign_envelope(encode(make_manifest()), PAYLOAD_COMMAND, [k.rollout])
    return envelope.to_bytes()


def payload_not_base64(k: Kit) -> bytes:
    envelope = Envelope.from_bytes(k.make_command())
    return replace_envelope(envelope, payload="!not base64!")


def rollback_signed_by(k: Kit, signer: SigningKey) -> RollbackAction:
    return RollbackAction(manifest=k.signed_manifest("1.5.0", SHA_OTHER, signer=signer))


def wave_without_rollout(k: Kit) -> bytes:
    return k.wave(rollout_id=None)


def junk(data: bytes) -> Callable[[Kit], bytes]:
    return lambda _k: data


# (scenario, error type, code, whether Rejected.command is the parsed command)
REJECTED: list[object] = [
    # a well-formed DSSE envelope
    pytest.param(send(junk(b"")), DecodeError, "malformed", False, id="empty-bytes"),
    pytest.param(send(junk(b"junk")), DecodeError, "malformed", False, id="junk-bytes"),
    pytest.param(send(junk(b"\xff\xfe{}")), DecodeError, "malformed", False, id="not-utf8"),
    pytest.param(send(junk(b'{"a":1}')), DecodeError, "malformed", False, id="json-not-envelope"),
    pytest.param(send(junk(b"[]")), DecodeError, "malformed", False, id="json-array"),
    pytest.param(
        send(junk(b"[" * 5000 + b"]" * 5000)), DecodeError, "malformed", False, id="deep-nesting"
    ),
    pytest.param(
        send(junk(b'{"payloadType":"x","payload":"","signatures":[],"extra":1}')),
        DecodeError,
        "malformed",
        False,
        id="envelope-with-unknown-field",
    ),
    pytest.param(
        send(payload_not_base64), DecodeError, "malformed", False, id="payload-not-base64"
    ),
    # a threshold of rollout-role signatures
    pytest.param(
        send(signed_then_altered),
        BadSignatureError,
        "bad_signature",
        False,
        id="payload-altered-after-signing",
    ),
    pytest.param(
        send(lambda k: k.make_command(signers=[k.release])),
        WrongRoleError,
        "wrong_role",
        False,
        id="command-signed-by-release-key",
    ),
    pytest.param(
        send(lambda k: k.make_command(signers=[k.root])),
        WrongRoleError,
        "wrong_role",
        False,
        id="command-signed-by-root-key",
    ),
    pytest.param(
        send(lambda k: k.make_command(signers=[k.stranger])),
        UnknownKeyError,
        "unknown_key",
        False,
        id="command-signed-by-unknown-key",
    ),
    pytest.param(
        send(command_envelope_with_manifest_type),
        WrongRoleError,
        "wrong_role",
        False,
        id="command-envelope-with-manifest-payload-type",
    ),
    # a well-formed command for this fleet
    pytest.param(
        send(payload_not_a_command), DecodeError, "malformed", False, id="signed-non-command"
    ),
    # addressed to this node
    pytest.param(
        send(lambda k: k.make_command(target=NodeTarget(node="node-2"))),
        NotAddressedError,
        "not_addressed",
        True,
        id="per-node-command-for-another-node",
    ),
    pytest.param(
        send(lambda k: k.make_command(fleet="plant-8")),
        NotAddressedError,
        "not_addressed",
        True,
        id="wrong-fleet",
    ),
    pytest.param(
        send(lambda k: k.wave(fleet="plant-8")),
        NotAddressedError,
        "not_addressed",
        True,
        id="wave-for-wrong-fleet",
    ),
    pytest.param(
        send(wave_without_rollout),
        NotAddressedError,
        "not_addressed",
        True,
        id="wave-without-rollout-id",
    ),
    # not expired
    pytest.param(
        send(lambda k: k.make_command(expires_at=NOW)),
        ExpiredError,
        "expired",
        True,
        id="expires-exactly-now",
    ),
    pytest.param(
        send(lambda k: k.make_command(expires_at=NOW - 1)),
        ExpiredError,
        "expired",
        True,
        id="expired-command",
    ),
    pytest.param(
        send(lambda k: k.wave(expires_at=NOW - 1)),
        ExpiredError,
        "expired",
        True,
        id="expired-wave-command",
    ),
    # a release-role signature on the embedded manifest
    pytest.param(
        send(manifest_signed_by_rollout),
        WrongRoleError,
        "wrong_role",
        True,
        id="manifest-signed-by-rollout-key",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.deploy(signer=k.stranger))),
        UnknownKeyError,
        "unknown_key",
        True,
        id="manifest-signed-by-unknown-key",
    ),
    pytest.param(
        send(lambda k: k.make_command(rollback_signed_by(k, k.rollout))),
        WrongRoleError,
        "wrong_role",
        True,
        id="rollback-manifest-signed-by-rollout-key",
    ),
    # a seq above the highest applied
    pytest.param(
        send(lambda k: k.make_command(seq=10), state=APPLIED_10),
        ReplayError,
        "replayed",
        True,
        id="node-command-seq-equal-to-last",
    ),
    pytest.param(
        send(lambda k: k.make_command(seq=3), state=APPLIED_10),
        ReplayError,
        "replayed",
        True,
        id="node-command-seq-below-last",
    ),
    # no downgrade unless it is a signed rollback
    pytest.param(
        send(lambda k: k.make_command(k.deploy("1.5.0", SHA_OTHER)), state=RUNNING_2_0),
        DowngradeError,
        "downgrade",
        True,
        id="deploy-1.5.0-over-active-2.0.0",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.deploy("2.0.0", SHA_OTHER)), state=RUNNING_2_0),
        DowngradeError,
        "downgrade",
        True,
        id="deploy-same-version-different-sha",
    ),
    pytest.param(
        send(lambda k: k.make_command(k.deploy("2.0.0-rc.1", SHA_OTHER)), state=RUNNING_2_0),
        DowngradeError,
        "downgrade",
        True,
        id="deploy-prerelease-of-active-version",
    ),
]


def assert_rejected(
    outcome: Outcome, error: type[Exception], code: str, command: Command | None
) -> None:
    assert isinstance(outcome, Rejected), outcome
    assert type(outcome.error) is error, outcome.error
    assert outcome.code == code
    assert outcome.command == command


@pytest.mark.parametrize(("scenario", "error", "code", "reports_command"), REJECTED)
def test_rejected(
    kit: Kit,
    store: TrustStore,
    scenario: Scenario,
    error: type[Exception],
    code: str,
    reports_command: bool,
) -> None:
    delivery = scenario(kit)

    outcome = delivery.verify(store)

    expected = command_of(delivery.data) if reports_command else None
    assert_rejected(outcome, error, code, expected)


def test_deploy_of_another_model_is_not_a_downgrade(kit: Kit, store: TrustStore) -> None:
    manifest = sign_envelope(
        encode(make_manifest("1.0.0", SHA_OTHER, name="yolo")), PAYLOAD_MANIFEST, [kit.release]
    )
    data = kit.make_command(DeployAction(manifest=manifest))

    outcome = Delivery(data, state=RUNNING_2_0).verify(store)  # running resnet 2.0.0

    assert isinstance(outcome, Accepted), outcome


# ----- ignored ----------------------------------------------------------------

IGNORED: list[object] = [
    pytest.param(send(lambda k: k.wave(selector={"site": "paris"})), id="selector-value-differs"),
    pytest.param(
        send(lambda k: k.wave(selector={"gpu": "yes"})), id="selector-key-missing-from-labels"
    ),
    pytest.param(
        send(lambda k: k.wave(selector={"site": "berlin"}), me=as_node(NODE, hw="jetson")),
        id="node-without-the-selected-label",
    ),
    pytest.param(
        send(lambda k: k.wave(1000), me=as_node(node_outside_wave(1000))),
        id="node-outside-bucket-limit",
    ),
    pytest.param(
        send(lambda k: k.wave(5000, wave=2), me=as_node(node_outside_wave(5000))),
        id="node-outside-half-wave",
    ),
    pytest.param(send(lambda k: k.wave(0), me=as_node(NODE)), id="empty-wave"),
    pytest.param(send(lambda k: k.wave(seq=10), state=APPLIED_10), id="wave-seq-equal-superseded"),
    pytest.param(send(lambda k: k.wave(seq=2), state=APPLIED_10), id="wave-seq-below-superseded"),
]


@pytest.mark.parametrize("scenario", IGNORED)
def test_ignored(kit: Kit, store: TrustStore, scenario: Scenario) -> None:
    outcome = scenario(kit).verify(store)

    assert isinstance(outcome, Ignored), outcome


def test_bucket_helpers_agree_with_shared_waves() -> None:
    inside, outside = node_in_wave(1000), node_outside_wave(1000)

    assert bucket(ROLLOUT, inside) < 1000 <= bucket(ROLLOUT, outside)


# ----- duplicates -------------------------------------------------------------


def accept(delivery: Delivery, store: TrustStore) -> VerifierState:
    """Verify ``delivery``, insist it is accepted, and return the state to persist."""
    outcome = delivery.verify(store)
    assert isinstance(outcome, Accepted), outcome
    return record(delivery.state, outcome)


def redelivered(k: Kit) -> tuple[bytes, bytes]:
    data = k.make_command(seq=10)
    return data, data


def retained_wave_again(k: Kit) -> tuple[bytes, bytes]:
    data = k.wave(seq=10)
    return data, data


def next_wave_same_manifest(k: Kit) -> tuple[bytes, bytes]:
    return (
        k.wave(1000, wave=0, command_id="cmd-w0", seq=10),
        k.wave(5000, wave=1, command_id="cmd-w1", seq=11),
    )


def redelivered_rollback(k: Kit) -> tuple[bytes, bytes]:
    data = k.make_command(k.rollback("1.5.0"), seq=10)
    return data, data


# (first, second): the first is accepted and recorded, the second is a Duplicate
DUPLICATES: list[object] = [
    pytest.param(redelivered, id="same-bytes-again"),
    pytest.param(retained_wave_again, id="retained-wave-seen-on-reconnect"),
    pytest.param(next_wave_same_manifest, id="next-wave-same-rollout-and-manifest"),
    pytest.param(redelivered_rollback, id="same-rollback-again"),
]


@pytest.mark.parametrize("pair", DUPLICATES)
def test_duplicate(kit: Kit, store: TrustStore, pair: Callable[[Kit], tuple[bytes, bytes]]) -> None:
    first, second = pair(kit)
    me = as_node(node_in_wave(1000))  # inside every wave these scenarios send
    state = accept(Delivery(first, me=me), store)

    outcome = Delivery(second, me=me, state=state).verify(store)

    assert isinstance(outcome, Duplicate), outcome
    assert outcome.command == command_of(second)


def test_different_manifest_in_same_rollout_is_not_a_duplicate(kit: Kit, store: TrustStore) -> None:
    state = accept(Delivery(kit.wave(seq=10)), store)
    later = kit.wave(seq=11, body=kit.deploy("2.2.0", SHA_OTHER), command_id="cmd-2")

    outcome = Delivery(later, state=state).verify(store)

    assert isinstance(outcome, Accepted), outcome


def node_command_first(k: Kit) -> bytes:
    return k.make_command(command_id="cmd-1", seq=10)


def wave_command_first(k: Kit) -> bytes:
    return k.wave(command_id="cmd-w0", seq=10)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(node_command_first, id="after-a-per-node-command"),
        pytest.param(wave_command_first, id="after-a-wave-command"),
    ],
)
def test_node_retry_with_new_command_id_is_accepted(
    kit: Kit, store: TrustStore, first: Callable[[Kit], bytes]
) -> None:
    state = accept(Delivery(first(kit)), store)
    retry = kit.make_command(command_id="cmd-1-retry", seq=11)  # same rollout and manifest

    outcome = Delivery(retry, state=state).verify(store)

    assert isinstance(outcome, Accepted), outcome
    assert outcome.command.command_id == "cmd-1-retry"


def test_expired_redelivery_of_an_applied_command_is_a_duplicate(
    kit: Kit, store: TrustStore
) -> None:
    data = kit.wave(seq=10, expires_at=NOW + 60)
    state = accept(Delivery(data), store)

    outcome = Delivery(data, state=state, now=NOW + 120).verify(store)

    assert isinstance(outcome, Duplicate), outcome


# ----- trust updates ------------------------------------------------------------

NEW_ROOT = SigningKey.generate()  # the root a rotation moves to


def rotate_same_root(k: Kit) -> bytes:
    return k.make_command(k.trust_update(k.trust_list(version=2), [k.root]), rollout_id=None)


def rotate_to_new_root(k: Kit) -> bytes:
    update = k.trust_update(k.trust_list(version=2, root=NEW_ROOT), [k.root, NEW_ROOT])
    return k.make_command(update, rollout_id=None)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(rotate_same_root, id="v2-same-root-signed-by-current-root"),
        pytest.param(rotate_to_new_root, id="v2-new-root-signed-by-old-and-new-root"),
    ],
)
def test_trust_update_accepted(kit: Kit, store: TrustStore, build: Callable[[Kit], bytes]) -> None:
    outcome = Delivery(build(kit)).verify(store)

    assert isinstance(outcome, Accepted), outcome
    assert outcome.keys == ("c:cmd-1",)
    assert outcome.manifest is None
    assert outcome.new_trust is not None
    assert outcome.new_trust.version == 2


def trust_update_command(trust: Callable[[Kit], TrustList], signers: str) -> Scenario:
    """A trust update of ``trust`` signed by the kit keys named in ``signers``."""

    def build(k: Kit) -> Delivery:
        named = {"root": k.root, "new": NEW_ROOT, "stranger": k.stranger}
        keys = [named[name] for name in signers.split()]
        return Delivery(k.make_command(k.trust_update(trust(k), keys), rollout_id=None))

    return build


TRUST_REJECTED: list[object] = [
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=1), "root"),
        VersionRollbackError,
        "version_rollback",
        id="same-version",
    ),
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=2), "stranger"),
        UnknownKeyError,
        "unknown_key",
        id="signed-by-unknown-root",
    ),
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=2, root=k.stranger), "stranger"),
        UnknownKeyError,
        "unknown_key",
        id="self-signed-by-its-own-unknown-root",
    ),
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=2, root=NEW_ROOT), "root"),
        UnknownKeyError,
        "unknown_key",
        id="new-root-did-not-sign",
    ),
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=2, root=NEW_ROOT), "new"),
        UnknownKeyError,
        "unknown_key",
        id="current-root-did-not-sign",
    ),
    pytest.param(
        trust_update_command(lambda k: k.trust_list(version=2, expires_at=NOW), "root"),
        ExpiredError,
        "expired",
        id="new-list-already-expired",
    ),
]


@pytest.mark.parametrize(("scenario", "error", "code"), TRUST_REJECTED)
def test_trust_update_rejected(
    kit: Kit, store: TrustStore, scenario: Scenario, error: type[TrustError], code: str
) -> None:
    delivery = scenario(kit)

    outcome = delivery.verify(store)

    assert_rejected(outcome, error, code, command_of(delivery.data))


def test_trust_update_with_wrong_payload_type_is_rejected(kit: Kit, store: TrustStore) -> None:
    """A trust list wrapped under the manifest payload type is not a root document."""
    trust = sign_envelope(kit.trust_list(version=2).to_bytes(), PAYLOAD_MANIFEST, [kit.root])
    data = kit.make_command(TrustUpdateAction(trust=trust), rollout_id=None)

    outcome = Delivery(data).verify(store)

    assert_rejected(outcome, WrongRoleError, "wrong_role", command_of(data))


# ----- an expired trust list refuses everything ----------------------------------

TRUST_EXPIRES_SOON = NOW + 100


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda k: k.make_command(), id="deploy"),
        pytest.param(lambda k: k.make_command(k.rollback("1.5.0")), id="rollback"),
        pytest.param(lambda k: k.make_command(CancelAction()), id="cancel"),
        pytest.param(lambda k: k.wave(), id="wave-deploy"),
    ],
)
@pytest.mark.parametrize("now", [TRUST_EXPIRES_SOON, TRUST_EXPIRES_SOON + 1], ids=["at", "after"])
def test_expired_trust_list_rejects_every_command(
    kit: Kit, build: Callable[[Kit], bytes], now: float
) -> None:
    expiring = kit.store(expires_at=TRUST_EXPIRES_SOON)
    data = build(kit)
    assert command_of(data).expires_at > now  # the command itself is still valid

    outcome = Delivery(data, now=now).verify(expiring)

    assert_rejected(outcome, ExpiredError, "expired", command_of(data))


def test_expired_trust_list_still_takes_a_root_signed_rotation(kit: Kit) -> None:
    """A node offline past its list's expiry can recover over the air, via root."""
    expiring = kit.store(expires_at=TRUST_EXPIRES_SOON)

    outcome = Delivery(rotate_same_root(kit), now=TRUST_EXPIRES_SOON + 1).verify(expiring)

    assert isinstance(outcome, Accepted), outcome
    assert outcome.new_trust is not None
    assert outcome.new_trust.version == 2


def test_expired_trust_list_refuses_a_rotation_not_signed_by_root(kit: Kit) -> None:
    expiring = kit.store(expires_at=TRUST_EXPIRES_SOON)
    update = kit.trust_update(kit.trust_list(version=2), [kit.rollout])
    data = kit.make_command(update, rollout_id=None)

    outcome = Delivery(data, now=TRUST_EXPIRES_SOON + 1).verify(expiring)

    assert isinstance(outcome, Rejected), outcome


# ----- record() -----------------------------------------------------------------


def accepted(seq: int, *keys: str) -> Accepted:
    """An Accepted built by hand: record() trusts it and never re-verifies."""
    command = Command(
        command_id="cmd-r",
        seq=seq,
        fleet=FLEET,
        issued_at=NOW,
        expires_at=NOW + 600,
        target=NodeTarget(node=NODE),
        body=CancelAction(),
    )
    return Accepted(command=command, manifest=None, keys=keys)


@pytest.mark.parametrize(
    ("last_seq", "seq", "expected"),
    [
        pytest.param(0, 7, 7, id="first-command"),
        pytest.param(10, 11, 11, id="higher-seq-raises-it"),
        pytest.param(20, 15, 20, id="lower-seq-never-lowers-it"),
        pytest.param(20, 20, 20, id="equal-seq-keeps-it"),
    ],
)
def test_record_keeps_the_highest_seq(last_seq: int, seq: int, expected: int) -> None:
    state = replace(RUNNING_2_0, last_seq=last_seq)

    new = record(state, accepted(seq, "c:x"))

    assert new.last_seq == expected
    assert new.active == state.active


def test_record_appends_keys_and_leaves_active_unchanged() -> None:
    state = replace(RUNNING_2_0, attempted=("c:a",))

    new = record(state, accepted(9, "c:b", "r:ro:deploy:" + SHA_NEW))

    assert new.attempted == ("c:a", "c:b", "r:ro:deploy:" + SHA_NEW)
    assert new.active == RUNNING_2_0.active
    assert state.attempted == ("c:a",)  # the old state is untouched (frozen)


@pytest.mark.parametrize("already", [MAX_REMEMBERED_KEYS - 1, MAX_REMEMBERED_KEYS])
def test_record_bounds_remembered_keys_dropping_the_oldest(already: int) -> None:
    old = tuple(f"c:old-{i}" for i in range(already))
    state = VerifierState(last_seq=1, attempted=old)

    new = record(state, accepted(2, "c:new", "r:ro:cancel:-"))

    assert len(new.attempted) == MAX_REMEMBERED_KEYS
    assert new.attempted[-2:] == ("c:new", "r:ro:cancel:-")
    assert new.attempted[:-2] == old[already + 2 - MAX_REMEMBERED_KEYS :]


def test_recorded_state_round_trips_through_the_verifier(kit: Kit, store: TrustStore) -> None:
    """Accept, record, and the recorded seq now blocks an older per-node command."""
    state = accept(Delivery(kit.make_command(command_id="cmd-5", seq=5)), store)
    older = kit.make_command(command_id="cmd-4", seq=4, rollout_id=None)

    outcome = Delivery(older, state=state).verify(store)

    assert state.last_seq == 5
    assert_rejected(outcome, ReplayError, "replayed", command_of(older))


# ----- properties -----------------------------------------------------------------

# What unsigned junk can be refused with: never a code from after the signature check.
ENVELOPE_CODES = {"malformed"} | {
    e.code for e in (BadSignatureError, UnknownKeyError, WrongRoleError, ThresholdError)
}


def loose_json(value: object) -> bytes:
    """Python's permissive JSON: may hold NaN, Infinity and escaped lone surrogates."""
    return json.dumps(value).encode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
ENVELOPE_LIKE = st.fixed_dictionaries(
    {
        "payloadType": st.sampled_from([PAYLOAD_COMMAND, PAYLOAD_MANIFEST, PAYLOAD_TRUST, "x"]),
        "payload": st.binary(max_size=200).map(b64encode) | st.text(max_size=40),
        "signatures": st.lists(
            st.fixed_dictionaries(
                {
                    "keyid": st.sampled_from(["0" * 64, "f" * 64]) | st.text(max_size=64),
                    "sig": st.binary(max_size=64).map(b64encode),
                }
            ),
            max_size=3,
        ),
    }
)


@PROPERTY
@given(data=st.binary(max_size=2048) | JSON.map(loose_json) | ENVELOPE_LIKE.map(loose_json))
def test_arbitrary_bytes_never_raise(store: TrustStore, data: bytes) -> None:
    outcome = verify_command(data, trust=store, me=ME, state=FRESH, now=NOW)

    assert isinstance(outcome, Rejected)
    assert outcome.command is None
    assert outcome.code in ENVELOPE_CODES


@pytest.fixture(scope="module")
def signed_deploy(kit: Kit) -> bytes:
    return kit.make_command(kit.deploy(), seq=10)


@PROPERTY
@given(choice=st.data(), mask=st.integers(1, 255))
def test_one_flipped_byte_never_yields_a_different_accepted_command(
    store: TrustStore, signed_deploy: bytes, choice: st.DataObject, mask: int
) -> None:
    index = choice.draw(st.integers(0, len(signed_deploy) - 1), label="index")
    flipped = bytearray(signed_deploy)
    flipped[index] ^= mask

    outcome = verify_command(bytes(flipped), trust=store, me=ME, state=FRESH, now=NOW)

    if isinstance(outcome, Accepted):  # only a harmless flip, and compact JSON has none
        assert outcome.command == command_of(signed_deploy)
    else:
        assert isinstance(outcome, Rejected), outcome


def test_the_unflipped_command_is_accepted(store: TrustStore, signed_deploy: bytes) -> None:
    """The baseline the flip property depends on."""
    outcome = verify_command(signed_deploy, trust=store, me=ME, state=FRESH, now=NOW)

    assert isinstance(outcome, Accepted)
