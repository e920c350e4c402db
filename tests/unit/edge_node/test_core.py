"""The node's command verifier (edge_node.core): accepted and rejected commands, one
table row per rule.

Every scenario is built from real keys, a real trust store and really signed
envelopes; the verifier gets the exact bytes a node would receive and an
explicit clock (``NOW``), so nothing here sleeps or touches the network.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_node.core import (
    Accepted,
)
from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    Envelope,
    SigningKey,
    sign_envelope,
)
from shared.errors import (
    BadSignatureError,
    DecodeError,
    DowngradeError,
    ExpiredError,
    NotAddressedError,
    ReplayError,
    UnknownKeyError,
    WrongRoleError,
)
from shared.messages import (
    CancelAction,
    DeployAction,
    NodeTarget,
    RollbackAction,
    encode,
)
from shared.trust import TrustStore
from shared.waves import BUCKETS
from tests.unit.edge_node.verifier_kit import (
    APPLIED_10,
    NOW,
    ROLLOUT,
    RUNNING_2_0,
    SHA_ACTIVE,
    SHA_NEW,
    SHA_OTHER,
    Delivery,
    Kit,
    Scenario,
    as_node,
    assert_rejected,
    command_of,
    make_manifest,
    node_in_wave,
    replace_envelope,
    send,
    tamper_payload,
)

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
        send(lambda k: k.wave(selector="site=berlin")),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="wave-selector-subset-of-labels",
    ),
    pytest.param(
        send(lambda k: k.wave(selector="site in (paris,berlin),hw!=pi,!canary,hw")),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="wave-selector-with-every-operator",
    ),
    pytest.param(
        send(lambda k: k.wave(selector="site=berlin", exclude=("other-1", "other-2"))),
        ("c:cmd-1", f"r:{ROLLOUT}:deploy:{SHA_NEW}"),
        id="wave-excluding-other-nodes",
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
