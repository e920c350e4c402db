"""Key material on disk: the root, release and rollout keys, operators' keys
and ``trust.json``.

Operators' private keys live in ``operators/<name>.pem`` beside the role keys
when this machine made them; an operator may instead make their own and hand
over only the public half (``fleetctl operator add NAME --public-key FILE``).

Invariants:

* private keys are written with mode 0600, atomically (temp file + ``os.replace``),
  PKCS#8 PEM, encrypted when a passphrase is given;
* nothing existing is overwritten unless ``force`` is set;
* ``trust.json`` always holds a trust list that verifies against its own root
  keys, and a rotation writes a version exactly one higher, signed by the old
  and the new root keys, so a node holding the old list accepts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgefleet_io.files import atomic_write
from shared.envelope import SigningKey, b64decode, b64encode
from shared.errors import DecodeError, EdgeFleetError, TrustError, UsageError
from shared.topics import check_id
from shared.trust import (
    KeyEntry,
    OperatorRole,
    Role,
    TrustList,
    TrustStore,
    sign_trust_list,
)

__all__ = [
    "DEFAULT_TRUST_DAYS",
    "FIRST_OPERATOR",
    "KeySet",
    "KeysExistError",
    "add_operator",
    "init_keys",
    "key_path",
    "load_key",
    "load_operator_key",
    "load_trust",
    "operator_key_path",
    "public_key_entry",
    "remove_operator",
    "rotate_key",
    "trust_path",
]

DEFAULT_TRUST_DAYS = 365
FIRST_OPERATOR = "admin"  # the admin that ``keys init`` creates
_DAY_S = 86_400


class KeysExistError(EdgeFleetError):
    """Key files exist already and ``force`` was not given."""


@dataclass(frozen=True)
class KeySet:
    directory: Path
    trust: TrustList


def key_path(directory: Path, role: Role) -> Path:
    return directory / f"{role.value}.pem"


def trust_path(directory: Path) -> Path:
    return directory / "trust.json"


def operator_key_path(directory: Path, name: str) -> Path:
    return directory / "operators" / f"{name}.pem"


def load_operator_key(path: Path, passphrase: bytes | None) -> SigningKey:
    """Raises: TrustError when the key file is missing, unreadable or locked."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read operator key {path}: {exc.strerror}") from None
    return SigningKey.from_pem(data, passphrase)


def public_key_entry(text: str) -> KeyEntry:
    """An Ed25519 public key given as base64 of its 32 raw bytes.

    Raises: UsageError.
    """
    try:
        raw = b64decode(text.strip(), "public key")
    except DecodeError as exc:
        raise UsageError(str(exc)) from None
    if len(raw) != 32:
        raise UsageError("an Ed25519 public key is 32 bytes (base64 of the raw key)")
    return KeyEntry(public=b64encode(raw))


def load_key(directory: Path, role: Role, passphrase: bytes | None) -> SigningKey:
    """Raises: TrustError when the key file is missing, unreadable or locked."""
    path = key_path(directory, role)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read {role} key {path}: {exc.strerror}") from None
    return SigningKey.from_pem(data, passphrase)


def load_trust(directory: Path, *, now: float) -> TrustStore:
    """Raises: TrustError (TrustFileError when missing or unreadable)."""
    try:
        data: bytes | None = trust_path(directory).read_bytes()
    except OSError:
        data = None
    return TrustStore.bootstrap(data, now=now)


def init_keys(
    directory: Path,
    *,
    now: float,
    passphrase: bytes | None = None,
    force: bool = False,
    valid_days: int = DEFAULT_TRUST_DAYS,
) -> KeySet:
    """Create root, release and rollout keys, the first admin operator
    (:data:`FIRST_OPERATOR`) and a root-signed ``trust.json`` v1.

    Raises:
        KeysExistError: a key or trust file exists and ``force`` is false.
    """
    admin_path = operator_key_path(directory, FIRST_OPERATOR)
    targets = [key_path(directory, role) for role in Role] + [trust_path(directory), admin_path]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise KeysExistError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace them"
        )
    keys = {role: SigningKey.generate() for role in Role}
    admin = SigningKey.generate()
    trust = TrustList.build(
        version=1,
        expires_at=now + valid_days * _DAY_S,
        roles={role: [key] for role, key in keys.items()},
        operators={FIRST_OPERATOR: (OperatorRole.ADMIN, [KeyEntry(public=admin.public_b64())])},
    )
    for role, key in keys.items():
        atomic_write(key_path(directory, role), key.to_pem(passphrase), mode=0o600)
    admin_path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(admin_path, admin.to_pem(passphrase), mode=0o600)
    envelope = sign_trust_list(trust, [keys[Role.ROOT]])
    atomic_write(trust_path(directory), envelope.to_bytes(), mode=0o644)
    return KeySet(directory, trust)


