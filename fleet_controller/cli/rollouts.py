"""``fleetctl rollout start|status|list|events|pause|resume|abort|rollback``.

The tunables of ``rollout start`` are the fields of
:class:`~shared.operations.RolloutPolicy` and their defaults are stated only
there: every tunable flag defaults to None, its ``--help`` shows the default
read from :data:`~shared.operations.DEFAULT_POLICY`, and the request carries
``model`` plus only the flags the operator gave, so the controller fills in the
rest. Each flag is parsed with a message naming it (``--waves: ...``); then the
whole request is checked with :func:`~shared.operations.parse_request`, the
controller's own check, before the broker is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import (
    format_duration,
    format_fraction,
    format_waves,
    named,
    parse_activate_at,
    parse_duration,
    parse_fraction,
    parse_model_ref,
    parse_select,
    parse_waves,
    whole_number,
)
from shared.errors import TransportError, UsageError
from shared.operations import (
    DEFAULT_POLICY,
    ROLLOUT_ABORT,
    ROLLOUT_EVENTS,
    ROLLOUT_LIST,
    ROLLOUT_PAUSE,
    ROLLOUT_RESUME,
    ROLLOUT_ROLLBACK,
    ROLLOUT_START,
    ROLLOUT_STATUS,
    Operation,
    RolloutRef,
)
from shared.topics import check_id

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

__all__ = ["add_policy_flags", "events_table", "policy_request", "register", "start_request"]

_ENDED_OK = "succeeded"
_ACTIVE_ROLLOUT_STATES = frozenset({"pending", "running", "paused", "rolling_back"})
_LIST_COLUMNS = (
    "rollout_id",
    "model",
    "state",
    "wave",
    "node_counts",
    "created_by",
    "created_at",
    "updated_at",
    "reason",
)
_EVENT_COLUMNS = ("ts", "node_id", "state", "code", "reason")


# ----- rollout start ----------------------------------------------------------------------


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise UsageError("must be above zero")
    return seconds


def _milliseconds(text: str) -> float:
    return 1000.0 * parse_duration(text)


def _show_milliseconds(value: float) -> str:
    return format_duration(value / 1000.0)


def _any_fraction(text: str) -> float:
    return parse_fraction(text, maximum=None)


def _gates(text: str) -> list[str]:
    gates = [g.strip() for g in text.split(",") if g.strip()]
    unknown = sorted(set(gates) - {"errors", "latency"})
    if not gates or unknown:
        raise UsageError("must be errors, latency or errors,latency")
    return gates


def _show_gates(gates: Sequence[str]) -> str:
    return ",".join(gates)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise UsageError("must be at least 1")
    return value


@dataclass(frozen=True, slots=True)
class _Tunable:
    """A ``rollout start`` flag that sets one :class:`RolloutPolicy` field from text."""

    option: str
    field: str
    parse: Callable[[str], Any]
    show: Callable[[Any], str]
    """The field's value written the way the flag takes it (for ``--help``)."""
    help: str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")


_TUNABLES = (
    _Tunable("--waves", "waves", parse_waves, format_waves, "cumulative percentages"),
    _Tunable(
        "--max-failures",
        "max_failures",
        parse_fraction,
        format_fraction,
        "halt above this share of the nodes enrolled so far",
    ),
    _Tunable(
        "--wave-timeout",
        "wave_timeout_s",
        _positive_duration,
        format_duration,
        "time a node has from its command to activation",
        "DURATION",
    ),
    _Tunable(
        "--health-window",
        "health_window_s",
        parse_duration,
        format_duration,
        "how long an activated node must stay healthy",
        "DURATION",
    ),
    _Tunable(
        "--gate",
        "gates",
        _gates,
        _show_gates,
        "health gates: errors, latency or both",
        "GATES",
    ),
    _Tunable(
        "--max-latency-regression",
        "max_latency_regression",
        _any_fraction,
        format_fraction,
        "median latency growth allowed over the reference",
    ),
    _Tunable(
        "--min-latency-regression",
        "min_latency_regression_ms",
        _milliseconds,
        _show_milliseconds,
        "latency growth below this is noise, never a regression",
        "DURATION",
    ),
    _Tunable(
        "--max-error-increase",
        "max_error_increase",
        parse_fraction,
        format_fraction,
        "error-rate growth allowed over the reference",
    ),
    _Tunable(
        "--confidence",
        "confidence",
        parse_fraction,
        format_fraction,
        "how sure the gate must be of a breach",
    ),
    _Tunable(
        "--min-samples",
        "min_samples",
        _count,
        str,
        "runs each side needs before the gate judges",
        "N",
    ),
    _Tunable(
        "--breach-evaluations",
        "breach_evaluations",
        _count,
        str,
        "consecutive breaching judgements that fail a node",
        "N",
    ),
    _Tunable(
        "--retry-backoff",
        "retry_backoff_s",
        parse_duration,
        format_duration,
        "first retry delay, doubled for each further retry",
        "DURATION",
    ),
)


