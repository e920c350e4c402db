"""One log line per interval for a repeated event, so a flood costs a counter, not a log.

A malformed message is logged and counted; under a flood of them, a line per
message would cost more than the message itself and bury everything else in
the log. :class:`LogThrottle` writes the first occurrence at once and then at
most one line per ``every_s``, each saying how many it left out since the last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogThrottle"]


class LogThrottle:
    """Warnings for one kind of event through ``logger``, at most one per ``every_s``."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every_s = every_s
        self._clock = clock
        self._next = float("-inf")
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        """Log ``message % args`` now, or count it for the next line."""
        now = self._clock()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + self._every_s
        if self._left_out:
            message += " (and %d more like it not logged)"
            args = (*args, self._left_out)
            self._left_out = 0
        self._logger.warning(message, *args)
