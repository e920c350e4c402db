"""TUF-style trust: a root-signed trust list naming the keys of each role.

Roles:

* ``root`` — offline; signs trust lists (this document).
* ``release`` — signs model manifests; held by operators, never by the controller.
* ``rollout`` — online, held by the controller; signs commands and, under
  their own payload type (:data:`~shared.envelope.PAYLOAD_ACK`), acks.

Beside the roles, the list names the **operators**: each has one or more keys
and an operator role (:class:`OperatorRole`: viewer, deployer or admin). An
operator signs each request to the controller with one of its keys
(:meth:`TrustStore.open_request`); the signature, not anything the request
says, is who asked. Operators are added, removed and rotated like any other
key: a new trust list version signed by root.

Invariants:

* A :class:`TrustStore` only ever holds a trust list that verified: the first
  one against its own root keys (trust on first use, shipped with the node),
  every later one against a threshold of the current root keys *and* of its own
  root keys, with a strictly higher version and an expiry in the future.
* :meth:`TrustStore.open` returns payload bytes only if a threshold of distinct
  keys of the requested role signed exactly those bytes under the payload type
  that role signs. Keys of other roles, unknown keys and bad signatures never
  count.
* An expired trust list refuses every document (but can still be replaced by a
  rotation, as TUF allows for root).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.codec import decode_json, encode_json
from shared.envelope import (
    PAYLOAD_ACK,
    PAYLOAD_COMMAND,
    PAYLOAD_MANIFEST,
    PAYLOAD_REQUEST,
    PAYLOAD_TRUST,
    Envelope,
    SigningKey,
    key_id,
    public_key_from_b64,
    sign_envelope,
    verify_signature,
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

__all__ = [
    "MAX_OPERATORS",
    "ROLE_PAYLOAD_TYPES",
    "KeyEntry",
    "OperatorEntry",
    "OperatorRole",
    "Principal",
    "Role",
    "RoleEntry",
    "TrustList",
    "TrustStore",
    "sign_trust_list",
]

MAX_OPERATORS = 256
_MAX_KEYS = 64 + 4 * MAX_OPERATORS


class Role(StrEnum):
    ROOT = "root"
    RELEASE = "release"
    ROLLOUT = "rollout"


ROLE_PAYLOAD_TYPES: dict[Role, str] = {
    Role.ROOT: PAYLOAD_TRUST,
    Role.RELEASE: PAYLOAD_MANIFEST,
    Role.ROLLOUT: PAYLOAD_COMMAND,
}
"""What each role signs by default; :data:`_OTHER_PAYLOAD_TYPES` lists the rest."""
_OTHER_PAYLOAD_TYPES: dict[Role, frozenset[str]] = {Role.ROLLOUT: frozenset({PAYLOAD_ACK})}

_KEYID = r"^[0-9a-f]{64}$"
_OPERATOR_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class OperatorRole(StrEnum):
    """What an operator may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  # read only
    DEPLOYER = "deployer"  # models, rollouts, deployments, labels
    ADMIN = "admin"  # nodes, trust, operators

    def allows(self, required: OperatorRole) -> bool:
        order = list(OperatorRole)
        return order.index(self) >= order.index(required)


class KeyEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: Literal["ed25519"] = "ed25519"
    public: str = Field(max_length=64, description="raw 32-byte public key, base64")

    @property
    def keyid(self) -> str:
        return key_id(public_key_from_b64(self.public))


class RoleEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keyids: tuple[str, ...] = Field(min_length=1, max_length=16)
    threshold: int = Field(ge=1, le=16)

    @model_validator(mode="after")
    def _threshold_reachable(self) -> Self:
        if len(set(self.keyids)) < self.threshold:
            raise ValueError("threshold exceeds the number of distinct keys")
        return self


class OperatorEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keyids: tuple[str, ...] = Field(min_length=1, max_length=4)
    role: OperatorRole


