"""The topic tree (shared.topics): identifiers, builders and the exact inverse parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import topics
from shared.errors import DecodeError
from shared.topics import ParsedTopic, TopicError, TopicKind, parse_topic
from tests.support.shared_kit import PROPERTY, SHA

IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
SHAS = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)

BAD_IDS: list[Any] = [
    pytest.param("a/b", id="slash"),
    pytest.param("a+b", id="plus"),
    pytest.param("a#b", id="hash"),
    pytest.param("+", id="single-level-wildcard"),
    pytest.param("#", id="multi-level-wildcard"),
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("nodé", id="non-ascii"),
    pytest.param("n\u0661", id="non-ascii-digit"),
    pytest.param("a b", id="space"),
    pytest.param("node\n", id="trailing-newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("$SYS", id="dollar"),
    pytest.param(None, id="not-a-string"),
]

# Every builder with one identifier slot, and how to call it with ``bad`` in that slot.
ID_SLOTS: list[Any] = [
    pytest.param(lambda bad: topics.state(bad, "n1"), id="state-fleet"),
    pytest.param(lambda bad: topics.state("f", bad), id="state-node"),
    pytest.param(lambda bad: topics.node_cmd("f", bad), id="node_cmd-node"),
    pytest.param(lambda bad: topics.status("f", bad), id="status-node"),
    pytest.param(lambda bad: topics.telemetry("f", bad), id="telemetry-node"),
    pytest.param(lambda bad: topics.results("f", bad), id="results-node"),
    pytest.param(lambda bad: topics.ack("f", bad), id="ack-node"),
    pytest.param(lambda bad: topics.infer_request("f", bad), id="infer_request-node"),
    pytest.param(lambda bad: topics.infer_reply("f", "n", bad), id="infer_reply-client"),
    pytest.param(lambda bad: topics.rollout_cmd("f", bad), id="rollout_cmd-rollout"),
    pytest.param(topics.rollout_cmd_filter, id="rollout_cmd_filter-fleet"),
    pytest.param(lambda bad: topics.artifact_request("f", SHA, bad), id="artifact_request-node"),
    pytest.param(lambda bad: topics.artifact_data("f", SHA, bad), id="artifact_data-node"),
    pytest.param(topics.controller_state, id="controller_state-fleet"),
    pytest.param(topics.ctl_request, id="ctl_request-fleet"),
    pytest.param(lambda bad: topics.ctl_reply("f", bad), id="ctl_reply-client"),
    pytest.param(lambda bad: topics.node_filter(bad, "state"), id="node_filter-fleet"),
    pytest.param(lambda bad: topics.shared_subscription("fleet/v1/f/ctl/request", bad), id="group"),
    pytest.param(topics.check_id, id="check_id"),
]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("build", ID_SLOTS)
def test_builders_reject_bad_ids(build: Callable[[Any], str], bad: Any) -> None:
    with pytest.raises(TopicError):
        build(bad)


def test_topic_error_is_a_decode_error() -> None:
    assert issubclass(TopicError, DecodeError)


@pytest.mark.parametrize("good", ["a", "x" * 64, "Node-1_b.c", "...", "0"])
def test_check_id_accepts(good: str) -> None:
    assert topics.check_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(SHA.upper(), id="uppercase"),
        pytest.param(SHA[:-1], id="63-chars"),
        pytest.param(SHA + "0", id="65-chars"),
        pytest.param("g" * 64, id="not-hex"),
        pytest.param(SHA + "\n", id="trailing-newline"),
        pytest.param("", id="empty"),
    ],
)
def test_bad_sha256_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.check_sha256(bad)
    with pytest.raises(TopicError):
        topics.artifact_request("f", bad, "n")
    with pytest.raises(TopicError):
        topics.artifact_data("f", bad, "n")
    with pytest.raises(TopicError):
        topics.artifact_broadcast("f", bad)


# Every concrete builder, the topic it must build, and what parse_topic must return.
ROUND_TRIPS: list[Any] = [
    pytest.param(
        topics.state("f", "n"),
        "fleet/v1/f/node/n/state",
        ParsedTopic(TopicKind.STATE, "f", node="n"),
        id="state",
    ),
    pytest.param(
        topics.node_cmd("f", "n"),
        "fleet/v1/f/node/n/cmd",
        ParsedTopic(TopicKind.NODE_CMD, "f", node="n"),
        id="node_cmd",
    ),
    pytest.param(
        topics.status("f", "n"),
        "fleet/v1/f/node/n/status",
        ParsedTopic(TopicKind.STATUS, "f", node="n"),
        id="status",
    ),
    pytest.param(
        topics.telemetry("f", "n"),
        "fleet/v1/f/node/n/telemetry",
        ParsedTopic(TopicKind.TELEMETRY, "f", node="n"),
        id="telemetry",
    ),
    pytest.param(
        topics.results("f", "n"),
        "fleet/v1/f/node/n/results",
        ParsedTopic(TopicKind.RESULTS, "f", node="n"),
        id="results",
    ),
    pytest.param(
        topics.ack("f", "n"),
        "fleet/v1/f/node/n/ack",
        ParsedTopic(TopicKind.ACK, "f", node="n"),
        id="ack",
    ),
    pytest.param(
        topics.infer_request("f", "n"),
        "fleet/v1/f/node/n/infer/request",
        ParsedTopic(TopicKind.INFER_REQUEST, "f", node="n"),
        id="infer_request",
    ),
    pytest.param(
        topics.infer_reply("f", "n", "c"),
        "fleet/v1/f/node/n/infer/reply/c",
        ParsedTopic(TopicKind.INFER_REPLY, "f", node="n", client="c"),
        id="infer_reply",
    ),
    pytest.param(
        topics.rollout_cmd("f", "r"),
        "fleet/v1/f/rollout/r/cmd",
        ParsedTopic(TopicKind.ROLLOUT_CMD, "f", rollout="r"),
        id="rollout_cmd",
    ),
    pytest.param(
        topics.artifact_request("f", SHA, "n"),
        f"fleet/v1/f/artifact/{SHA}/req/n",
        ParsedTopic(TopicKind.ARTIFACT_REQUEST, "f", node="n", sha256=SHA),
        id="artifact_request",
    ),
    pytest.param(
        topics.artifact_data("f", SHA, "n"),
        f"fleet/v1/f/artifact/{SHA}/data/n",
        ParsedTopic(TopicKind.ARTIFACT_DATA, "f", node="n", sha256=SHA),
        id="artifact_data",
    ),
    pytest.param(
        topics.artifact_broadcast("f", SHA),
        f"fleet/v1/f/artifact/{SHA}/data",
        ParsedTopic(TopicKind.ARTIFACT_BROADCAST, "f", sha256=SHA),
        id="artifact_broadcast",
    ),
    pytest.param(
        topics.controller_state("f"),
        "fleet/v1/f/controller/state",
        ParsedTopic(TopicKind.CONTROLLER_STATE, "f"),
        id="controller_state",
    ),
    pytest.param(
        topics.controller_replica_state("f", "ctl-a"),
        "fleet/v1/f/controller/state/ctl-a",
        ParsedTopic(TopicKind.CONTROLLER_REPLICA_STATE, "f", client="ctl-a"),
        id="controller_replica_state",
    ),
    pytest.param(
        topics.ctl_request("f"),
        "fleet/v1/f/ctl/request",
        ParsedTopic(TopicKind.CTL_REQUEST, "f"),
        id="ctl_request",
    ),
    pytest.param(
        topics.ctl_reply("f", "c"),
        "fleet/v1/f/ctl/reply/c",
        ParsedTopic(TopicKind.CTL_REPLY, "f", client="c"),
        id="ctl_reply",
    ),
]


@pytest.mark.parametrize(("built", "expected_topic", "expected"), ROUND_TRIPS)
def test_build_then_parse(built: str, expected_topic: str, expected: ParsedTopic) -> None:
    assert built == expected_topic
    assert parse_topic(built) == expected


def test_round_trip_table_covers_every_kind() -> None:
    assert {row.values[2].kind for row in ROUND_TRIPS} == set(TopicKind)


# Builders keyed by kind, for the property test below.
BUILDERS: dict[TopicKind, Callable[[str, str, str, str], str]] = {
    TopicKind.STATE: lambda f, n, _c, _s: topics.state(f, n),
    TopicKind.NODE_CMD: lambda f, n, _c, _s: topics.node_cmd(f, n),
    TopicKind.STATUS: lambda f, n, _c, _s: topics.status(f, n),
    TopicKind.TELEMETRY: lambda f, n, _c, _s: topics.telemetry(f, n),
    TopicKind.RESULTS: lambda f, n, _c, _s: topics.results(f, n),
    TopicKind.ACK: lambda f, n, _c, _s: topics.ack(f, n),
    TopicKind.INFER_REQUEST: lambda f, n, _c, _s: topics.infer_request(f, n),
    TopicKind.INFER_REPLY: lambda f, n, c, _s: topics.infer_reply(f, n, c),
    TopicKind.ROLLOUT_CMD: lambda f, n, _c, _s: topics.rollout_cmd(f, n),
    TopicKind.ARTIFACT_REQUEST: lambda f, n, _c, s: topics.artifact_request(f, s, n),
    TopicKind.ARTIFACT_DATA: lambda f, n, _c, s: topics.artifact_data(f, s, n),
    TopicKind.ARTIFACT_BROADCAST: lambda f, _n, _c, s: topics.artifact_broadcast(f, s),
    TopicKind.CONTROLLER_STATE: lambda f, _n, _c, _s: topics.controller_state(f),
    TopicKind.CONTROLLER_REPLICA_STATE: lambda f, _n, c, _s: topics.controller_replica_state(f, c),
    TopicKind.CTL_REQUEST: lambda f, _n, _c, _s: topics.ctl_request(f),
    TopicKind.CTL_REPLY: lambda f, _n, c, _s: topics.ctl_reply(f, c),
}


def test_property_builders_cover_every_kind() -> None:
    assert set(BUILDERS) == set(TopicKind)


@PROPERTY
@given(st.sampled_from(sorted(TopicKind)), IDS, IDS, IDS, SHAS)
def test_parse_inverts_every_builder(
    kind: TopicKind, fleet: str, ident: str, client: str, sha: str
) -> None:
    parsed = parse_topic(BUILDERS[kind](fleet, ident, client, sha))
    assert parsed.kind is kind
    assert parsed.fleet == fleet
    if kind is TopicKind.ROLLOUT_CMD:
        assert parsed.rollout == ident
    elif kind in {
        TopicKind.CONTROLLER_STATE,
        TopicKind.CONTROLLER_REPLICA_STATE,
        TopicKind.CTL_REQUEST,
        TopicKind.CTL_REPLY,
        TopicKind.ARTIFACT_BROADCAST,
    }:
        assert parsed.node is None
    else:
        assert parsed.node == ident
    assert parsed.client == (
        client
        if kind in {TopicKind.INFER_REPLY, TopicKind.CTL_REPLY, TopicKind.CONTROLLER_REPLICA_STATE}
        else None
    )
    assert parsed.sha256 == (
        sha
        if kind
        in {TopicKind.ARTIFACT_REQUEST, TopicKind.ARTIFACT_DATA, TopicKind.ARTIFACT_BROADCAST}
        else None
    )


UNRELATED: list[Any] = [
    pytest.param("", id="empty"),
    pytest.param("fleet", id="prefix-only"),
    pytest.param("fleet/v1/f", id="fleet-only"),
    pytest.param("fleet/v2/f/node/n/state", id="other-version"),
    pytest.param("other/v1/f/node/n/state", id="other-root"),
    pytest.param("/fleet/v1/f/node/n/state", id="leading-slash"),
    pytest.param("fleet/v1/f/node/n/state/", id="trailing-slash"),
    pytest.param("fleet/v1/f/node/n", id="node-without-leaf"),
    pytest.param("fleet/v1/f/node", id="node-without-id"),
    pytest.param("fleet/v1/f/node/n/unknown", id="unknown-leaf"),
    pytest.param("fleet/v1/f/node/n/state/extra", id="extra-level"),
    pytest.param("fleet/v1/f/node/n/infer", id="infer-without-direction"),
    pytest.param("fleet/v1/f/node/n/infer/reply", id="infer-reply-without-client"),
    pytest.param("fleet/v1/f/node/n/infer/reply/c/x", id="infer-reply-extra"),
    pytest.param("fleet/v1/f/node/+/state", id="node-filter"),
    pytest.param("fleet/v1/f/node/n/#", id="hash-filter"),
    pytest.param("fleet/v1/+/ctl/request", id="fleet-wildcard"),
    pytest.param("fleet/v1/f/rollout/r", id="rollout-without-cmd"),
    pytest.param("fleet/v1/f/rollout/r/cmd/x", id="rollout-extra"),
    pytest.param("fleet/v1/f/rollout/+/cmd", id="rollout-filter"),
    pytest.param(f"fleet/v1/f/artifact/{SHA}/put/n", id="artifact-unknown-direction"),
    pytest.param(f"fleet/v1/f/artifact/{SHA.upper()}/req/n", id="artifact-uppercase-sha"),
    pytest.param("fleet/v1/f/artifact/abc/req/n", id="artifact-short-sha"),
    pytest.param(f"fleet/v1/f/artifact/{SHA}/req", id="artifact-without-node"),
    pytest.param("fleet/v1/f/controller", id="controller-without-leaf"),
    pytest.param("fleet/v1/f/controller/state/x/y", id="controller-extra"),
    pytest.param("fleet/v1/f/controller/state/a b", id="controller-bad-replica-id"),
    pytest.param("fleet/v1/f/ctl/reply", id="ctl-reply-without-client"),
    pytest.param("fleet/v1/f/ctl/request/x", id="ctl-request-extra"),
    pytest.param("fleet/v1/f/ctl/other", id="ctl-unknown"),
    pytest.param("$share/controllers/fleet/v1/f/ctl/request", id="shared-subscription"),
    pytest.param("fleet/v1/f/node/n\u00e9/state", id="non-ascii-node"),
    pytest.param("fleet/v1/" + "x" * 65 + "/ctl/request", id="long-fleet"),
]


@pytest.mark.parametrize("topic", UNRELATED)
def test_unrelated_topics_rejected(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_filters_and_shared_subscription() -> None:
    assert topics.rollout_cmd_filter("f") == "fleet/v1/f/rollout/+/cmd"
    assert topics.node_filter("f", "results") == "fleet/v1/f/node/+/results"
    assert (
        topics.shared_subscription(topics.node_filter("f", "status"))
        == "$share/controllers/fleet/v1/f/node/+/status"
    )
