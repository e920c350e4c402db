"""``fleetctl operator add|remove|list``: who may ask the controller for what.

Operators are named in ``trust.json`` with their public keys and a role
(viewer, deployer, admin); ``add`` and ``remove`` write trust list N+1 signed
by the root key in the key directory, so they run where the root key is.
The controller and the nodes take the new list from ``fleetctl keys push``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.keys import (
    DEFAULT_TRUST_DAYS,
    KeySet,
    add_operator,
    load_trust,
    operator_key_path,
    public_key_entry,
    remove_operator,
)
from shared.errors import UsageError
from shared.trust import OperatorRole, TrustList

__all__ = ["register"]


def _operator_rows(trust: TrustList, directory: Path) -> list[dict[str, object]]:
    return [
        {
            "operator": name,
            "role": entry.role.value,
            "keyids": list(entry.keyids),
            "key_file": (
                str(operator_key_path(directory, name))
                if operator_key_path(directory, name).exists()
                else None
            ),
        }
        for name, entry in sorted(trust.operators.items())
    ]


def _print(keyset: KeySet, args: argparse.Namespace, message: str | None) -> None:
    trust = keyset.trust
    rows = _operator_rows(trust, keyset.directory)
    if args.json:
        print(json.dumps({"trust_version": trust.version, "operators": rows}))
        return
    from rich.table import Table

    table = Table(title=f"operators in trust v{trust.version}")
    table.add_column("operator")
    table.add_column("role")
    table.add_column("key id")
    table.add_column("private key here")
    for row in rows:
        keyids = row["keyids"]
        assert isinstance(keyids, list)
        table.add_row(
            str(row["operator"]),
            str(row["role"]),
            ", ".join(k[:16] for k in keyids),
            str(row["key_file"] or "-"),
        )
    console = common.stdout()
    console.print(table)
    if message:
        console.print(message, highlight=False)


def _add(args: argparse.Namespace) -> int:
    directory = common.keys_dir(args.dir)
    public = None
    if args.public_key:
        try:
            public = public_key_entry(Path(args.public_key).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {args.public_key}: {exc.strerror}") from None
    keyset = add_operator(
        directory,
        args.name,
        OperatorRole(args.role),
        public=public,
        now=time.time(),
        passphrase=common.passphrase(),
        valid_days=DEFAULT_TRUST_DAYS,
    )
    where = "" if public else f"; their private key is {operator_key_path(directory, args.name)}"
    message = f"{args.name} has the {args.role} role{where}. Run `fleetctl keys push` next."
    _print(keyset, args, message)
    return 0


def _remove(args: argparse.Namespace) -> int:
    directory = common.keys_dir(args.dir)
    keyset = remove_operator(directory, args.name, now=time.time(), passphrase=common.passphrase())
    _print(keyset, args, f"{args.name} removed. Run `fleetctl keys push` next.")
    return 0


def _list(args: argparse.Namespace) -> int:
    directory = common.keys_dir(args.dir)
    trust = load_trust(directory, now=time.time()).trust
    _print(KeySet(directory, trust), args, None)
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``operator`` and its actions to ``commands``."""
    operator = commands.add_parser("operator", help=help_of("operator"))
    actions = operator.add_subparsers(dest="operator_command", required=True, metavar="ACTION")
    key_options = common.key_dir_options()
    with_keys = [*parents.with_json, key_options]
    add = common.add_command(
        actions,
        "add",
        _add,
        "name an operator (or change their role) in trust list N+1",
        with_keys,
        description=(
            "Without --public-key a key pair is made and the private key written to "
            "KEYS/operators/NAME.pem (mode 0600): hand it to the operator. "
            f"Private keys are encrypted when {common.PASSPHRASE_ENV} is set."
        ),
    )
    add.add_argument("name", metavar="NAME", help="operator name (letters, digits, _ . -)")
    add.add_argument("--role", required=True, choices=[r.value for r in OperatorRole])
    add.add_argument(
        "--public-key",
        metavar="FILE",
        help="the operator's own Ed25519 public key (base64 of the 32 raw bytes)",
    )
    remove = common.add_command(
        actions, "remove", _remove, "drop an operator in trust list N+1", with_keys
    )
    remove.add_argument("name", metavar="NAME")
    common.add_command(actions, "list", _list, "operators and their roles", with_keys)
