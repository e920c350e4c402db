"""The node's command verifier (edge_node.core): trust updates, expired trust lists,
record(), and properties over arbitrary bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_node.core import (
    MAX_REMEMBERED_KEYS,
    Accepted,
    Rejected,
    VerifierState,
    record,
    verify_command,
)
from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    PAYLOAD_TRUST,
    SigningKey,
    b64encode,
    sign_envelope,
)
from shared.errors import (
    BadSignatureError,
    ExpiredError,
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
    NodeTarget,
    TrustUpdateAction,
)
from shared.trust import TrustList, TrustStore
from tests.unit.edge_node.verifier_kit import (
    FLEET,
    FRESH,
    ME,
    NODE,
    NOW,
    PROPERTY,
    RUNNING_2_0,
    SHA_NEW,
    Delivery,
    Kit,
    Scenario,
    accept,
    assert_rejected,
    command_of,
)

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

    new = record(state, accepted(seq, "c:x"), now=NOW)

    assert new.last_seq == expected
    assert new.active == state.active


def test_record_appends_keys_and_leaves_active_unchanged() -> None:
    state = replace(RUNNING_2_0, attempted=("c:a",))

    new = record(state, accepted(9, "c:b", "r:ro:deploy:" + SHA_NEW), now=NOW)

    assert new.attempted == ("c:a", "c:b", "r:ro:deploy:" + SHA_NEW)
    assert new.active == RUNNING_2_0.active
    assert state.attempted == ("c:a",)  # the old state is untouched (frozen)


@pytest.mark.parametrize("already", [MAX_REMEMBERED_KEYS - 1, MAX_REMEMBERED_KEYS])
def test_record_bounds_remembered_keys_dropping_the_oldest(already: int) -> None:
    old = tuple(f"c:old-{i}" for i in range(already))
    state = VerifierState(last_seq=1, attempted=old)

    new = record(state, accepted(2, "c:new", "r:ro:cancel:-"), now=NOW)

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
