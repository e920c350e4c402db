"""Trust list rotation and validation (shared.trust): rotate, root rotation, bad lists."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from shared.envelope import (
    PAYLOAD_COMMAND,
    PAYLOAD_TRUST,
    Envelope,
    SigningKey,
    sign_envelope,
)
from shared.errors import (
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
from tests.support.shared_kit import (
    NOW,
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
