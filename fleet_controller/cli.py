"""``fleetctl``: the operator's command line.

Exit codes (the contract scripts rely on): 0 ok, 1 operation failed, 2 usage or
input error. Every EdgeFleet error is printed as one line on stderr; a
traceback is never shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleet_controller.keys import DEFAULT_TRUST_DAYS, init_keys, rotate_key
from shared import __version__
from shared.errors import DecodeError, EdgeFleetError
from shared.trust import Role, TrustList

__all__ = ["main"]

PASSPHRASE_ENV = "FLEET_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
KEYS_ENV = "FLEET_KEYS"

Handler = Callable[[argparse.Namespace], int]


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _keys_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir or os.environ.get(KEYS_ENV) or "keys")


def _print_trust(trust: TrustList, directory: Path, *, as_json: bool) -> None:
    roles = sorted(trust.roles.items())
    rows = [
        {"role": role.value, "keyids": list(entry.keyids), "threshold": entry.threshold}
        for role, entry in roles
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "dir": str(directory),
                    "trust_version": trust.version,
                    "expires_at": trust.expires_at,
                    "roles": rows,
                }
            )
        )
        return
    table = Table(title=f"trust v{trust.version} in {directory}")
    table.add_column("role")
    table.add_column("key id")
    table.add_column("threshold", justify="right")
    for role, entry in roles:
        table.add_row(role.value, ", ".join(k[:16] for k in entry.keyids), str(entry.threshold))
    Console().print(table)
    expires = time.strftime("%Y-%m-%d", time.gmtime(trust.expires_at))
    Console().print(f"trust.json expires {expires}; copy it to every node")


def _keys_init(args: argparse.Namespace) -> int:
    directory = _keys_dir(args)
    keyset = init_keys(
        directory,
        now=time.time(),
        passphrase=_passphrase(),
        force=args.force,
        valid_days=args.valid_days,
    )
    _print_trust(keyset.trust, directory, as_json=args.json)
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    directory = _keys_dir(args)
    keyset = rotate_key(
        directory,
        Role(args.role),
        now=time.time(),
        passphrase=_passphrase(),
        valid_days=args.valid_days,
    )
    _print_trust(keyset.trust, directory, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetctl", description="Operate an EdgeFleet: keys, models, rollouts, nodes."
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = commands.add_parser("keys", help="create and rotate signing keys and trust.json")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help=f"key directory (env {KEYS_ENV}, default ./keys)")
    common.add_argument(
        "--valid-days", type=int, default=DEFAULT_TRUST_DAYS, help="trust list lifetime"
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    init = key_commands.add_parser(
        "init",
        parents=[common],
        help="create root, release and rollout keys and trust.json",
        description=f"Private keys are encrypted when {PASSPHRASE_ENV} is set.",
    )
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(handler=_keys_init)

    rotate = key_commands.add_parser(
        "rotate", parents=[common], help="issue a new key for a role and trust list N+1"
    )
    rotate.add_argument("--role", required=True, choices=[r.value for r in Role])
    rotate.set_defaults(handler=_keys_rotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except DecodeError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 2
    except EdgeFleetError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleetctl: interrupted", file=sys.stderr)
        return 1
