"""The operator API over MQTT: request/response with correlation ids.

``fleetctl`` signs an :class:`~shared.messages.OperatorRequest` with the
operator's key (a DSSE envelope, :data:`~shared.envelope.PAYLOAD_REQUEST`),
publishes it on ``ctl/request`` and waits for the
:class:`~shared.messages.OperatorReply` with the same ``id`` on the operator's
own ``ctl/reply/{operator}``. Pending replies are keyed by
correlation id and removed in ``finally``. Operations, their typed arguments
and which of them are audited are listed once, in :data:`shared.operations.OPERATIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgefleet_io.transport import Link, Session, Transport
from fleet_controller.keys import FIRST_OPERATOR, load_operator_key, operator_key_path
from shared import topics
from shared.envelope import PAYLOAD_REQUEST, SigningKey, sign_envelope
from shared.errors import (
    BrokerUnavailableError,
    DecodeError,
    EdgeFleetError,
    RequestTimeoutError,
    TransportError,
)
from shared.messages import OperatorReply, OperatorRequest, decode, encode

__all__ = ["CtlClient", "OperationError", "OperatorIdentity"]


@dataclass(frozen=True, slots=True)
class OperatorIdentity:
    """An operator as the trust list names them, with the private key they sign with."""

    name: str
    key: SigningKey

    @classmethod
    def load(
        cls, keys_dir: Path, name: str = FIRST_OPERATOR, passphrase: bytes | None = None
    ) -> OperatorIdentity:
        """Operator ``name`` with its key from ``keys_dir/operators/``.

        Raises: TrustError when the key cannot be read.
        """
        return cls(name, load_operator_key(operator_key_path(keys_dir, name), passphrase))


class OperationError(EdgeFleetError):
    """The controller refused or failed an operation; ``code`` is the CLI exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class CtlClient:
    """One operator connection: ``async with CtlClient(transport, ...) as ctl: ...``.

    Replies come on ``ctl/reply/{operator}``, the only reply topic the broker
    lets that operator read; correlation ids keep concurrent sessions of one
    operator apart. ``client_id`` defaults to the operator's name and a random
    suffix (the broker may require the operator's name as the prefix).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        fleet: str,
        identity: OperatorIdentity,
        timeout_s: float = 10.0,
    ) -> None:
        self._transport = transport
        self._fleet = fleet
        self._identity = identity
        self._timeout_s = timeout_s
        self._client_id = f"{identity.name}-{secrets.token_hex(6)}"
        self._connection: AbstractAsyncContextManager[Link] | None = None
        self._link: Link | None = None
        self._pending: dict[str, asyncio.Future[OperatorReply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        connection = self._transport.connect(Session(client_id=self._client_id))
        try:
            link = await connection.__aenter__()
        except TransportError as exc:
            raise BrokerUnavailableError(
                f"cannot reach the broker at {self._transport}: {exc}"
            ) from None
        try:
            await link.subscribe([(topics.ctl_reply(self._fleet, self._identity.name), 1)])
        except TransportError as exc:
            with contextlib.suppress(TransportError):
                await connection.__aexit__(None, None, None)
            raise BrokerUnavailableError(
                f"cannot reach the broker at {self._transport}: {exc}"
            ) from None
        self._connection, self._link = connection, link
        self._reader = asyncio.get_running_loop().create_task(self._read(link))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        connection, self._connection, self._link = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(TransportError):
                await connection.__aexit__(exc_type, exc, tb)

    async def _read(self, link: Link) -> None:
        with contextlib.suppress(TransportError):
            async for message in link.messages():
                try:
                    reply = decode(OperatorReply, message.payload)
                except DecodeError:
                    continue
                future = self._pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Run ``op`` on the controller and return its result.

        Raises:
            OperationError: the controller answered with an error (``code`` 1 or 2).
            RequestTimeoutError: no answer in time (is ``fleetctl serve`` running?).
            BrokerUnavailableError: the broker connection failed.
        """
        request_id = secrets.token_hex(8)
        now = time.time()
        request = OperatorRequest(
            id=request_id,
            operator=self._identity.name,
            nonce=secrets.token_hex(16),
            op=op,
            args=args or {},
            issued_at=now,
            expires_at=now + self._timeout_s,
        )
        signed = sign_envelope(encode(request), PAYLOAD_REQUEST, [self._identity.key]).to_bytes()
        link = self._link
        if link is None:
            raise BrokerUnavailableError("the operator connection is not open")
        future: asyncio.Future[OperatorReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await link.publish(topics.ctl_request(self._fleet), signed, qos=1)
            async with asyncio.timeout(self._timeout_s):
                reply = await future
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer from the controller of fleet {self._fleet!r} within "
                f"{self._timeout_s:g}s: is `fleetctl serve` running?"
            ) from None
        except TransportError as exc:
            raise BrokerUnavailableError(f"broker connection failed: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise OperationError(reply.error or f"{op} failed", reply.code or 1)
        return reply.result
