"""Logging for the long-running programs (``fleetctl serve``, ``fleetctl demo``,
``edge-node run``, ``edge-node simulate``): one handler on stderr, as text or JSON lines.

* ``text``: ``2026-11-22 06:35:22,123 INFO fleet_controller.ticker: message``;
* ``json``: one object per line, ``{"ts": "2026-11-22T06:35:22.123Z", "level":
  "info", "logger": "...", "message": "..."}`` plus ``exception`` (the
  traceback as text) when the record carries one. Newlines inside a message or
  a traceback are escaped, so every record stays on one line.

:func:`setup_logging` replaces the handler it installed before (if any) and
leaves every other handler alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "setup_logging"]

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message`` and, when present, ``exception`` and ``stack``."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "ts": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _OurHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`setup_logging` installs (so a second call replaces it)."""


def setup_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Log records at ``level`` and above to ``stream`` (stderr) in ``log_format``.

    Raises:
        ValueError: an unknown level or format (the command lines offer only
            :data:`LOG_LEVELS` and :data:`LOG_FORMATS`).
    """
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: use {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use {' or '.join(LOG_FORMATS)}")
    handler = _OurHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiomqtt warns whenever more than ten publishes await their PUBACK; serving
    # chunks and acks to many nodes does that by design.
    logging.getLogger("mqtt").setLevel(max(logging.ERROR, root.level))
