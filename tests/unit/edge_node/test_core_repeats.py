"""The node's command verifier (edge_node.core): ignored broadcasts and duplicates."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_node.core import (
    Accepted,
    Duplicate,
    Ignored,
    VerifierState,
)
from shared.trust import TrustStore
from shared.waves import bucket
from tests.unit.edge_node.verifier_kit import (
    APPLIED_10,
    NODE,
    NOW,
    ROLLOUT,
    RUNNING_2_0,
    SHA_OTHER,
    Delivery,
    Kit,
    Scenario,
    accept,
    as_node,
    command_of,
    node_in_wave,
    node_outside_wave,
    send,
)

# ----- ignored ----------------------------------------------------------------

IGNORED: list[object] = [
    pytest.param(send(lambda k: k.wave(selector="site=paris")), id="selector-value-differs"),
    pytest.param(send(lambda k: k.wave(selector="gpu=yes")), id="selector-key-missing-from-labels"),
    pytest.param(
        send(lambda k: k.wave(selector="site=berlin"), me=as_node(NODE, hw="jetson")),
        id="node-without-the-selected-label",
    ),
    pytest.param(send(lambda k: k.wave(selector="site notin (berlin)")), id="selector-notin"),
    pytest.param(send(lambda k: k.wave(selector="!hw")), id="selector-label-must-be-absent"),
    pytest.param(
        send(lambda k: k.wave(selector="site in (paris,rome)")), id="selector-value-not-in-set"
    ),
    pytest.param(
        send(lambda k: k.wave(selector="site=berlin", exclude=("x", NODE))),
        id="excluded-by-id",
    ),
    pytest.param(
        send(lambda k: k.wave(1000), me=as_node(node_outside_wave(1000))),
        id="node-outside-bucket-limit",
    ),
    pytest.param(
        send(lambda k: k.wave(5000, wave=2), me=as_node(node_outside_wave(5000))),
        id="node-outside-half-wave",
    ),
    pytest.param(send(lambda k: k.wave(0), me=as_node(NODE)), id="empty-wave"),
    pytest.param(send(lambda k: k.wave(seq=10), state=APPLIED_10), id="wave-seq-equal-superseded"),
    pytest.param(send(lambda k: k.wave(seq=2), state=APPLIED_10), id="wave-seq-below-superseded"),
]


@pytest.mark.parametrize("scenario", IGNORED)
def test_ignored(kit: Kit, store: TrustStore, scenario: Scenario) -> None:
    outcome = scenario(kit).verify(store)

    assert isinstance(outcome, Ignored), outcome


def test_bucket_helpers_agree_with_shared_waves() -> None:
    inside, outside = node_in_wave(1000), node_outside_wave(1000)

    assert bucket(ROLLOUT, inside) < 1000 <= bucket(ROLLOUT, outside)


# ----- duplicates -------------------------------------------------------------


def redelivered(k: Kit) -> tuple[bytes, bytes]:
    data = k.make_command(seq=10)
    return data, data


def retained_wave_again(k: Kit) -> tuple[bytes, bytes]:
    data = k.wave(seq=10)
    return data, data


def next_wave_same_manifest(k: Kit) -> tuple[bytes, bytes]:
    return (
        k.wave(1000, wave=0, command_id="cmd-w0", seq=10),
        k.wave(5000, wave=1, command_id="cmd-w1", seq=11),
    )


def redelivered_rollback(k: Kit) -> tuple[bytes, bytes]:
    data = k.make_command(k.rollback("1.5.0"), seq=10)
    return data, data


# (first, second): the first is accepted and recorded, the second is a Duplicate
DUPLICATES: list[object] = [
    pytest.param(redelivered, id="same-bytes-again"),
    pytest.param(retained_wave_again, id="retained-wave-seen-on-reconnect"),
    pytest.param(next_wave_same_manifest, id="next-wave-same-rollout-and-manifest"),
    pytest.param(redelivered_rollback, id="same-rollback-again"),
]


@pytest.mark.parametrize("pair", DUPLICATES)
def test_duplicate(kit: Kit, store: TrustStore, pair: Callable[[Kit], tuple[bytes, bytes]]) -> None:
    first, second = pair(kit)
    me = as_node(node_in_wave(1000))  # inside every wave these scenarios send
    # A node that ran 1.5.0 before: the rollback scenario goes back to it.
    before = VerifierState(previous=RUNNING_2_0.previous)
    state = accept(Delivery(first, me=me, state=before), store)

    outcome = Delivery(second, me=me, state=state).verify(store)

    assert isinstance(outcome, Duplicate), outcome
    assert outcome.command == command_of(second)


def test_different_manifest_in_same_rollout_is_not_a_duplicate(kit: Kit, store: TrustStore) -> None:
    state = accept(Delivery(kit.wave(seq=10)), store)
    later = kit.wave(seq=11, body=kit.deploy("2.2.0", SHA_OTHER), command_id="cmd-2")

    outcome = Delivery(later, state=state).verify(store)

    assert isinstance(outcome, Accepted), outcome


def node_command_first(k: Kit) -> bytes:
    return k.make_command(command_id="cmd-1", seq=10)


def wave_command_first(k: Kit) -> bytes:
    return k.wave(command_id="cmd-w0", seq=10)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(node_command_first, id="after-a-per-node-command"),
        pytest.param(wave_command_first, id="after-a-wave-command"),
    ],
)
def test_node_retry_with_new_command_id_is_accepted(
    kit: Kit, store: TrustStore, first: Callable[[Kit], bytes]
) -> None:
    state = accept(Delivery(first(kit)), store)
    retry = kit.make_command(command_id="cmd-1-retry", seq=11)  # same rollout and manifest

    outcome = Delivery(retry, state=state).verify(store)

    assert isinstance(outcome, Accepted), outcome
    assert outcome.command.command_id == "cmd-1-retry"


def test_expired_redelivery_of_an_applied_command_is_a_duplicate(
    kit: Kit, store: TrustStore
) -> None:
    data = kit.wave(seq=10, expires_at=NOW + 60)
    state = accept(Delivery(data), store)

    outcome = Delivery(data, state=state, now=NOW + 120).verify(store)

    assert isinstance(outcome, Duplicate), outcome
