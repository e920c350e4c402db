"""Broker URLs: ``mqtt://[user[:password]@]host[:port]`` and ``mqtts://`` for TLS.

One query parameter is allowed, ``?protocol=5`` (the default) or
``?protocol=3.1.1``: the MQTT version spoken with that broker. MQTT 3.1.1 has
no session expiry and no shared subscriptions, so on 3.1.1 a persistent
session lasts until the client next connects with a clean session (or the
broker expires it by its own setting), and the controller subscribes without
``$share`` (one controller per fleet). Everything else EdgeFleet needs is in
the payloads.

Pure parsing; connecting is the job of each side's session module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from shared.errors import DecodeError

__all__ = [
    "DEFAULT_BROKER_URL",
    "MQTT_VERSIONS",
    "BrokerAddress",
    "check_mqtt_version",
    "parse_broker_url",
]

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
MQTT_VERSIONS: Final = ("5", "3.1.1")
"""The MQTT versions EdgeFleet speaks; the first is the default."""


def check_mqtt_version(value: str) -> str:
    """``value`` if it names a version of :data:`MQTT_VERSIONS`. Raises: DecodeError."""
    if value not in MQTT_VERSIONS:
        raise DecodeError(f"MQTT version {value!r}: use {' or '.join(MQTT_VERSIONS)}")
    return value


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    mqtt_version: str = MQTT_VERSIONS[0]

    @property
    def shared_subscriptions(self) -> bool:
        """Whether ``$share/{group}/...`` is available (MQTT 5 only)."""
        return self.mqtt_version == "5"

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        query = "" if self.mqtt_version == MQTT_VERSIONS[0] else f"?protocol={self.mqtt_version}"
        return f"{scheme}://{user}{self.host}:{self.port}{query}"


def parse_broker_url(url: str, mqtt_version: str | None = None) -> BrokerAddress:
    """The address of ``url``; ``mqtt_version``, when given, wins over the URL's.

    Raises: DecodeError for anything but an mqtt(s) URL with a host and at most
    ``?protocol=5|3.1.1``, or an unknown ``mqtt_version``."""
    try:
        parts = urlsplit(url)
        port = parts.port
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise DecodeError(f"invalid broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise DecodeError(f"invalid broker URL {url!r}: expected mqtt://host:port or mqtts://")
    if parts.path not in ("", "/") or parts.fragment:
        raise DecodeError(f"invalid broker URL {url!r}: no path allowed")
    if len(query) > 1 or any(key != "protocol" for key, _ in query):
        raise DecodeError(f"invalid broker URL {url!r}: the only query allowed is ?protocol=")
    version = query[0][1] if query else MQTT_VERSIONS[0]
    if version not in MQTT_VERSIONS:
        raise DecodeError(
            f"invalid broker URL {url!r}: protocol {version!r}, use {' or '.join(MQTT_VERSIONS)}"
        )
    if mqtt_version is not None:
        version = check_mqtt_version(mqtt_version)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        mqtt_version=version,
    )
