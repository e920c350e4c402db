"""``fleetctl nodes|audit|report`` (:mod:`fleet_controller.cli.fleet`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.fleet_controller.cli._kit import one_line, run


def test_nodes_json_is_the_only_output(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    code, out, err = run(capsys, "nodes", "--select", "site=a", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)[0]["node_id"] == "n1"
    assert calls == [("nodes.list", {"select": "site=a"})]


@pytest.mark.parametrize(
    ("argv", "op", "args"),
    [
        (["nodes"], "nodes.list", {"select": ""}),
        (["audit"], "audit.list", {"limit": 100}),
        (["audit", "--limit", "5"], "audit.list", {"limit": 5}),
        (["report"], "report", {}),
    ],
)
def test_requests_sent(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    argv: list[str],
    op: str,
    args: dict[str, Any],
) -> None:
    code, _, _ = run(capsys, *argv, "--json")
    assert code == 0
    assert calls == [(op, args)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nodes", "--select", "k="], "fleetctl: --select: "),
        (
            ["audit", "--limit", "100001"],
            "fleetctl audit: argument --limit: expected a whole number from 1 to 100000",
        ),
    ],
)
def test_refused_before_the_controller(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    argv: list[str],
    message: str,
) -> None:
    code, _, err = run(capsys, *argv)
    assert (code, calls) == (2, [])
    assert one_line(err).startswith(message)
