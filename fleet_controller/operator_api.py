"""The operator API's request pipeline: authenticate, authorize, parse once,
dispatch by table, reply, audit.

A request arrives as a DSSE envelope whose payload is an
:class:`~shared.messages.OperatorRequest`, signed by one of an operator's keys
named in the trust list. :class:`OperatorApi`:

1. **authenticates** it (:func:`authenticate`, pure): the signature must be by
   an operator's key (:meth:`~shared.trust.TrustStore.open_request`), the
   request must name that operator, have been issued at most
   :data:`REQUEST_SKEW_S` ahead of the controller's clock, not have expired,
   and live at most :data:`MAX_REQUEST_LIFETIME_S`. Anything else is dropped
   with no answer (nobody to answer: the reply topic is the signer's), logged
   and counted under ``ctl_unauthenticated``;
2. **rate-limits** each operator (:class:`RateLimiter`): past the limit the
   request is answered ``rate limited`` and counted, never run;
3. **rejects replays**: the nonce is claimed in the store
   (:meth:`~fleet_controller.store.audit.AuditRepository.claim_nonce`), shared
   by every replica, until the request expires; a replay is dropped and counted;
4. **authorizes**: the operator's role must allow the operation's role
   (:class:`~shared.trust.OperatorRole`), else code 2 and an audit entry
   ``denied``;
5. finds the operation's :class:`Route`, parses ``args`` exactly once into the
   operation's frozen request model (:func:`shared.operations.parse_request`,
   against the controller's clock), runs the handler with the typed request,
   and answers on ``ctl/reply/{operator}``, the signer's own reply topic.

The routes are a table built with :func:`bind`, which ties each operation to
a handler taking that operation's request type, so a type checker sees every
pairing (no dispatch by method name).

Every outcome of an authenticated request is an answer; nothing a request
carries can end the controller:

* handled: code 0, audited as ``ok`` for mutating operations (an upload once,
  with the chunk that completes it);
* unknown operation, arguments that do not validate, malformed input
  (``DecodeError``): code 2 naming the field, audited as ``refused`` always;
* a role that may not run the operation: code 2, audited as ``denied``;
* the operation failed (``EdgeFleetError``): code 1, audited as ``failed``
  for mutating operations;
* the handler raised anything else: code 1 ``internal error: ...``, logged with
  the request id and a traceback, audited as ``failed`` always.

The audit log's operator is the signer's name from the trust list.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fleet_controller.link import ControllerLink
from fleet_controller.quotas import RateLimiter
from fleet_controller.store import Store
from shared import topics
from shared.envelope import Envelope
from shared.errors import DecodeError, EdgeFleetError, TransportError, TrustError
from shared.messages import OperatorReply, OperatorRequest, decode, encode
from shared.operations import Operation, Request, parse_request
from shared.trust import Principal, TrustStore

__all__ = [
    "MAX_REQUEST_LIFETIME_S",
    "OPERATOR_BURST",
    "OPERATOR_RATE_PER_S",
    "REQUEST_SKEW_S",
    "AuthError",
    "OperatorApi",
    "Route",
    "authenticate",
    "bind",
    "route_table",
]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Request)

_ERROR_MAX_CHARS = 500  # OperatorReply.error holds at most 512
_AUDIT_TEXT_MAX_CHARS = 256  # longer argument values are summarised in the audit log
_AUDIT_JSON_MAX_CHARS = 1024

REQUEST_SKEW_S = 60.0
"""How far ahead of the controller's clock a request may say it was issued."""
MAX_REQUEST_LIFETIME_S = 3600.0 + REQUEST_SKEW_S
"""From issue to expiry (``fleetctl --timeout`` is at most an hour)."""
OPERATOR_RATE_PER_S = 50.0
OPERATOR_BURST = 500.0


class AuthError(EdgeFleetError):
    """A request that is not an operator's signed, live request."""


def authenticate(
    envelope: Envelope, trust: TrustStore, *, now: float
) -> tuple[Principal, OperatorRequest]:
    """Who signed ``envelope`` and what they asked (pure; the nonce is not checked here).

    Raises:
        AuthError: a signature, the operator's name or a time does not hold.
    """
    try:
        principal, payload = trust.open_request(envelope, now=now)
        request = decode(OperatorRequest, payload)
    except (TrustError, DecodeError) as exc:
        raise AuthError(str(exc)) from None
    if request.operator != principal.name:
        raise AuthError(f"request names operator {request.operator}, signed by {principal.name}")
    if request.issued_at > now + REQUEST_SKEW_S:
        raise AuthError(f"request {request.id} is issued in the future")
    if request.expires_at < now:
        raise AuthError(f"request {request.id} has expired")
    if request.expires_at - request.issued_at > MAX_REQUEST_LIFETIME_S:
        raise AuthError(f"request {request.id} lives longer than {MAX_REQUEST_LIFETIME_S:g}s")
    return principal, request


@dataclass(frozen=True, slots=True)
class Route(Generic[R]):
    """One operation and the handler of its typed request: ``handler(request, operator)``."""

    operation: Operation[R]
    handler: Callable[[R, str], Awaitable[Any]]

    async def __call__(self, args: Mapping[str, Any], operator: str, *, now: float) -> Any:
        """Parse ``args`` once and run the handler. Raises: RequestError, and what it raises."""
        return await self.handler(parse_request(self.operation, args, now=now), operator)


