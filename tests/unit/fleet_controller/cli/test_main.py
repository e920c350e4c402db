"""``fleetctl``'s exit codes and one-line errors (:func:`fleet_controller.cli.main`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet_controller.api import OperationError
from fleet_controller.cli import common
from shared.operations import Operation
from tests.unit.fleet_controller.cli._kit import one_line, run


@pytest.mark.parametrize(
    "argv",
    [
        ["rollout", "start", "c@1.0.0", "--waves", "10,5"],
        ["rollout", "start", "c@1.0.0", "--max-failures", "10"],
        ["rollout", "start", "c@1.0.0", "--wave-timeout", "5x"],
        ["rollout", "start", "c@1.0.0", "--wave-timeout", "0"],
        ["rollout", "start", "c@1.0.0", "--health-window", "soon"],
        ["rollout", "start", "c@1.0.0", "--max-latency-regression", "lots"],
        ["rollout", "start", "c@1.0.0", "--activate-at", "2030-01-01T00:00:00"],
        ["rollout", "start", "c@1.0.0", "--retry-backoff", "-1s"],
        ["rollout", "start", "c@1.0.0", "--max-retries", "-1"],
        ["rollout", "start", "c@1.0.0", "--select", "site="],
        ["rollout", "start", "c@1.0.0", "--id", "has/slash"],
        ["rollout", "start", "c@1.0.0", "--max-retries", "two"],
        ["rollout", "start", "c@one"],
        ["rollout", "start", "c"],
        ["rollout", "start"],
        ["rollout", "status", "bad id"],
        ["rollout", "pause", "a+b"],
        ["rollout", "events", "bad id"],
        ["rollout", "events"],
        ["rollout", "start", "c@1.0.0", "--wave-timeout", "8d"],
        ["rollout", "explode", "r1"],
        ["nodes", "--select", "k in x"],
        ["nodes", "--bogus"],
        ["audit", "--limit", "0"],
        ["audit", "--limit", "-3"],
        ["model", "list", "--timeout", "0"],
        ["model", "list", "--timeout", "2h"],
        ["top", "--once", "--interval", "9999d"],
        ["demo", "--nodes", "0"],
        ["demo", "--nodes", "201"],
        ["demo", "--nodes", "NaN"],
        ["keys", "init", "--valid-days", "-5"],
        ["serve", "--retention-days", "inf"],
        ["model", "list", "--timeout", "soon"],
        ["model", "list", "--fleet", "a/b"],
        ["top", "--json"],
        ["top", "--once", "--interval", "0"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], closed_broker: str, argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv, *(["--broker", closed_broker] if argv else []))
    assert code == 2
    assert out == ""
    assert one_line(err).startswith("fleetctl")


def test_bad_broker_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "model", "list", "--broker", "http://example.com")
    assert code == 2
    assert "invalid broker URL" in one_line(err)


def test_unreachable_broker_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str],
    closed_broker: str,
    keys: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(common.KEYS_ENV, str(keys))
    code, out, err = run(capsys, "model", "list", "--json", "--broker", closed_broker)
    assert code == 1
    assert out == ""
    assert "cannot reach the broker" in one_line(err)


def test_a_missing_operator_key_exits_1_before_the_broker_is_tried(
    capsys: pytest.CaptureFixture[str], closed_broker: str, tmp_path: Path
) -> None:
    missing = tmp_path / "nobody.pem"
    code, out, err = run(
        capsys, "model", "list", "--broker", closed_broker, "--operator-key", str(missing)
    )
    assert code == 1
    assert out == ""
    assert (
        one_line(err)
        == f"fleetctl: cannot read operator key {missing}: No such file or directory\n"
    )


def test_an_invalid_operator_name_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], closed_broker: str
) -> None:
    code, _, err = run(capsys, "model", "list", "--broker", closed_broker, "--operator", "a/b")
    assert code == 2
    assert "operator" in one_line(err)


def test_operation_error_exits_with_its_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(settings: common.Settings, op: Operation[Any], args: Any = None) -> Any:
        raise OperationError("rollout r1 exists already", 2)

    monkeypatch.setattr(common, "call", refuse)
    code, _, err = run(capsys, "rollout", "start", "c@1.0.0", "--id", "r1")
    assert code == 2
    assert one_line(err) == "fleetctl: rollout r1 exists already\n"
