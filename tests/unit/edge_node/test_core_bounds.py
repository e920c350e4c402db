"""The verifier against bricking and rollback attacks (edge_node.core): commands
from the future or living too long, a seq that would make every later command a
replay, a counter that went wrong anyway, trust updates that no counter can
block, and rollbacks only to the node's own previous model. Each refusal has a
positive control beside it, so a rejection means something."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_node.core import (
    CLOCK_SKEW_S,
    MAX_COMMAND_LIFETIME_S,
    Accepted,
    VerifierState,
    effective_last_seq,
    record,
)
from shared.errors import OutOfBoundsError, ReplayError, RollbackTargetError
from shared.messages import ModelRef
from shared.trust import TrustStore
from tests.unit.edge_node.verifier_kit import (
    MODEL,
    NOW,
    RUNNING_2_0,
    SHA_ACTIVE,
    SHA_NEW,
    Delivery,
    Kit,
    assert_rejected,
    command_of,
)

NOW_MS = int(NOW * 1000)
BRICKED = VerifierState(last_seq=2**63 - 1)


@pytest.mark.parametrize(
    ("build", "why"),
    [
        pytest.param(
            lambda k: k.make_command(
                issued_at=NOW + 10 * 365 * 86_400, expires_at=NOW + 10 * 365 * 86_400 + 600
            ),
            "ahead of this node's clock",
            id="issued-ten-years-ahead",
        ),
        pytest.param(
            lambda k: k.make_command(issued_at=NOW + CLOCK_SKEW_S + 1, expires_at=NOW + 3600),
            "ahead of this node's clock",
            id="issued-just-beyond-the-skew",
        ),
        pytest.param(
            lambda k: k.make_command(expires_at=NOW - 60 + MAX_COMMAND_LIFETIME_S + 1),
            "lives longer than 30 days",
            id="lifetime-over-30-days",
        ),
        pytest.param(
            lambda k: k.make_command(seq=2**63 - 1),
            "ahead of this node's clock in milliseconds",
            id="seq-2-to-the-63-minus-1",
        ),
        pytest.param(
            lambda k: k.make_command(seq=int((NOW + CLOCK_SKEW_S) * 1000) + 1),
            "ahead of this node's clock in milliseconds",
            id="seq-just-beyond-the-clock",
        ),
    ],
)
def test_commands_out_of_bounds_are_refused(
    kit: Kit, store: TrustStore, build: Callable[[Kit], bytes], why: str
) -> None:
    data = build(kit)
    outcome = Delivery(data).verify(store)
    assert_rejected(outcome, OutOfBoundsError, "out_of_bounds", command_of(data))
    assert why in str(outcome.error)  # type: ignore[union-attr]


def test_commands_within_bounds_are_accepted(kit: Kit, store: TrustStore) -> None:
    """Positive control: at the edges of every bound, a command is obeyed."""
    for data in (
        kit.make_command(issued_at=NOW + CLOCK_SKEW_S, expires_at=NOW + CLOCK_SKEW_S + 600),
        kit.make_command(expires_at=NOW - 60 + MAX_COMMAND_LIFETIME_S),
        kit.make_command(seq=int((NOW + CLOCK_SKEW_S) * 1000)),
        kit.make_command(seq=NOW_MS),  # how the controller numbers: its clock in ms
    ):
        assert isinstance(Delivery(data).verify(store), Accepted)


def test_a_node_whose_counter_went_wrong_recovers_by_itself(kit: Kit, store: TrustStore) -> None:
    """A stored seq beyond the clock cannot have come from an honest command: it
    counts as the clock, so commands numbered now are obeyed and older ones stay
    replays."""
    assert effective_last_seq(2**63 - 1, NOW) == NOW_MS
    assert effective_last_seq(NOW_MS + 5, NOW) == NOW_MS + 5  # a plausible one is kept

    fresh = kit.make_command(seq=NOW_MS + 1)
    accepted = Delivery(fresh, state=BRICKED).verify(store)
    assert isinstance(accepted, Accepted), accepted
    assert record(BRICKED, accepted, now=NOW).last_seq == NOW_MS + 1

    old = kit.make_command(seq=NOW_MS - 1000, command_id="old")
    assert_rejected(
        Delivery(old, state=BRICKED).verify(store), ReplayError, "replayed", command_of(old)
    )


def test_trust_updates_are_never_blocked_by_the_command_counter(
    kit: Kit, store: TrustStore
) -> None:
    """A root-signed rotation with a seq below the last applied is obeyed, and it
    does not move the counter (it is ordered by the list's version)."""
    state = VerifierState(last_seq=NOW_MS)
    update = kit.make_command(
        kit.trust_update(kit.trust_list(version=2), [kit.root]), rollout_id=None, seq=1
    )
    outcome = Delivery(update, state=state).verify(store)
    assert isinstance(outcome, Accepted), outcome
    assert outcome.new_trust is not None
    assert outcome.new_trust.version == 2
    assert record(state, outcome, now=NOW).last_seq == NOW_MS


def test_a_rollback_goes_only_to_the_nodes_own_previous_model(kit: Kit, store: TrustStore) -> None:
    """RUNNING_2_0 runs 2.0.0 and ran 1.5.0 (SHA_OTHER) before it."""
    back = kit.make_command(kit.rollback("1.5.0"))
    assert isinstance(Delivery(back, state=RUNNING_2_0).verify(store), Accepted)
    # A resumed rollback that was applied already: the target is the active model.
    applied = kit.make_command(kit.rollback("2.0.0", SHA_ACTIVE), command_id="resumed")
    assert isinstance(Delivery(applied, state=RUNNING_2_0).verify(store), Accepted)

    for data in (
        kit.make_command(kit.rollback("1.0.0", SHA_NEW)),  # an older release, not its own
        kit.make_command(kit.rollback("1.5.0", SHA_NEW)),  # same version, other build
    ):
        outcome = Delivery(data, state=RUNNING_2_0).verify(store)
        assert_rejected(outcome, RollbackTargetError, "rollback_target", command_of(data))
        assert "is not this node's previous model (resnet 1.5.0)" in str(outcome.error)  # type: ignore[union-attr]

    never_had = VerifierState(active=ModelRef(name=MODEL, version="2.0.0", sha256=SHA_ACTIVE))
    outcome = Delivery(back, state=never_had).verify(store)
    assert_rejected(outcome, RollbackTargetError, "rollback_target", command_of(back))
