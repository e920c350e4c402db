"""``fleetctl``: the operator's command line.

Exit codes (the contract scripts rely on): 0 ok, 1 operation failed, 2 usage or
input error. Every EdgeFleet error is printed as one line on stderr; a
traceback is never shown. Listing and status commands take ``--json`` and then
print exactly one JSON document on stdout.

This package keeps one module per command group; each has a
``register(commands, parents)`` that adds its subcommands, with their handlers,
to the top-level parser. Flag values are parsed by the pure functions of
:mod:`~fleet_controller.cli.flags`, which raise
:class:`~shared.errors.UsageError` (exit 2) with a one-line reason; what every
command shares (global options, settings, the controller, output) is in
:mod:`~fleet_controller.cli.common`. Everything a command can check locally is
checked before it contacts the broker.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from fleet_controller.api import OperationError
from fleet_controller.cli import (
    broker,
    common,
    demo,
    deployments,
    fleet,
    keys,
    models,
    operators,
    rollouts,
    serve,
    top,
)
from shared import __version__
from shared.errors import DecodeError, EdgeFleetError

__all__ = ["build_parser", "main"]

_GROUPS: tuple[Callable[[common.Commands, common.Parents], None], ...] = (
    keys.register,
    operators.register,
    serve.register,
    models.register,
    rollouts.register,
    deployments.register,
    fleet.register,
    top.register,
    demo.register,
    broker.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``fleetctl`` parser: every command group's subcommands, each with its handler."""
    parser = common.Parser(
        prog="fleetctl", description="Operate an EdgeFleet: keys, models, rollouts, nodes."
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = common.option_groups()
    for register in _GROUPS:
        register(commands, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fleetctl`` with ``argv``; returns the exit code (never raises, never a traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2, one line printed), --help or --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    handler: common.Handler = args.handler
    try:
        return handler(args)
    except OperationError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return exc.code
    except DecodeError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 2
    except EdgeFleetError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fleetctl: {common.first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleetctl: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get(common.DEBUG_ENV):
            raise
        print(
            f"fleetctl: unexpected {type(exc).__name__}: {common.first_line(exc)} "
            f"(a bug: set {common.DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
