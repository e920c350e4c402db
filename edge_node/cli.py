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
import functools
import json
import logging
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

from edgefleet_io.logs import LOG_FORMATS, LOG_LEVELS, setup_logging
from shared import __version__
from shared.broker import DEFAULT_BROKER_URL, MQTT_VERSIONS, BrokerAddress, parse_broker_url
from shared.errors import DecodeError, EdgeFleetError, TrustError, UsageError
from shared.topics import check_id

if TYPE_CHECKING:
    from edge_node.agent import AgentConfig

__all__ = ["main"]

_RUN_KEYS = {
    "id", "trust", "data", "broker", "fleet", "labels", "source", "rate", "concurrency",
    "micro_batch", "swap_mode", "threads", "providers", "graph_optimization",
    "change_threshold", "corner_threshold",
    "topk", "batch_max", "batch_interval", "telemetry_interval", "resend_after",
    "chunk_bytes", "ca_file", "cert_file", "key_file", "password_file", "log_level",
    "log_format", "mqtt_version",
}  # fmt: skip
_MQTT_HELP = "MQTT version (default: the URL's ?protocol=, else 5); 3.1.1 for NATS"
_PATH_KEYS = {"trust", "data", "ca_file", "cert_file", "key_file", "password_file"}
"""Relative paths in a config file are relative to the file (an enrollment bundle)."""


def _load_toml(path: str | None) -> dict[str, Any]:
    """The ``[node]`` table (or the top level when there is none); keys may use - or _."""
    if path is None:
        return {}
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from None
    table = data.get("node", data)
    if not isinstance(table, dict):
        raise UsageError(f"config {path}: [node] must be a table")
    settings = {str(key).replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(settings) - _RUN_KEYS)
    if unknown:
        raise UsageError(f"config {path}: unknown setting {unknown[0]!r}")
    here = Path(path).parent
    for key in _PATH_KEYS & set(settings):
        if isinstance(settings[key], str):
            settings[key] = str(here / settings[key])  # an absolute path stays as it is
    return settings


