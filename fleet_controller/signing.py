"""Building and signing commands with the rollout key (the controller's only key).

``seq`` values come from the caller (the store's counter in the service), so
every command the controller ever signs has a unique, increasing number.
"""

from __future__ import annotations

import secrets

from shared.envelope import PAYLOAD_COMMAND, Envelope, SigningKey, sign_envelope
from shared.messages import (
    CancelAction,
    Command,
    DeployAction,
    NodeTarget,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
    encode,
)

__all__ = ["DEFAULT_COMMAND_TTL_S", "new_command_id", "sign_command"]

DEFAULT_COMMAND_TTL_S = 7 * 86_400

Body = DeployAction | RollbackAction | TrustUpdateAction | CancelAction


def new_command_id(prefix: str = "cmd") -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def sign_command(
    key: SigningKey,
    *,
    fleet: str,
    seq: int,
    target: NodeTarget | WaveTarget,
    body: Body,
    now: float,
    rollout_id: str | None = None,
    command_id: str | None = None,
    ttl_s: float = DEFAULT_COMMAND_TTL_S,
) -> tuple[Command, Envelope]:
    """A command and its DSSE envelope signed by ``key`` (the rollout role)."""
    command = Command(
        command_id=command_id or new_command_id(),
        seq=seq,
        fleet=fleet,
        rollout_id=rollout_id,
        issued_at=now,
        expires_at=now + ttl_s,
        target=target,
        body=body,
    )
    return command, sign_envelope(encode(command), PAYLOAD_COMMAND, [key])
