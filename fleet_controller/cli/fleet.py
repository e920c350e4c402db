"""``fleetctl nodes``, ``fleetctl audit`` and ``fleetctl report``: what the controller knows.

Read-only questions to the controller's database; each request is checked
locally (``--select``, ``--limit``) before the broker is contacted. The tables
are drawn by :mod:`fleet_controller.console`, imported (with rich) only when
one is drawn: with ``--json`` these commands load the operator API client only.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import named, parse_select, whole_number
from shared.operations import AUDIT_LIST, NODES_LIST, REPORT

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["register"]

_NODE_COLUMNS = ("node_id", "online", "model", "labels", "agent_version", "last_seen", "revoked")
_AUDIT_COLUMNS = ("ts", "operator", "action", "outcome", "detail", "args")


def _table(title: str, columns: tuple[str, ...]) -> common.Render:
    def render(rows: Any) -> RenderableType:
        from fleet_controller import console as view

        return view.records_table(rows, title=title, columns=columns)

    return render


def _report_view(report: Any) -> RenderableType:
    from fleet_controller import console as view

    return view.report_view(report)


def _nodes(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    select = named("--select", parse_select, args.select)
    request = common.checked(NODES_LIST, {"select": select})
    rows = common.rows(asyncio.run(common.call(settings, NODES_LIST, request)), NODES_LIST.name)
    common.emit(args, rows, _table(f"nodes ({select})" if select else "nodes", _NODE_COLUMNS))
    return 0


def _audit(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    request = common.checked(AUDIT_LIST, {"limit": args.limit})
    rows = common.rows(asyncio.run(common.call(settings, AUDIT_LIST, request)), AUDIT_LIST.name)
    common.emit(args, rows, _table("audit log", _AUDIT_COLUMNS))
    return 0


def _report(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    report = common.mapping(asyncio.run(common.call(settings, REPORT)), REPORT.name)
    common.emit(args, report, _report_view)
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``nodes``, ``audit`` and ``report`` to ``commands``."""
    nodes = common.add_command(commands, "nodes", _nodes, help_of("nodes"), parents.with_json)
    nodes.add_argument("--select", default="", metavar="K=V,...", help="label selector")
    audit = common.add_command(commands, "audit", _audit, help_of("audit"), parents.with_json)
    audit.add_argument(
        "--limit", type=whole_number(1, 100_000), default=100, help="newest N entries (100)"
    )
    common.add_command(commands, "report", _report, help_of("report"), parents.with_json)
