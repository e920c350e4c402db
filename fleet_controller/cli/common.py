"""What every ``fleetctl`` command shares: options, settings, the controller, output.

* The global options (``--broker``, ``--fleet``, ``--operator``,
  ``--operator-key``, ``--timeout``, ``--ca-file``) and ``--json`` are parent
  parsers (:class:`Parents`, made by :func:`option_groups`) that each command
  group's ``register(commands, parents)`` hands to its subcommands;
  :func:`settings_from` resolves them, flags first, then the environment,
  then defaults.
* :class:`Parser` turns argparse's usage errors into one line on stderr, exit 2.
* An operator API call goes through :func:`call` (the seam unit tests replace),
  or :func:`controller` for several calls on one connection; :func:`checked`
  first validates the arguments with the controller's own
  :func:`~shared.operations.parse_request`, so a bad request exits 2 before
  the broker is contacted.
* With ``--json`` a command prints exactly one JSON document on stdout
  (:func:`emit`); otherwise a rich rendering.

Importing this module is cheap: ``fleetctl --help`` and every command import
it. The broker client, the operator's key, the operations' request models and
rich are imported by the functions that use them, so a ``--json`` listing never
loads rich (nor onnxruntime, onnx or SQLAlchemy, which only some commands need).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from edgefleet_io.logs import LOG_FORMATS, LOG_LEVELS
from fleet_controller.cli.flags import named, parse_positive_duration
from shared.broker import DEFAULT_BROKER_URL, MQTT_VERSIONS, BrokerAddress, parse_broker_url
from shared.errors import EdgeFleetError, UsageError
from shared.topics import check_id

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from edgefleet_io.mqtt import MqttTransport
    from fleet_controller.api import CtlClient
    from shared.operations import Operation

__all__ = [
    "DEBUG_ENV",
    "DEFAULT_TIMEOUT_S",
    "KEYS_ENV",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_TIMEOUT_S",
    "OPERATOR_ENV",
    "OPERATOR_KEY_ENV",
    "PASSPHRASE_ENV",
    "Commands",
    "Handler",
    "Parents",
    "Parser",
    "Render",
    "Settings",
    "add_command",
    "call",
    "checked",
    "controller",
    "emit",
    "first_line",
    "key_dir_options",
    "keys_dir",
    "mapping",
    "option_groups",
    "passphrase",
    "quiet_onnxruntime",
    "read_secret",
    "rows",
    "settings_from",
    "stdout",
]

PASSPHRASE_ENV = "FLEET_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
KEYS_ENV = "FLEET_KEYS"
OPERATOR_ENV = "FLEET_OPERATOR"
OPERATOR_KEY_ENV = "FLEET_OPERATOR_KEY"
DEBUG_ENV = "FLEET_DEBUG"  # set: unexpected errors show their traceback
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 3600.0

Handler: TypeAlias = Callable[[argparse.Namespace], int]
Render: TypeAlias = "Callable[[Any], RenderableType]"
"""Draws a command's answer with rich; called (and rich imported) only without ``--json``."""


# ----- the parser ---------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


Commands: TypeAlias = "argparse._SubParsersAction[Parser]"


@dataclass(frozen=True, slots=True)
class Parents:
    """The option groups subcommands inherit (argparse ``parents``)."""

    base: tuple[Parser, ...]
    """The global options."""
    with_json: tuple[Parser, ...]
    """The global options and ``--json``."""


def option_groups() -> Parents:
    """One set of shared option groups, for every command group to register with."""
    options = _global_options()
    return Parents(base=(options,), with_json=(options, _json_option()))


def _global_options() -> Parser:
    """The parent parser of the options every command takes."""
    from fleet_controller.keys import FIRST_OPERATOR

    options = Parser(add_help=False)
    group = options.add_argument_group("global options")
    group.add_argument(
        "--broker", metavar="URL", help=f"broker (env FLEET_BROKER, default {DEFAULT_BROKER_URL})"
    )
    group.add_argument(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        help="MQTT version spoken with the broker (default: the URL's ?protocol=, else 5); "
        "3.1.1 for brokers without MQTT 5, such as NATS",
    )
    group.add_argument("--fleet", help="fleet name (env FLEET_FLEET, default 'default')")
    group.add_argument(
        "--operator",
        help=f"your operator name in trust.json (env {OPERATOR_ENV}, default {FIRST_OPERATOR})",
    )
    group.add_argument(
        "--operator-key",
        metavar="FILE",
        help=f"your private key (env {OPERATOR_KEY_ENV}, default KEYS/operators/NAME.pem)",
    )
    group.add_argument(
        "--timeout",
        metavar="DURATION",
        help=f"wait for answers (default {DEFAULT_TIMEOUT_S:g}s, at most 1h)",
    )
    group.add_argument("--ca-file", help="CA bundle for mqtts:// (env FLEET_CA_FILE)")
    group.add_argument(
        "--cert-file", help="client certificate for mutual TLS (env FLEET_CERT_FILE)"
    )
    group.add_argument("--key-file", help="its private key (env FLEET_KEY_FILE)")
    group.add_argument(
        "--password-file",
        help="the broker password, read from this file (env FLEET_PASSWORD_FILE): "
        "keeps it out of the URL and the process list",
    )
    return options


def _json_option() -> Parser:
    """The parent parser of ``--json``."""
    options = Parser(add_help=False)
    options.add_argument("--json", action="store_true", help="print one JSON document")
    return options


def key_dir_options() -> Parser:
    """A parent parser with ``--dir``: the key directory."""
    options = Parser(add_help=False)
    options.add_argument("--dir", help=f"key directory (env {KEYS_ENV}, default ./keys)")
    return options


