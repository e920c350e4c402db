"""Typed operator requests: every operation refuses out-of-range arguments by field name."""

from __future__ import annotations

from typing import Any

import pytest

from shared import operations as ops
from shared.operations import (
    DEFAULT_POLICY,
    OPERATIONS,
    RequestError,
    RolloutStart,
    lookup,
    parse_request,
)
from shared.trust import OperatorRole

NOW = 1_800_000_000.0
SHA = "a" * 64

VALID: dict[str, dict[str, Any]] = {
    "model.upload": {"sha256": SHA, "offset": 0, "size": 10, "data": ""},
    "model.add": {"envelope": "{}"},
    "model.list": {},
    "rollout.start": {"model": "clf@1.0.0"},
    "rollout.status": {"rollout_id": "r1"},
    "rollout.list": {"active_only": True},
    "rollout.events": {"rollout_id": "r1"},
    "rollout.pause": {"rollout_id": "r1"},
    "rollout.resume": {"rollout_id": "r1"},
    "rollout.abort": {"rollout_id": "r1"},
    "rollout.rollback": {"rollout_id": "r1"},
    "nodes.list": {"select": "site=berlin"},
    "node.revoke": {"node_id": "n1"},
    "node.forget": {"node_id": "n1"},
    "node.label": {"node_id": "n1", "set": {"site": "b"}, "hide": ["gpu"], "reset": ["tier"]},
    "deployment.set": {"deployment": "cams", "model": "clf@1.0.0", "select": "site=a"},
    "deployment.list": {},
    "deployment.show": {"deployment": "cams"},
    "deployment.delete": {"deployment": "cams"},
    "trust.push": {"trust": "{}"},
    "audit.list": {"limit": 10},
    "report": {},
}

# One out-of-range or mistyped argument per operation, and the field the error names.
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("model.upload", {**VALID["model.upload"], "sha256": "xyz"}, "sha256"),
    ("model.upload", {**VALID["model.upload"], "size": 0}, "size"),
    ("model.upload", {**VALID["model.upload"], "offset": -1}, "offset"),
    ("model.upload", {**VALID["model.upload"], "size": "10"}, "size"),
    ("model.add", {"envelope": 5}, "envelope"),
    ("model.list", {"x": 1}, "x"),
    ("rollout.start", {"model": "clf"}, "model"),
    ("rollout.start", {"model": "clf@one"}, "model"),
    ("rollout.start", {"model": "clf@1.0.0", "activate_at": -1}, "activate_at"),
    ("rollout.start", {"model": "clf@1.0.0", "activate_at": NOW - 3600}, "activate_at"),
    ("rollout.start", {"model": "clf@1.0.0", "activate_at": NOW + 400 * 86_400}, "activate_at"),
    ("rollout.start", {"model": "clf@1.0.0", "waves": [{}]}, "waves.0"),
    ("rollout.start", {"model": "clf@1.0.0", "waves": []}, "waves"),
    ("rollout.start", {"model": "clf@1.0.0", "waves": [50, 10]}, "waves"),
    ("rollout.start", {"model": "clf@1.0.0", "waves": [0]}, "waves"),
    (
        "rollout.start",
        {"model": "clf@1.0.0", "wave_timeout_s": 10 * 365 * 86_400},
        "wave_timeout_s",
    ),
    ("rollout.start", {"model": "clf@1.0.0", "wave_timeout_s": 0}, "wave_timeout_s"),
    ("rollout.start", {"model": "clf@1.0.0", "health_window_s": -1}, "health_window_s"),
    ("rollout.start", {"model": "clf@1.0.0", "max_failures": 1.5}, "max_failures"),
    ("rollout.start", {"model": "clf@1.0.0", "max_retries": True}, "max_retries"),
    ("rollout.start", {"model": "clf@1.0.0", "max_retries": 1000}, "max_retries"),
    ("rollout.start", {"model": "clf@1.0.0", "auto_rollback": "yes"}, "auto_rollback"),
    ("rollout.start", {"model": "clf@1.0.0", "select": "site="}, "select"),
    ("rollout.start", {"model": "clf@1.0.0", "rollout_id": "a/b"}, "rollout_id"),
    ("rollout.start", {"model": "clf@1.0.0", "max_error_increase": 2}, "max_error_increase"),
    ("rollout.start", {"model": "clf@1.0.0", "retry_backoff_s": 1e9}, "retry_backoff_s"),
    ("rollout.status", {}, "rollout_id"),
    ("rollout.list", {"active_only": 1}, "active_only"),
    ("rollout.events", {"rollout_id": "#"}, "rollout_id"),
    ("rollout.pause", {"rollout_id": ""}, "rollout_id"),
    ("rollout.resume", {"rollout_id": 7}, "rollout_id"),
    ("rollout.abort", {"rollout_id": "r" * 65}, "rollout_id"),
    ("rollout.rollback", {"rollout_id": None}, "rollout_id"),
    ("nodes.list", {"select": "a=b,a=c"}, "select"),
    ("node.revoke", {"node_id": "n 1"}, "node_id"),
    ("node.forget", {"node_id": ""}, "node_id"),
    ("node.label", {"node_id": "n1"}, "arguments"),
    ("node.label", {"node_id": "n1", "set": {"a": "b"}, "hide": ["a"]}, "arguments"),
    ("node.label", {"node_id": "n1", "set": {"a": "b c"}}, "set.a"),
    ("node.label", {"node_id": "n1", "reset": ["x"] * 65}, "reset"),
    ("deployment.set", {"deployment": "a/b", "model": "clf@1.0.0"}, "deployment"),
    (
        "deployment.set",
        {"deployment": "d", "model": "clf@1.0.0", "activate_at": NOW},
        "activate_at",
    ),
    ("deployment.set", {"deployment": "d", "model": "clf@1.0.0", "waves": [0]}, "waves"),
    ("deployment.set", {"deployment": "d", "model": "clf"}, "model"),
    ("deployment.set", {"deployment": "d", "model": "clf@1.0.0", "waves": [10, 50]}, "waves"),
    ("deployment.list", {"all": True}, "all"),
    ("deployment.show", {}, "deployment"),
    ("deployment.delete", {"deployment": 5}, "deployment"),
    ("trust.push", {"trust": "x" * (600 * 1024)}, "trust"),
    ("audit.list", {"limit": 0}, "limit"),
    ("report", {"extra": True}, "extra"),
]


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_operation_accepts_its_valid_arguments(name: str) -> None:
    request = parse_request(lookup(name), VALID[name], now=NOW)
    assert isinstance(request, OPERATIONS[name].request)