def bind(operation: Operation[R], handler: Callable[[R, str], Awaitable[Any]]) -> Route[R]:
    """A route: the type checker holds ``handler`` to ``operation``'s request type."""
    return Route(operation, handler)


def route_table(*routes: Route[Any]) -> dict[str, Route[Any]]:
    """Routes by operation name. Raises: ValueError when an operation appears twice."""
    table: dict[str, Route[Any]] = {}
    for route in routes:
        name = route.operation.name
        if name in table:
            raise ValueError(f"operation {name} is routed twice")
        table[name] = route
    return table


@dataclass(frozen=True, slots=True)
class _Answer:
    reply: OperatorReply
    outcome: str  # ok | refused | failed
    detail: str | None
    audit: bool


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_ERROR_MAX_CHARS]


def _audit_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` with big values (chunk data, signed envelopes, junk) summarised."""
    summary: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, str):
            too_long = len(value) > _AUDIT_TEXT_MAX_CHARS
            summary[key] = f"<{len(value)} characters>" if too_long else value
            continue
        text = json.dumps(value, default=str)
        too_big = len(text) > _AUDIT_JSON_MAX_CHARS
        summary[key] = f"<{len(text)} characters of JSON>" if too_big else value
    return summary


class OperatorApi:
    """Answers operator requests through a table of routes (see the module docstring)."""

    def __init__(
        self,
        routes: Mapping[str, Route[Any]],
        *,
        store: Store,
        link: ControllerLink,
        fleet: str,
        trust: Callable[[], TrustStore],
        clock: Callable[[], float],
        metrics: Counter[str],
        limiter: RateLimiter | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._store = store
        self._link = link
        self._fleet = fleet
        self._trust = trust
        self._clock = clock
        self._metrics = metrics
        self._limiter = limiter or RateLimiter(OPERATOR_RATE_PER_S, OPERATOR_BURST)

    async def handle(self, envelope: Envelope) -> None:
        """Authenticate, answer, audit and reply to one request; never raises."""
        now = self._clock()
        try:
            principal, request = authenticate(envelope, self._trust(), now=now)
        except AuthError as exc:
            self._metrics["ctl_unauthenticated"] += 1
            log.warning("dropping an operator request: %s", exc)
            return
        if not self._limiter.allow(principal.name, now):
            self._metrics["ctl_rate_limited"] += 1
            message = f"rate limited: more than {OPERATOR_RATE_PER_S:g} requests/s"
            await self._reply(principal, _failure(request, 1, "failed", message, audit=False))
            return
        try:
            fresh = await asyncio.to_thread(
                self._store.audit.claim_nonce,
                request.nonce,
                principal.name,
                expires_at=request.expires_at,
                now=now,
            )
        except Exception:
            log.exception("cannot record operator request %s's nonce", request.id)
            return
        if not fresh:
            self._metrics["ctl_replays"] += 1
            log.warning(
                "dropping a replayed operator request %s from %s", request.id, principal.name
            )
            return
        answer = await self._answer(principal, request, now)
        if answer.audit:
            await self._audit(principal, request, answer, now)
        await self._reply(principal, answer)

    async def _reply(self, principal: Principal, answer: _Answer) -> None:
        try:
            await self._link.publish(
                topics.ctl_reply(self._fleet, principal.name), encode(answer.reply), qos=1
            )
        except TransportError as exc:
            log.warning("reply to operator request %s not sent: %s", answer.reply.id, exc)

    async def _answer(self, principal: Principal, request: OperatorRequest, now: float) -> _Answer:
        route = self._routes.get(request.op)
        if route is None:
            return _failure(request, 2, "refused", f"unknown operation {request.op!r}", audit=True)
        operation = route.operation
        if not principal.role.allows(operation.role):
            self._metrics["ctl_denied"] += 1
            message = (
                f"operator {principal.name} ({principal.role}) may not run {operation.name}: "
                f"it needs the {operation.role} role"
            )
            return _failure(request, 2, "denied", message, audit=True)
        try:
            result = await route(request.args, principal.name, now=now)
        except DecodeError as exc:
            return _failure(request, 2, "refused", str(exc), audit=True)
        except EdgeFleetError as exc:
            return _failure(request, 1, "failed", str(exc), audit=operation.mutating)
        except Exception as exc:
            log.exception("operator request %s (%s) raised", request.id, request.op)
            message = f"internal error: {type(exc).__name__}: {exc}"
            return _failure(request, 1, "failed", message, audit=True)
        reply = OperatorReply(id=request.id, ok=True, result=result)
        return _Answer(reply, "ok", None, audit=operation.mutating and not _in_progress(result))

    async def _audit(
        self, principal: Principal, request: OperatorRequest, answer: _Answer, now: float
    ) -> None:
        try:
            await asyncio.to_thread(
                self._store.audit.append,
                principal.name,
                request.op,
                _audit_args(request.args),
                answer.outcome,
                answer.detail,
                now,
            )
        except Exception:
            log.exception("cannot write operator request %s to the audit log", request.id)


def _in_progress(result: Any) -> bool:
    """An upload chunk that did not complete its blob: audited only when it fails."""
    return isinstance(result, dict) and result.get("complete") is False


def _failure(
    request: OperatorRequest, code: Literal[1, 2], outcome: str, message: str, *, audit: bool
) -> _Answer:
    text = _one_line(message)
    reply = OperatorReply(id=request.id, ok=False, code=code, error=text)
    return _Answer(reply, outcome, text, audit=audit)