def add_command(
    parent: Commands,
    name: str,
    handler: Handler,
    help_text: str,
    parents: Sequence[Parser],
    **kwargs: Any,
) -> Parser:
    """A subcommand ``name`` of ``parent`` that runs ``handler``."""
    command = parent.add_parser(name, parents=list(parents), help=help_text, **kwargs)
    command.set_defaults(handler=handler)
    return command


# ----- settings and the controller ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved global options."""

    broker: BrokerAddress
    fleet: str
    operator: str
    operator_key: Path
    timeout_s: float
    ca_file: str | None
    cert_file: str | None = None
    key_file: str | None = None

    def transport(self) -> MqttTransport:
        """Connections to the broker with these credentials.

        Raises: UsageError when the TLS files cannot be loaded.
        """
        from edgefleet_io.mqtt import MqttTransport

        return MqttTransport(
            self.broker, ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """The global options, flags first, then the environment, then defaults.

    Raises:
        UsageError / DecodeError: an invalid broker URL, fleet, operator or timeout.
    """
    from fleet_controller.keys import FIRST_OPERATOR, operator_key_path

    url = args.broker or os.environ.get("FLEET_BROKER") or DEFAULT_BROKER_URL
    broker = parse_broker_url(url, args.mqtt_version)
    fleet = check_id(args.fleet or os.environ.get("FLEET_FLEET") or "default", "fleet")
    operator = check_id(args.operator or os.environ.get(OPERATOR_ENV) or FIRST_OPERATOR, "operator")
    key_text = args.operator_key or os.environ.get(OPERATOR_KEY_ENV)
    # A command's own key folder (``model add --keys``, ``keys push --dir``) holds it too.
    folder = keys_dir(getattr(args, "keys", None) or getattr(args, "dir", None))
    operator_key = Path(key_text) if key_text else operator_key_path(folder, operator)
    timeout_s = DEFAULT_TIMEOUT_S
    if args.timeout:
        timeout_s = named("--timeout", _timeout, args.timeout)
    ca_file = args.ca_file or os.environ.get("FLEET_CA_FILE") or None
    password_file = args.password_file or os.environ.get("FLEET_PASSWORD_FILE")
    if password_file:
        broker = replace(broker, password=read_secret(Path(password_file), "password file"))
    return Settings(
        broker,
        fleet,
        operator,
        operator_key,
        timeout_s,
        ca_file,
        args.cert_file or os.environ.get("FLEET_CERT_FILE") or None,
        args.key_file or os.environ.get("FLEET_KEY_FILE") or None,
    )


def read_secret(path: Path, what: str) -> str:
    """The first line of a file holding a secret. Raises: UsageError."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UsageError(f"cannot read {what} {path}: {reason}") from None
    if not text:
        raise UsageError(f"{what} {path} is empty")
    return text.splitlines()[0]


def _timeout(text: str) -> float:
    return parse_positive_duration(text, maximum_s=MAX_TIMEOUT_S)


def checked(
    operation: Operation[Any], args: dict[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """``args`` as given, once they validate as ``operation``'s request.

    The controller runs the same check; running it here first refuses a bad
    request with exit 2 before the broker is contacted. ``now`` (default: the
    clock) is the reference time for activation times.

    Raises:
        RequestError: the one-line message names the operation and the field.
    """
    from shared.operations import parse_request

    parse_request(operation, args, now=time.time() if now is None else now)
    return args


@contextlib.asynccontextmanager
async def controller(settings: Settings) -> AsyncIterator[CtlClient]:
    """A connected operator API client, signing as the operator.

    Raises:
        TrustError: the operator's key cannot be read.
    """
    from fleet_controller.api import CtlClient, OperatorIdentity
    from fleet_controller.keys import load_operator_key

    key = load_operator_key(settings.operator_key, passphrase())
    async with CtlClient(
        settings.transport(),
        fleet=settings.fleet,
        identity=OperatorIdentity(settings.operator, key),
        timeout_s=settings.timeout_s,
    ) as ctl:
        yield ctl


async def call(
    settings: Settings, operation: Operation[Any], args: Mapping[str, Any] | None = None
) -> Any:
    """Run one ``operation`` on the controller; its answer.

    Raises:
        OperationError: the controller refused (its code is the exit code).
        TransportError: the broker or the controller did not answer.
    """
    async with controller(settings) as ctl:
        return await ctl.call(operation.name, dict(args) if args else None)


def passphrase() -> bytes | None:
    """The private keys' passphrase from the environment, if set."""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def keys_dir(value: str | None) -> Path:
    """``--keys``/``--dir``, else the environment, else ``./keys``."""
    return Path(value or os.environ.get(KEYS_ENV) or "keys")


# ----- output ---------------------------------------------------------------------------


def stdout() -> Console:
    """Rich output on stdout; piped output gets room for wide tables instead of 80 columns."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def emit(args: argparse.Namespace, value: Any, render: Render) -> None:
    """JSON only on stdout with ``--json``; a rich rendering otherwise (rich is imported
    only then: ``render`` is not called with ``--json``)."""
    if getattr(args, "json", False):
        print(json.dumps(value))
    else:
        stdout().print(render(value))


def rows(value: Any, what: str) -> list[dict[str, Any]]:
    """``value`` if it is a list of objects. Raises: EdgeFleetError."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EdgeFleetError(f"unexpected answer from the controller to {what}")
    return value


def mapping(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is an object. Raises: EdgeFleetError."""
    if not isinstance(value, dict):
        raise EdgeFleetError(f"unexpected answer from the controller to {what}")
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def quiet_onnxruntime() -> None:
    """Keep onnxruntime's own log off stderr: its errors reach the user as our one line."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # fatal only