def _default(field: str, show: Callable[[Any], str] = str) -> str:
    """``(default ...)`` for ``--help``, escaped for argparse's %-formatting."""
    return f"(default {show(getattr(DEFAULT_POLICY, field))})".replace("%", "%%")


def policy_request(args: argparse.Namespace) -> dict[str, Any]:
    """``model``, ``select`` and the policy flags given (:func:`add_policy_flags`).

    Raises: UsageError naming the flag.
    """
    name, version = parse_model_ref(args.model)
    request: dict[str, Any] = {"model": f"{name}@{version}"}
    for tunable in _TUNABLES:
        text = getattr(args, tunable.dest)
        if text is not None:
            request[tunable.field] = named(tunable.option, tunable.parse, text)
    if args.auto_rollback is not None:
        request["auto_rollback"] = args.auto_rollback
    if args.max_retries is not None:
        request["max_retries"] = args.max_retries
    if args.select is not None:
        request["select"] = named("--select", parse_select, args.select)
    return request


def start_request(args: argparse.Namespace, *, now: float) -> dict[str, Any]:
    """The ``rollout.start`` arguments: ``model`` and the flags given, nothing else.

    Raises:
        UsageError: a flag's value (the message names the flag), or the request as
            the controller would check it (the message names the field).
    """
    request = policy_request(args)
    if args.activate_at is not None:
        request["activate_at"] = named(
            "--activate-at", lambda t: parse_activate_at(t, now=now), args.activate_at
        )
    if args.id is not None:
        request["rollout_id"] = check_id(args.id, "rollout id")
    for flag in ("dry_run", "force"):
        if getattr(args, flag):
            request[flag] = True
    return common.checked(ROLLOUT_START, request, now=now)


def _rollout_view(status: Any) -> RenderableType:
    from fleet_controller import console as view

    return view.rollout_view(status)


def _plan_view(plan: Any) -> RenderableType:
    from fleet_controller import console as view

    return view.plan_view(plan)


