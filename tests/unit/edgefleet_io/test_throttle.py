"""One log line per interval for a repeated event."""

from __future__ import annotations

import logging

import pytest

from edgefleet_io.throttle import LogThrottle


def test_a_repeated_warning_is_logged_once_a_second_with_what_was_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("flood"), every_s=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="flood"):
        for n in range(5):
            throttle.warning("dropping %d", n)
        now[0] = 101.0
        throttle.warning("dropping %d", 5)
        throttle.warning("dropping %d", 6)
        now[0] = 102.5
        throttle.warning("dropping %d", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "dropping 0",
        "dropping 5 (and 4 more like it not logged)",
        "dropping 7 (and 1 more like it not logged)",
    ]
