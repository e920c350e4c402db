"""The operator API's request pipeline: parse once, dispatch by table, reply, audit.

An :class:`~shared.messages.OperatorRequest` names an operation of
:data:`shared.operations.OPERATIONS`. :class:`OperatorApi` drops it when it has
expired; otherwise it finds the operation's :class:`Route`, parses ``args``
exactly once into the operation's frozen request model
(:func:`shared.operations.parse_request`, against the controller's clock), runs
the handler with the typed request, and answers on ``ctl/reply/{client}``.

The routes are a table built with :func:`bind`, which ties each operation to
a handler taking that operation's request type, so a type checker sees every
pairing (no dispatch by method name).

Every outcome is an answer; nothing a request carries can end the controller:

* handled: code 0, audited as ``ok`` for mutating operations;
* unknown operation, arguments that do not validate, malformed input
  (``DecodeError``): code 2 naming the field, audited as ``refused`` always;
* the operation failed (``EdgeFleetError``): code 1, audited as ``failed``
  for mutating operations;
* the handler raised anything else: code 1 ``internal error: ...``, logged with
  the request id and a traceback, audited as ``failed`` always.

An expired request is dropped: no answer, no audit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fleet_controller.link import ControllerLink
from fleet_controller.store import Store
from shared import topics
from shared.errors import DecodeError, EdgeFleetError, TransportError
from shared.messages import OperatorReply, OperatorRequest, encode
from shared.operations import Operation, Request, parse_request

__all__ = ["OperatorApi", "Route", "bind", "route_table"]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Request)

_ERROR_MAX_CHARS = 500  # OperatorReply.error holds at most 512
_AUDIT_TEXT_MAX_CHARS = 256  # longer argument values are summarised in the audit log
_AUDIT_JSON_MAX_CHARS = 1024


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
        clock: Callable[[], float],
    ) -> None:
        self._routes = dict(routes)
        self._store = store
        self._link = link
        self._fleet = fleet
        self._clock = clock

    async def handle(self, request: OperatorRequest) -> None:
        """Answer, audit and reply to one request; never raises."""
        now = self._clock()
        if request.expires_at < now:
            log.info("dropping expired operator request %s (%s)", request.id, request.op)
            return
        answer = await self._answer(request, now)
        if answer.audit:
            await self._audit(request, answer, now)
        try:
            await self._link.publish(
                topics.ctl_reply(self._fleet, request.client), encode(answer.reply), qos=1
            )
        except TransportError as exc:
            log.warning("reply to operator request %s not sent: %s", request.id, exc)

    async def _answer(self, request: OperatorRequest, now: float) -> _Answer:
        route = self._routes.get(request.op)
        if route is None:
            return _failure(request, 2, "refused", f"unknown operation {request.op!r}", audit=True)
        mutating = route.operation.mutating
        try:
            result = await route(request.args, request.operator, now=now)
        except DecodeError as exc:
            return _failure(request, 2, "refused", str(exc), audit=True)
        except EdgeFleetError as exc:
            return _failure(request, 1, "failed", str(exc), audit=mutating)
        except Exception as exc:
            log.exception("operator request %s (%s) raised", request.id, request.op)
            message = f"internal error: {type(exc).__name__}: {exc}"
            return _failure(request, 1, "failed", message, audit=True)
        reply = OperatorReply(id=request.id, ok=True, result=result)
        return _Answer(reply, "ok", None, audit=mutating)

    async def _audit(self, request: OperatorRequest, answer: _Answer, now: float) -> None:
        try:
            await asyncio.to_thread(
                self._store.audit.append,
                request.operator,
                request.op,
                _audit_args(request.args),
                answer.outcome,
                answer.detail,
                now,
            )
        except Exception:
            log.exception("cannot write operator request %s to the audit log", request.id)


def _failure(
    request: OperatorRequest, code: Literal[1, 2], outcome: str, message: str, *, audit: bool
) -> _Answer:
    text = _one_line(message)
    reply = OperatorReply(id=request.id, ok=False, code=code, error=text)
    return _Answer(reply, outcome, text, audit=audit)
