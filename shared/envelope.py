"""DSSE envelopes signed with Ed25519.

An envelope is ``{"payloadType", "payload": base64, "signatures": [{"keyid", "sig"}]}``.
Each signature covers DSSE's pre-authentication encoding (PAE) of the payload
type and the *exact payload bytes*; verification works on those bytes and only
then are they parsed, so no field outside the signature can influence a
decision and no canonicalisation is needed.

A key id is the lowercase hex SHA-256 of the raw 32-byte Ed25519 public key.
This module signs and checks single signatures; which keys count for which role
(and how many are needed) is :mod:`shared.trust`'s job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from shared.codec import decode_json, encode_json
from shared.errors import BadSignatureError, DecodeError, TrustError

__all__ = [
    "PAYLOAD_ACK",
    "PAYLOAD_COMMAND",
    "PAYLOAD_MANIFEST",
    "PAYLOAD_REQUEST",
    "PAYLOAD_TRUST",
    "Envelope",
    "Signature",
    "SigningKey",
    "b64decode",
    "b64encode",
    "key_id",
    "pae",
    "public_key_from_b64",
    "sign_envelope",
    "verify_signature",
]

PAYLOAD_TRUST = "application/vnd.edgefleet.trust+json"
PAYLOAD_MANIFEST = "application/vnd.edgefleet.manifest+json"
PAYLOAD_COMMAND = "application/vnd.edgefleet.command+json"
PAYLOAD_REQUEST = "application/vnd.edgefleet.request+json"
PAYLOAD_ACK = "application/vnd.edgefleet.ack+json"

_MAX_SIGNATURES = 16


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keyid: str = Field(pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(max_length=128)


class Envelope(BaseModel):
    """A DSSE envelope. ``payload`` and ``sig`` are standard base64."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    payloadType: str = Field(max_length=128)  # noqa: N815 - DSSE's field name
    payload: str
    signatures: tuple[Signature, ...] = Field(max_length=_MAX_SIGNATURES)

    def payload_bytes(self) -> bytes:
        """The decoded payload (not yet verified: callers verify first)."""
        return b64decode(self.payload, "payload")

    def to_bytes(self) -> bytes:
        return encode_json(self.model_dump())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 1024 * 1024) -> Envelope:
        """Parse an envelope strictly.

        Raises:
            DecodeError: not a well-formed envelope.
        """
        value = decode_json(data, max_bytes=max_bytes)
        try:
            return cls.model_validate(value)
        except ValueError as exc:
            raise DecodeError(f"malformed envelope: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    return str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str = "value") -> bytes:
    """Strict standard base64.

    Raises:
        DecodeError: ``text`` is not canonical base64.
    """
    try:
        encoded = text.encode("ascii")
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DecodeError(f"{what} is not valid base64") from None
    # b64decode ignores the unused low bits of the last character ("QR==" reads
    # as "QQ=="), so several texts would carry one value: allow only the one.
    if base64.b64encode(raw) != encoded:
        raise DecodeError(f"{what} is not canonical base64")
    return raw


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Raises: DecodeError if ``text`` is not a base64 raw Ed25519 public key."""
    raw = b64decode(text, "public key")
    if len(raw) != 32:
        raise DecodeError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its key id."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def public_b64(self) -> str:
        return b64encode(self.public.public_bytes_raw())

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted with ``passphrase`` when one is given."""
        # PEM support loads on first use: nodes verify with raw public keys only.
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> SigningKey:
        """Raises: TrustError if the PEM is unreadable, encrypted without a passphrase,
        the passphrase is wrong, or it is not an Ed25519 key."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see to_pem

        try:
            key = serialization.load_pem_private_key(data, password=passphrase or None)
        except (ValueError, TypeError) as exc:
            raise TrustError(f"cannot load private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise TrustError("private key is not an Ed25519 key")
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def sign_envelope(payload: bytes, payload_type: str, keys: list[SigningKey]) -> Envelope:
    """Sign ``payload`` with every key in ``keys``."""
    message = pae(payload_type, payload)
    return Envelope(
        payloadType=payload_type,
        payload=b64encode(payload),
        signatures=tuple(Signature(keyid=k.keyid, sig=b64encode(k.sign(message))) for k in keys),
    )


def verify_signature(
    public_key: Ed25519PublicKey, payload_type: str, payload: bytes, signature: Signature
) -> None:
    """Check one signature over the PAE of ``payload``.

    Raises:
        BadSignatureError: the signature does not match.
    """
    try:
        raw = b64decode(signature.sig, "signature")
    except DecodeError:
        raise BadSignatureError(f"signature by key {signature.keyid[:12]} is not base64") from None
    try:
        public_key.verify(raw, pae(payload_type, payload))
    except InvalidSignature:
        raise BadSignatureError(f"bad signature by key {signature.keyid[:12]}") from None