def rotate_key(
    directory: Path,
    role: Role,
    *,
    now: float,
    passphrase: bytes | None = None,
    valid_days: int = DEFAULT_TRUST_DAYS,
) -> KeySet:
    """Replace ``role``'s key and write trust list version N+1.

    The old key file is kept as ``<role>.pem.v<N>`` so a rollback of this step
    remains possible; nodes stop accepting it as soon as they take trust v<N+1>.

    Raises:
        TrustError: the current keys or trust list cannot be loaded.
    """
    current = load_trust(directory, now=now)
    old_root = load_key(directory, Role.ROOT, passphrase)
    if old_root.keyid not in current.trust.roles[Role.ROOT].keyids:
        raise TrustError(f"{key_path(directory, Role.ROOT)} is not a root key of trust.json")
    keys = {r: load_key(directory, r, passphrase) for r in Role if r is not role}
    keys[role] = SigningKey.generate()
    trust = TrustList.build(
        version=current.version + 1,
        expires_at=now + valid_days * _DAY_S,
        roles={r: [k] for r, k in keys.items()},
        operators=_operators(current.trust),
    )
    signers = [old_root] if role is not Role.ROOT else [old_root, keys[Role.ROOT]]
    envelope = sign_trust_list(trust, signers)
    current.rotate(envelope, now=now)  # proves a node holding the old list accepts it
    old = key_path(directory, role)
    os.replace(old, old.with_name(f"{old.name}.v{current.version}"))
    atomic_write(old, keys[role].to_pem(passphrase), mode=0o600)
    atomic_write(trust_path(directory), envelope.to_bytes(), mode=0o644)
    return KeySet(directory, trust)


def _operators(trust: TrustList) -> dict[str, tuple[OperatorRole, list[KeyEntry]]]:
    return {
        name: (entry.role, [trust.keys[k] for k in entry.keyids])
        for name, entry in trust.operators.items()
    }


def _reissue(
    directory: Path,
    operators: dict[str, tuple[OperatorRole, list[KeyEntry]]],
    *,
    now: float,
    passphrase: bytes | None,
    valid_days: int,
) -> KeySet:
    """Write trust list N+1 with the same role keys and ``operators``, signed by root."""
    current = load_trust(directory, now=now)
    root = load_key(directory, Role.ROOT, passphrase)
    if root.keyid not in current.trust.roles[Role.ROOT].keyids:
        raise TrustError(f"{key_path(directory, Role.ROOT)} is not a root key of trust.json")
    old = current.trust
    role_keys = {k for entry in old.roles.values() for k in entry.keyids}
    keys = {k: v for k, v in old.keys.items() if k in role_keys}
    for _, entries in operators.values():
        keys.update((entry.keyid, entry) for entry in entries)
    trust = TrustList(
        version=old.version + 1,
        expires_at=now + valid_days * _DAY_S,
        keys=keys,
        roles=old.roles,
        operators={
            name: {"keyids": tuple(e.keyid for e in entries), "role": role}
            for name, (role, entries) in operators.items()
        },
    )
    envelope = sign_trust_list(trust, [root])
    current.rotate(envelope, now=now)  # proves a node holding the old list accepts it
    atomic_write(trust_path(directory), envelope.to_bytes(), mode=0o644)
    return KeySet(directory, trust)


def add_operator(
    directory: Path,
    name: str,
    role: OperatorRole,
    *,
    public: KeyEntry | None,
    now: float,
    passphrase: bytes | None = None,
    valid_days: int = DEFAULT_TRUST_DAYS,
) -> KeySet:
    """Name operator ``name`` with ``role`` in trust list N+1 (or change their role).

    Without ``public``, a key pair is made and its private half written to
    ``operators/<name>.pem``; an existing operator keeps their keys.

    Raises:
        UsageError: a bad name, or the public key is someone else's already.
        TrustError: the current keys or trust list cannot be loaded.
    """
    check_id(name, "operator")
    current = load_trust(directory, now=now).trust
    operators = _operators(current)
    entries = list(operators[name][1]) if name in operators else []
    private: SigningKey | None = None
    if public is not None:
        entries = [public]
    elif not entries:
        private = SigningKey.generate()
        entries = [KeyEntry(public=private.public_b64())]
    taken = {k for entry in current.roles.values() for k in entry.keyids} | {
        e.keyid for other, (_, keys) in operators.items() if other != name for e in keys
    }
    if any(e.keyid in taken for e in entries):
        raise UsageError("that public key is held by another operator or a role already")
    operators[name] = (role, entries)
    keyset = _reissue(directory, operators, now=now, passphrase=passphrase, valid_days=valid_days)
    if private is not None:
        path = operator_key_path(directory, name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, private.to_pem(passphrase), mode=0o600)
    return keyset


def remove_operator(
    directory: Path,
    name: str,
    *,
    now: float,
    passphrase: bytes | None = None,
    valid_days: int = DEFAULT_TRUST_DAYS,
) -> KeySet:
    """Trust list N+1 without operator ``name``; their key file, if here, is removed.

    Raises:
        UsageError: no such operator, or it is the last admin.
        TrustError: the current keys or trust list cannot be loaded.
    """
    current = load_trust(directory, now=now).trust
    operators = _operators(current)
    if name not in operators:
        raise UsageError(f"no operator {name!r} in trust v{current.version}")
    del operators[name]
    if not any(role is OperatorRole.ADMIN for role, _ in operators.values()):
        raise UsageError(f"{name} is the last admin: add another admin first")
    keyset = _reissue(directory, operators, now=now, passphrase=passphrase, valid_days=valid_days)
    operator_key_path(directory, name).unlink(missing_ok=True)
    return keyset
