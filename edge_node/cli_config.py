"""``edge-node run``'s settings: flags, then a TOML file, then the environment, then
defaults, each checked, into one :class:`~edge_node.agent.AgentConfig`.

A bad setting raises :class:`~shared.errors.UsageError` with one line naming it
(the command line exits 2 on it).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from shared.broker import DEFAULT_BROKER_URL, BrokerAddress, parse_broker_url
from shared.errors import TrustError, UsageError
from shared.topics import check_id

if TYPE_CHECKING:
    from edge_node.agent import AgentConfig

__all__ = [
    "build_config",
    "check_data_dir",
    "check_trust",
    "load_toml",
    "parse_labels",
    "setting_ranges",
    "text_setting",
]

_RUN_KEYS = {
    "id", "trust", "data", "broker", "fleet", "labels", "source", "rate", "concurrency",
    "micro_batch", "swap_mode", "threads", "providers", "graph_optimization",
    "change_threshold", "corner_threshold",
    "topk", "batch_max", "batch_interval", "telemetry_interval", "resend_after",
    "chunk_bytes", "ca_file", "cert_file", "key_file", "password_file", "log_level",
    "log_format", "mqtt_version",
}  # fmt: skip
_PATH_KEYS = {"trust", "data", "ca_file", "cert_file", "key_file", "password_file"}
"""Relative paths in a config file are relative to the file (an enrollment bundle)."""


def load_toml(path: str | None) -> dict[str, Any]:
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


def parse_labels(values: object) -> dict[str, str]:
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
def setting_ranges() -> dict[str, _Range]:
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
        return setting_ranges()[name].check(_setting(args, toml, name, default))
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _whole(args: argparse.Namespace, toml: dict[str, Any], name: str, default: int) -> int:
    return int(_number(args, toml, name, default))


def text_setting(args: argparse.Namespace, toml: dict[str, Any], name: str, default: Any) -> Any:
    """A string setting (``None`` stays ``None``)."""
    value = _setting(args, toml, name, default)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{name}: expected a string, got {value!r}")
    return value


def check_data_dir(path: Path) -> Path:
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
        toml = load_toml(args.config)
    node_id = text_setting(args, toml, "id", None)
    data = text_setting(args, toml, "data", None)
    if node_id is None or data is None:
        raise UsageError("--id and --data are required (flags or config file)")
    trust = text_setting(args, toml, "trust", None)
    source_kind, source_dir = parse_source(text_setting(args, toml, "source", "synthetic"))
    broker_url = text_setting(
        args, toml, "broker", os.environ.get("FLEET_BROKER", DEFAULT_BROKER_URL)
    )
    fleet = text_setting(args, toml, "fleet", os.environ.get("FLEET_FLEET", "default"))
    labels = parse_labels(args.label) if args.label else parse_labels(toml.get("labels"))
    graph = text_setting(args, toml, "graph_optimization", "extended")
    if graph not in ("disable", "basic", "extended", "all"):
        raise UsageError(f"graph optimization {graph!r}: use disable, basic, extended or all")
    rate = _number(args, toml, "rate", 10.0)
    swap_mode = text_setting(args, toml, "swap_mode", "availability")
    if swap_mode not in ("availability", "resource"):
        raise UsageError(f"swap mode {swap_mode!r}: use availability or resource")
    threads = _whole(args, toml, "threads", 0)
    providers = _providers(_setting(args, toml, "providers", None))
    node_id = check_id(node_id, "node id")
    password_file = text_setting(args, toml, "password_file", None)
    broker = _broker(
        broker_url, node_id, password_file, text_setting(args, toml, "mqtt_version", None)
    )
    ca_file = _check_ca_file(text_setting(args, toml, "ca_file", None))
    cert_file = text_setting(args, toml, "cert_file", None)
    key_file = text_setting(args, toml, "key_file", None)
    MqttTransport(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)  # loads TLS
    return AgentConfig(
        node_id=node_id,
        data_dir=check_data_dir(Path(data)),
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