def _broker(url: str, node_id: str, password_file: str | None, mqtt: str | None) -> BrokerAddress:
    """The broker address (MQTT version ``mqtt`` over the URL's); with ``password_file``, that
    password (and, when the URL names no user, the node id). Raises: UsageError / DecodeError."""
    address = parse_broker_url(url, mqtt)
    if password_file is None:
        return address
    try:
        password = Path(password_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UsageError(f"cannot read password file {password_file}: {reason}") from None
    if not password:
        raise UsageError(f"password file {password_file} is empty")
    return replace(address, username=address.username or node_id, password=password)


def _labels(values: object) -> dict[str, str]:
    """``--label k=v`` flags, or the config's ``labels`` table or list of ``"k=v"``."""
    if values is None:
        return {}
    if isinstance(values, dict):
        return {
            check_id(str(k), "label key"): check_id(str(v), "label value")
            for k, v in values.items()
        }
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise UsageError('labels: use a table (labels = {k = "v"}) or a list of "k=v"')
    from shared.labels import parse_labels

    return parse_labels(",".join(values))


def _setting(args: argparse.Namespace, toml: dict[str, Any], name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    if value is not None:
        return value
    return toml.get(name, default)


@dataclass(frozen=True, slots=True)
class _Range:
    """A numeric setting's bounds; ``above``: the lower bound itself is refused."""

    low: float
    high: float
    whole: bool = False
    above: bool = False

    def check(self, value: object) -> float:
        """``value`` if it is a finite number (whole when ``whole``) in range.

        Raises: ValueError with the one-line reason.
        """
        number_ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not number_ok or (self.whole and not isinstance(value, int)):
            raise ValueError(self.expected(repr(value)))
        number = float(cast(float, value))
        low_ok = number > self.low if self.above else number >= self.low
        if not (math.isfinite(number) and low_ok and number <= self.high):
            raise ValueError(self.expected(repr(value)))
        return int(number) if self.whole else number

    def expected(self, got: str) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.above:
            return f"expected {kind} above {self.low:g} and at most {self.high:g}, got {got}"
        return f"expected {kind} from {self.low:g} to {self.high:g}, got {got}"

    def flag(self) -> Callable[[str], float]:
        """An argparse ``type=`` parsing and checking the flag's text (one line, exit 2)."""

        def parse(text: str) -> float:
            try:
                return self.check(int(text) if self.whole else float(text))
            except ValueError:
                raise argparse.ArgumentTypeError(self.expected(repr(text[:40]))) from None

        return parse


@functools.cache
def _ranges() -> dict[str, _Range]:
    """Bounds of every numeric setting (flags and config file alike). Sizes and counts
    stay within what the wire allows (a result batch holds at most 1000 results,
    a chunk request at most 512 KiB); durations in seconds."""
    from edge_node.inference_core import MAX_TOPK

    return {
        "rate": _Range(0, 100_000),  # inputs per second; 0: flat out
        "concurrency": _Range(1, 256, whole=True),
        "micro_batch": _Range(1, 4096, whole=True),
        "threads": _Range(0, 1024, whole=True),  # 0: onnxruntime chooses
        "change_threshold": _Range(0, 1e9),  # mean absolute input change; 0: off
        "corner_threshold": _Range(0, 1),  # a top score
        "topk": _Range(1, MAX_TOPK, whole=True),
        "batch_max": _Range(1, 1000, whole=True),
        "batch_interval": _Range(0, 3600, above=True),
        "telemetry_interval": _Range(0, 86_400, above=True),
        "resend_after": _Range(0, 86_400, above=True),
        "chunk_bytes": _Range(1024, 512 * 1024, whole=True),
        "count": _Range(1, 10_000, whole=True),  # simulated nodes
    }


def _number(args: argparse.Namespace, toml: dict[str, Any], name: str, default: float) -> float:
    """A numeric setting within its :func:`_ranges`. Raises: UsageError naming it."""
    try:
        return _ranges()[name].check(_setting(args, toml, name, default))
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _whole(args: argparse.Namespace, toml: dict[str, Any], name: str, default: int) -> int:
    return int(_number(args, toml, name, default))


def _text(args: argparse.Namespace, toml: dict[str, Any], name: str, default: Any) -> Any:
    """A string setting (``None`` stays ``None``)."""
    value = _setting(args, toml, name, default)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{name}: expected a string, got {value!r}")
    return value


def _check_data_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"data directory {path} is not a directory")
    return path


def _check_ca_file(ca_file: str | None) -> str | None:
    """Load the CA bundle once now, so a bad path is a usage error, not a crash later."""
    if ca_file is None:
        return None
    import ssl

    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "strerror", None) or exc
        raise UsageError(f"CA file {ca_file}: {reason}") from None
    return ca_file


def check_trust(data_dir: Path, trust_file: Path | None) -> None:
    """Refuse to start a node that would have no usable trust list.

    Raises:
        UsageError: neither the shipped file nor a rotated copy in ``data_dir``
            verifies (missing, unreadable, malformed, badly signed or expired).
    """
    from edge_node.state import NodeStore

    try:
        NodeStore(data_dir).load_trust(trust_file, now=time.time())
    except TrustError as exc:
        raise UsageError(f"{exc}: give --trust a valid root-signed trust.json") from None


def _providers(value: object) -> tuple[str, ...] | None:
    """``--providers A,B`` or the config's ``"A,B"`` / ``["A", "B"]``: each must be an
    execution provider this machine's onnxruntime offers (None: the manifest's).

    Raises: UsageError.
    """
    if value is None:
        return None
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, list) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value]
    else:
        raise UsageError(f"providers: expected names like CPUExecutionProvider, got {value!r}")
    from edge_node.validation import check_provider_names  # loads onnxruntime

    return check_provider_names([name for name in names if name], on_this_machine=True)


