"""Operators are principals: signed, fresh, unreplayed requests, authorized by role,
answered only on the signer's own reply topic (fleet_controller.operator_api)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_controller.keys import load_key, load_trust
from fleet_controller.operator_api import (
    MAX_REQUEST_LIFETIME_S,
    REQUEST_SKEW_S,
    AuthError,
    authenticate,
)
from fleet_controller.quotas import RateLimiter
from fleet_controller.store import Store
from shared import topics
from shared.envelope import PAYLOAD_COMMAND, PAYLOAD_REQUEST, SigningKey, sign_envelope
from shared.trust import OperatorRole, Role
from tests.unit.fleet_controller.kit import (
    FLEET,
    NOW,
    Controller,
    Operator,
    controller,
    eventually,
    run,
)


async def refused_silently(ctl: Controller, op: Operator, data: bytes, counter: str) -> None:
    """``data`` is dropped (counted under ``counter``, never answered, never audited),
    and the controller goes on answering: the next reply is a valid request's."""
    before = ctl.service.metrics[counter]
    await op.publish(data)
    await eventually(counter, lambda: ctl.service.metrics[counter] == before + 1)
    request_id = await op.send("model.list")
    assert (await op.next_reply()).id == request_id


def test_each_role_runs_what_it_may_and_is_denied_the_rest(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys) as ctl,
            ctl.operator("vera") as vera,
            ctl.operator("dave") as dave,
        ):
            assert await vera.call("nodes.list") == []
            start = await vera.request("rollout.start", {"model": "clf@1.0.0"})
            assert (start.code, start.error) == (
                2,
                "operator vera (viewer) may not run rollout.start: it needs the deployer role",
            )
            revoke = await dave.request("node.revoke", {"node_id": "n1"})
            assert revoke.code == 2
            assert "needs the admin role" in (revoke.error or "")
            pushed = await dave.request("trust.push", {"trust": "{}"})
            assert pushed.code == 2
            assert ctl.store.nodes.get("n1") is None
            # Denials are audited under the signer's name, with what was asked.
            audit = ctl.store.audit.list()
            assert [(a.operator, a.action, a.outcome) for a in audit] == [
                ("dave", "trust.push", "denied"),
                ("dave", "node.revoke", "denied"),
                ("vera", "rollout.start", "denied"),
            ]
            assert ctl.service.metrics["ctl_denied"] == 3

    run(scenario)


def test_unknown_keys_and_borrowed_names_get_no_answer(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys) as ctl,
            ctl.operator("alice", key=SigningKey.generate()) as stranger,
            ctl.operator("vera") as vera,
        ):
            _, forged = stranger.signed("node.revoke", {"node_id": "n1"})
            await refused_silently(ctl, vera, forged, "ctl_unauthenticated")
            # vera signs, but says she is alice: the signature decides, and they differ.
            _, borrowed = vera.signed("node.revoke", {"node_id": "n1"}, operator="alice")
            await refused_silently(ctl, vera, borrowed, "ctl_unauthenticated")
            await refused_silently(ctl, vera, b'{"not": "an envelope"}', "malformed")
            assert ctl.store.audit.list() == []

    run(scenario)


def test_a_replayed_request_runs_once(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator("alice") as alice:
            request_id, data = alice.signed("node.revoke", {"node_id": "n1"})
            await alice.publish(data)
            assert (await alice.next_reply()).id == request_id
            await refused_silently(ctl, alice, data, "ctl_replays")
            audit = ctl.store.audit.list()
            assert [(a.action, a.outcome) for a in audit] == [("node.revoke", "ok")]

    run(scenario)


def test_nonces_are_shared_by_replicas_on_one_database(tmp_path: Path) -> None:
    url = str(tmp_path / "fleet.db")
    with Store.open(url) as one, Store.open(url) as two:
        assert one.audit.claim_nonce("a" * 32, "alice", expires_at=NOW + 60, now=NOW)
        assert not two.audit.claim_nonce("a" * 32, "alice", expires_at=NOW + 60, now=NOW)
        # Once the request has expired its nonce is forgotten; the request is refused
        # as expired by then, before its nonce is looked at.
        assert two.audit.claim_nonce("b" * 32, "alice", expires_at=NOW + 200, now=NOW + 61)
        assert one.audit.claim_nonce("a" * 32, "alice", expires_at=NOW + 200, now=NOW + 61)


@pytest.mark.parametrize(
    ("issued_at", "ttl_s", "error"),
    [
        (NOW - 120, 60, "has expired"),
        (NOW + REQUEST_SKEW_S + 5, 60, "issued in the future"),
        (NOW, MAX_REQUEST_LIFETIME_S + 1, "lives longer than"),
    ],
)
def test_stale_future_and_long_lived_requests_get_no_answer(
    tmp_path: Path, keys: Path, issued_at: float, ttl_s: float, error: str
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator("alice") as alice:
            _, data = alice.signed(
                "node.revoke", {"node_id": "n1"}, issued_at=issued_at, ttl_s=ttl_s
            )
            await refused_silently(ctl, alice, data, "ctl_unauthenticated")
            assert ctl.store.audit.list() == []

    run(scenario)


def test_replies_go_only_to_the_signer(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys) as ctl,
            ctl.operator("vera") as vera,
            ctl.operator("alice") as alice,
        ):
            vera_id = await vera.send("audit.list")
            alice_id = await alice.send("model.list")
            # Each reads only their own topic: alice's first reply is her own.
            assert (await alice.next_reply()).id == alice_id
            assert (await vera.next_reply()).id == vera_id
            assert topics.ctl_reply(FLEET, "vera") != topics.ctl_reply(FLEET, "alice")

    run(scenario)


def test_an_activation_time_in_the_past_is_refused_and_the_controller_serves_on(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator("dave") as dave:
            bad = await dave.request("rollout.start", {"model": "clf@1.0.0", "activate_at": -1})
            assert bad.code == 2
            assert "activate_at" in (bad.error or "")
            assert await dave.call("rollout.list") == []

    run(scenario)


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.allow("a", NOW) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", NOW)  # buckets are per operator
    assert not limiter.allow("a", NOW + 0.4)
    assert limiter.allow("a", NOW + 0.5)
    assert [limiter.allow("a", NOW + 100) for _ in range(4)] == [True, True, True, False]


def test_a_command_signed_by_the_rollout_key_is_not_an_operator_request(keys: Path) -> None:
    trust = load_trust(keys, now=NOW)
    command = sign_envelope(b"{}", PAYLOAD_COMMAND, [load_key(keys, Role.ROLLOUT, None)])
    with pytest.raises(AuthError, match="is not an operator request"):
        authenticate(command, trust, now=NOW)
    disguised = sign_envelope(b"{}", PAYLOAD_REQUEST, [load_key(keys, Role.ROLLOUT, None)])
    with pytest.raises(AuthError, match="not signed by an operator"):
        authenticate(disguised, trust, now=NOW)


def test_roles_are_ordered() -> None:
    assert OperatorRole.ADMIN.allows(OperatorRole.VIEWER)
    assert OperatorRole.DEPLOYER.allows(OperatorRole.DEPLOYER)
    assert not OperatorRole.VIEWER.allows(OperatorRole.DEPLOYER)
    assert not OperatorRole.DEPLOYER.allows(OperatorRole.ADMIN)