@dataclass(frozen=True, slots=True)
class Principal:
    """An operator whose signature verified: who asked, and what they may do."""

    name: str
    role: OperatorRole


class TrustList(BaseModel):
    """The signed payload of ``trust.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    type: Literal["trust"] = "trust"
    version: int = Field(ge=1)
    expires_at: float = Field(description="UNIX seconds")
    keys: dict[str, KeyEntry] = Field(max_length=_MAX_KEYS)
    roles: dict[Role, RoleEntry]
    operators: dict[Annotated[str, Field(pattern=_OPERATOR_NAME)], OperatorEntry] = Field(
        default_factory=dict, max_length=MAX_OPERATORS
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        missing = set(Role) - set(self.roles)
        if missing:
            raise ValueError(f"roles missing: {', '.join(sorted(missing))}")
        for keyid, entry in self.keys.items():
            if key_id(public_key_from_b64(entry.public)) != keyid:
                raise ValueError(f"key id {keyid[:12]} does not match its public key")
        for role, role_entry in self.roles.items():
            unknown = [k for k in role_entry.keyids if k not in self.keys]
            if unknown:
                raise ValueError(f"role {role} names unknown key {unknown[0][:12]}")
        role_keys = {k for entry in self.roles.values() for k in entry.keyids}
        owners: dict[str, str] = {}
        for name, operator in self.operators.items():
            for keyid in operator.keyids:
                if keyid not in self.keys:
                    raise ValueError(f"operator {name} names unknown key {keyid[:12]}")
                if keyid in role_keys:
                    raise ValueError(f"operator {name}'s key {keyid[:12]} also holds a role")
                if owners.setdefault(keyid, name) != name:
                    raise ValueError(f"key {keyid[:12]} belongs to two operators")
        return self

    def operator_of(self, keyid: str) -> tuple[str, OperatorEntry] | None:
        """The operator holding ``keyid``, if any."""
        for name, operator in self.operators.items():
            if keyid in operator.keyids:
                return name, operator
        return None

    @classmethod
    def build(
        cls,
        *,
        version: int,
        expires_at: float,
        roles: dict[Role, list[SigningKey]],
        thresholds: dict[Role, int] | None = None,
        operators: Mapping[str, tuple[OperatorRole, list[KeyEntry]]] | None = None,
    ) -> TrustList:
        """A trust list naming the public halves of ``roles``' keys, and ``operators``
        (name: role and public keys)."""
        keys = {k.keyid: KeyEntry(public=k.public_b64()) for ks in roles.values() for k in ks}
        operator_entries: dict[str, OperatorEntry] = {}
        for name, (role, entries) in (operators or {}).items():
            ids = tuple(entry.keyid for entry in entries)
            keys.update(zip(ids, entries, strict=True))
            operator_entries[name] = OperatorEntry(keyids=ids, role=role)
        return cls(
            version=version,
            expires_at=expires_at,
            keys=keys,
            operators=operator_entries,
            roles={
                role: RoleEntry(
                    keyids=tuple(k.keyid for k in ks),
                    threshold=(thresholds or {}).get(role, 1),
                )
                for role, ks in roles.items()
            },
        )

    def to_bytes(self) -> bytes:
        return encode_json(self.model_dump(mode="json"))


def sign_trust_list(trust: TrustList, root_keys: list[SigningKey]) -> Envelope:
    return sign_envelope(trust.to_bytes(), PAYLOAD_TRUST, root_keys)


def _verify(
    trust: TrustList, envelope: Envelope, role: Role, payload_type: str | None = None
) -> bytes:
    expected_type = payload_type or ROLE_PAYLOAD_TYPES[role]
    if envelope.payloadType != expected_type:
        raise WrongRoleError(
            f"payload type {envelope.payloadType!r} is not signed by the {role} role"
        )
    payload = envelope.payload_bytes()
    role_entry = trust.roles[role]
    valid: set[str] = set()
    bad = wrong_role = unknown = 0
    for signature in envelope.signatures:
        if signature.keyid in valid:
            continue
        if signature.keyid not in trust.keys:
            unknown += 1
            continue
        if signature.keyid not in role_entry.keyids:
            wrong_role += 1
            continue
        public = public_key_from_b64(trust.keys[signature.keyid].public)
        try:
            verify_signature(public, envelope.payloadType, payload, signature)
        except BadSignatureError:
            bad += 1
            continue
        valid.add(signature.keyid)
    if len(valid) >= role_entry.threshold:
        return payload
    if bad:
        raise BadSignatureError(f"bad signature on {role} document")
    if valid:
        raise ThresholdError(
            f"{role} document has {len(valid)} of {role_entry.threshold} required signatures"
        )
    if wrong_role:
        raise WrongRoleError(f"document signed by a key that does not hold the {role} role")
    if unknown:
        raise UnknownKeyError(f"document signed by a key unknown to trust v{trust.version}")
    raise ThresholdError(f"{role} document carries no signature")


def _parse_trust(payload: bytes) -> TrustList:
    try:
        return TrustList.model_validate(decode_json(payload))
    except ValueError as exc:
        raise DecodeError(f"malformed trust list: {exc}".splitlines()[0]) from None


class TrustStore:
    """The trust list a node or controller currently believes."""

    def __init__(self, trust: TrustList, envelope: Envelope) -> None:
        """Use :meth:`bootstrap` or :meth:`rotate`; this trusts its argument blindly."""
        self._trust = trust
        self._envelope = envelope

    @property
    def trust(self) -> TrustList:
        return self._trust

    @property
    def version(self) -> int:
        return self._trust.version

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the signed trust list's bytes: which list this is."""
        return hashlib.sha256(self._envelope.payload_bytes()).hexdigest()

    def envelope_bytes(self) -> bytes:
        """The envelope to persist as ``trust.json``."""
        return self._envelope.to_bytes()

    @classmethod
    def anchor(cls, data: bytes | None) -> TrustStore:
        """A shipped ``trust.json`` that its own root keys sign, expired or not.

        ``data`` is ``None`` when the file is missing or unreadable.

        Raises:
            TrustFileError: no data, or the data is not a trust envelope.
            TrustError: its root signatures do not verify.
        """
        if data is None:
            raise TrustFileError("trust file is missing or unreadable: refusing every command")
        try:
            envelope = Envelope.from_bytes(data)
            if envelope.payloadType != PAYLOAD_TRUST:
                raise TrustFileError("trust file does not hold a trust list")
            trust = _parse_trust(envelope.payload_bytes())
        except DecodeError as exc:
            raise TrustFileError(f"trust file is unreadable: {exc}") from None
        _verify(trust, envelope, Role.ROOT)
        return cls(trust, envelope)

    @classmethod
    def bootstrap(cls, data: bytes | None, *, now: float) -> TrustStore:
        """Trust a shipped ``trust.json`` (its own root keys must sign it, and it
        must not have expired).

        Raises:
            TrustFileError: no data, or the data is not a trust envelope.
            TrustError: signatures do not verify or the list has expired.
        """
        return cls.anchor(data).unexpired(now)

    @classmethod
    def walk(
        cls, anchor: bytes | None, chain: Sequence[bytes], *, now: float
    ) -> tuple[TrustStore, int, str | None]:
        """TUF's root walk: from the shipped ``anchor``, take each rotation of
        ``chain`` in order while it verifies against the list before it (its root
        threshold and its own, a higher version); lists passed on the way may have
        expired, the one reached may not.

        Returns the list reached, how many links of ``chain`` were taken and, when
        a link did not verify (the walk stops there), why.

        Raises:
            TrustFileError / TrustError: the anchor does not verify, or the list
                reached has expired.
        """
        store = cls.anchor(anchor)
        taken = 0
        for data in chain:
            try:
                store = store.rotate(Envelope.from_bytes(data), now=now, allow_expired=True)
            except (TrustError, DecodeError) as exc:
                why = f"link {taken + 1} of the trust chain does not follow v{store.version}: {exc}"
                return store.unexpired(now), taken, why
            taken += 1
        return store.unexpired(now), taken, None

    def unexpired(self, now: float) -> TrustStore:
        """This store. Raises: ExpiredError when the list has expired."""
        if self.expired(now):
            raise ExpiredError(f"trust list v{self.version} has expired")
        return self

    def open(
        self,
        envelope: Envelope,
        role: Role,
        *,
        now: float,
        payload_type: str | None = None,
        allow_expired: bool = False,
    ) -> bytes:
        """Verify ``envelope`` for ``role`` and return its payload bytes.

        ``payload_type`` asks for another of the role's payload types than its
        default (:data:`ROLE_PAYLOAD_TYPES`): the rollout role's acks.

        ``allow_expired`` skips the trust list's own expiry; it is only for
        carrying a root-signed rotation to a node whose list has expired (the
        rotation is then checked against the root keys by :meth:`rotate`).

        Raises:
            ExpiredError: the trust list itself has expired.
            WrongRoleError, UnknownKeyError, BadSignatureError, ThresholdError:
                the signatures do not satisfy ``role``.
            DecodeError: the payload is not base64.
        """
        if self._trust.expires_at <= now and not allow_expired:
            raise ExpiredError(f"trust list v{self._trust.version} has expired")
        if payload_type is not None and payload_type not in _OTHER_PAYLOAD_TYPES.get(role, ()):
            raise ValueError(f"the {role} role does not sign {payload_type}")
        return _verify(self._trust, envelope, role, payload_type)

    def open_request(self, envelope: Envelope, *, now: float) -> tuple[Principal, bytes]:
        """Verify an operator's signed request; the operator and the payload bytes.

        The first signature by a key that an operator holds decides: it must
        verify. Signatures by other keys are ignored.

        Raises:
            ExpiredError: the trust list itself has expired.
            WrongRoleError: the envelope is not an operator request.
            UnknownKeyError: no signature is by an operator's key.
            BadSignatureError: the operator's signature does not verify.
            DecodeError: the payload is not base64.
        """
        if self._trust.expires_at <= now:
            raise ExpiredError(f"trust list v{self._trust.version} has expired")
        if envelope.payloadType != PAYLOAD_REQUEST:
            kind = envelope.payloadType
            raise WrongRoleError(f"payload type {kind!r} is not an operator request")
        payload = envelope.payload_bytes()
        for signature in envelope.signatures:
            found = self._trust.operator_of(signature.keyid)
            if found is None:
                continue
            name, operator = found
            public = public_key_from_b64(self._trust.keys[signature.keyid].public)
            verify_signature(public, envelope.payloadType, payload, signature)
            return Principal(name, operator.role), payload
        raise UnknownKeyError(f"request not signed by an operator of trust v{self._trust.version}")

    def expired(self, now: float) -> bool:
        return self._trust.expires_at <= now

    def rotate(self, envelope: Envelope, *, now: float, allow_expired: bool = False) -> TrustStore:
        """Accept a newer trust list signed by the current and the new root.

        ``allow_expired`` accepts a new list that has expired already (a step
        of :meth:`walk`, which checks the list it ends at).

        Raises:
            TrustError subclasses: a signature threshold is not met, the version
                does not go up, or the new list has already expired.
            DecodeError: the payload is not a trust list.
        """
        payload = _verify(self._trust, envelope, Role.ROOT)
        new = _parse_trust(payload)
        _verify(new, envelope, Role.ROOT)
        if new.version <= self._trust.version:
            raise VersionRollbackError(
                f"trust list v{new.version} is not newer than v{self._trust.version}"
            )
        if new.expires_at <= now and not allow_expired:
            raise ExpiredError(f"trust list v{new.version} has expired")
        return TrustStore(new, envelope)
