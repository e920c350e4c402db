"""``fleetctl broker init|add`` and ``fleetctl node enroll|revoke``: the secure broker.

``broker init`` writes, into one directory, everything a TLS-only Mosquitto
with the dynamic security plugin needs (:mod:`fleet_controller.dynsec`): the
fleet CA and the broker's certificate (``tls/``), ``secure.conf`` pointing at
them, the plugin's ``dynamic-security.json`` with the broker admin, the
controller replicas and the operators, and each of those clients' credentials
(``credentials/NAME/``: password, client certificate and key, CA; 0600).

``node enroll`` and ``broker add`` change a running broker through the
plugin's control topic, connecting as the broker admin (the global
``--broker``, ``--password-file``, ``--cert-file``, ``--key-file`` and
``--ca-file`` options). ``node revoke`` is an operator request: the controller
marks the node revoked and removes its broker account (``serve --dynsec``).
``node enroll ID --out DIR`` writes the node's enrollment bundle:
``trust.json``, ``ca.crt``, ``client.crt``, ``client.key``, ``password`` and a
``node.toml`` that ``edge-node run --config`` takes as it is.
Secrets are written 0600 and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from fleet_controller.cli import common, deployments
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import check_node_username, parse_names
from shared.broker import parse_broker_url
from shared.errors import EdgeFleetError, UsageError
from shared.operations import NODE_REVOKE

__all__ = ["register"]

_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _write(path: Path, data: bytes | str, mode: int) -> None:
    from edgefleet_io.files import atomic_write  # only writers need it

    atomic_write(path, data.encode() if isinstance(data, str) else data, mode=mode)


def _render_secure_conf(template: str, directory: Path) -> str:
    """``secure.conf`` with its file paths pointing into ``directory``.

    Raises:
        EdgeFleetError: the template lacks one of those settings.
    """
    wanted = {
        "cafile": directory / "tls" / "ca.crt",
        "certfile": directory / "tls" / "broker.crt",
        "keyfile": directory / "tls" / "broker.key",
        "plugin_opt_config_file": directory / "dynamic-security.json",
    }
    lines, found = [], set()
    for line in template.splitlines():
        key = line.split(" ", 1)[0]
        if key in wanted:
            line = f"{key} {wanted[key]}"  # noqa: PLW2901 - the rewritten line
            found.add(key)
        lines.append(line)
    missing = sorted(set(wanted) - found)
    if missing:
        raise EdgeFleetError(f"secure.conf has no {missing[0]} setting")
    return "\n".join(lines) + "\n"


def _write_credentials(
    directory: Path, name: str, password: str, ca: Any, *, broker: str | None = None
) -> Path:
    """``credentials/NAME/``: password, client certificate and key, the CA."""
    where = _private_dir(directory / name)
    _write(where / "password", password + "\n", 0o600)
    ca.issue(name).write(where / "client.crt", where / "client.key")
    _write(where / "ca.crt", ca.cert_pem(), 0o644)
    if broker is not None:
        _write(where / "broker.url", broker + "\n", 0o644)
    return where


def _broker_init(args: argparse.Namespace) -> int:
    from broker_config import config_path  # only `broker init` reads templates
    from fleet_controller import dynsec
    from fleet_controller.certs import CertAuthority

    directory = Path(args.dir).absolute()
    operators = parse_names(args.operators, "operator")
    controllers = parse_names(args.controllers, "controller") or ["controller"]
    clash = sorted(set(operators) & {*controllers, "broker-admin"})
    if clash:
        raise UsageError(f"{clash[0]!r} is named twice (operators, controllers, broker-admin)")
    hosts = tuple(args.host) or ("localhost", "127.0.0.1")
    conf = directory / "secure.conf"
    if conf.exists() and not args.force:
        raise EdgeFleetError(f"{directory} holds a broker already; pass --force to replace it")
    passwords = {name: dynsec.new_password() for name in ("broker-admin", *controllers, *operators)}
    config = dynsec.base_config(
        admin_password=passwords["broker-admin"],
        controllers={name: passwords[name] for name in controllers},
        operators={name: passwords[name] for name in operators},
    )
    ca = CertAuthority.create()
    broker_url = f"mqtts://{hosts[0]}:8883"
    try:
        tls = _private_dir(directory / "tls")
        ca.write(tls / "ca.crt", tls / "ca.key")
        ca.issue(hosts[0], server_names=hosts).write(tls / "broker.crt", tls / "broker.key")
        _write(directory / "dynamic-security.json", json.dumps(config, indent=1), 0o600)
        template = config_path("secure.conf").read_text(encoding="utf-8")
        _write(conf, _render_secure_conf(template, directory), 0o644)
        credentials = _private_dir(directory / "credentials")
        for name, password in passwords.items():
            _write_credentials(credentials, name, password, ca, broker=broker_url)
    except OSError as exc:
        raise EdgeFleetError(f"cannot write into {directory}: {exc.strerror}") from None
    result = {
        "dir": str(directory),
        "config": str(conf),
        "ca": str(tls / "ca.crt"),
        "broker": broker_url,
        "credentials": {name: str(credentials / name) for name in passwords},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    out = common.stdout()
    out.print(f"wrote a TLS-only broker with dynamic security into {directory}", highlight=False)
    for step in (
        f"mosquitto -c {conf}        # as a user that may write {directory}",
        f"credentials for each client: {credentials}/NAME/ (hand each to its owner)",
        f"enroll nodes as the broker admin: fleetctl node enroll NODE --out BUNDLE "
        f"--ca-dir {tls} (see docs/security.md)",
    ):
        out.print(f"  {step}", highlight=False, markup=False)
    return 0


def _control(args: argparse.Namespace, commands: list[dict[str, Any]]) -> None:
    """Send ``commands`` as the broker admin, waiting ``--timeout`` for the answer."""
    from fleet_controller.dynsec import control

    settings = common.settings_from(args)
    if settings.broker.username is None:
        raise UsageError(
            "the broker admin's username is missing: --broker mqtts://broker-admin@HOST"
        )
    asyncio.run(control(settings.transport(), commands, timeout_s=settings.timeout_s))


def _broker_add(args: argparse.Namespace) -> int:
    from fleet_controller import dynsec
    from fleet_controller.certs import CertAuthority

    name = check_node_username(args.name) if args.kind == "controller" else args.name
    parse_names(name, args.kind)
    ca_dir = Path(args.ca_dir)
    ca = CertAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty: credentials are never overwritten")
    password = dynsec.new_password()
    add = dynsec.add_operator if args.kind == "operator" else dynsec.add_controller
    _control(args, add(name, password))
    where = _write_credentials(out.parent, out.name, password, ca)
    _report(args, {"name": name, "kind": args.kind, "credentials": str(where)})
    return 0


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        common.stdout().print(
            ", ".join(f"{k}: {v}" for k, v in result.items()), highlight=False, markup=False
        )


def _node_toml(node: str, broker: str, fleet: str) -> str:
    return (
        "# Written by `fleetctl node enroll`; run it with: edge-node run --config node.toml\n"
        "# Paths are relative to this file. Set `data` to where the node keeps its state.\n"
        "[node]\n"
        f'id = "{node}"\n'
        f'fleet = "{fleet}"\n'
        f'broker = "{broker}"\n'
        'trust = "trust.json"\n'
        'ca_file = "ca.crt"\n'
        'cert_file = "client.crt"\n'
        'key_file = "client.key"\n'
        'password_file = "password"\n'
        f'data = "/var/lib/edgefleet/{node}"\n'
    )


def _node_enroll(args: argparse.Namespace) -> int:
    from fleet_controller import dynsec
    from fleet_controller.certs import CertAuthority
    from fleet_controller.keys import load_trust, trust_path

    node = check_node_username(args.id)
    settings = common.settings_from(args)
    keys = common.keys_dir(args.keys)
    trust = trust_path(keys)
    load_trust(keys, now=time.time())  # the anchor must verify before it ships
    ca_dir = Path(args.ca_dir)
    ca = CertAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty: a bundle is never overwritten")
    node_broker = args.node_broker or _public_url(settings.broker)
    parse_broker_url(node_broker)
    password = dynsec.new_password()
    _control(args, dynsec.enroll_node(node, password))
    try:
        bundle = _private_dir(out)
        _write(bundle / "password", password + "\n", 0o600)
        ca.issue(node).write(bundle / "client.crt", bundle / "client.key")
        _write(bundle / "ca.crt", ca.cert_pem(), 0o644)
        shutil.copyfile(trust, bundle / "trust.json")
        _write(bundle / "node.toml", _node_toml(node, node_broker, settings.fleet), 0o600)
    except OSError as exc:
        raise EdgeFleetError(
            f"node {node} is enrolled on the broker, but its bundle was not written "
            f"({exc.strerror}): revoke it and enroll again"
        ) from None
    _report(args, {"node": node, "bundle": str(out), "broker": node_broker})
    return 0


def _public_url(address: Any) -> str:
    """The broker URL without the admin's credentials."""
    scheme = "mqtts" if address.tls else "mqtt"
    return f"{scheme}://{address.host}:{address.port}"


