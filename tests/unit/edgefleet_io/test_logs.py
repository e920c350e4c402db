"""Log setup shared by both programs (:mod:`edgefleet_io.logs`): text or one JSON object a line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from edgefleet_io.logs import JsonFormatter, setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_ts_level_logger_message_and_the_exception(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("fleet_controller.ticker")
    log.debug("not at info")
    log.info("rollout %s: wave %d/%d started", "r1", 2, 3)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("tick raised")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the traceback stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "info",
        "logger": "fleet_controller.ticker",
        "message": "rollout r1: wave 2/3 started",
    }
    assert set(first) == {"ts", "level", "logger", "message"}
    assert datetime.fromisoformat(first["ts"].replace("Z", "+00:00")).tzinfo is not None
    assert second["level"] == "error"
    assert second["message"] == "tick raised"
    assert "Traceback" in second["exception"]
    assert "RuntimeError: boom\nsecond line" in second["exception"]


def test_text_is_the_default_and_a_second_setup_replaces_the_first(restore_root: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("warning", stream=first)
    setup_logging("INFO", "json", stream=second)
    logging.getLogger("edge_node.link").info("connected")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["message"] == "connected"
    setup_logging("info", stream=first)
    logging.getLogger("edge_node.link").info("again")
    assert first.getvalue().endswith(" INFO edge_node.link: again\n")
    assert second.getvalue().count("\n") == 1


def test_json_formatter_escapes_what_would_break_a_line() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, 'a "quoted"\nline', (), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["message"] == 'a "quoted"\nline'


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_unknown_level_or_format_is_refused(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="use"):
        setup_logging(level, fmt)
