"""``fleetctl deployment ...`` and ``fleetctl node label|forget``
(:mod:`fleet_controller.cli.deployments`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet_controller.cli.deployments import parse_label_changes
from shared.errors import UsageError
from tests.unit.fleet_controller.cli._kit import one_line, run


@pytest.mark.parametrize(
    ("argv", "op", "args"),
    [
        (
            ["deployment", "set", "cams", "c@1.0.0", "--select", "site in (a,b)"],
            "deployment.set",
            {"deployment": "cams", "model": "c@1.0.0", "select": "site in (a,b)"},
        ),
        (
            ["deployment", "set", "cams", "c@1.0.0", "--waves", "10,100", "--gate", "errors"],
            "deployment.set",
            {"deployment": "cams", "model": "c@1.0.0", "waves": [10.0, 100.0], "gates": ["errors"]},
        ),
        (
            ["deployment", "set", "cams", "c@1.0.0", "--force", "--no-auto-rollback"],
            "deployment.set",
            {"deployment": "cams", "model": "c@1.0.0", "auto_rollback": False, "force": True},
        ),
        (["deployment", "list"], "deployment.list", {}),
        (["deployment", "show", "cams"], "deployment.show", {"deployment": "cams"}),
        (["deployment", "delete", "cams"], "deployment.delete", {"deployment": "cams"}),
        (
            ["node", "label", "n1", "site=b", "!gpu", "tier-"],
            "node.label",
            {"node_id": "n1", "set": {"site": "b"}, "hide": ["gpu"], "reset": ["tier"]},
        ),
        (["node", "forget", "n1"], "node.forget", {"node_id": "n1"}),
    ],
)
def test_requests_sent(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    argv: list[str],
    op: str,
    args: dict[str, Any],
) -> None:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    json.loads(out)
    assert calls == [(op, args)]


@pytest.mark.parametrize(
    "argv",
    [
        ["deployment", "show", "cams"],
        ["deployment", "set", "cams", "c@1.0.0"],
        ["node", "label", "n1", "site=b"],
    ],
)
def test_tables_for_people(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert "cams" in out or "site=b" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["node", "label", "n1", "site"], "fleetctl: label change 'site': expected k=v, !k or k-"),
        (["node", "label", "n1", "a=b c"], "fleetctl: label change 'a=b c': invalid label value"),
        (["node", "label", "n1", "a=b", "a-"], "fleetctl: invalid node.label: "),
        (["node", "forget", "n/1"], "fleetctl: invalid node id"),
        (["deployment", "set", "a/b", "c@1.0.0"], "fleetctl: invalid deployment name"),
        (["deployment", "set", "cams", "c@1.0.0", "--select", "k="], "fleetctl: --select: "),
        (["deployment", "set", "cams", "c@1.0.0", "--waves", "50,10"], "fleetctl: --waves"),
        (["deployment", "set", "cams", "c"], "fleetctl: "),
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


def test_label_changes_parse_into_set_hide_and_reset() -> None:
    assert parse_label_changes(["a=1", "!b", "c-"]) == {
        "set": {"a": "1"},
        "hide": ["b"],
        "reset": ["c"],
    }
    assert parse_label_changes(["a=1"]) == {"set": {"a": "1"}}
    with pytest.raises(UsageError, match="label change '!': "):
        parse_label_changes(["!"])
