"""``edge-node``: run a node, inspect its data directory, or simulate many nodes.

Settings come from flags, then a TOML file (``--config``), then the environment
(``FLEET_BROKER``, ``FLEET_FLEET``), then defaults. Exit codes: 0 ok, 1 the
operation failed, 2 usage or input error; errors are one line, never a traceback.

Each command imports what it uses when it runs: ``run`` the agent (onnxruntime,
the broker client, the outbox), ``status`` the node's store and rich, ``simulate``
the simulator; ``edge-node --help`` imports none of them. A running node never
loads rich, the operator API, the controller's database layer or the schema
generator (``tests/unit/edge_node/test_imports.py`` holds it to that).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

from edge_node.cli_config import (
    build_config,
    check_data_dir,
    check_trust,
    load_toml,
    parse_labels,
    setting_ranges,
    text_setting,
)
from edgefleet_io.logs import LOG_FORMATS, LOG_LEVELS, setup_logging
from shared import __version__
from shared.broker import DEFAULT_BROKER_URL, MQTT_VERSIONS, parse_broker_url
from shared.errors import DecodeError, EdgeFleetError, UsageError
from shared.topics import check_id

if TYPE_CHECKING:
    from edge_node.agent import AgentConfig


__all__ = ["build_config", "check_trust", "main"]

_MQTT_HELP = "MQTT version (default: the URL's ?protocol=, else 5); 3.1.1 for NATS"


async def _run_agent(config: AgentConfig) -> None:
    import asyncio
    import signal

    from edge_node.agent import NodeAgent

    agent = NodeAgent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def _cmd_run(args: argparse.Namespace) -> int:
    toml = load_toml(args.config)
    config = build_config(args, toml)
    check_trust(config.data_dir, config.trust_file)
    setup_logging(
        str(text_setting(args, toml, "log_level", "info")),
        str(text_setting(args, toml, "log_format", "text")),
    )
    import asyncio

    asyncio.run(_run_agent(config))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_node.outbox import read_depths
    from edge_node.state import NodeStore

    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"{data} is not a node data directory")
    state = NodeStore(data).load()
    outbox_depth, telemetry_depth = read_depths(data / "outbox.db")
    report = {
        "data": str(data),
        "active": state.active.model_dump() if state.active else None,
        "previous": state.previous.model_dump() if state.previous else None,
        "last_command_seq": state.last_seq,
        "sessions": state.session,
        "outbox_depth": outbox_depth,
        "telemetry_queued": telemetry_depth,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edge node in {data}", show_header=False)
    for label, ref in (("active model", state.active), ("previous model", state.previous)):
        table.add_row(label, f"{ref.name} {ref.version} ({ref.sha256[:12]})" if ref else "-")
    table.add_row("last command seq", str(state.last_seq))
    table.add_row("outbox (unacknowledged)", str(outbox_depth))
    table.add_row("telemetry queued", str(telemetry_depth))
    Console().print(table)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    from edge_node.agent import SourceKind
    from edge_node.simulate import node_ids, run_simulation
    from edge_node.sources import parse_source

    url = args.broker or os.environ.get("FLEET_BROKER", DEFAULT_BROKER_URL)
    broker = parse_broker_url(url, args.mqtt_version)
    fleet = check_id(args.fleet or os.environ.get("FLEET_FLEET", "default"), "fleet")
    prefix = check_id(args.prefix, "prefix")
    base_dir = check_data_dir(Path(args.data))
    source, _ = parse_source(args.source)
    if source not in ("synthetic", "none"):
        raise UsageError("simulated nodes take --source synthetic or none")
    trust_file = Path(args.trust)
    for node_id in node_ids(prefix, args.count):
        check_trust(base_dir / node_id, trust_file)
    setup_logging(args.log_level, args.log_format)
    asyncio.run(
        run_simulation(
            count=args.count,
            prefix=prefix,
            base_dir=base_dir,
            trust_file=trust_file,
            broker=broker,
            fleet=fleet,
            labels=parse_labels(args.label),
            source=cast(SourceKind, source),
            rate_hz=args.rate if args.rate > 0 else None,
            telemetry_interval_s=args.telemetry_interval,
        )
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_credentials(run: argparse.ArgumentParser) -> None:
    run.add_argument("--ca-file", help="CA bundle for mqtts://")
    run.add_argument("--cert-file", help="client certificate for mutual TLS (with --key-file)")
    run.add_argument("--key-file", help="the client certificate's private key")
    run.add_argument(
        "--password-file", help="broker password, read from this file (username: the node id)"
    )


def _add_run(run: argparse.ArgumentParser) -> None:
    ranges = setting_ranges()
    run.add_argument("--config", help="TOML file with the same settings (a [node] table)")
    run.add_argument("--id", help="node id ([A-Za-z0-9_.-]{1,64})")
    run.add_argument("--trust", help="root-signed trust.json shipped with the node")
    run.add_argument("--data", help="data directory (models, outbox, state)")
    run.add_argument(
        "--broker", help=f"broker URL (env FLEET_BROKER, default {DEFAULT_BROKER_URL})"
    )
    run.add_argument("--mqtt-version", choices=MQTT_VERSIONS, help=_MQTT_HELP)
    run.add_argument("--fleet", help="fleet name (env FLEET_FLEET, default 'default')")
    run.add_argument("--label", action="append", metavar="K=V", help="node label (repeatable)")
    run.add_argument("--source", help="synthetic (default), dir:PATH, mqtt or none")
    run.add_argument(
        "--rate", type=ranges["rate"].flag(), help="synthetic inputs per second (0: flat out)"
    )
    run.add_argument(
        "--concurrency", type=ranges["concurrency"].flag(), help="parallel inference requests"
    )
    run.add_argument(
        "--providers",
        help="onnxruntime execution providers in order, e.g. CUDAExecutionProvider,"
        "CPUExecutionProvider, each available here (default: the manifest's, among those "
        "available)",
    )
    run.add_argument(
        "--micro-batch",
        type=ranges["micro_batch"].flag(),
        help="stack up to N waiting inputs into one run (dynamic batch models; default 32)",
    )
    run.add_argument("--swap-mode", help="availability (default) or resource (unload first)")
    run.add_argument(
        "--threads",
        type=ranges["threads"].flag(),
        help="onnxruntime intra-op threads (0: all cores)",
    )
    run.add_argument("--graph-optimization", help="disable, basic, extended (default) or all")
    run.add_argument(
        "--change-threshold",
        type=ranges["change_threshold"].flag(),
        help="skip inputs that barely changed",
    )
    run.add_argument(
        "--corner-threshold",
        type=ranges["corner_threshold"].flag(),
        help="flag results below this score",
    )
    run.add_argument("--topk", type=ranges["topk"].flag(), help="top-k classes kept per result")
    run.add_argument("--batch-max", type=ranges["batch_max"].flag(), help="results per message")
    run.add_argument(
        "--batch-interval",
        type=ranges["batch_interval"].flag(),
        help="seconds between result messages",
    )
    run.add_argument(
        "--telemetry-interval",
        type=ranges["telemetry_interval"].flag(),
        help="seconds between telemetry",
    )
    run.add_argument(
        "--resend-after",
        type=ranges["resend_after"].flag(),
        help="re-send unacknowledged after seconds",
    )
    run.add_argument(
        "--chunk-bytes",
        type=ranges["chunk_bytes"].flag(),
        help="artifact chunk size for MQTT transfer",
    )
    _add_credentials(run)
    run.add_argument("--log-level", choices=LOG_LEVELS, help="info by default")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    run.set_defaults(handler=_cmd_run)


def _add_status(status: argparse.ArgumentParser) -> None:
    status.add_argument("--data", required=True, help="the node's data directory")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(handler=_cmd_status)


def _add_simulate(simulate: argparse.ArgumentParser) -> None:
    ranges = setting_ranges()
    simulate.add_argument(
        "--count", type=ranges["count"].flag(), required=True, help="number of nodes"
    )
    simulate.add_argument("--prefix", default="sim", help="node id prefix (ids PREFIX-0001...)")
    simulate.add_argument(
        "--data", default="sim-data", help="base directory for the nodes' data (./sim-data)"
    )
    simulate.add_argument("--trust", required=True, help="trust.json given to every node")
    simulate.add_argument("--broker", help="broker URL (env FLEET_BROKER)")
    simulate.add_argument("--mqtt-version", choices=MQTT_VERSIONS, help=_MQTT_HELP)
    simulate.add_argument("--fleet", help="fleet name (env FLEET_FLEET)")
    simulate.add_argument("--label", action="append", metavar="K=V", help="label for every node")
    simulate.add_argument("--source", default="none", help="none (default) or synthetic")
    simulate.add_argument(
        "--rate", type=ranges["rate"].flag(), default=1.0, help="inputs per second per node"
    )
    simulate.add_argument(
        "--telemetry-interval",
        type=ranges["telemetry_interval"].flag(),
        default=10.0,
        help="seconds between each node's telemetry (10, as edge-node run)",
    )
    simulate.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    simulate.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="text or json lines"
    )
    simulate.set_defaults(handler=_cmd_simulate)


#: The commands, their one-line help, and what adds their arguments and handler.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run the node daemon", _add_run),
    "status": ("show a node's models and outbox", _add_status),
    "simulate": ("run many nodes in one process", _add_simulate),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``edge-node`` parser for ``argv``: the command it names in full, the
    others by name and help only (``--help`` imports nothing of the node). With
    ``argv`` None every command is added in full."""
    parser = _Parser(prog="edge-node", description="EdgeFleet edge node agent.")
    parser.add_argument("--version", action="version", version=f"edge-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The only options before a command are --help and --version, which take no value.
    chosen = None if argv is None else next((w for w in argv if not w.startswith("-")), None)
    for name, (help_text, add) in _COMMANDS.items():
        if argv is None or name == chosen:
            add(commands.add_parser(name, help=help_text))
        else:
            commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edge-node`` with ``argv``; returns the exit code (never a traceback)."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(words).parse_args(words)
    except SystemExit as exc:  # a usage error (2, one line printed), --help or --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args))
    except (DecodeError, ValueError) as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 2
    except EdgeFleetError as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the data directory or a file in it is unusable
        where = f": {exc.filename}" if exc.filename else ""
        print(f"edge-node: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    except Exception as exc:  # the contract: one line, never a traceback
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        print(f"edge-node: unexpected error: {_first_leaf(exc)!r}", file=sys.stderr)
        return 1


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
