"""``fleetctl``: the operator's command line.

Exit codes (the contract scripts rely on): 0 ok, 1 operation failed, 2 usage or
input error. Every EdgeFleet error is printed as one line on stderr; a
traceback is never shown. Listing and status commands take ``--json`` and then
print exactly one JSON document on stdout.

Every command takes the global options ``--broker`` (env FLEET_BROKER),
``--fleet`` (env FLEET_FLEET), ``--operator`` (env FLEET_OPERATOR, else $USER),
``--timeout`` and ``--ca-file``. Flag values are parsed by the small pure
functions below (``parse_duration``, ``parse_fraction``, ...), which raise
:class:`UsageError` (exit 2) with a one-line reason; everything a command can
check locally is checked before it contacts the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from edgefleet_io.mqtt import MqttTransport
from fleet_controller import console as view
from fleet_controller.api import CtlClient, OperationError
from fleet_controller.keys import (
    DEFAULT_TRUST_DAYS,
    init_keys,
    key_path,
    load_key,
    rotate_key,
    trust_path,
)
from shared import __version__
from shared.broker import DEFAULT_BROKER_URL, BrokerAddress, parse_broker_url
from shared.errors import DecodeError, EdgeFleetError, TransportError
from shared.messages import ModelManifest, WarmupInput
from shared.topics import check_id
from shared.trust import Role, TrustList
from shared.version import SemVer
from shared.waves import format_selector, parse_selector

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


__all__ = [
    "UsageError",
    "build_parser",
    "check_node_username",
    "main",
    "parse_activate_at",
    "parse_duration",
    "parse_fraction",
    "parse_model_ref",
    "parse_operators",
    "parse_select",
    "parse_shape",
    "parse_warmup_input",
    "parse_waves",
    "render_acl",
    "render_secure_conf",
]

PASSPHRASE_ENV = "FLEET_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
KEYS_ENV = "FLEET_KEYS"
DB_ENV = "FLEET_DB"
DEBUG_ENV = "FLEET_DEBUG"  # set: unexpected errors show their traceback
DEFAULT_DB_URL = "sqlite:///fleet-data/fleet.db"
DEFAULT_TIMEOUT_S = 10.0
_ENDED_OK = "succeeded"
_ACTIVE_ROLLOUT_STATES = frozenset({"pending", "running", "paused", "rolling_back"})
_LOG_LEVELS = ("debug", "info", "warning", "error")

Handler = Callable[[argparse.Namespace], int]


class UsageError(DecodeError):
    """A flag, argument or input file is invalid (exit code 2)."""


# ----- pure parsers of flag values ----------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)", re.ASCII)
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+", re.ASCII)
_FRACTION = re.compile(rf"({_NUMBER})(%?)", re.ASCII)
_MAX_FLAG_CHARS = 64


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90`` (seconds), ``90s``, ``250ms``, ``5m``, ``1h30m``, ``2d``.

    Raises:
        UsageError: anything else (negative, empty, unknown unit, not finite).
    """
    value = text.strip()
    if len(value) <= _MAX_FLAG_CHARS:
        if re.fullmatch(_NUMBER, value, re.ASCII):
            return float(value)
        if _DURATION.fullmatch(value):
            return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    raise UsageError(f"invalid duration {text[:40]!r}: use e.g. 90, 60s, 5m, 1h30m")


def parse_fraction(text: str, *, maximum: float | None = 1.0) -> float:
    """A fraction from ``10%`` or ``0.1``; at most ``maximum`` (None: no upper bound).

    Raises:
        UsageError: not a non-negative number or percentage, or above ``maximum``.
    """
    match = _FRACTION.fullmatch(text.strip()) if len(text) <= _MAX_FLAG_CHARS else None
    if match is None:
        raise UsageError(f"invalid percentage {text[:40]!r}: use e.g. 10% or 0.1")
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if maximum is not None and value > maximum:
        hint = "" if match.group(2) else f": write {match.group(1)}% for a percentage"
        raise UsageError(f"{text.strip()} is more than {maximum * 100:g}%{hint}")
    return value


def parse_waves(text: str) -> list[float]:
    """Cumulative wave sizes in percent: ``1,10,50,100`` (a ``%`` sign is allowed).

    Raises:
        UsageError: empty, not numbers, outside (0, 100], not strictly increasing,
            or more than 64 waves.
    """
    waves: list[float] = []
    for raw in text.split(","):
        match = _FRACTION.fullmatch(raw.strip()) if len(raw) <= _MAX_FLAG_CHARS else None
        if match is None:
            raise UsageError(f"invalid wave {raw.strip()[:20]!r}: use percentages like 1,10,50,100")
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise UsageError(f"wave {raw.strip()} must be in (0, 100] percent")
        if waves and percent <= waves[-1]:
            raise UsageError(f"waves must grow: {percent:g}% after {waves[-1]:g}%")
        waves.append(percent)
    if len(waves) > 64:
        raise UsageError("at most 64 waves")
    return waves


def parse_select(text: str) -> str:
    """A label selector ``k=v,k2=v2`` in canonical form (sorted; empty: every node).

    Raises:
        DecodeError: a term is not ``key=value`` with valid ids, or a key repeats.
    """
    return format_selector(parse_selector(text))


