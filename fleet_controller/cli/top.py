"""``fleetctl top``: the live console of the fleet's nodes.

It reads the nodes' MQTT topics directly and needs no controller; the view
and the subscription loop live in :mod:`fleet_controller.console`, this module
only checks the flags and prints the ``--once`` snapshot.
"""

from __future__ import annotations

import argparse
import asyncio

from fleet_controller import console as view
from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import named, parse_positive_duration
from shared.errors import UsageError

__all__ = ["MAX_INTERVAL_S", "register"]

MAX_INTERVAL_S = 3600.0


def _top(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    if args.json and not args.once:
        raise UsageError("--json needs --once (one snapshot)")
    interval_s = named(
        "--interval", lambda t: parse_positive_duration(t, maximum_s=MAX_INTERVAL_S), args.interval
    )
    snapshot = asyncio.run(
        view.run_top(
            settings.transport(),
            fleet=settings.fleet,
            interval_s=interval_s,
            once=args.once,
            console=common.stdout(),
        )
    )
    if snapshot is not None:
        rows = [view.NodeRow(**n) for n in snapshot["nodes"]]
        common.emit(
            args,
            snapshot,
            lambda _: view.top_table(settings.fleet, rows, malformed=snapshot["malformed"]),
        )
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``top`` to ``commands``."""
    top = common.add_command(
        commands,
        "top",
        _top,
        help_of("top"),
        parents.with_json,
        description="Subscribes read-only to the nodes' state, telemetry and status. "
        "--once prints one snapshot after --interval (with --json: one JSON document).",
    )
    top.add_argument("--once", action="store_true", help="collect, print one snapshot, exit")
    top.add_argument(
        "--interval", default="2s", metavar="DURATION", help="refresh period / --once wait (2s)"
    )