def _rollout_start(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    request = start_request(args, now=time.time())
    answer = common.mapping(
        asyncio.run(common.call(settings, ROLLOUT_START, request)), ROLLOUT_START.name
    )
    common.emit(args, answer, _plan_view if answer.get("dry_run") else _rollout_view)
    return 0


# ----- one rollout by id ------------------------------------------------------------------


def _ref(operation: Operation[RolloutRef], args: argparse.Namespace) -> dict[str, Any]:
    """``{"rollout_id": ...}`` from the ROLLOUT_ID argument. Raises: UsageError."""
    return common.checked(operation, {"rollout_id": check_id(args.id, "rollout id")})


def _rollout_status(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    request = _ref(ROLLOUT_STATUS, args)
    if args.watch and not args.json:
        return asyncio.run(_watch_rollout(settings, request))
    answer = asyncio.run(common.call(settings, ROLLOUT_STATUS, request))
    common.emit(args, common.mapping(answer, ROLLOUT_STATUS.name), _rollout_view)
    return 0


async def _watch_rollout(settings: common.Settings, request: dict[str, Any]) -> int:
    """Redraw the rollout every second until it ends (0 if it succeeded, else 1) or Ctrl-C."""
    from rich.live import Live

    from fleet_controller import console as view

    stop = asyncio.Event()
    async with common.controller(settings) as ctl:
        status = common.mapping(await ctl.call(ROLLOUT_STATUS.name, request), ROLLOUT_STATUS.name)
        with (
            view.stop_on_signals(stop),
            Live(view.rollout_view(status), console=common.stdout(), auto_refresh=False) as live,
        ):
            while status.get("state") in _ACTIVE_ROLLOUT_STATES and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                if stop.is_set():
                    break
                note = None
                try:
                    status = common.mapping(
                        await ctl.call(ROLLOUT_STATUS.name, request), ROLLOUT_STATUS.name
                    )
                except TransportError as exc:
                    note = f"{exc} (retrying)"
                live.update(view.rollout_view(status, note=note), refresh=True)
    if stop.is_set():
        return 0
    return 0 if status.get("state") == _ENDED_OK else 1


def events_table(rollout_id: str, events: Sequence[dict[str, Any]]) -> Table:
    """The ``rollout events`` table: one row per node state change, in the order given.

    The columns are fixed, so a rollout without events yet still shows them.
    """
    from rich.table import Table
    from rich.text import Text

    from fleet_controller import console as view

    table = Table(title=f"rollout {rollout_id} events")
    for key in _EVENT_COLUMNS:
        table.add_column(key.replace("_", " "))
    for event in events:
        table.add_row(*(Text(view.format_value(k, event.get(k))) for k in _EVENT_COLUMNS))
    if not events:
        table.caption = "(none)"
    return table


def _rollout_events(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    request = _ref(ROLLOUT_EVENTS, args)
    events = common.rows(
        asyncio.run(common.call(settings, ROLLOUT_EVENTS, request)), ROLLOUT_EVENTS.name
    )
    common.emit(args, events, lambda e: events_table(request["rollout_id"], e))
    return 0


def _rollout_change(operation: Operation[RolloutRef]) -> common.Handler:
    def handler(args: argparse.Namespace) -> int:
        settings = common.settings_from(args)
        request = _ref(operation, args)
        answer = asyncio.run(common.call(settings, operation, request))
        common.emit(args, common.mapping(answer, operation.name), _rollout_view)
        return 0

    return handler


def _list_view(rows: Any, title: str) -> RenderableType:
    from fleet_controller import console as view

    return view.records_table(rows, title=title, columns=_LIST_COLUMNS)


def _rollout_list(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    request = common.checked(ROLLOUT_LIST, {"active_only": args.active})
    rows = common.rows(asyncio.run(common.call(settings, ROLLOUT_LIST, request)), ROLLOUT_LIST.name)
    title = "active rollouts" if args.active else "rollouts"
    common.emit(args, rows, lambda r: _list_view(r, title))
    return 0


# ----- the parser -------------------------------------------------------------------------


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """``--select`` and the rollout policy's flags (read by :func:`policy_request`)."""
    parser.add_argument("--select", metavar="K=V,...", help="label selector (default: every node)")
    for tunable in _TUNABLES:
        parser.add_argument(
            tunable.option,
            metavar=tunable.metavar,
            help=f"{tunable.help} {_default(tunable.field, tunable.show)}",
        )
    parser.add_argument(
        "--auto-rollback",
        action=argparse.BooleanOptionalAction,
        help="roll activated nodes back when the rollout fails "
        + _default("auto_rollback", lambda on: "yes" if on else "no"),
    )
    parser.add_argument(
        "--max-retries",
        type=whole_number(0, 100),
        help=f"per node, 0 to 100 {_default('max_retries')}",
    )


def _add_start(actions: common.Commands, parents: common.Parents) -> None:
    start = common.add_command(
        actions,
        "start",
        _rollout_start,
        "start a staged rollout",
        parents.with_json,
        description="Flags left out take the controller's defaults, shown here.",
    )
    start.add_argument("model", metavar="NAME@VERSION")
    add_policy_flags(start)
    start.add_argument(
        "--activate-at",
        metavar="TIME",
        help="ISO 8601 with zone, UNIX seconds, or +DURATION (default: at once)",
    )
    start.add_argument("--id", help="rollout id (default: generated)")
    start.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (waves, offline nodes, refusals, overlaps) and start nothing",
    )
    start.add_argument(
        "--force", action="store_true", help="start even if another active rollout overlaps"
    )


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``rollout`` and its actions to ``commands``."""
    rollout = commands.add_parser("rollout", help=help_of("rollout"))
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    _add_start(actions, parents)
    status = common.add_command(
        actions,
        "status",
        _rollout_status,
        "show a rollout and its nodes",
        parents.with_json,
        description="--watch redraws every second until the rollout ends (exit 0 when it "
        "succeeded, 1 otherwise) or Ctrl-C (exit 0). --json prints one document and ignores "
        "--watch.",
    )
    status.add_argument("id", metavar="ROLLOUT_ID")
    status.add_argument("--watch", action="store_true", help="follow it live")
    listing = common.add_command(actions, "list", _rollout_list, "list rollouts", parents.with_json)
    listing.add_argument("--active", action="store_true", help="only those not ended")
    events = common.add_command(
        actions,
        "events",
        _rollout_events,
        "show a rollout's node state changes, oldest first",
        parents.with_json,
    )
    events.add_argument("id", metavar="ROLLOUT_ID")
    for operation, help_text in (
        (ROLLOUT_PAUSE, "pause a rollout"),
        (ROLLOUT_RESUME, "resume a paused rollout"),
        (ROLLOUT_ABORT, "stop a rollout; activated nodes keep the new model"),
        (ROLLOUT_ROLLBACK, "stop a rollout and roll its activated nodes back"),
    ):
        action = operation.name.removeprefix("rollout.")
        change = common.add_command(
            actions, action, _rollout_change(operation), help_text, parents.with_json
        )
        change.add_argument("id", metavar="ROLLOUT_ID")
