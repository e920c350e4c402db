"""DSSE envelopes and Ed25519 keys (shared.envelope)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.envelope import (
    PAYLOAD_MANIFEST,
    Envelope,
    Signature,
    SigningKey,
    b64decode,
    b64encode,
    key_id,
    pae,
    public_key_from_b64,
    sign_envelope,
    verify_signature,
)
from shared.errors import BadSignatureError, DecodeError, TrustError


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def test_pae_matches_the_dsse_specification() -> None:
    # The worked example of the DSSE v1 protocol document.
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("t\u00e9", b"") == "DSSEv1 3 t\u00e9 0 ".encode()  # lengths are in bytes


def test_key_id_is_sha256_of_the_raw_public_key(key: SigningKey) -> None:
    raw = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.keyid == key_id(key.public) == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(key.public_b64()) == raw


def test_sign_then_verify_and_serialize(key: SigningKey) -> None:
    envelope = sign_envelope(b'{"a":1}', PAYLOAD_MANIFEST, [key])
    assert envelope.payload_bytes() == b'{"a":1}'
    assert [s.keyid for s in envelope.signatures] == [key.keyid]
    verify_signature(key.public, PAYLOAD_MANIFEST, b'{"a":1}', envelope.signatures[0])
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope
    assert json.loads(envelope.to_bytes()) == {
        "payloadType": PAYLOAD_MANIFEST,
        "payload": b64encode(b'{"a":1}'),
        "signatures": [{"keyid": key.keyid, "sig": envelope.signatures[0].sig}],
    }


@pytest.mark.parametrize(
    ("payload_type", "payload"),
    [
        pytest.param("other/type", b'{"a":1}', id="other-payload-type"),
        pytest.param(PAYLOAD_MANIFEST, b'{"a":2}', id="other-payload"),
        pytest.param(PAYLOAD_MANIFEST, b'{"a":1} ', id="payload-with-trailing-space"),
    ],
)
def test_signature_binds_type_and_exact_bytes(
    key: SigningKey, payload_type: str, payload: bytes
) -> None:
    signature = sign_envelope(b'{"a":1}', PAYLOAD_MANIFEST, [key]).signatures[0]
    with pytest.raises(BadSignatureError):
        verify_signature(key.public, payload_type, payload, signature)


def test_signature_by_another_key_is_bad(key: SigningKey) -> None:
    signature = sign_envelope(b"x", PAYLOAD_MANIFEST, [SigningKey.generate()]).signatures[0]
    with pytest.raises(BadSignatureError):
        verify_signature(key.public, PAYLOAD_MANIFEST, b"x", signature)


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param("!!!!", id="not-base64"),
        pytest.param("", id="empty"),
        pytest.param(b64encode(b"\x00" * 64), id="zero-signature"),
        pytest.param(b64encode(b"\x00" * 63), id="short-signature"),
    ],
)
def test_malformed_signature_is_bad_signature(key: SigningKey, sig: str) -> None:
    with pytest.raises(BadSignatureError):
        verify_signature(key.public, PAYLOAD_MANIFEST, b"x", Signature(keyid=key.keyid, sig=sig))


BAD_BASE64: list[Any] = [
    pytest.param("QR==", id="non-zero-padding-bits-1-byte"),
    pytest.param("QUJ=", id="non-zero-padding-bits-2-bytes"),
    pytest.param("QQ", id="missing-padding"),
    pytest.param("QQ=", id="short-padding"),
    pytest.param("QQ===", id="extra-padding"),
    pytest.param("Q", id="one-char"),
    pytest.param("QQ==\n", id="trailing-newline"),
    pytest.param("Q Q==", id="inner-space"),
    pytest.param("QQ-_", id="urlsafe-alphabet"),
    pytest.param("QQ==QQ==", id="data-after-padding"),
    pytest.param("QUJD\u00e9", id="non-ascii"),
]


@pytest.mark.parametrize("text", BAD_BASE64)
def test_b64decode_rejects(text: str) -> None:
    with pytest.raises(DecodeError):
        b64decode(text)


@pytest.mark.parametrize("raw", [b"", b"A", b"AB", b"ABC", bytes(range(256))])
def test_b64_round_trip(raw: bytes) -> None:
    assert b64decode(b64encode(raw)) == raw


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b64encode(b"\x01" * 31), id="31-bytes"),
        pytest.param(b64encode(b"\x01" * 33), id="33-bytes"),
        pytest.param("not base64!", id="not-base64"),
    ],
)
def test_public_key_from_b64_rejects(text: str) -> None:
    with pytest.raises(DecodeError):
        public_key_from_b64(text)


def _envelope_dict(key: SigningKey) -> dict[str, Any]:
    return json.loads(sign_envelope(b"{}", PAYLOAD_MANIFEST, [key]).to_bytes())


ENVELOPE_MUTATIONS: list[Any] = [
    pytest.param(lambda d: d.pop("payload"), id="missing-payload"),
    pytest.param(lambda d: d.pop("signatures"), id="missing-signatures"),
    pytest.param(lambda d: d.update(extra=1), id="unknown-field"),
    pytest.param(lambda d: d["signatures"][0].update(extra=1), id="unknown-signature-field"),
    pytest.param(
        lambda d: d["signatures"][0].update(keyid=d["signatures"][0]["keyid"].upper()),
        id="uppercase-keyid",
    ),
    pytest.param(lambda d: d["signatures"][0].update(keyid="ab"), id="short-keyid"),
    pytest.param(lambda d: d["signatures"][0].update(sig="A" * 129), id="long-sig"),
    pytest.param(lambda d: d.update(payloadType="t" * 129), id="long-payload-type"),
    pytest.param(lambda d: d.update(signatures=d["signatures"] * 17), id="17-signatures"),
    pytest.param(lambda d: d.update(payload=1), id="payload-not-a-string"),
    pytest.param(lambda d: d.update(signatures={}), id="signatures-not-a-list"),
]


@pytest.mark.parametrize("mutate", ENVELOPE_MUTATIONS)
def test_envelope_from_bytes_rejects(key: SigningKey, mutate: Any) -> None:
    document = _envelope_dict(key)
    mutate(document)
    with pytest.raises(DecodeError):
        Envelope.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="list"),
        pytest.param(b"\x80", id="not-utf8"),
        pytest.param(
            b'{"payloadType":"t","payload":"","signatures":[],"payload":""}', id="duplicate-key"
        ),
    ],
)
def test_envelope_from_bytes_rejects_bad_json(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Envelope.from_bytes(data)


def test_envelope_from_bytes_size_limit(key: SigningKey) -> None:
    data = sign_envelope(b"x" * 100, PAYLOAD_MANIFEST, [key]).to_bytes()
    assert Envelope.from_bytes(data, max_bytes=len(data)).payload_bytes() == b"x" * 100
    with pytest.raises(DecodeError, match="byte limit"):
        Envelope.from_bytes(data, max_bytes=len(data) - 1)


def test_payload_bytes_rejects_bad_base64(key: SigningKey) -> None:
    envelope = Envelope(payloadType=PAYLOAD_MANIFEST, payload="QR==", signatures=())
    with pytest.raises(DecodeError):
        envelope.payload_bytes()


def test_pem_round_trip(key: SigningKey) -> None:
    assert SigningKey.from_pem(key.to_pem()).keyid == key.keyid
    encrypted = key.to_pem(b"correct horse")
    assert b"ENCRYPTED" in encrypted
    assert SigningKey.from_pem(encrypted, b"correct horse").keyid == key.keyid


@pytest.mark.parametrize(
    ("pem", "passphrase"),
    [
        pytest.param("encrypted", None, id="encrypted-without-passphrase"),
        pytest.param("encrypted", b"wrong", id="wrong-passphrase"),
        pytest.param("plain", b"unexpected", id="passphrase-for-plain-key"),
        pytest.param("ec", None, id="not-ed25519"),
        pytest.param("garbage", None, id="garbage"),
    ],
)
def test_pem_load_failures_are_trust_errors(
    key: SigningKey, pem: str, passphrase: bytes | None
) -> None:
    data = {
        "encrypted": key.to_pem(b"correct horse"),
        "plain": key.to_pem(),
        "ec": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "garbage": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    }[pem]
    with pytest.raises(TrustError):
        SigningKey.from_pem(data, passphrase)
