"""Signed acks (shared.acks): only the rollout key's ack for this node opens."""

from __future__ import annotations

import pytest

from shared.acks import open_ack, sign_ack
from shared.envelope import PAYLOAD_ACK, PAYLOAD_COMMAND, SigningKey, b64encode, sign_envelope
from shared.errors import (
    BadSignatureError,
    DecodeError,
    NotAddressedError,
    TrustError,
    WrongRoleError,
)
from shared.messages import Ack, encode
from shared.trust import Role
from tests.support.shared_kit import NOW, Keys, command, sign_command, store_for

ACK = Ack(node="n1", seq=7, ts=NOW)


def _tampered(k: Keys) -> bytes:
    """A genuine signature over another ack's bytes."""
    genuine = sign_envelope(encode(ACK), PAYLOAD_ACK, [k.rollout])
    more = encode(ACK.model_copy(update={"seq": 2**62}))
    return genuine.model_copy(update={"payload": b64encode(more)}).to_bytes()


def test_the_rollout_keys_ack_opens_for_its_node() -> None:
    k = Keys()
    assert open_ack(sign_ack(ACK, k.rollout), trust=store_for(k), node="n1", now=NOW) == ACK


@pytest.mark.parametrize(
    ("forge", "error"),
    [
        (lambda k: encode(ACK), DecodeError),
        (lambda k: sign_ack(ACK, SigningKey.generate()), TrustError),
        (lambda k: sign_ack(ACK, k.release), WrongRoleError),
        (_tampered, BadSignatureError),
        (lambda k: sign_ack(ACK.model_copy(update={"node": "n2"}), k.rollout), NotAddressedError),
        (lambda k: sign_envelope(encode(ACK), PAYLOAD_COMMAND, [k.rollout]).to_bytes(), TrustError),
        (lambda k: sign_command([k.rollout], command()).to_bytes(), TrustError),
    ],
    ids=["unsigned", "unknown-key", "release-key", "tampered", "other-node", "as-command",
         "a-command"],
)  # fmt: skip
def test_forged_acks_do_not_open(forge: object, error: type[Exception]) -> None:
    k = Keys()
    data = forge(k)  # type: ignore[operator]
    with pytest.raises(error):
        open_ack(data, trust=store_for(k), node="n1", now=NOW)


def test_an_ack_envelope_is_no_command() -> None:
    k = Keys()
    envelope = sign_envelope(encode(ACK), PAYLOAD_ACK, [k.rollout])
    with pytest.raises(WrongRoleError):
        store_for(k).open(envelope, Role.ROLLOUT, now=NOW)
    with pytest.raises(ValueError, match="does not sign"):
        store_for(k).open(envelope, Role.RELEASE, now=NOW, payload_type=PAYLOAD_ACK)
