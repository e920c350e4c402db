"""``fleetctl``: the operator's command line.

Exit codes (the contract scripts rely on): 0 ok, 1 operation failed, 2 usage or
input error. Every EdgeFleet error is printed as one line on stderr; a
traceback is never shown. Listing and status commands take ``--json`` and then
print exactly one JSON document on stdout.

This package keeps one module per command group; each has a
``register(commands, parents)`` that adds its subcommands, with their handlers,
to the top-level parser. Only the group of the command being run is imported
(:data:`~fleet_controller.cli.catalog.COMMANDS` names each command's group and
help for ``fleetctl --help``), and a group imports rich only to draw tables, so
``fleetctl nodes --json`` needs no more than the operator API client: no
onnxruntime, onnx, rich or SQLAlchemy. Flag values are parsed by the pure functions of
:mod:`~fleet_controller.cli.flags`, which raise
:class:`~shared.errors.UsageError` (exit 2) with a one-line reason; what every
command shares (global options, settings, the controller, output) is in
:mod:`~fleet_controller.cli.common`. Everything a command can check locally is
checked before it contacts the broker.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fleet_controller.cli import common
from fleet_controller.cli.catalog import COMMANDS
from shared import __version__
from shared.errors import DecodeError, EdgeFleetError

__all__ = ["build_parser", "main"]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``fleetctl`` parser for ``argv``.

    Only the group of the command ``argv`` names is imported and registered in
    full, with its handlers; every other command is listed by its name and help
    (:data:`~fleet_controller.cli.catalog.COMMANDS`), so ``fleetctl nodes --json``
    loads neither the model tools nor the controller service. With ``argv``
    None every group is registered in full.
    """
    parser = common.Parser(
        prog="fleetctl", description="Operate an EdgeFleet: keys, models, rollouts, nodes."
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if argv is None:
        wanted = {command.group for command in COMMANDS.values()}
    else:
        chosen = COMMANDS.get(_command_word(argv) or "")
        wanted = {chosen.group} if chosen else set()
    parents: common.Parents | None = None
    registered: set[str] = set()
    for name, command in COMMANDS.items():
        if command.group in registered:
            continue
        if command.group in wanted:
            parents = parents or common.option_groups()
            module = importlib.import_module(f"fleet_controller.cli.{command.group}")
            module.register(commands, parents)
            registered.add(command.group)
        else:
            commands.add_parser(name, help=command.help, add_help=False)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the only
    options before a command are ``--help`` and ``--version``, which take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fleetctl`` with ``argv``; returns the exit code (never raises, never a traceback)."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(words).parse_args(words)
    except SystemExit as exc:  # a usage error (2, one line printed), --help or --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    handler: common.Handler = args.handler
    try:
        return handler(args)
    except DecodeError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 2
    except EdgeFleetError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return _exit_code(exc)
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


def _exit_code(exc: EdgeFleetError) -> int:
    """The code of an operation the controller refused (1 or 2); 1 for any other failure."""
    # The operator API client is imported here, not at the top: a command that
    # raised an OperationError has imported it already, and --help never needs it.
    from fleet_controller.api import OperationError

    return exc.code if isinstance(exc, OperationError) else 1