def parse_model_ref(text: str) -> tuple[str, str]:
    """``NAME@VERSION`` → (name, version).

    Raises:
        UsageError / VersionError: no ``@``, an invalid name, or not a semantic version.
    """
    name, sep, version = text.partition("@")
    if not sep:
        raise UsageError(f"model {text[:80]!r} must be NAME@VERSION, e.g. classifier@1.2.0")
    SemVer.parse(version)
    return check_id(name, "model name"), version


def parse_shape(text: str) -> tuple[int, ...]:
    """A tensor shape: ``1x8``, ``[1,8]``, ``8``, or ``[]`` (a scalar).

    Raises:
        UsageError: a dimension is not a non-negative integer.
    """
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1].strip()
        parts = [p.strip() for p in inner.split(",")] if inner else []
    elif value:
        parts = value.split("x")
    else:
        parts = []
    if not all(p.isascii() and p.isdigit() and len(p) <= 7 for p in parts):
        raise UsageError(f"invalid shape {text[:40]!r}: use e.g. 1x8, [1,8] or [] for a scalar")
    return tuple(int(p) for p in parts)


def parse_warmup_input(text: str) -> WarmupInput:
    """``NAME=SHAPE`` (zeros) or ``NAME=SHAPE:VALUE`` (every element ``VALUE``).

    ``input=1x8``, ``sample_rate=[]:16000``. The name may contain ``:`` (as
    TensorFlow exports do), so the last ``=`` separates name and shape.

    Raises:
        UsageError: the text does not have that form, or the value is not finite.
    """
    name, sep, spec = text.rpartition("=")
    if not sep or not name:
        raise UsageError(
            f"invalid warm-up input {text[:60]!r}: use NAME=SHAPE or NAME=SHAPE:VALUE, "
            "e.g. input=1x8 or sample_rate=[]:16000"
        )
    shape_text, colon, value_text = spec.partition(":")
    shape = parse_shape(shape_text)
    fill = 0.0
    if colon:
        try:
            fill = float(value_text)
        except ValueError:
            fill = math.nan
        if not math.isfinite(fill):
            raise UsageError(f"warm-up input {name!r}: value {value_text[:40]!r} is not a number")
    try:
        return WarmupInput(name=name, shape=shape, fill=fill)
    except ValidationError as exc:
        raise UsageError(f"warm-up input {name[:40]!r}: {_first_error(exc)}") from None