def build_config(args: argparse.Namespace, toml: dict[str, Any] | None = None) -> AgentConfig:
    """Merge flags, the TOML file and the environment into an :class:`AgentConfig`.

    ``toml`` is the already loaded ``--config`` table (loaded here when ``None``).

    Raises:
        UsageError / DecodeError: a setting is missing or invalid.
    """
    from edge_node.agent import AgentConfig, SourceKind
    from edge_node.sessions import SessionOptionsConfig
    from edge_node.sources import parse_source
    from edgefleet_io.mqtt import MqttTransport

    if toml is None:
        toml = _load_toml(args.config)
    node_id = _text(args, toml, "id", None)
    data = _text(args, toml, "data", None)
    if node_id is None or data is None:
        raise UsageError("--id and --data are required (flags or config file)")
    trust = _text(args, toml, "trust", None)
    source_kind, source_dir = parse_source(_text(args, toml, "source", "synthetic"))
    broker_url = _text(args, toml, "broker", os.environ.get("FLEET_BROKER", DEFAULT_BROKER_URL))
    fleet = _text(args, toml, "fleet", os.environ.get("FLEET_FLEET", "default"))
    labels = _labels(args.label) if args.label else _labels(toml.get("labels"))
    graph = _text(args, toml, "graph_optimization", "extended")
    if graph not in ("disable", "basic", "extended", "all"):
        raise UsageError(f"graph optimization {graph!r}: use disable, basic, extended or all")
    rate = _number(args, toml, "rate", 10.0)
    swap_mode = _text(args, toml, "swap_mode", "availability")
    if swap_mode not in ("availability", "resource"):
        raise UsageError(f"swap mode {swap_mode!r}: use availability or resource")
    threads = _whole(args, toml, "threads", 0)
    providers = _providers(_setting(args, toml, "providers", None))
    node_id = check_id(node_id, "node id")
    password_file = _text(args, toml, "password_file", None)
    broker = _broker(broker_url, node_id, password_file, _text(args, toml, "mqtt_version", None))
    ca_file = _check_ca_file(_text(args, toml, "ca_file", None))
    cert_file = _text(args, toml, "cert_file", None)
    key_file = _text(args, toml, "key_file", None)
    MqttTransport(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)  # loads TLS
    return AgentConfig(
        node_id=node_id,
        data_dir=_check_data_dir(Path(data)),
        trust_file=Path(trust) if trust else None,
        broker=broker,
        fleet=check_id(fleet, "fleet"),
        labels=labels,
        source=cast(SourceKind, source_kind),
        source_dir=source_dir,
        rate_hz=rate if rate > 0 else None,
        concurrency=_whole(args, toml, "concurrency", 1),
        micro_batch=_whole(args, toml, "micro_batch", 32),
        swap_mode=cast(Literal["availability", "resource"], swap_mode),
        session_options=SessionOptionsConfig(
            intra_op_threads=threads, graph_optimization=graph, providers=providers
        ),
        change_threshold=_number(args, toml, "change_threshold", 0.0),
        corner_threshold=_number(args, toml, "corner_threshold", 0.5),
        topk=_whole(args, toml, "topk", 3),
        batch_max=_whole(args, toml, "batch_max", 100),
        batch_interval_s=_number(args, toml, "batch_interval", 1.0),
        telemetry_interval_s=_number(args, toml, "telemetry_interval", 10.0),
        resend_after_s=_number(args, toml, "resend_after", 15.0),
        chunk_bytes=_whole(args, toml, "chunk_bytes", 256 * 1024),
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )


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
    toml = _load_toml(args.config)
    config = build_config(args, toml)
    check_trust(config.data_dir, config.trust_file)
    setup_logging(
        str(_text(args, toml, "log_level", "info")), str(_text(args, toml, "log_format", "text"))
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
    base_dir = _check_data_dir(Path(args.data))
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
            labels=_labels(args.label),
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
    ranges = _ranges()
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
    ranges = _ranges()
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
