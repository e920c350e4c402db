"""The operator API's pipeline (fleet_controller.operator_api) on the in-memory broker.

Every request is answered, refused or failed, never fatal: out-of-range
arguments of every operation, unknown operations, junk on the request topic
and handlers that raise all get an answer (or a drop, for junk and expired
requests), are audited as the table in the module says, and the controller
goes on answering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet_io.transport import Session
from fleet_controller.deployments import Deployments
from fleet_controller.handlers import OperatorHandlers
from fleet_controller.operator_api import _audit_args
from shared import topics
from shared.operations import OPERATIONS
from tests.unit.fleet_controller.kit import FLEET, controller, run
from tests.unit.shared.test_operations import INVALID


def audit_rows(audit: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(a["operator"], a["action"], a["outcome"]) for a in audit]


def test_every_operation_has_a_handler() -> None:
    # Built without a store: only the binding is looked at.
    handlers = OperatorHandlers.__new__(OperatorHandlers)
    deployments = Deployments.__new__(Deployments)
    routes = {**handlers.routes(), **deployments.routes()}
    assert not set(handlers.routes()) & set(deployments.routes())
    assert set(routes) == set(OPERATIONS)
    assert all(routes[name].operation is OPERATIONS[name] for name in routes)


@pytest.mark.parametrize(("name", "args", "field"), INVALID)
def test_out_of_range_arguments_are_refused_naming_the_field_and_audited(
    tmp_path: Path, keys: Path, name: str, args: dict[str, Any], field: str
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            reply = await op.request(name, args)
            assert (reply.ok, reply.code) == (False, 2)
            assert reply.error is not None
            assert reply.error.startswith(f"invalid {name}: {field}: ")
            audit = await op.call("audit.list")
            assert audit_rows(audit)[0] == ("alice", name, "refused")
            assert audit[0]["detail"] == reply.error
            # ... and the controller still answers a valid request.
            assert await op.call("nodes.list") == []

    run(scenario)


def test_operator_api_answers_audits_and_survives_junk(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            raw = ctl.broker.transport()
            async with raw.connect(Session(client_id="raw")) as junk:
                # Junk on the request topic is dropped; the controller keeps answering.
                await junk.publish(topics.ctl_request(FLEET), b'{"v":1,"v":2}')
            assert await op.call("nodes.list") == []
            assert await op.call("node.revoke", {"node_id": "cam-9"}) == {
                "node_id": "cam-9",
                "revoked": True,
                "broker_account_removed": False,  # no dynamic security on this broker
            }
            nodes = await op.call("nodes.list")
            assert [(n["node_id"], n["revoked"]) for n in nodes] == [("cam-9", True)]
            unknown = await op.request("rollout.explode")
            assert unknown.code == 2
            assert unknown.error == "unknown operation 'rollout.explode'"
            bad = await op.request("rollout.start", {"model": "no-version"})
            assert bad.code == 2
            missing = await op.request("rollout.start", {"model": "ghost@1.0.0"})
            assert missing.code == 1
            audit = await op.call("audit.list")
            assert audit_rows(audit) == [
                ("alice", "rollout.start", "failed"),
                ("alice", "rollout.start", "refused"),
                ("alice", "rollout.explode", "refused"),
                ("alice", "node.revoke", "ok"),
            ]
            assert ctl.service.metrics["malformed"] >= 1

    run(scenario)


def test_a_handler_that_raises_gets_an_internal_error_and_the_controller_goes_on(
    tmp_path: Path, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:

            def broken() -> list[Any]:
                raise RuntimeError("kaput")

            ctl.store.models.list = broken
            request_id = await op.send("model.list")
            reply = await op.reply(request_id)
            assert (reply.ok, reply.code) == (False, 1)
            assert reply.error == "internal error: RuntimeError: kaput"
            audit = await op.call("audit.list")
            assert audit_rows(audit) == [("alice", "model.list", "failed")]
            assert audit[0]["detail"] == reply.error
            assert await op.call("nodes.list") == []
            logged = [r for r in caplog.records if request_id in r.getMessage()]
            assert logged
            assert logged[0].exc_info is not None  # with its traceback

    run(scenario)


def test_an_expired_request_is_dropped_unanswered_and_unaudited(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            await op.send("node.revoke", {"node_id": "n1"}, ttl_s=-1)
            assert await op.call("nodes.list") == []  # answered after the expired one
            assert await op.call("audit.list") == []
            assert await op.call("nodes.list") == []

    run(scenario)


def test_big_arguments_are_summarised_in_the_audit_log() -> None:
    summary = _audit_args(
        {"data": "x" * 1000, "small": "ok", "waves": [{}] * 1000, "n": 5, "few": [1, 2]}
    )
    assert summary == {
        "data": "<1000 characters>",
        "small": "ok",
        "waves": f"<{len(json.dumps([{}] * 1000))} characters of JSON>",
        "n": 5,
        "few": [1, 2],
    }
