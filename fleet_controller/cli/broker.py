"""``fleetctl broker init`` and ``fleetctl node enroll|revoke``: the secure Mosquitto setup.

``broker init`` renders ``secure.conf`` and the ACL from the templates in
:mod:`broker_config` into a directory (atomically, and never replacing the
password file); ``node enroll|revoke`` edit that password file through
``mosquitto_passwd``. Reserved usernames (``controller``, ``operator*``) are
refused before anything is written. ``revoke`` also tells the controller, and
only warns if it cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fleet_controller.cli import common, deployments
from fleet_controller.cli.flags import (
    check_node_username,
    parse_operators,
    render_acl,
    render_secure_conf,
)
from shared.errors import EdgeFleetError, UsageError
from shared.operations import NODE_REVOKE

__all__ = ["BROKER_FILES", "register"]

BROKER_FILES = ("secure.conf", "acl", "passwd")
_RELOAD_HINT = "reload the broker so it takes effect: kill -HUP $(pidof mosquitto)"


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write atomically (temp file + ``os.replace``) with ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _print_next_steps(directory: Path, operators: Sequence[str], *, kept: bool) -> None:
    conf, acl, passwd = (directory / name for name in BROKER_FILES)
    out = common.stdout()
    out.print(f"wrote {conf}, {acl}" + (f"; kept {passwd}" if kept else f" and an empty {passwd}"))
    out.print("next steps:", highlight=False)
    steps = [
        f"mosquitto_passwd {passwd} controller          # the controller's login",
        *(f"mosquitto_passwd {passwd} {op}" for op in operators),
        f"fleetctl node enroll NODE_ID --passwd-file {passwd}   # one per node",
        f"chgrp mosquitto {directory} {acl} {passwd}   # the broker drops root and must read them",
        "put ca.crt, broker.crt, broker.key where secure.conf says (or edit those lines)",
        f"mosquitto -c {conf}",
        "after changing the password or ACL file: kill -HUP $(pidof mosquitto)",
    ]
    for step in steps:
        out.print(f"  {step}", highlight=False, markup=False)


def _broker_init(args: argparse.Namespace) -> int:
    from broker_config import config_path  # noqa: PLC0415 - only `broker init` reads the templates

    operators = parse_operators(args.operators or "")
    directory = Path(args.dir)
    conf, acl, passwd = (directory / name for name in BROKER_FILES)
    existing = [p.name for p in (conf, acl, passwd) if p.exists()]
    if existing and not args.force:
        raise EdgeFleetError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace "
            "the config and ACL (the password file is always kept)"
        )
    secure_text = render_secure_conf(
        config_path("secure.conf").read_text(encoding="utf-8"),
        passwd_file=passwd.absolute(),
        acl_file=acl.absolute(),
    )
    acl_text = render_acl(config_path("acl.template").read_text(encoding="utf-8"), operators)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        _write_file(conf, secure_text, 0o644)
        _write_file(acl, acl_text, 0o640)
        kept = passwd.exists()
        if not kept:
            _write_file(passwd, "", 0o640)
    except OSError as exc:
        raise EdgeFleetError(f"cannot write into {directory}: {exc.strerror}") from None
    if args.json:
        result = {
            "dir": str(directory),
            "config": str(conf),
            "acl": str(acl),
            "passwd": str(passwd),
            "passwd_kept": kept,
            "operators": operators,
        }
        print(json.dumps(result))
    else:
        _print_next_steps(directory, operators, kept=kept)
    return 0


def _enrolled(passwd: Path, username: str) -> bool:
    """Raises: UsageError when the password file cannot be read."""
    try:
        lines = passwd.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(
            f"password file {passwd} does not exist: create it with `fleetctl broker init`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read password file {passwd}: {common.first_line(exc)}") from None
    return any(line.split(":", 1)[0] == username for line in lines)


def _mosquitto_passwd(arguments: Sequence[str]) -> None:
    """Run ``mosquitto_passwd`` with ``arguments``.

    Raises:
        EdgeFleetError: it is not installed or it fails.
    """
    program = shutil.which("mosquitto_passwd")
    if program is None:
        raise EdgeFleetError(
            "mosquitto_passwd not found: install mosquitto (apt install mosquitto)"
        )
    try:
        done = subprocess.run(  # noqa: S603 - fixed program, arguments checked by check_id
            [program, *arguments], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgeFleetError(f"mosquitto_passwd failed: {common.first_line(exc)}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise EdgeFleetError(
            f"mosquitto_passwd failed: {message[0] if message else f'exit {done.returncode}'}"
        )


def _node_enroll(args: argparse.Namespace) -> int:
    node = check_node_username(args.id)
    passwd = Path(args.passwd_file)
    if _enrolled(passwd, node) and not args.force:
        raise EdgeFleetError(
            f"node {node} is already enrolled in {passwd}; pass --force to issue a new password"
        )
    password = secrets.token_urlsafe(24)
    # -b puts the password on mosquitto_passwd's command line for a moment
    # (visible in `ps` on this host); it is never written anywhere else.
    _mosquitto_passwd(["-b", str(passwd), node, password])
    if args.json:
        print(json.dumps({"node": node, "username": node, "password": password}))
        return 0
    out = common.stdout()
    out.print(f"node {node} enrolled in {passwd}", highlight=False)
    out.print(f"password (shown once, store it on the node): {password}", highlight=False)
    out.print(
        f"the node connects with --broker mqtts://{node}:PASSWORD@BROKER:8883", highlight=False
    )
    out.print(_RELOAD_HINT, highlight=False, markup=False)
    return 0


def _tell_controller(args: argparse.Namespace, node: str) -> bool:
    """Mark ``node`` revoked on the controller; False (and a warning) if that failed."""
    try:
        settings = common.settings_from(args)
        request = common.checked(NODE_REVOKE, {"node_id": node})
        asyncio.run(common.call(settings, NODE_REVOKE, request))
    except EdgeFleetError as exc:
        print(f"fleetctl: warning: the controller was not told ({exc})", file=sys.stderr)
        return False
    return True


def _node_revoke(args: argparse.Namespace) -> int:
    node = check_node_username(args.id)
    passwd = Path(args.passwd_file)
    if not _enrolled(passwd, node):
        raise EdgeFleetError(f"node {node} is not enrolled in {passwd}")
    _mosquitto_passwd(["-D", str(passwd), node])
    # Also tell the controller, so rollouts stop selecting the node.
    told = _tell_controller(args, node)
    if args.json:
        print(json.dumps({"node": node, "revoked": True, "controller_told": told}))
        return 0
    out = common.stdout()
    out.print(f"node {node} removed from {passwd}", highlight=False)
    if told:
        out.print("the controller marked it revoked: rollouts no longer select it")
    out.print(_RELOAD_HINT, highlight=False, markup=False)
    out.print(
        "on reload Mosquitto 2.0 disconnects the node and refuses it from then on",
        highlight=False,
    )
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``broker`` and ``node`` and their actions to ``commands``."""
    broker = commands.add_parser("broker", help="secure Mosquitto configuration")
    broker_actions = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    init = common.add_command(
        broker_actions,
        "init",
        _broker_init,
        "write secure.conf, acl and an empty passwd into a directory",
        parents.with_json,
    )
    init.add_argument("--dir", required=True, help="where to write the files")
    init.add_argument(
        "--operators", default="", metavar="NAME,...", help="operator usernames (operator-*)"
    )
    init.add_argument(
        "--force", action="store_true", help="replace config and ACL (passwd is kept)"
    )
    node = commands.add_parser(
        "node", help="nodes: broker credentials, operators' labels, forgetting"
    )
    node_actions = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    enroll = common.add_command(
        node_actions,
        "enroll",
        _node_enroll,
        "give a node a broker username and a new password (printed once)",
        parents.with_json,
    )
    enroll.add_argument("id", metavar="NODE_ID")
    enroll.add_argument("--passwd-file", required=True, help="Mosquitto password file")
    enroll.add_argument("--force", action="store_true", help="replace an existing password")
    revoke = common.add_command(
        node_actions,
        "revoke",
        _node_revoke,
        "remove a node's broker username",
        parents.with_json,
    )
    revoke.add_argument("id", metavar="NODE_ID")
    revoke.add_argument("--passwd-file", required=True, help="Mosquitto password file")
    deployments.add_node_actions(node_actions, parents)
