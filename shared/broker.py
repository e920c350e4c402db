"""Broker URLs: ``mqtt://[user[:password]@]host[:port]`` and ``mqtts://`` for TLS.

Pure parsing; connecting is the job of each side's session module.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from shared.errors import DecodeError

__all__ = ["DEFAULT_BROKER_URL", "BrokerAddress", "parse_broker_url"]

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Raises: DecodeError for anything but an mqtt(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DecodeError(f"invalid broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise DecodeError(f"invalid broker URL {url!r}: expected mqtt://host:port or mqtts://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise DecodeError(f"invalid broker URL {url!r}: no path or query allowed")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