def test_every_operation_has_an_invalid_case() -> None:
    assert {name for name, _, _ in INVALID} == set(OPERATIONS)


@pytest.mark.parametrize(("name", "args", "field"), INVALID)
def test_out_of_range_arguments_are_refused_naming_the_field(
    name: str, args: dict[str, Any], field: str
) -> None:
    with pytest.raises(RequestError, match=rf"^invalid {name}: {field}: "):
        parse_request(lookup(name), args, now=NOW)


def test_unknown_operation_is_refused() -> None:
    with pytest.raises(RequestError, match=r"unknown operation 'rollout\.explode'"):
        lookup("rollout.explode")


def test_rollout_defaults_are_stated_once_in_the_policy() -> None:
    request = parse_request(ops.ROLLOUT_START, {"model": "clf@1.2.3"}, now=NOW)
    assert isinstance(request, RolloutStart)
    for name in ops.RolloutPolicy.model_fields:
        assert getattr(request, name) == getattr(DEFAULT_POLICY, name)
    assert (request.name, request.version, request.selector) == ("clf", "1.2.3", ())


def test_activation_a_little_in_the_past_is_within_clock_skew() -> None:
    request = parse_request(
        ops.ROLLOUT_START, {"model": "clf@1.0.0", "activate_at": NOW - 30}, now=NOW
    )
    assert isinstance(request, RolloutStart)
    assert request.activate_at == NOW - 30


def test_viewers_only_read_and_admins_alone_manage_nodes_and_trust() -> None:
    by_role = {
        role: {name for name, op in OPERATIONS.items() if op.role is role} for role in OperatorRole
    }
    assert by_role[OperatorRole.VIEWER] == {
        name for name, op in OPERATIONS.items() if not op.mutating
    }
    assert by_role[OperatorRole.ADMIN] == {"node.revoke", "node.forget", "trust.push"}


def test_mutating_operations_are_the_ones_that_change_the_fleet() -> None:
    mutating = {name for name, op in OPERATIONS.items() if op.mutating}
    assert mutating == {
        "model.upload",
        "model.add",
        "rollout.start",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
        "rollout.rollback",
        "node.revoke",
        "node.forget",
        "node.label",
        "deployment.set",
        "deployment.delete",
        "trust.push",
    }
