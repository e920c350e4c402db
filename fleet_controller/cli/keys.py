"""``fleetctl keys init|rotate|push``: signing keys and ``trust.json``.

``init`` and ``rotate`` work on the key directory only (never the broker);
``push`` sends the current ``trust.json`` to the fleet through the controller.
Private keys are encrypted when ``FLEET_KEY_PASSPHRASE`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import whole_number
from fleet_controller.keys import DEFAULT_TRUST_DAYS, init_keys, rotate_key, trust_path
from shared.errors import UsageError
from shared.operations import TRUST_PUSH
from shared.trust import Role, TrustList

__all__ = ["MAX_TRUST_DAYS", "register"]

MAX_TRUST_DAYS = 3650  # ten years: a trust list that outlives its keys' custody is a risk


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
    from rich.console import Console
    from rich.table import Table

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
    directory = common.keys_dir(args.dir)
    keyset = init_keys(
        directory,
        now=time.time(),
        passphrase=common.passphrase(),
        force=args.force,
        valid_days=args.valid_days,
    )
    _print_trust(keyset.trust, directory, as_json=args.json)
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    directory = common.keys_dir(args.dir)
    keyset = rotate_key(
        directory,
        Role(args.role),
        now=time.time(),
        passphrase=common.passphrase(),
        valid_days=args.valid_days,
    )
    _print_trust(keyset.trust, directory, as_json=args.json)
    return 0


def _keys_push(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    directory = common.keys_dir(args.dir)
    try:
        text = trust_path(directory).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {trust_path(directory)}: {exc.strerror}") from None
    request = common.checked(TRUST_PUSH, {"trust": text})
    result = common.mapping(
        asyncio.run(common.call(settings, TRUST_PUSH, request)), TRUST_PUSH.name
    )
    if args.json:
        print(json.dumps(result))
    else:
        common.stdout().print(
            f"trust v{result['version']} sent to the fleet as {result['rollout_id']} "
            "(retained: nodes offline now take it when they return)",
            highlight=False,
        )
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``keys`` and its actions to ``commands``."""
    keys = commands.add_parser("keys", help=help_of("keys"))
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_options = common.key_dir_options()
    key_options.add_argument(
        "--valid-days",
        type=whole_number(1, MAX_TRUST_DAYS),
        default=DEFAULT_TRUST_DAYS,
        help=f"trust list lifetime in days, 1 to {MAX_TRUST_DAYS} ({DEFAULT_TRUST_DAYS})",
    )
    with_keys = [*parents.with_json, key_options]
    init = common.add_command(
        actions,
        "init",
        _keys_init,
        "create root, release and rollout keys and trust.json",
        with_keys,
        description=f"Private keys are encrypted when {common.PASSPHRASE_ENV} is set.",
    )
    init.add_argument("--force", action="store_true", help="replace existing keys")
    rotate = common.add_command(
        actions, "rotate", _keys_rotate, "issue a new key for a role and trust list N+1", with_keys
    )
    rotate.add_argument("--role", required=True, choices=[r.value for r in Role])
    common.add_command(
        actions,
        "push",
        _keys_push,
        "send trust.json (after a rotation) to every node over the air",
        with_keys,
    )