def parse_activate_at(text: str, *, now: float) -> float:
    """UNIX seconds from ``1767225600``, ISO 8601 with a zone, or ``+DURATION`` from ``now``.

    A time without a zone is refused rather than guessed (local? UTC?).

    Raises:
        UsageError: unreadable, without a time zone, or in the past.
    """
    value = text.strip()
    if value.startswith("+"):
        when = now + parse_duration(value[1:])
    elif re.fullmatch(_NUMBER, value, re.ASCII):
        when = float(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise UsageError(
                f"invalid time {text[:40]!r}: use ISO 8601 with a zone "
                "(2026-03-01T02:00:00Z), UNIX seconds, or +DURATION (+30m)"
            ) from None
        if moment.tzinfo is None:
            raise UsageError(f"time {value!r} has no time zone: add Z or an offset like +01:00")
        when = moment.timestamp()
    if when < now:
        raise UsageError(f"activation time {value!r} is in the past")
    return when


def check_node_username(node_id: str) -> str:
    """A node id that may become a broker username.

    Raises:
        UsageError: not a valid id, or reserved: ``controller`` and ``operator*``
            have ACL rights of their own, and the ACL's node patterns apply to them.
    """
    check_id(node_id, "node id")
    lowered = node_id.lower()
    if lowered == "controller" or lowered.startswith("operator"):
        raise UsageError(
            f"node id {node_id!r} is reserved: 'controller' and 'operator*' usernames "
            "have broker rights of their own"
        )
    return node_id


def parse_operators(text: str) -> list[str]:
    """``operator-alice,operator-bob`` → usernames (each ``operator...``, no repeats).

    Raises:
        UsageError: an invalid id, a name not starting with ``operator`` (node
            enrollment refuses only those, so only those are safe from a node
            taking the same username), or a repeat.
    """
    names: list[str] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        check_id(raw, "operator username")
        if not raw.startswith("operator"):
            raise UsageError(
                f"operator username {raw!r} must start with 'operator' (e.g. operator-{raw}): "
                "node enrollment refuses those names, so no node can take an operator's rights"
            )
        if raw in names:
            raise UsageError(f"operator {raw!r} is given twice")
        names.append(raw)
    return names


def render_acl(template: str, operators: Sequence[str]) -> str:
    """The ACL file: the template as it stands plus one operator block per operator.

    The block is the template's lines starting with ``#@ `` with that prefix
    dropped and ``{operator}`` replaced (see the template's header).

    Raises:
        EdgeFleetError: the template has no operator block.
    """
    block = [line[3:] for line in template.splitlines() if line.startswith("#@ ")]
    if not block:
        raise EdgeFleetError("acl.template has no operator block (lines starting with '#@ ')")
    out = template if template.endswith("\n") else template + "\n"
    for operator in operators:
        out += f"\n# operator {operator} (rendered by fleetctl broker init)\n"
        out += "".join(line.replace("{operator}", operator) + "\n" for line in block)
    return out


def render_secure_conf(template: str, *, passwd_file: Path, acl_file: Path) -> str:
    """``secure.conf`` with its ``password_file`` and ``acl_file`` lines pointing at ours.

    Raises:
        EdgeFleetError: the template lacks one of those settings.
    """
    wanted = {"password_file": passwd_file, "acl_file": acl_file}
    lines = []
    found = set()
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


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


# ----- settings shared by every command ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    broker: BrokerAddress
    fleet: str
    operator: str
    timeout_s: float
    ca_file: str | None


def _settings(args: argparse.Namespace) -> Settings:
    """The global options, flags first, then the environment, then defaults.

    Raises:
        UsageError / DecodeError: an invalid broker URL, fleet, operator or timeout.
    """
    broker = parse_broker_url(args.broker or os.environ.get("FLEET_BROKER") or DEFAULT_BROKER_URL)
    fleet = check_id(args.fleet or os.environ.get("FLEET_FLEET") or "default", "fleet")
    operator = (
        args.operator or os.environ.get("FLEET_OPERATOR") or os.environ.get("USER") or "operator"
    )
    if not 0 < len(operator) <= 128 or not operator.isprintable():
        raise UsageError(f"invalid operator name {operator[:40]!r}")
    timeout_s = parse_duration(args.timeout) if args.timeout else DEFAULT_TIMEOUT_S
    if timeout_s <= 0:
        raise UsageError("--timeout must be above zero")
    ca_file = args.ca_file or os.environ.get("FLEET_CA_FILE") or None
    return Settings(broker, fleet, operator, timeout_s, ca_file)


@contextlib.asynccontextmanager
async def _controller(settings: Settings) -> AsyncIterator[CtlClient]:
    async with CtlClient(
        MqttTransport(settings.broker, ca_file=settings.ca_file),
        fleet=settings.fleet,
        operator=settings.operator,
        reply_to=settings.broker.username,
        timeout_s=settings.timeout_s,
    ) as ctl:
        yield ctl


async def _call(settings: Settings, op: str, args: dict[str, Any] | None = None) -> Any:
    async with _controller(settings) as ctl:
        return await ctl.call(op, args)


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _keys_dir(value: str | None) -> Path:
    return Path(value or os.environ.get(KEYS_ENV) or "keys")


def _stdout() -> Console:
    """Rich output on stdout; piped output gets room for wide tables instead of 80 columns."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def _emit(args: argparse.Namespace, value: Any, render: Callable[[Any], RenderableType]) -> None:
    """JSON only on stdout with ``--json``; a rich rendering otherwise."""
    if getattr(args, "json", False):
        print(json.dumps(value))
    else:
        _stdout().print(render(value))


def _rows(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EdgeFleetError(f"unexpected answer from the controller to {what}")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EdgeFleetError(f"unexpected answer from the controller to {what}")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiomqtt warns whenever more than ten publishes await their PUBACK; serving
    # chunks and acks to many nodes does that by design.
    logging.getLogger("mqtt").setLevel(max(logging.ERROR, logging.getLogger().level))


# ----- keys ---------------------------------------------------------------------------


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
    directory = _keys_dir(args.dir)
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
    directory = _keys_dir(args.dir)
    keyset = rotate_key(
        directory,
        Role(args.role),
        now=time.time(),
        passphrase=_passphrase(),
        valid_days=args.valid_days,
    )
    _print_trust(keyset.trust, directory, as_json=args.json)
    return 0


def _keys_push(args: argparse.Namespace) -> int:
    directory = _keys_dir(args.dir)
    try:
        text = trust_path(directory).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {trust_path(directory)}: {exc.strerror}") from None
    result = _mapping(
        asyncio.run(_call(_settings(args), "trust.push", {"trust": text})), "trust.push"
    )
    if args.json:
        print(json.dumps(result))
    else:
        _stdout().print(
            f"trust v{result['version']} sent to the fleet as {result['rollout_id']} "
            "(retained: nodes offline now take it when they return)",
            highlight=False,
        )
    return 0


# ----- serve --------------------------------------------------------------------------


def _database_url(url: str) -> str:
    """Check ``url`` (a plain path means a SQLite file) and create a SQLite file's folder.

    Raises:
        UsageError: not a database URL SQLAlchemy understands.
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - only `serve` needs SQLAlchemy
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    if "://" not in url:  # a plain path names a SQLite file
        url = f"sqlite:///{Path(url).resolve()}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(
            f"invalid database URL {url[:80]!r}: use sqlite:///PATH or postgresql+psycopg://..."
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UsageError(
            f"invalid database URL {url[:80]!r}: use sqlite:///PATH or postgresql+psycopg://..."
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(str(parsed.database)).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeFleetError(f"cannot create {folder}: {exc.strerror}") from None
    return url


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    tick_s = parse_duration(args.tick)
    if tick_s <= 0:
        raise UsageError("--tick must be above zero")
    if not math.isfinite(args.retention_days) or args.retention_days <= 0:
        raise UsageError("--retention-days must be above zero")
    keys_dir = _keys_dir(args.keys)
    for needed in (key_path(keys_dir, Role.ROLLOUT), trust_path(keys_dir)):
        if not needed.is_file():
            raise UsageError(
                f"{needed} is missing: create keys with `fleetctl keys init --dir {keys_dir}` "
                f"or point --keys / {KEYS_ENV} at them"
            )
    db_url = _database_url(args.db or os.environ.get(DB_ENV) or DEFAULT_DB_URL)
    http_listen, http_url = _http_settings(args.http, args.http_url)
    _setup_logging(args.log_level)

    from fleet_controller.service import ControllerConfig  # noqa: PLC0415 - heavy imports

    config = ControllerConfig(
        broker=settings.broker,
        db_url=db_url,
        keys_dir=keys_dir,
        fleet=settings.fleet,
        tick_s=tick_s,
        retention_days=args.retention_days,
        ca_file=settings.ca_file,
        passphrase=_passphrase(),
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
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from fleet_controller.service import ControllerService  # noqa: PLC0415

    try:
        service = ControllerService(config)
    except SQLAlchemyError as exc:
        raise EdgeFleetError(f"cannot open the database: {_first_line(exc)}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)
    await service.run()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----- models -------------------------------------------------------------------------

_MODEL_COLUMNS = ("name", "version", "sha256", "size", "added_by", "added_at")


def _load_sample(path: Path) -> list[WarmupInput]:
    """One warm-up input per array of an ``.npz`` file, with its values.

    Raises:
        UsageError: unreadable, not an ``.npz``, or arrays that are not finite numbers.
    """
    import numpy as np  # noqa: PLC0415

    try:
        with np.load(path, allow_pickle=False) as sample:
            arrays = {name: sample[name] for name in sample.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read sample {path}: {_first_line(exc)}") from None
    except AttributeError:  # np.load returned one array: an .npy, not an .npz
        raise UsageError(f"sample {path} is not an .npz archive") from None
    inputs = []
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise UsageError(f"sample array {name!r} holds {array.dtype}, not numbers")
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise UsageError(f"sample array {name!r} holds NaN or infinity")
        try:
            inputs.append(
                WarmupInput(
                    name=name,
                    shape=tuple(int(d) for d in array.shape),
                    values=tuple(values.ravel().tolist()),
                )
            )
        except ValidationError as exc:
            raise UsageError(f"sample array {name!r}: {_first_error(exc)}") from None
    return inputs


def _read_labels(path: Path) -> list[str]:
    """Class labels, one per line, in class-index order (trailing blank lines dropped).

    Raises:
        UsageError: the file cannot be read as UTF-8.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels {path}: {_first_line(exc)}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _quantize(source: Path, target: Path) -> Path:
    """Write an int8 dynamically quantized copy of ``source`` to ``target``.

    Raises:
        EdgeFleetError: the quantizer is missing (it needs the ``onnx`` package) or fails.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415
    except ImportError as exc:
        raise EdgeFleetError(
            f"--quantize needs the onnx package ({_first_line(exc)}): pip install onnx"
        ) from None
    # The quantizer logs advice ("consider pre-processing") on the root logger.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise many unexported types
        raise EdgeFleetError(f"cannot quantize {source.name}: {_first_line(exc)}") from None
    finally:
        logging.disable(logging.NOTSET)
    return target


def _quiet_onnxruntime() -> None:
    """Keep onnxruntime's own log off stderr: its errors reach the user as our one line."""
    import onnxruntime as ort  # noqa: PLC0415 - only `model add` needs onnxruntime

    ort.set_default_logger_severity(4)  # fatal only


def _progress(total_bytes: int) -> Progress:
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    disabled = not sys.stdout.isatty() or os.environ.get("CI", "").lower() in ("1", "true")
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disabled or total_bytes <= 0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _ModelAdd:
    """A checked ``model add`` request (``int8_path`` set with ``--quantize``)."""

    path: Path
    name: str
    version: str
    warmup: tuple[WarmupInput, ...]
    labels: tuple[str, ...]
    keys_dir: Path
    int8_path: Path | None


async def _model_add_async(request: _ModelAdd, settings: Settings) -> list[dict[str, Any]]:
    """Validate everything locally, then upload and register (the broker comes last).

    Raises:
        EdgeFleetError / DecodeError: a local check failed, or the controller refused.
    """
    from fleet_controller.publish import (  # noqa: PLC0415 - loads onnxruntime
        prepare_manifest,
        sign_release,
        upload_blob,
    )

    now = time.time()

    async def prepare(path: Path, name: str) -> ModelManifest:
        return await prepare_manifest(
            path,
            name=name,
            version=request.version,
            warmup=request.warmup,
            labels=request.labels,
            operator=settings.operator,
            now=now,
        )

    releases = [(request.path, await prepare(request.path, request.name))]
    if request.int8_path is not None:
        int8 = await asyncio.to_thread(_quantize, request.path, request.int8_path)
        releases.append((int8, await prepare(int8, f"{request.name}-int8")))
    # The release key is the operator's; the controller never sees it.
    if not key_path(request.keys_dir, Role.RELEASE).is_file():
        raise UsageError(
            f"no release key {key_path(request.keys_dir, Role.RELEASE)}: pass --keys DIR "
            f"(env {KEYS_ENV}) or create keys with `fleetctl keys init`"
        )
    release_key = load_key(request.keys_dir, Role.RELEASE, _passphrase())
    signed = [sign_release(path, m, release_key) for path, m in releases]
    rows = []
    async with _controller(settings) as ctl:
        with _progress(sum(r.manifest.size for r in signed)) as progress:
            for release in signed:
                m = release.manifest
                task = progress.add_task(f"{m.name} {m.version}", total=m.size)

                def advance(received: int, task: TaskID = task) -> None:
                    progress.update(task, completed=received)

                await upload_blob(ctl, release.path, m, advance)
                answer = await ctl.call("model.add", {"envelope": release.envelope_text})
                rows.append(_mapping(answer, "model.add"))
    return rows


def _model_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such model file: {path}")
    name = check_id(args.name, "model name")
    SemVer.parse(args.version)
    warmup = [parse_warmup_input(t) for t in args.warmup_input or ()]
    if args.sample:
        warmup += _load_sample(Path(args.sample))
    names = [w.name for w in warmup]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"warm-up input {repeated[0]!r} is given twice")
    labels = _read_labels(Path(args.label_file)) if args.label_file else []
    if args.quantize:
        check_id(f"{name}-int8", "model name")
    _quiet_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="fleetctl-") as tmp:
        request = _ModelAdd(
            path=path,
            name=name,
            version=args.version,
            warmup=tuple(warmup),
            labels=tuple(labels),
            keys_dir=_keys_dir(args.keys),
            int8_path=Path(tmp) / f"{name}-int8.onnx" if args.quantize else None,
        )
        rows = asyncio.run(_model_add_async(request, settings))
    _emit(
        args,
        rows if args.quantize else rows[0],
        lambda _: view.records_table(rows, title="model added", columns=_MODEL_COLUMNS),
    )
    return 0


def _model_list(args: argparse.Namespace) -> int:
    rows = _rows(asyncio.run(_call(_settings(args), "model.list")), "model.list")
    _emit(args, rows, lambda r: view.records_table(r, title="models", columns=_MODEL_COLUMNS))
    return 0


# ----- rollouts -----------------------------------------------------------------------

_ROLLOUT_LIST_COLUMNS = (
    "rollout_id",
    "model",
    "state",
    "wave",
    "node_counts",
    "created_by",
    "created_at",
    "updated_at",
    "reason",
)


def _flag(option: str, parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, naming ``option`` in the error. Raises: UsageError."""
    try:
        return parse(text)
    except DecodeError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _rollout_start(args: argparse.Namespace) -> int:
    settings = _settings(args)
    name, version = parse_model_ref(args.model)
    if args.max_retries < 0:
        raise UsageError("--max-retries must not be negative")
    request: dict[str, Any] = {
        "model": f"{name}@{version}",
        "select": _flag("--select", parse_select, args.select),
        "waves": _flag("--waves", parse_waves, args.waves),
        "max_failures": _flag("--max-failures", parse_fraction, args.max_failures),
        "wave_timeout_s": _flag("--wave-timeout", parse_duration, args.wave_timeout),
        "health_window_s": _flag("--health-window", parse_duration, args.health_window),
        "max_latency_regression": _flag(
            "--max-latency-regression",
            lambda t: parse_fraction(t, maximum=None),
            args.max_latency_regression,
        ),
        "min_latency_regression_ms": 1000.0
        * _flag("--min-latency-regression", parse_duration, args.min_latency_regression),
        "auto_rollback": args.auto_rollback,
        "activate_at": _flag(
            "--activate-at", lambda t: parse_activate_at(t, now=time.time()), args.activate_at
        )
        if args.activate_at
        else None,
        "max_retries": args.max_retries,
        "retry_backoff_s": _flag("--retry-backoff", parse_duration, args.retry_backoff),
        "rollout_id": check_id(args.id, "rollout id") if args.id else "",
    }
    if request["wave_timeout_s"] <= 0:
        raise UsageError("--wave-timeout must be above zero")
    result = _mapping(asyncio.run(_call(settings, "rollout.start", request)), "rollout.start")
    _emit(args, result, view.rollout_view)
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rollout_id = check_id(args.id, "rollout id")
    if args.watch and not args.json:
        return asyncio.run(_watch_rollout(settings, rollout_id))
    status = _mapping(
        asyncio.run(_call(settings, "rollout.status", {"rollout_id": rollout_id})),
        "rollout.status",
    )
    _emit(args, status, view.rollout_view)
    return 0


async def _watch_rollout(settings: Settings, rollout_id: str) -> int:
    """Redraw the rollout every second until it ends (0 if it succeeded, else 1) or Ctrl-C."""
    stop = asyncio.Event()
    async with _controller(settings) as ctl:
        status = _mapping(
            await ctl.call("rollout.status", {"rollout_id": rollout_id}), "rollout.status"
        )
        with (
            view.stop_on_signals(stop),
            Live(view.rollout_view(status), console=_stdout(), auto_refresh=False) as live,
        ):
            while status.get("state") in _ACTIVE_ROLLOUT_STATES and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                if stop.is_set():
                    break
                note = None
                try:
                    status = _mapping(
                        await ctl.call("rollout.status", {"rollout_id": rollout_id}),
                        "rollout.status",
                    )
                except TransportError as exc:
                    note = f"{exc} (retrying)"
                live.update(view.rollout_view(status, note=note), refresh=True)
    if stop.is_set():
        return 0
    return 0 if status.get("state") == _ENDED_OK else 1


def _rollout_list(args: argparse.Namespace) -> int:
    rows = _rows(
        asyncio.run(_call(_settings(args), "rollout.list", {"active_only": args.active})),
        "rollout.list",
    )
    title = "active rollouts" if args.active else "rollouts"
    _emit(args, rows, lambda r: view.records_table(r, title=title, columns=_ROLLOUT_LIST_COLUMNS))
    return 0


def _rollout_change(op: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        settings = _settings(args)
        rollout_id = check_id(args.id, "rollout id")
        result = _mapping(asyncio.run(_call(settings, op, {"rollout_id": rollout_id})), op)
        _emit(args, result, view.rollout_view)
        return 0

    return handler


# ----- nodes, audit, report -------------------------------------------------------------

_NODE_COLUMNS = ("node_id", "online", "model", "labels", "agent_version", "last_seen", "revoked")
_AUDIT_COLUMNS = ("ts", "operator", "action", "outcome", "detail", "args")


def _nodes(args: argparse.Namespace) -> int:
    settings = _settings(args)
    select = _flag("--select", parse_select, args.select)
    rows = _rows(asyncio.run(_call(settings, "nodes.list", {"select": select})), "nodes.list")
    title = f"nodes ({select})" if select else "nodes"
    _emit(args, rows, lambda r: view.records_table(r, title=title, columns=_NODE_COLUMNS))
    return 0


def _audit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not 1 <= args.limit <= 100_000:
        raise UsageError("--limit must be between 1 and 100000")
    rows = _rows(asyncio.run(_call(settings, "audit.list", {"limit": args.limit})), "audit.list")
    _emit(args, rows, lambda r: view.records_table(r, title="audit log", columns=_AUDIT_COLUMNS))
    return 0


def _report(args: argparse.Namespace) -> int:
    report = _mapping(asyncio.run(_call(_settings(args), "report")), "report")
    _emit(args, report, view.report_view)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fleet_controller.demo import run_demo  # noqa: PLC0415 - builds models with onnx

    if args.nodes < 1 or args.nodes > 200:
        raise UsageError("--nodes must be between 1 and 200")
    _setup_logging(args.log_level)
    _quiet_onnxruntime()
    keep = Path(args.dir) if args.dir else None
    asyncio.run(run_demo(nodes=args.nodes, broker_url=args.demo_broker, keep=keep))
    return 0


# ----- top ----------------------------------------------------------------------------


def _top(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.json and not args.once:
        raise UsageError("--json needs --once (one snapshot)")
    interval_s = parse_duration(args.interval)
    if interval_s <= 0:
        raise UsageError("--interval must be above zero")
    snapshot = asyncio.run(
        view.run_top(
            MqttTransport(settings.broker, ca_file=settings.ca_file),
            fleet=settings.fleet,
            interval_s=interval_s,
            once=args.once,
            console=_stdout(),
        )
    )
    if snapshot is not None:
        rows = [view.NodeRow(**n) for n in snapshot["nodes"]]
        _emit(
            args,
            snapshot,
            lambda _: view.top_table(settings.fleet, rows, malformed=snapshot["malformed"]),
        )
    return 0


# ----- broker and node credentials ----------------------------------------------------

BROKER_FILES = ("secure.conf", "acl", "passwd")


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


def _broker_init(args: argparse.Namespace) -> int:
    from broker_config import config_path  # noqa: PLC0415

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
    result = {
        "dir": str(directory),
        "config": str(conf),
        "acl": str(acl),
        "passwd": str(passwd),
        "passwd_kept": kept,
        "operators": operators,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    out = _stdout()
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
        raise UsageError(f"cannot read password file {passwd}: {_first_line(exc)}") from None
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
        raise EdgeFleetError(f"mosquitto_passwd failed: {_first_line(exc)}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise EdgeFleetError(
            f"mosquitto_passwd failed: {message[0] if message else f'exit {done.returncode}'}"
        )


_RELOAD_HINT = "reload the broker so it takes effect: kill -HUP $(pidof mosquitto)"


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
    out = _stdout()
    out.print(f"node {node} enrolled in {passwd}", highlight=False)
    out.print(f"password (shown once, store it on the node): {password}", highlight=False)
    out.print(
        f"the node connects with --broker mqtts://{node}:PASSWORD@BROKER:8883", highlight=False
    )
    out.print(_RELOAD_HINT, highlight=False, markup=False)
    return 0


def _node_revoke(args: argparse.Namespace) -> int:
    node = check_node_username(args.id)
    passwd = Path(args.passwd_file)
    if not _enrolled(passwd, node):
        raise EdgeFleetError(f"node {node} is not enrolled in {passwd}")
    _mosquitto_passwd(["-D", str(passwd), node])
    # Also tell the controller, so rollouts stop selecting the node.
    try:
        asyncio.run(_call(_settings(args), "node.revoke", {"node_id": node}))
        told = True
    except EdgeFleetError as exc:
        told = False
        print(f"fleetctl: warning: the controller was not told ({exc})", file=sys.stderr)
    if args.json:
        print(json.dumps({"node": node, "revoked": True, "controller_told": told}))
        return 0
    out = _stdout()
    out.print(f"node {node} removed from {passwd}", highlight=False)
    if told:
        out.print("the controller marked it revoked: rollouts no longer select it")
    out.print(_RELOAD_HINT, highlight=False, markup=False)
    out.print(
        "on reload Mosquitto 2.0 disconnects the node and refuses it from then on",
        highlight=False,
    )
    return 0


# ----- the parser ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _global_options() -> _Parser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("global options")
    group.add_argument(
        "--broker", metavar="URL", help=f"broker (env FLEET_BROKER, default {DEFAULT_BROKER_URL})"
    )
    group.add_argument("--fleet", help="fleet name (env FLEET_FLEET, default 'default')")
    group.add_argument(
        "--operator", help="who you are, for the audit log (env FLEET_OPERATOR, default $USER)"
    )
    group.add_argument(
        "--timeout", metavar="DURATION", help=f"wait for answers (default {DEFAULT_TIMEOUT_S:g}s)"
    )
    group.add_argument("--ca-file", help="CA bundle for mqtts:// (env FLEET_CA_FILE)")
    return options


def _json_option() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument("--json", action="store_true", help="print one JSON document")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleetctl", description="Operate an EdgeFleet: keys, models, rollouts, nodes."
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _global_options()
    as_json = _json_option()
    both = [common, as_json]

    def leaf(
        parent: argparse._SubParsersAction[_Parser],
        name: str,
        handler: Handler,
        help_text: str,
        parents: Sequence[_Parser] = (common,),
        **kwargs: Any,
    ) -> argparse.ArgumentParser:
        command = parent.add_parser(name, parents=list(parents), help=help_text, **kwargs)
        command.set_defaults(handler=handler)
        return command

    # keys
    keys = commands.add_parser("keys", help="create and rotate signing keys and trust.json")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_options = _Parser(add_help=False)
    key_options.add_argument("--dir", help=f"key directory (env {KEYS_ENV}, default ./keys)")
    key_options.add_argument(
        "--valid-days", type=int, default=DEFAULT_TRUST_DAYS, help="trust list lifetime"
    )
    init = leaf(
        key_commands,
        "init",
        _keys_init,
        "create root, release and rollout keys and trust.json",
        [common, as_json, key_options],
        description=f"Private keys are encrypted when {PASSPHRASE_ENV} is set.",
    )
    init.add_argument("--force", action="store_true", help="replace existing keys")
    rotate = leaf(
        key_commands,
        "rotate",
        _keys_rotate,
        "issue a new key for a role and trust list N+1",
        [common, as_json, key_options],
    )
    rotate.add_argument("--role", required=True, choices=[r.value for r in Role])
    leaf(
        key_commands,
        "push",
        _keys_push,
        "send trust.json (after a rotation) to every node over the air",
        [common, as_json, key_options],
    )

    # serve
    serve = leaf(
        commands,
        "serve",
        _serve,
        "run the controller service",
        description="Runs until SIGINT or SIGTERM. Keys must hold rollout.pem and trust.json; "
        f"{PASSPHRASE_ENV} unlocks encrypted keys.",
    )
    serve.add_argument("--db", help=f"database URL (env {DB_ENV}, default {DEFAULT_DB_URL})")
    serve.add_argument("--keys", help=f"key directory (env {KEYS_ENV}, default ./keys)")
    serve.add_argument("--tick", default="1s", metavar="DURATION", help="rollout tick (1s)")
    serve.add_argument(
        "--retention-days", type=float, default=30.0, help="keep telemetry and results (30)"
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve artifacts over HTTP with Range (off by default)",
    )
    serve.add_argument(
        "--http-url", help="base URL nodes use for --http (default http://HOST:PORT)"
    )
    serve.add_argument("--log-level", default="info", choices=_LOG_LEVELS)

    # model
    model = commands.add_parser("model", help="register and list models")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    add = leaf(
        model_commands,
        "add",
        _model_add,
        "inspect, warm up, sign and upload an ONNX model",
        both,
        description="Signs with the release key from --keys (never sent to the controller). "
        "--json prints the model row (a list of two rows with --quantize).",
    )
    add.add_argument("file", help="the .onnx file")
    add.add_argument("--name", required=True, help="model name ([A-Za-z0-9_.-])")
    add.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    add.add_argument(
        "--warmup-input",
        action="append",
        metavar="NAME=SHAPE[:VALUE]",
        help="warm-up input, e.g. input=1x8 or sample_rate=[]:16000 (repeatable)",
    )
    add.add_argument("--sample", metavar="FILE.npz", help="warm-up inputs with values, by name")
    add.add_argument("--label-file", metavar="FILE", help="class labels, one per line")
    add.add_argument(
        "--quantize", action="store_true", help="also register an int8 variant as NAME-int8"
    )
    add.add_argument("--keys", help=f"key directory with release.pem (env {KEYS_ENV})")
    leaf(model_commands, "list", _model_list, "list registered models", both)

    # rollout
    rollout = commands.add_parser("rollout", help="start, watch and steer rollouts")
    rollout_commands = rollout.add_subparsers(
        dest="rollout_command", required=True, metavar="ACTION"
    )
    start = leaf(rollout_commands, "start", _rollout_start, "start a staged rollout", both)
    start.add_argument("model", metavar="NAME@VERSION")
    start.add_argument("--select", default="", metavar="K=V,...", help="label selector")
    start.add_argument("--waves", default="1,10,50,100", help="cumulative percentages")
    start.add_argument("--max-failures", default="10%", help="halt above this share of a wave")
    start.add_argument("--wave-timeout", default="5m", metavar="DURATION")
    start.add_argument("--health-window", default="60s", metavar="DURATION")
    start.add_argument("--max-latency-regression", default="50%", help="p95 growth allowed")
    start.add_argument(
        "--min-latency-regression",
        default="1ms",
        metavar="DURATION",
        help="p95 growth below this is noise, never a regression (1ms)",
    )
    start.add_argument(
        "--auto-rollback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="roll activated nodes back when the rollout fails (default: yes)",
    )
    start.add_argument(
        "--activate-at", metavar="TIME", help="ISO 8601 with zone, UNIX seconds, or +DURATION"
    )
    start.add_argument("--max-retries", type=int, default=2, help="per node (2)")
    start.add_argument("--retry-backoff", default="10s", metavar="DURATION")
    start.add_argument("--id", help="rollout id (default: generated)")
    status = leaf(
        rollout_commands,
        "status",
        _rollout_status,
        "show a rollout and its nodes",
        both,
        description="--watch redraws every second until the rollout ends (exit 0 when it "
        "succeeded, 1 otherwise) or Ctrl-C (exit 0). --json prints one document and ignores "
        "--watch.",
    )
    status.add_argument("id", metavar="ROLLOUT_ID")
    status.add_argument("--watch", action="store_true", help="follow it live")
    listing = leaf(rollout_commands, "list", _rollout_list, "list rollouts", both)
    listing.add_argument("--active", action="store_true", help="only those not ended")
    for op, help_text in (
        ("pause", "pause a rollout"),
        ("resume", "resume a paused rollout"),
        ("abort", "stop a rollout; activated nodes keep the new model"),
        ("rollback", "stop a rollout and roll its activated nodes back"),
    ):
        change = leaf(rollout_commands, op, _rollout_change(f"rollout.{op}"), help_text, both)
        change.add_argument("id", metavar="ROLLOUT_ID")

    # nodes, audit, report, top
    nodes = leaf(commands, "nodes", _nodes, "list nodes the controller knows", both)
    nodes.add_argument("--select", default="", metavar="K=V,...", help="label selector")
    audit = leaf(commands, "audit", _audit, "show the audit log of operator actions", both)
    audit.add_argument("--limit", type=int, default=100, help="newest N entries (100)")
    leaf(commands, "report", _report, "results per node and model, corner cases, latency", both)
    top = leaf(
        commands,
        "top",
        _top,
        "live console of the fleet's nodes (reads MQTT directly)",
        both,
        description="Subscribes read-only to the nodes' state, telemetry and status. "
        "--once prints one snapshot after --interval (with --json: one JSON document).",
    )
    top.add_argument("--once", action="store_true", help="collect, print one snapshot, exit")
    top.add_argument(
        "--interval", default="2s", metavar="DURATION", help="refresh period / --once wait (2s)"
    )

    demo = commands.add_parser(
        "demo",
        help="run a whole fleet on this machine: rollouts, waves, an automatic rollback",
        description="Starts Mosquitto (unless --broker), a controller and simulated nodes "
        "in this process, then rolls out three model versions.",
    )
    demo.add_argument("--nodes", type=int, default=12, help="simulated nodes (12)")
    demo.add_argument(
        "--broker", dest="demo_broker", help="use this broker instead of starting one"
    )
    demo.add_argument("--dir", help="keep the demo's files here instead of a temporary folder")
    demo.add_argument("--log-level", default="warning", choices=_LOG_LEVELS)
    demo.set_defaults(handler=_demo)

    # broker, node credentials
    broker = commands.add_parser("broker", help="secure Mosquitto configuration")
    broker_commands = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    binit = leaf(
        broker_commands,
        "init",
        _broker_init,
        "write secure.conf, acl and an empty passwd into a directory",
        both,
    )
    binit.add_argument("--dir", required=True, help="where to write the files")
    binit.add_argument(
        "--operators", default="", metavar="NAME,...", help="operator usernames (operator-*)"
    )
    binit.add_argument(
        "--force", action="store_true", help="replace config and ACL (passwd is kept)"
    )
    node = commands.add_parser("node", help="broker credentials of nodes")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    enroll = leaf(
        node_commands,
        "enroll",
        _node_enroll,
        "give a node a broker username and a new password (printed once)",
        both,
    )
    enroll.add_argument("id", metavar="NODE_ID")
    enroll.add_argument("--passwd-file", required=True, help="Mosquitto password file")
    enroll.add_argument("--force", action="store_true", help="replace an existing password")
    revoke = leaf(node_commands, "revoke", _node_revoke, "remove a node's broker username", both)
    revoke.add_argument("id", metavar="NODE_ID")
    revoke.add_argument("--passwd-file", required=True, help="Mosquitto password file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fleetctl`` with ``argv``; returns the exit code (never raises, never a traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2, one line printed), --help or --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except OperationError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return exc.code
    except DecodeError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 2
    except EdgeFleetError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fleetctl: {_first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleetctl: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"fleetctl: unexpected {type(exc).__name__}: {_first_line(exc)} "
            f"(a bug: set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
