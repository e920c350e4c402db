"""Root-signed trust lists and role checks (shared.trust)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared import errors
from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    PAYLOAD_TRUST,
    Envelope,
    Signature,
    SigningKey,
    b64decode,
    b64encode,
    sign_envelope,
)
from shared.errors import (
    BadSignatureError,
    DecodeError,
    ExpiredError,
    ThresholdError,
    TrustError,
    TrustFileError,
    UnknownKeyError,
    VersionRollbackError,
    WrongRoleError,
)
from shared.messages import Command, ModelManifest, TrustUpdateAction, decode, encode
from shared.trust import (
    ROLE_PAYLOAD_TYPES,
    Role,
    RoleEntry,
    TrustList,
    TrustStore,
    sign_trust_list,
)
from tests.unit._shared_kit import (
    NOW,
    PROPERTY,
    YEAR_S,
    Keys,
    command,
    manifest,
    sign_command,
    sign_manifest,
    store_for,
    trust_bytes,
    trust_list,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def store(keys: Keys) -> TrustStore:
    return store_for(keys)


# ----- the error family ---------------------------------------------------------

TRUST_ERRORS = [
    errors.BadSignatureError,
    errors.UnknownKeyError,
    errors.WrongRoleError,
    errors.ThresholdError,
    errors.ExpiredError,
    errors.ReplayError,
    errors.VersionRollbackError,
    errors.TrustFileError,
    errors.NotAddressedError,
    errors.DowngradeError,
    errors.DigestMismatchError,
]


@pytest.mark.parametrize("error", TRUST_ERRORS, ids=lambda e: e.__name__)
def test_trust_errors_are_trust_errors_not_decode_errors(error: type[TrustError]) -> None:
    assert issubclass(error, TrustError)
    assert not issubclass(error, DecodeError)
    assert not issubclass(error, errors.TransportError)
    assert error.code != TrustError.code


def test_trust_error_codes_are_distinct() -> None:
    codes = [e.code for e in TRUST_ERRORS]
    assert len(set(codes)) == len(codes)


# ----- open(): one row per reason a document is refused -------------------------

# Each row builds (envelope, role) from the store's keys; the store trusts ``keys``.
OpenCase = Callable[[Keys], tuple[Envelope, Role]]


def _wrong_signature(k: Keys) -> tuple[Envelope, Role]:
    good = sign_manifest([k.release])
    other = sign_manifest([k.release], manifest(version="9.9.9"))
    # The release key's signature, but over another manifest.
    return good.model_copy(update={"signatures": other.signatures}), Role.RELEASE


def _corrupt_signature(k: Keys) -> tuple[Envelope, Role]:
    good = sign_manifest([k.release])
    raw = bytearray(b64decode(good.signatures[0].sig))
    raw[0] ^= 1
    sig = Signature(keyid=k.release.keyid, sig=b64encode(bytes(raw)))
    return good.model_copy(update={"signatures": (sig,)}), Role.RELEASE


def _forged_keyid(k: Keys) -> tuple[Envelope, Role]:
    # An outsider signs but claims to be the release key.
    forged = sign_manifest([SigningKey.generate()])
    sig = forged.signatures[0].model_copy(update={"keyid": k.release.keyid})
    return forged.model_copy(update={"signatures": (sig,)}), Role.RELEASE


OPEN_REJECTIONS: list[Any] = [
    pytest.param(_wrong_signature, BadSignatureError, id="signature-over-other-payload"),
    pytest.param(_corrupt_signature, BadSignatureError, id="corrupt-signature"),
    pytest.param(_forged_keyid, BadSignatureError, id="outsider-claims-release-keyid"),
    pytest.param(
        lambda k: (sign_manifest([SigningKey.generate()]), Role.RELEASE),
        UnknownKeyError,
        id="unknown-key",
    ),
    pytest.param(
        lambda k: (sign_manifest([k.rollout]), Role.RELEASE),
        WrongRoleError,
        id="manifest-signed-by-rollout-key",
    ),
    pytest.param(
        lambda k: (sign_manifest([k.root]), Role.RELEASE),
        WrongRoleError,
        id="manifest-signed-by-root-key",
    ),
    pytest.param(
        lambda k: (sign_command([k.release]), Role.ROLLOUT),
        WrongRoleError,
        id="command-signed-by-release-key",
    ),
    pytest.param(
        lambda k: (sign_manifest([k.release]), Role.ROLLOUT),
        WrongRoleError,
        id="manifest-opened-as-command",
    ),
    pytest.param(
        lambda k: (sign_command([k.rollout]), Role.RELEASE),
        WrongRoleError,
        id="command-opened-as-manifest",
    ),
    pytest.param(
        lambda k: (sign_envelope(encode(command()), PAYLOAD_MANIFEST, [k.rollout]), Role.ROLLOUT),
        WrongRoleError,
        id="rollout-key-with-manifest-payload-type",
    ),
    pytest.param(
        lambda k: (sign_envelope(encode(manifest()), PAYLOAD_COMMAND, [k.release]), Role.RELEASE),
        WrongRoleError,
        id="release-key-with-command-payload-type",
    ),
    pytest.param(
        lambda k: (sign_envelope(b"{}", "application/json", [k.release]), Role.RELEASE),
        WrongRoleError,
        id="foreign-payload-type",
    ),
    pytest.param(
        lambda k: (sign_envelope(b"{}", PAYLOAD_TRUST, [k.root]), Role.RELEASE),
        WrongRoleError,
        id="trust-payload-type-as-manifest",
    ),
    pytest.param(lambda k: (sign_manifest([]), Role.RELEASE), ThresholdError, id="no-signature"),
]


@pytest.mark.parametrize(("case", "error"), OPEN_REJECTIONS)
def test_open_rejects(
    store: TrustStore, keys: Keys, case: OpenCase, error: type[TrustError]
) -> None:
    envelope, role = case(keys)
    with pytest.raises(error) as caught:
        store.open(envelope, role, now=NOW)
    assert type(caught.value) is error  # exactly this reason, not a relative


def test_open_accepts_each_role(store: TrustStore, keys: Keys) -> None:
    assert store.open(sign_manifest([keys.release]), Role.RELEASE, now=NOW) == encode(manifest())
    assert store.open(sign_command([keys.rollout]), Role.ROLLOUT, now=NOW) == encode(command())


def test_open_payload_not_base64_is_decode_error(store: TrustStore, keys: Keys) -> None:
    envelope = sign_manifest([keys.release]).model_copy(update={"payload": "%%%"})
    with pytest.raises(DecodeError):
        store.open(envelope, Role.RELEASE, now=NOW)


def test_bad_signature_wins_over_a_valid_one_below_threshold() -> None:
    k = Keys()
    second = SigningKey.generate()
    trust = TrustList.build(
        version=1,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [k.root], Role.RELEASE: [k.release, second], Role.ROLLOUT: [k.rollout]},
        thresholds={Role.RELEASE: 2},
    )
    store = TrustStore.bootstrap(trust_bytes(trust, [k.root]), now=NOW)
    good = sign_manifest([k.release, second])
    forged = good.signatures[1].model_copy(update={"sig": good.signatures[0].sig})
    with pytest.raises(BadSignatureError):
        store.open(
            good.model_copy(update={"signatures": (good.signatures[0], forged)}),
            Role.RELEASE,
            now=NOW,
        )


# ----- thresholds ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_of_two() -> tuple[TrustStore, Keys, SigningKey]:
    """A store whose release role needs two of two keys."""
    k = Keys()
    second = SigningKey.generate()
    trust = TrustList.build(
        version=1,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [k.root], Role.RELEASE: [k.release, second], Role.ROLLOUT: [k.rollout]},
        thresholds={Role.RELEASE: 2},
    )
    return TrustStore.bootstrap(trust_bytes(trust, [k.root]), now=NOW), k, second


THRESHOLD_CASES: list[Any] = [
    pytest.param(lambda k, s: [k.release], ThresholdError, id="one-of-two"),
    pytest.param(lambda k, s: [s], ThresholdError, id="the-other-one-of-two"),
    pytest.param(lambda k, s: [], ThresholdError, id="zero-signatures"),
    pytest.param(
        lambda k, s: [k.release, k.release], ThresholdError, id="same-key-twice-counts-once"
    ),
    pytest.param(
        lambda k, s: [k.release, k.rollout], ThresholdError, id="one-valid-plus-wrong-role"
    ),
    pytest.param(
        lambda k, s: [k.release, SigningKey.generate()], ThresholdError, id="one-valid-plus-unknown"
    ),
    pytest.param(lambda k, s: [k.rollout, k.root], WrongRoleError, id="only-wrong-roles"),
]


@pytest.mark.parametrize(("signers", "error"), THRESHOLD_CASES)
def test_threshold_rejects(
    two_of_two: tuple[TrustStore, Keys, SigningKey],
    signers: Callable[[Keys, SigningKey], list[SigningKey]],
    error: type[TrustError],
) -> None:
    store, k, second = two_of_two
    with pytest.raises(error) as caught:
        store.open(sign_manifest(signers(k, second)), Role.RELEASE, now=NOW)
    assert type(caught.value) is error


@pytest.mark.parametrize(
    "signers",
    [
        pytest.param(lambda k, s: [k.release, s], id="both"),
        pytest.param(lambda k, s: [s, k.release, s, k.release], id="both-repeated"),
        pytest.param(
            lambda k, s: [k.rollout, SigningKey.generate(), s, k.release], id="both-among-others"
        ),
    ],
)
def test_threshold_met(
    two_of_two: tuple[TrustStore, Keys, SigningKey],
    signers: Callable[[Keys, SigningKey], list[SigningKey]],
) -> None:
    store, k, second = two_of_two
    assert store.open(sign_manifest(signers(k, second)), Role.RELEASE, now=NOW) == encode(
        manifest()
    )


def test_duplicate_signature_by_one_key_counts_once(
    two_of_two: tuple[TrustStore, Keys, SigningKey],
) -> None:
    store, k, _ = two_of_two
    envelope = sign_manifest([k.release])
    doubled = envelope.model_copy(update={"signatures": envelope.signatures * 2})
    with pytest.raises(ThresholdError, match="1 of 2"):
        store.open(doubled, Role.RELEASE, now=NOW)


# ----- expiry -------------------------------------------------------------------


def test_expired_trust_list_refuses_everything() -> None:
    k = Keys()
    store = TrustStore.bootstrap(trust_bytes(trust_list(k, expires_at=NOW + 10), [k.root]), now=NOW)
    assert store.open(sign_manifest([k.release]), Role.RELEASE, now=NOW + 9.999)
    for envelope, role in [
        (sign_manifest([k.release]), Role.RELEASE),
        (sign_command([k.rollout]), Role.ROLLOUT),
    ]:
        with pytest.raises(ExpiredError):
            store.open(envelope, role, now=NOW + 10)  # expiry is exclusive


def test_allow_expired_skips_only_the_expiry() -> None:
    k = Keys()
    store = TrustStore.bootstrap(trust_bytes(trust_list(k, expires_at=NOW + 10), [k.root]), now=NOW)
    assert not store.expired(NOW + 9.999)
    assert store.expired(NOW + 10)
    later = NOW + 100
    assert store.open(sign_command([k.rollout]), Role.ROLLOUT, now=later, allow_expired=True)
    with pytest.raises(UnknownKeyError):
        store.open(
            sign_command([SigningKey.generate()]), Role.ROLLOUT, now=later, allow_expired=True
        )
    with pytest.raises(WrongRoleError):
        store.open(sign_command([k.release]), Role.ROLLOUT, now=later, allow_expired=True)


def test_expired_trust_list_can_still_be_rotated() -> None:
    k = Keys()
    store = TrustStore.bootstrap(trust_bytes(trust_list(k, expires_at=NOW + 10), [k.root]), now=NOW)
    rotated = store.rotate(sign_trust_list(trust_list(k, version=2), [k.root]), now=NOW + 100)
    assert rotated.version == 2
    assert rotated.open(sign_manifest([k.release]), Role.RELEASE, now=NOW + 100)


# ----- bootstrap ----------------------------------------------------------------

BootstrapCase = Callable[[Keys], bytes | None]


def _bootstrap_signed_by_release(k: Keys) -> bytes:
    return trust_bytes(trust_list(k), [k.release])


BOOTSTRAP_REJECTIONS: list[Any] = [
    pytest.param(lambda k: None, TrustFileError, id="missing"),
    pytest.param(lambda k: b"", TrustFileError, id="empty"),
    pytest.param(lambda k: b"\x00\xff garbage", TrustFileError, id="garbage-bytes"),
    pytest.param(lambda k: b'{"not": "an envelope"}', TrustFileError, id="json-not-envelope"),
    pytest.param(
        lambda k: sign_manifest([k.release]).to_bytes(), TrustFileError, id="manifest-envelope"
    ),
    pytest.param(
        lambda k: sign_command([k.rollout]).to_bytes(), TrustFileError, id="command-envelope"
    ),
    pytest.param(
        lambda k: sign_envelope(encode(manifest()), PAYLOAD_TRUST, [k.root]).to_bytes(),
        TrustFileError,
        id="trust-type-but-manifest-payload",
    ),
    pytest.param(
        lambda k: sign_envelope(b"not json", PAYLOAD_TRUST, [k.root]).to_bytes(),
        TrustFileError,
        id="trust-type-but-not-json",
    ),
    pytest.param(
        lambda k: Envelope(payloadType=PAYLOAD_TRUST, payload="QR==", signatures=()).to_bytes(),
        TrustFileError,
        id="payload-not-canonical-base64",
    ),
    pytest.param(_bootstrap_signed_by_release, WrongRoleError, id="signed-by-release-key"),
    pytest.param(
        lambda k: trust_bytes(trust_list(k), [SigningKey.generate()]),
        UnknownKeyError,
        id="signed-by-unknown-key",
    ),
    pytest.param(lambda k: trust_bytes(trust_list(k), []), ThresholdError, id="unsigned"),
    pytest.param(
        lambda k: trust_bytes(trust_list(k, expires_at=NOW), [k.root]), ExpiredError, id="expired"
    ),
    pytest.param(
        lambda k: (
            sign_trust_list(trust_list(k), [k.root])
            .model_copy(update={"payload": b64encode(trust_list(k, version=5).to_bytes())})
            .to_bytes()
        ),
        BadSignatureError,
        id="payload-swapped-after-signing",
    ),
]


@pytest.mark.parametrize(("case", "error"), BOOTSTRAP_REJECTIONS)
def test_bootstrap_rejects(keys: Keys, case: BootstrapCase, error: type[TrustError]) -> None:
    data = case(keys)
    with pytest.raises(error) as caught:
        TrustStore.bootstrap(data, now=NOW)
    assert type(caught.value) is error


def test_bootstrap_and_persist(keys: Keys) -> None:
    data = trust_bytes(trust_list(keys, version=3), [keys.root])
    store = TrustStore.bootstrap(data, now=NOW)
    assert store.version == 3
    assert store.trust == trust_list(keys, version=3)
    assert store.envelope_bytes() == data
    assert TrustStore.bootstrap(store.envelope_bytes(), now=NOW).trust == store.trust


# ----- rotate -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "offered"),
    [pytest.param(1, 1, id="same-version-replayed"), pytest.param(3, 2, id="older-version")],
)
def test_rotate_refuses_rollback(current: int, offered: int) -> None:
    k = Keys()
    store = store_for(k, version=current)
    with pytest.raises(VersionRollbackError):
        store.rotate(sign_trust_list(trust_list(k, version=offered), [k.root]), now=NOW)


def test_rotate_replaying_the_current_envelope_is_a_rollback(keys: Keys) -> None:
    store = store_for(keys)
    with pytest.raises(VersionRollbackError):
        store.rotate(Envelope.from_bytes(store.envelope_bytes()), now=NOW)


ROTATE_REJECTIONS: list[Any] = [
    pytest.param(
        lambda k: sign_trust_list(trust_list(k, version=2, expires_at=NOW), [k.root]),
        ExpiredError,
        id="new-list-already-expired",
    ),
    pytest.param(
        lambda k: sign_trust_list(trust_list(k, version=2), [SigningKey.generate()]),
        UnknownKeyError,
        id="signed-by-unknown-key",
    ),
    pytest.param(
        lambda k: sign_trust_list(trust_list(k, version=2), [k.rollout]),
        WrongRoleError,
        id="signed-by-rollout-key",
    ),
    pytest.param(
        lambda k: sign_trust_list(trust_list(k, version=2), []), ThresholdError, id="unsigned"
    ),
    pytest.param(
        lambda k: sign_envelope(trust_list(k, version=2).to_bytes(), PAYLOAD_COMMAND, [k.root]),
        WrongRoleError,
        id="command-payload-type",
    ),
    pytest.param(lambda k: sign_command([k.rollout]), WrongRoleError, id="a-command"),
]


@pytest.mark.parametrize(("case", "error"), ROTATE_REJECTIONS)
def test_rotate_rejects(
    keys: Keys, case: Callable[[Keys], Envelope], error: type[TrustError]
) -> None:
    store = store_for(keys)
    with pytest.raises(error) as caught:
        store.rotate(case(keys), now=NOW)
    assert type(caught.value) is error
    assert store.version == 1  # the store is immutable: rotate returns a new one


def test_rotate_root_signed_non_trust_payload_is_decode_error(keys: Keys) -> None:
    store = store_for(keys)
    with pytest.raises(DecodeError):
        store.rotate(sign_envelope(encode(manifest()), PAYLOAD_TRUST, [keys.root]), now=NOW)


def test_rotate_needs_the_current_root_threshold() -> None:
    k = Keys()
    second_root = SigningKey.generate()
    roots = {Role.ROOT: [k.root, second_root], Role.RELEASE: [k.release], Role.ROLLOUT: [k.rollout]}
    v1 = TrustList.build(version=1, expires_at=NOW + YEAR_S, roles=roots, thresholds={Role.ROOT: 2})
    store = TrustStore.bootstrap(trust_bytes(v1, [k.root, second_root]), now=NOW)
    v2 = TrustList.build(version=2, expires_at=NOW + YEAR_S, roles=roots, thresholds={Role.ROOT: 2})
    with pytest.raises(ThresholdError):
        store.rotate(sign_trust_list(v2, [k.root]), now=NOW)
    assert store.rotate(sign_trust_list(v2, [k.root, second_root]), now=NOW).version == 2


# ----- rotation scenarios -------------------------------------------------------


def test_rollout_key_rotation_scenario() -> None:
    k = Keys()
    node = store_for(k)
    old_rollout_command = sign_command([k.rollout])
    assert node.open(old_rollout_command, Role.ROLLOUT, now=NOW) == encode(command())

    new_rollout = SigningKey.generate()
    v2 = TrustList.build(
        version=2,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [k.root], Role.RELEASE: [k.release], Role.ROLLOUT: [new_rollout]},
    )
    # The trust update travels inside a command signed by the (old) rollout key.
    update = command(seq=2, body=TrustUpdateAction(trust=sign_trust_list(v2, [k.root])))
    opened = node.open(sign_command([k.rollout], update), Role.ROLLOUT, now=NOW)
    trust_envelope = decode(Command, opened).body
    assert isinstance(trust_envelope, TrustUpdateAction)
    node = node.rotate(Envelope.from_bytes(trust_envelope.trust.to_bytes()), now=NOW)
    assert node.version == 2

    with pytest.raises(UnknownKeyError):  # the rotated-out key is gone from v2 entirely
        node.open(old_rollout_command, Role.ROLLOUT, now=NOW)
    assert node.open(sign_command([new_rollout]), Role.ROLLOUT, now=NOW) == encode(command())
    # The release key was kept.
    assert node.open(sign_manifest([k.release]), Role.RELEASE, now=NOW) == encode(manifest())


@pytest.fixture(scope="module")
def root_rotation() -> tuple[TrustStore, Keys, SigningKey, TrustList]:
    k = Keys()
    new_root = SigningKey.generate()
    v2 = TrustList.build(
        version=2,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [new_root], Role.RELEASE: [k.release], Role.ROLLOUT: [k.rollout]},
    )
    return store_for(k), k, new_root, v2


@pytest.mark.parametrize(
    ("signers", "error", "message"),
    [
        # Passes the current root's check, then fails v2's own: v2 no longer lists the old root.
        pytest.param(
            lambda k, new: [k.root], UnknownKeyError, "unknown to trust v2", id="only-old-root"
        ),
        # Fails the current root's check: v1 has never heard of the new root.
        pytest.param(
            lambda k, new: [new], UnknownKeyError, "unknown to trust v1", id="only-new-root"
        ),
        pytest.param(lambda k, new: [], ThresholdError, "no signature", id="no-root"),
        pytest.param(
            lambda k, new: [SigningKey.generate()], UnknownKeyError, "trust v1", id="unknown-key"
        ),
        pytest.param(
            lambda k, new: [k.release, new], WrongRoleError, "root", id="release-and-new-root"
        ),
    ],
)
def test_root_rotation_rejects(
    root_rotation: tuple[TrustStore, Keys, SigningKey, TrustList],
    signers: Callable[[Keys, SigningKey], list[SigningKey]],
    error: type[TrustError],
    message: str,
) -> None:
    store, k, new_root, v2 = root_rotation
    with pytest.raises(error, match=message) as caught:
        store.rotate(sign_trust_list(v2, signers(k, new_root)), now=NOW)
    assert type(caught.value) is error


def test_root_rotation_signed_by_old_and_new_root(
    root_rotation: tuple[TrustStore, Keys, SigningKey, TrustList],
) -> None:
    store, k, new_root, v2 = root_rotation
    rotated = store.rotate(sign_trust_list(v2, [k.root, new_root]), now=NOW)
    assert rotated.version == 2
    assert rotated.trust == v2
    # The next rotation is judged by the new root alone; the old root no longer counts.
    v3 = v2.model_copy(update={"version": 3})
    assert rotated.rotate(sign_trust_list(v3, [new_root]), now=NOW).version == 3
    with pytest.raises(UnknownKeyError):
        rotated.rotate(sign_trust_list(v3, [k.root]), now=NOW)
    # A node that restarts from the persisted v2 needs only v2's own root to accept it.
    assert TrustStore.bootstrap(rotated.envelope_bytes(), now=NOW).version == 2


# ----- trust list validation ----------------------------------------------------


def test_role_entry_threshold_must_be_reachable(keys: Keys) -> None:
    with pytest.raises(ValidationError, match="threshold exceeds"):
        RoleEntry(keyids=(keys.root.keyid, keys.root.keyid), threshold=2)
    with pytest.raises(ValidationError):
        RoleEntry(keyids=(keys.root.keyid,), threshold=0)
    with pytest.raises(ValidationError):
        RoleEntry(keyids=(), threshold=1)


def _trust_dict(k: Keys) -> dict[str, Any]:
    return json.loads(trust_list(k).to_bytes())


TRUST_LIST_MUTATIONS: list[Any] = [
    pytest.param(lambda d, k: d["roles"].pop("rollout"), id="role-missing"),
    pytest.param(lambda d, k: d["roles"].update(admin=d["roles"]["root"]), id="unknown-role"),
    pytest.param(lambda d, k: d["keys"].pop(k.release.keyid), id="role-names-unknown-key"),
    pytest.param(
        lambda d, k: d["keys"].update({k.release.keyid: {"public": k.rollout.public_b64()}}),
        id="keyid-does-not-match-key",
    ),
    pytest.param(
        lambda d, k: d["keys"][k.root.keyid].update(keytype="rsa"), id="unsupported-keytype"
    ),
    pytest.param(lambda d, k: d.update(version=0), id="version-zero"),
    pytest.param(lambda d, k: d.update(type="manifest"), id="wrong-type"),
    pytest.param(lambda d, k: d.update(v=2), id="wrong-schema-version"),
    pytest.param(lambda d, k: d.update(extra=True), id="unknown-field"),
    pytest.param(lambda d, k: d["roles"]["root"].update(threshold=2), id="threshold-unreachable"),
]


@pytest.mark.parametrize("mutate", TRUST_LIST_MUTATIONS)
def test_malformed_trust_list_is_refused(
    keys: Keys, mutate: Callable[[dict[str, Any], Keys], object]
) -> None:
    document = _trust_dict(keys)
    mutate(document, keys)
    payload = json.dumps(document).encode()
    with pytest.raises(TrustFileError):
        TrustStore.bootstrap(sign_envelope(payload, PAYLOAD_TRUST, [keys.root]).to_bytes(), now=NOW)
    store = store_for(keys)
    with pytest.raises(DecodeError):
        store.rotate(sign_envelope(payload, PAYLOAD_TRUST, [keys.root]), now=NOW)


@pytest.mark.parametrize(
    "public",
    [
        pytest.param("AAAA", id="3-bytes"),
        pytest.param("A" * 42 + "E=", id="non-canonical-base64"),
        pytest.param("!" * 44, id="not-base64"),
        pytest.param("A" * 43 + "=", id="32-bytes-of-another-key"),
    ],
)
def test_bad_public_key_in_trust_list_is_refused(keys: Keys, public: str) -> None:
    document = _trust_dict(keys)
    document["keys"][keys.root.keyid] = {"keytype": "ed25519", "public": public}
    envelope = sign_envelope(json.dumps(document).encode(), PAYLOAD_TRUST, [keys.root])
    with pytest.raises(TrustFileError):
        TrustStore.bootstrap(envelope.to_bytes(), now=NOW)
    with pytest.raises(DecodeError):
        store_for(keys).rotate(envelope, now=NOW)


# ----- `fleetctl keys init`, done purely ----------------------------------------


def test_keys_init_flow() -> None:
    root, release, rollout = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    trust = TrustList.build(
        version=1,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [root], Role.RELEASE: [release], Role.ROLLOUT: [rollout]},
    )
    assert set(trust.keys) == {root.keyid, release.keyid, rollout.keyid}
    assert {role: entry.keyids for role, entry in trust.roles.items()} == {
        Role.ROOT: (root.keyid,),
        Role.RELEASE: (release.keyid,),
        Role.ROLLOUT: (rollout.keyid,),
    }
    trust_json = sign_trust_list(trust, [root]).to_bytes()
    store = TrustStore.bootstrap(trust_json, now=NOW)

    # Keys survive being written as PEM and read back (what `keys init` stores on disk).
    release = SigningKey.from_pem(release.to_pem(b"pass"), b"pass")
    model = manifest(name="detector", version="2.0.0-rc.1")
    envelope = Envelope.from_bytes(
        sign_envelope(encode(model), ROLE_PAYLOAD_TYPES[Role.RELEASE], [release]).to_bytes()
    )
    assert decode(ModelManifest, store.open(envelope, Role.RELEASE, now=NOW)) == model
    with pytest.raises(WrongRoleError):
        store.open(envelope, Role.ROLLOUT, now=NOW)


# ----- property: one flipped byte is never believed -----------------------------


@pytest.fixture(scope="module")
def flip_targets() -> list[tuple[TrustStore, bytes, Role]]:
    """Serialized envelopes that verify, each needing every signature it carries."""
    k = Keys()
    store = store_for(k)
    second = SigningKey.generate()
    strict = TrustList.build(
        version=1,
        expires_at=NOW + YEAR_S,
        roles={Role.ROOT: [k.root], Role.RELEASE: [k.release, second], Role.ROLLOUT: [k.rollout]},
        thresholds={Role.RELEASE: 2},
    )
    strict_store = TrustStore.bootstrap(trust_bytes(strict, [k.root]), now=NOW)
    targets = [
        (store, sign_manifest([k.release]).to_bytes(), Role.RELEASE),
        (store, sign_command([k.rollout]).to_bytes(), Role.ROLLOUT),
        (strict_store, sign_manifest([k.release, second]).to_bytes(), Role.RELEASE),
    ]
    for target_store, data, role in targets:  # the unflipped documents are accepted
        assert target_store.open(Envelope.from_bytes(data), role, now=NOW)
    return targets


@PROPERTY
@given(data=st.data())
def test_any_single_byte_flip_is_refused(
    flip_targets: list[tuple[TrustStore, bytes, Role]], data: st.DataObject
) -> None:
    store, original, role = data.draw(st.sampled_from(flip_targets), label="target")
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    flipped = bytearray(original)
    flipped[position] ^= mask
    with pytest.raises((DecodeError, TrustError)):
        store.open(Envelope.from_bytes(bytes(flipped)), role, now=NOW)


def test_every_byte_flip_of_signature_and_payload_tail_is_refused(
    flip_targets: list[tuple[TrustStore, bytes, Role]],
) -> None:
    # Exhaustive where non-canonical base64 used to slip through: the last characters
    # of the signature and of the payload carry unused bits.
    store, original, role = flip_targets[0]
    document = json.loads(original)
    positions: list[int] = []
    for text in (document["signatures"][0]["sig"], document["payload"]):
        end = original.index(text.encode()) + len(text)
        positions.extend(range(end - 4, end))
    for position in positions:
        for mask in range(1, 256):
            flipped = bytearray(original)
            flipped[position] ^= mask
            with pytest.raises((DecodeError, TrustError)):
                store.open(Envelope.from_bytes(bytes(flipped)), role, now=NOW)
