"""``fleetctl serve``: run the controller service until SIGINT or SIGTERM.

Every setting is checked (keys present, database URL, durations, HTTP address)
before the service, SQLAlchemy or the broker are touched, so a bad flag exits 2
at once. The heavy imports (the service, SQLAlchemy) happen only here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
from typing import Any

from edgefleet_io.logs import setup_logging
from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import named, number, parse_positive_duration, whole_number
from fleet_controller.keys import key_path, trust_path
from fleet_controller.leader import DEFAULT_LEASE_S, MIN_LEASE_S
from fleet_controller.quotas import (
    BURST_S,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_NODE_BYTES_PER_S,
    DEFAULT_NODE_RESULTS_PER_S,
)
from shared.errors import EdgeFleetError, UsageError
from shared.trust import Role

__all__ = ["DB_ENV", "DEFAULT_DB_URL", "register"]

DB_ENV = "FLEET_DB"
DEFAULT_DB_URL = "sqlite:///fleet-data/fleet.db"
MAX_TICK_S = 60.0
MAX_RETENTION_DAYS = 3650.0
MAX_LEASE_S = 600.0


def _database_url(url: str) -> str:
    """Check ``url`` as the store reads it; create a ``sqlite:///`` file's folder.

    A plain file path must name a file in a folder that exists (a typo should
    not create a database somewhere unexpected); a ``sqlite:///`` URL's folder
    is created, as for the default.

    Raises:
        UsageError: not a database URL the store supports, a plain path whose
            folder does not exist, or a folder (one line, no password).
        EdgeFleetError: the SQLite file's folder cannot be created.
    """
    from fleet_controller.store import StoreError, parse_database_url  # heavy

    try:
        parsed = parse_database_url(url)
    except StoreError as exc:
        message = str(exc).removeprefix("invalid database URL: ")
        raise UsageError(f"invalid database URL (--db): {message}") from None
    path = parsed.sqlite_path
    if path is None:
        return url
    if path.is_dir():
        raise UsageError(f"--db {path} is a directory: name the database file in it")
    if "://" not in url:
        if not path.parent.is_dir():
            raise UsageError(
                f"--db {path}: folder {path.parent} does not exist "
                f"(create it, or write sqlite:///{path} to have it created)"
            )
        return url
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeFleetError(f"cannot create {path.parent}: {exc.strerror}") from None
    return url


def _serve(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    tick_s = named("--tick", lambda t: parse_positive_duration(t, maximum_s=MAX_TICK_S), args.tick)
    keys_dir = common.keys_dir(args.keys)
    for needed in (key_path(keys_dir, Role.ROLLOUT), trust_path(keys_dir)):
        if not needed.is_file():
            raise UsageError(
                f"{needed} is missing: create keys with `fleetctl keys init --dir {keys_dir}` "
                f"or point --keys / {common.KEYS_ENV} at them"
            )
    settings.transport()  # the TLS files load, or the start stops here
    db_url = _database_url(args.db or os.environ.get(DB_ENV) or DEFAULT_DB_URL)
    http_listen, http_url = _http_settings(args.http, args.http_url)
    setup_logging(args.log_level, args.log_format)

    from fleet_controller.service import ControllerConfig  # heavy imports

    config = ControllerConfig(
        broker=settings.broker,
        db_url=db_url,
        keys_dir=keys_dir,
        fleet=settings.fleet,
        tick_s=tick_s,
        lease_s=args.lease_s,
        retention_days=args.retention_days,
        node_results_per_s=args.node_results_rate,
        node_bytes_per_s=args.node_bytes_rate,
        max_upload_bytes=args.max_upload_bytes,
        dynsec=args.dynsec,
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
        passphrase=common.passphrase(),
        http_listen=http_listen,
        http_url=http_url,
    )
    asyncio.run(_run_service(config))
    return 0


def _http_settings(
    listen: str | None, url: str | None
) -> tuple[tuple[str, int] | None, str | None]:
    """``--http HOST:PORT`` and ``--http-url``. Raises: UsageError."""
    if listen is None:
        if url is not None:
            raise UsageError("--http-url needs --http HOST:PORT")
        return None, None
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--http {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:8080")
    if url is None:
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a check, not a bind
            raise UsageError("--http on all interfaces needs --http-url (how nodes reach it)")
        url = f"http://{host}:{port_text}"
    if not re.match(r"^https?://[^/\s]+", url):
        raise UsageError(f"--http-url {url!r}: expected http(s)://host[:port]")
    return (host, int(port_text)), url


async def _run_service(config: Any) -> None:
    from sqlalchemy.exc import SQLAlchemyError  # SQLAlchemy only for `serve`

    from fleet_controller.service import ControllerService  # the service only for `serve`

    try:
        service = ControllerService(config)
    except SQLAlchemyError as exc:
        raise EdgeFleetError(f"cannot open the database: {common.first_line(exc)}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)
    await service.run()


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``serve`` to ``commands``."""
    serve = common.add_command(
        commands,
        "serve",
        _serve,
        help_of("serve"),
        parents.base,
        description="Runs until SIGINT or SIGTERM. Keys must hold rollout.pem and trust.json; "
        f"{common.PASSPHRASE_ENV} unlocks encrypted keys.",
    )
    serve.add_argument(
        "--db", help=f"database URL or SQLite file path (env {DB_ENV}, default {DEFAULT_DB_URL})"
    )
    serve.add_argument("--keys", help=f"key directory (env {common.KEYS_ENV}, default ./keys)")
    serve.add_argument(
        "--tick", default="1s", metavar="DURATION", help="rollout tick (1s; at most 1m)"
    )
    serve.add_argument(
        "--lease-s",
        type=number(MIN_LEASE_S, MAX_LEASE_S),
        default=DEFAULT_LEASE_S,
        metavar="SECONDS",
        help=f"rollout lease of the replica that drives rollouts, renewed every third of it; "
        f"a successor takes over within about this long of a crash "
        f"({DEFAULT_LEASE_S:g}; {MIN_LEASE_S:g} to {MAX_LEASE_S:g})",
    )
    serve.add_argument(
        "--retention-days",
        type=number(0, MAX_RETENTION_DAYS, above=True),
        default=30.0,
        help=f"keep telemetry and results this many days (30; at most {MAX_RETENTION_DAYS:g})",
    )
    serve.add_argument(
        "--node-results-rate",
        type=number(0, 10_000_000, above=True),
        default=DEFAULT_NODE_RESULTS_PER_S,
        metavar="N",
        help=f"results a second one node may send, with a {BURST_S:g} s burst "
        f"({DEFAULT_NODE_RESULTS_PER_S:g}; more waits in its outbox)",
    )
    serve.add_argument(
        "--node-bytes-rate",
        type=number(0, 10 * 2**30, above=True),
        default=DEFAULT_NODE_BYTES_PER_S,
        metavar="BYTES",
        help=f"bytes a second one node may send ({DEFAULT_NODE_BYTES_PER_S:g})",
    )
    serve.add_argument(
        "--dynsec",
        action="store_true",
        help="the broker runs the dynamic security plugin: node revoke removes the "
        "node's broker account too",
    )
    serve.add_argument(
        "--max-upload-bytes",
        type=whole_number(1, 2**40),
        default=DEFAULT_MAX_UPLOAD_BYTES,
        metavar="BYTES",
        help=f"largest model file an operator may upload ({DEFAULT_MAX_UPLOAD_BYTES})",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve artifacts over HTTP with Range (off by default)",
    )
    serve.add_argument(
        "--http-url", help="base URL nodes use for --http (default http://HOST:PORT)"
    )
    serve.add_argument("--log-level", default="info", choices=common.LOG_LEVELS)
    serve.add_argument(
        "--log-format", default="text", choices=common.LOG_FORMATS, help="text or json lines"
    )
