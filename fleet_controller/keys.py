"""Key material on disk: the root, release and rollout keys and ``trust.json``.

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
from shared.envelope import SigningKey
from shared.errors import EdgeFleetError, TrustError
from shared.trust import Role, TrustList, TrustStore, sign_trust_list

__all__ = [
    "DEFAULT_TRUST_DAYS",
    "KeySet",
    "KeysExistError",
    "init_keys",
    "key_path",
    "load_key",
    "load_trust",
    "rotate_key",
    "trust_path",
]

DEFAULT_TRUST_DAYS = 365
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
    """Create root, release and rollout keys and a root-signed ``trust.json`` v1.

    Raises:
        KeysExistError: a key or trust file exists and ``force`` is false.
    """
    targets = [key_path(directory, role) for role in Role] + [trust_path(directory)]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise KeysExistError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace them"
        )
    keys = {role: SigningKey.generate() for role in Role}
    trust = TrustList.build(
        version=1,
        expires_at=now + valid_days * _DAY_S,
        roles={role: [key] for role, key in keys.items()},
    )
    for role, key in keys.items():
        atomic_write(key_path(directory, role), key.to_pem(passphrase), mode=0o600)
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
    )
    signers = [old_root] if role is not Role.ROOT else [old_root, keys[Role.ROOT]]
    envelope = sign_trust_list(trust, signers)
    current.rotate(envelope, now=now)  # proves a node holding the old list accepts it
    old = key_path(directory, role)
    os.replace(old, old.with_name(f"{old.name}.v{current.version}"))
    atomic_write(old, keys[role].to_pem(passphrase), mode=0o600)
    atomic_write(trust_path(directory), envelope.to_bytes(), mode=0o644)
    return KeySet(directory, trust)
