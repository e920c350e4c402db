"""Acks the controller signs and nodes verify before freeing anything.

An ack tells a node that its outbox slots up to ``seq`` are stored; a node that
believed a forged one would delete results nobody has. So the controller signs
each :class:`~shared.messages.Ack` with its rollout key, under the payload type
:data:`~shared.envelope.PAYLOAD_ACK` (a signed ack can never pass for a
command, nor a command for an ack), and a node frees its outbox only for an
ack that verifies against its trust list and names it. A replayed genuine ack
frees nothing new: everything up to its ``seq`` is already freed. A node also
never frees beyond what it has sent (:meth:`edge_node.outbox.Outbox.ack`).
"""

from __future__ import annotations

from shared.envelope import PAYLOAD_ACK, Envelope, SigningKey, sign_envelope
from shared.errors import NotAddressedError
from shared.messages import Ack, decode, encode
from shared.trust import Role, TrustStore

__all__ = ["open_ack", "sign_ack"]

_MAX_ACK_BYTES = 4096


def sign_ack(ack: Ack, key: SigningKey) -> bytes:
    """The wire form of ``ack``: a DSSE envelope signed by ``key`` (the rollout key)."""
    return sign_envelope(encode(ack), PAYLOAD_ACK, [key]).to_bytes()


def open_ack(data: bytes, *, trust: TrustStore, node: str, now: float) -> Ack:
    """The ack in ``data``, once its signature verifies and it names ``node``.

    Raises:
        DecodeError: not a well-formed signed ack.
        TrustError: the signature does not verify for the rollout role, or the
            ack is for another node (:class:`~shared.errors.NotAddressedError`).
    """
    envelope = Envelope.from_bytes(data, max_bytes=_MAX_ACK_BYTES)
    ack = decode(Ack, trust.open(envelope, Role.ROLLOUT, now=now, payload_type=PAYLOAD_ACK))
    if ack.node != node:
        raise NotAddressedError(f"ack for node {ack.node!r}")
    return ack