def _node_revoke(args: argparse.Namespace) -> int:
    node = check_node_username(args.id)
    settings = common.settings_from(args)
    request = common.checked(NODE_REVOKE, {"node_id": node})
    result = common.mapping(asyncio.run(common.call(settings, NODE_REVOKE, request)), "revoke")
    _report(args, result)
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``broker`` and ``node`` and their actions to ``commands``."""
    broker = commands.add_parser("broker", help=help_of("broker"))
    broker_actions = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    init = common.add_command(
        broker_actions,
        "init",
        _broker_init,
        "write a TLS-only broker with dynamic security, its CA and clients' credentials",
        parents.with_json,
    )
    init.add_argument("--dir", required=True, help="where to write everything")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="the broker's DNS name or IP address, as clients reach it (repeatable)",
    )
    init.add_argument("--operators", default="", metavar="NAME,...", help="operators' names")
    init.add_argument(
        "--controllers",
        default="controller",
        metavar="NAME,...",
        help="controller replicas' usernames (controller)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing setup")
    add = common.add_command(
        broker_actions,
        "add",
        _broker_add,
        "give an operator or a controller replica a broker account, live",
        parents.with_json,
    )
    add.add_argument("kind", choices=["operator", "controller"])
    add.add_argument("name", metavar="NAME")
    add.add_argument("--out", required=True, help="empty directory for the credentials")
    add.add_argument("--ca-dir", required=True, help="the fleet CA (broker init's tls/)")
    node = commands.add_parser("node", help=help_of("node"))
    node_actions = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    enroll = common.add_command(
        node_actions,
        "enroll",
        _node_enroll,
        "give a node a broker account and write its enrollment bundle",
        parents.with_json,
        description="Connects as the broker admin (--broker mqtts://broker-admin@HOST:8883 "
        "--password-file ... --cert-file ... --key-file ... --ca-file ...).",
    )
    enroll.add_argument("id", metavar="NODE_ID")
    enroll.add_argument("--out", required=True, help="empty directory for the bundle")
    enroll.add_argument("--ca-dir", required=True, help="the fleet CA (broker init's tls/)")
    enroll.add_argument("--keys", help=f"key directory with trust.json (env {common.KEYS_ENV})")
    enroll.add_argument("--node-broker", metavar="URL", help="the broker URL the node uses")
    revoke = common.add_command(
        node_actions,
        "revoke",
        _node_revoke,
        "revoke a node: rollouts stop selecting it; behind dynamic security the "
        "controller also removes its broker account (the broker disconnects it)",
        parents.with_json,
    )
    revoke.add_argument("id", metavar="NODE_ID")
    deployments.add_node_actions(node_actions, parents)
