"""Root-signed trust lists and role checks (shared.trust): opening, thresholds, expiry."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import errors
from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    PAYLOAD_REQUEST,
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
    WrongRoleError,
)
from shared.messages import encode
from shared.trust import (
    KeyEntry,
    OperatorRole,
    Principal,
    Role,
    TrustList,
    TrustStore,
    sign_trust_list,
)
from tests.support.shared_kit import (
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


# ----- operators ----------------------------------------------------------------


def _with_operators(k: Keys, operators: dict[str, tuple[OperatorRole, list[SigningKey]]]) -> Any:
    return TrustList.build(
        version=1,
        expires_at=NOW + YEAR_S,
        roles=k.roles(),
        operators={
            name: (role, [KeyEntry(public=key.public_b64()) for key in keys])
            for name, (role, keys) in operators.items()
        },
    )


def test_an_operator_request_opens_as_its_signer_with_their_role() -> None:
    k = Keys()
    alice, vera = SigningKey.generate(), SigningKey.generate()
    trust = _with_operators(
        k, {"alice": (OperatorRole.ADMIN, [alice]), "vera": (OperatorRole.VIEWER, [vera])}
    )
    store = TrustStore.bootstrap(trust_bytes(trust, [k.root]), now=NOW)
    principal, payload = store.open_request(
        sign_envelope(b"{}", PAYLOAD_REQUEST, [SigningKey.generate(), vera]), now=NOW
    )
    assert (principal, payload) == (Principal("vera", OperatorRole.VIEWER), b"{}")
    forged = sign_envelope(b"{}", PAYLOAD_REQUEST, [alice])
    forged = forged.model_copy(update={"payload": b64encode(b"[]")})
    with pytest.raises(BadSignatureError):
        store.open_request(forged, now=NOW)
    with pytest.raises(UnknownKeyError):
        store.open_request(sign_envelope(b"{}", PAYLOAD_REQUEST, [k.rollout]), now=NOW)
    # An operator's key never counts for a role.
    with pytest.raises(WrongRoleError):
        store.open(sign_envelope(b"{}", PAYLOAD_COMMAND, [alice]), Role.ROLLOUT, now=NOW)


def test_operator_keys_are_their_own() -> None:
    k = Keys()
    shared = SigningKey.generate()
    with pytest.raises(ValueError, match="also holds a role"):
        _with_operators(k, {"alice": (OperatorRole.ADMIN, [k.rollout])})
    with pytest.raises(ValueError, match="belongs to two operators"):
        _with_operators(
            k, {"a": (OperatorRole.ADMIN, [shared]), "b": (OperatorRole.VIEWER, [shared])}
        )
    with pytest.raises(ValueError, match="operators"):
        _with_operators(k, {"a/b": (OperatorRole.ADMIN, [shared])})
