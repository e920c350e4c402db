"""``fleetctl rollout ...`` (:mod:`fleet_controller.cli.rollouts`), against a fake controller."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import pytest
from rich.console import Console

from fleet_controller.cli import rollouts
from shared.operations import ROLLOUT_START, RolloutPolicy, parse_request
from tests.unit.fleet_controller.cli._kit import EVENTS, one_line, run


def test_rollout_start_sends_parsed_arguments(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    before = time.time()
    code, out, _ = run(
        capsys,
        "rollout",
        "start",
        "c@1.0.0",
        "--select",
        "site=a,hw=pi",
        "--waves",
        "1,100",
        "--max-failures",
        "20%",
        "--wave-timeout",
        "2m",
        "--health-window",
        "30s",
        "--max-latency-regression",
        "150%",
        "--no-auto-rollback",
        "--activate-at",
        "+1h",
        "--max-retries",
        "3",
        "--retry-backoff",
        "5s",
        "--min-latency-regression",
        "1ms",
        "--max-error-increase",
        "2%",
        "--id",
        "r1",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["rollout_id"] == "r1"
    [(op, args)] = calls
    assert op == "rollout.start"
    activate_at = args.pop("activate_at")
    assert before + 3600 <= activate_at <= time.time() + 3600
    assert args == {
        "model": "c@1.0.0",
        "select": "hw=pi,site=a",
        "waves": [1.0, 100.0],
        "max_failures": pytest.approx(0.2),
        "wave_timeout_s": 120.0,
        "health_window_s": 30.0,
        "max_latency_regression": pytest.approx(1.5),
        "min_latency_regression_ms": 1.0,
        "max_error_increase": pytest.approx(0.02),
        "auto_rollback": False,
        "max_retries": 3,
        "retry_backoff_s": 5.0,
        "rollout_id": "r1",
    }


def test_rollout_start_defaults(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    code, out, _ = run(capsys, "rollout", "start", "c@1.0.0")
    assert code == 0
    assert "rollout r1" in out
    [(_, sent)] = calls
    assert sent == {"model": "c@1.0.0"}  # the controller fills in RolloutPolicy's defaults
    args = parse_request(ROLLOUT_START, sent, now=time.time())
    assert args.waves == (1.0, 10.0, 50.0, 100.0)
    assert args.max_failures == pytest.approx(0.1)
    assert (args.wave_timeout_s, args.health_window_s) == (300.0, 60.0)
    assert args.auto_rollback is True
    assert args.activate_at is None
    assert args.rollout_id is None


@pytest.mark.parametrize(
    ("extra", "sent"),
    [
        (["--select", ""], {"select": ""}),
        (["--waves", "5%,100%"], {"waves": [5.0, 100.0]}),
        (["--auto-rollback"], {"auto_rollback": True}),
        (["--max-retries", "0"], {"max_retries": 0}),
        (["--min-latency-regression", "250ms"], {"min_latency_regression_ms": 250.0}),
        (["--health-window", "0"], {"health_window_s": 0.0}),
    ],
)
def test_rollout_start_sends_only_the_flags_given(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    extra: list[str],
    sent: dict[str, Any],
) -> None:
    code, _, _ = run(capsys, "rollout", "start", "c@1.0.0", *extra, "--json")
    assert code == 0
    assert calls == [("rollout.start", {"model": "c@1.0.0", **sent})]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--waves", "10,5"], "--waves: waves must grow"),
        (["--max-failures", "10"], "--max-failures: 10 is more than 100%"),
        (["--wave-timeout", "0"], "--wave-timeout: must be above zero"),
        (["--health-window", "soon"], "--health-window: invalid duration"),
        (["--activate-at", "2020-01-01T00:00:00Z"], "--activate-at: activation time"),
        (["--max-retries", "-1"], "--max-retries: expected a whole number from 0 to 100"),
        (["--select", "site in (a"], "--select: "),
        (["--id", "has/slash"], "invalid rollout id"),
        # Flags that parse but that the controller would refuse: the field is named.
        (["--wave-timeout", "8d"], "invalid rollout.start: wave_timeout_s: "),
        (["--health-window", "2d"], "invalid rollout.start: health_window_s: "),
        (["--retry-backoff", "2d"], "invalid rollout.start: retry_backoff_s: "),
        (["--max-latency-regression", "101"], "invalid rollout.start: max_latency_regression: "),
        (["--max-retries", "101"], "--max-retries: expected a whole number from 0 to 100"),
        (["--max-error-increase", "150%"], "--max-error-increase: "),
        (["--activate-at", "+400d"], "invalid rollout.start: activate_at: "),
        (["--waves", "0.001,0.002"], "invalid rollout.start: waves: waves must be increasing"),
    ],
)
def test_rollout_start_refuses_before_the_controller(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    extra: list[str],
    message: str,
) -> None:
    code, out, err = run(capsys, "rollout", "start", "c@1.0.0", *extra)
    assert (code, out, calls) == (2, "", [])
    line = one_line(err)
    assert line.startswith("fleetctl")  # "fleetctl:" or argparse's "fleetctl rollout start:"
    assert message in line


def _start_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # no line breaks inside a help text
    code, out, _ = run(capsys, "rollout", "start", "--help")
    assert code == 0
    return out


def test_rollout_start_help_shows_the_policy_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flat = " ".join(_start_help(capsys, monkeypatch).split())
    for flag, shown in [
        ("--waves WAVES", "(default 1,10,50,100)"),
        ("--max-failures MAX_FAILURES", "(default 10%)"),
        ("--wave-timeout DURATION", "(default 5m)"),
        ("--health-window DURATION", "(default 1m)"),
        ("--max-latency-regression MAX_LATENCY_REGRESSION", "(default 50%)"),
        ("--min-latency-regression DURATION", "(default 1ms)"),
        ("--retry-backoff DURATION", "(default 10s)"),
        ("--auto-rollback, --no-auto-rollback", "(default yes)"),
        ("--max-retries MAX_RETRIES", "(default 2)"),
    ]:
        assert re.search(rf"{re.escape(flag)} [^(]*{re.escape(shown)}", flat), flag


def test_rollout_start_help_reads_defaults_from_the_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = RolloutPolicy(waves=(50.0, 100.0), max_failures=0.25, wave_timeout_s=90.0)
    monkeypatch.setattr(rollouts, "DEFAULT_POLICY", policy)
    out = _start_help(capsys, monkeypatch)
    assert "(default 50,100)" in out
    assert "(default 25%)" in out
    assert "(default 90s)" in out


@pytest.mark.parametrize(
    ("argv", "op", "args"),
    [
        (["rollout", "pause", "r1"], "rollout.pause", {"rollout_id": "r1"}),
        (["rollout", "resume", "r1"], "rollout.resume", {"rollout_id": "r1"}),
        (["rollout", "abort", "r1"], "rollout.abort", {"rollout_id": "r1"}),
        (["rollout", "rollback", "r1"], "rollout.rollback", {"rollout_id": "r1"}),
        (["rollout", "status", "r1", "--watch"], "rollout.status", {"rollout_id": "r1"}),
    ],
)
def test_rollout_actions_print_json(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    argv: list[str],
    op: str,
    args: dict[str, Any],
) -> None:
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    assert json.loads(out)["state"] == "pending"
    assert calls == [(op, args)]


def test_rollout_events_json_is_the_list(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    code, out, err = run(capsys, "rollout", "events", "r1", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == EVENTS
    assert calls == [("rollout.events", {"rollout_id": "r1"})]


def test_rollout_events_prints_a_table(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "rollout", "events", "r1")
    assert code == 0
    assert "rollout r1 events" in out
    assert "model_invalid" in out
    assert "warm-up failed" in out
    assert calls == [("rollout.events", {"rollout_id": "r1"})]


def test_events_table_columns_in_order() -> None:
    out = io.StringIO()
    extra = [{**event, "extra": "not shown"} for event in EVENTS]
    extra[1]["reason"] = "[bold]warm-up failed[/bold]"  # a cell, never markup
    Console(file=out, width=200).print(rollouts.events_table("r1", extra))
    text = out.getvalue()
    [header] = [line for line in text.splitlines() if "node id" in line]
    assert [w for w in header.split() if w.isalpha()] == [
        "ts",
        "node",
        "id",
        "state",
        "code",
        "reason",
    ]
    assert "not shown" not in text
    assert "[bold]warm-up failed[/bold]" in text
    assert text.index("downloading") < text.index("failed")  # oldest first, as answered
    empty = io.StringIO()
    Console(file=empty, width=200).print(rollouts.events_table("r1", []))
    assert "(none)" in empty.getvalue()
    assert "reason" in empty.getvalue()
