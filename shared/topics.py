"""Build and parse every topic of the EdgeFleet topic tree.

All topics live under ``fleet/v1/{fleet}/``. Identifiers (fleet, node, rollout,
client) match ``[A-Za-z0-9_.-]{1,64}``: no ``/``, ``+`` or ``#`` can ever reach a
topic, so one node cannot address another's subtree by choosing its name.
Artifact digests are 64 lowercase hex characters.

Parsing is the exact inverse of building: ``parse_topic(build(...))`` returns the
same parts, and any other topic raises :class:`TopicError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import DecodeError

__all__ = [
    "PREFIX",
    "SHARED_GROUP",
    "ParsedTopic",
    "TopicError",
    "TopicKind",
    "ack",
    "artifact_broadcast",
    "artifact_data",
    "artifact_request",
    "check_id",
    "check_sha256",
    "controller_replica_state",
    "controller_replicas",
    "controller_state",
    "ctl_reply",
    "ctl_request",
    "infer_reply",
    "infer_request",
    "node_cmd",
    "node_filter",
    "parse_topic",
    "results",
    "rollout_cmd",
    "rollout_cmd_filter",
    "shared_subscription",
    "state",
    "status",
    "telemetry",
]

PREFIX = "fleet/v1"
SHARED_GROUP = "controllers"

_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TopicError(DecodeError):
    """A topic or identifier does not belong to the EdgeFleet tree."""


class TopicKind(StrEnum):
    STATE = "state"
    NODE_CMD = "node_cmd"
    STATUS = "status"
    TELEMETRY = "telemetry"
    RESULTS = "results"
    ACK = "ack"
    INFER_REQUEST = "infer_request"
    INFER_REPLY = "infer_reply"
    ROLLOUT_CMD = "rollout_cmd"
    ARTIFACT_REQUEST = "artifact_request"
    ARTIFACT_DATA = "artifact_data"
    ARTIFACT_BROADCAST = "artifact_broadcast"
    CONTROLLER_STATE = "controller_state"
    CONTROLLER_REPLICA_STATE = "controller_replica_state"
    CTL_REQUEST = "ctl_request"
    CTL_REPLY = "ctl_reply"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid identifier, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(f"invalid {what} {value!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    return value


def check_sha256(value: str) -> str:
    """Return ``value`` if it is a lowercase hex SHA-256 digest, else raise."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise TopicError(f"invalid sha256 {value!r}: must be 64 lowercase hex characters")
    return value


def _base(fleet: str) -> str:
    return f"{PREFIX}/{check_id(fleet, 'fleet')}"


def _node(fleet: str, node: str, leaf: str) -> str:
    return f"{_base(fleet)}/node/{check_id(node, 'node')}/{leaf}"


def state(fleet: str, node: str) -> str:
    return _node(fleet, node, "state")


def node_cmd(fleet: str, node: str) -> str:
    return _node(fleet, node, "cmd")


def status(fleet: str, node: str) -> str:
    return _node(fleet, node, "status")


def telemetry(fleet: str, node: str) -> str:
    return _node(fleet, node, "telemetry")


def results(fleet: str, node: str) -> str:
    return _node(fleet, node, "results")


def ack(fleet: str, node: str) -> str:
    return _node(fleet, node, "ack")


def infer_request(fleet: str, node: str) -> str:
    return _node(fleet, node, "infer/request")


def infer_reply(fleet: str, node: str, client: str) -> str:
    return _node(fleet, node, f"infer/reply/{check_id(client, 'client')}")


def rollout_cmd(fleet: str, rollout: str) -> str:
    return f"{_base(fleet)}/rollout/{check_id(rollout, 'rollout')}/cmd"


def rollout_cmd_filter(fleet: str) -> str:
    """Subscription filter for every rollout's broadcast command."""
    return f"{_base(fleet)}/rollout/+/cmd"


def artifact_request(fleet: str, sha256: str, node: str) -> str:
    """Chunk requests: published by ``node`` (its username), read by controllers."""
    return f"{_base(fleet)}/artifact/{check_sha256(sha256)}/req/{check_id(node, 'node')}"


def artifact_data(fleet: str, sha256: str, node: str) -> str:
    """Answers for ``node`` alone (a refusal): published by the controller."""
    return f"{_base(fleet)}/artifact/{check_sha256(sha256)}/data/{check_id(node, 'node')}"


def artifact_broadcast(fleet: str, sha256: str) -> str:
    """A blob's chunks, published once by the controller for every node downloading it."""
    return f"{_base(fleet)}/artifact/{check_sha256(sha256)}/data"


def controller_state(fleet: str) -> str:
    """The fleet's controller service: online while any replica is."""
    return f"{_base(fleet)}/controller/state"


def controller_replica_state(fleet: str, controller_id: str) -> str:
    """One controller replica's own state (leader or not)."""
    return f"{_base(fleet)}/controller/state/{check_id(controller_id, 'controller')}"


def controller_replicas(fleet: str) -> str:
    """Filter: every replica's own state."""
    return f"{_base(fleet)}/controller/state/+"


def ctl_request(fleet: str) -> str:
    return f"{_base(fleet)}/ctl/request"


def ctl_reply(fleet: str, client: str) -> str:
    return f"{_base(fleet)}/ctl/reply/{check_id(client, 'client')}"


def node_filter(fleet: str, leaf: str) -> str:
    """Filter for one leaf of every node, e.g. ``node_filter(f, "results")``."""
    return f"{_base(fleet)}/node/+/{leaf}"


def shared_subscription(topic_filter: str, group: str = SHARED_GROUP) -> str:
    """Wrap a filter as an MQTT 5 shared subscription so replicas split the load."""
    return f"$share/{check_id(group, 'group')}/{topic_filter}"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    fleet: str
    node: str | None = None
    rollout: str | None = None
    sha256: str | None = None
    client: str | None = None


_NODE_LEAVES: dict[tuple[str, ...], TopicKind] = {
    ("state",): TopicKind.STATE,
    ("cmd",): TopicKind.NODE_CMD,
    ("status",): TopicKind.STATUS,
    ("telemetry",): TopicKind.TELEMETRY,
    ("results",): TopicKind.RESULTS,
    ("ack",): TopicKind.ACK,
    ("infer", "request"): TopicKind.INFER_REQUEST,
}


def parse_topic(topic: str) -> ParsedTopic:
    """Split a concrete topic into its kind and identifiers.

    Raises:
        TopicError: the topic is not part of the EdgeFleet tree.
    """
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "fleet" or parts[1] != "v1":
        raise TopicError(f"not an EdgeFleet topic: {topic!r}")
    fleet = check_id(parts[2], "fleet")
    section, rest = parts[3], parts[4:]
    if section == "node" and rest:
        node = check_id(rest[0], "node")
        leaf = tuple(rest[1:])
        if leaf in _NODE_LEAVES:
            return ParsedTopic(_NODE_LEAVES[leaf], fleet, node=node)
        if len(leaf) == 3 and leaf[:2] == ("infer", "reply"):
            return ParsedTopic(
                TopicKind.INFER_REPLY, fleet, node=node, client=check_id(leaf[2], "client")
            )
    elif section == "rollout" and len(rest) == 2 and rest[1] == "cmd":
        return ParsedTopic(TopicKind.ROLLOUT_CMD, fleet, rollout=check_id(rest[0], "rollout"))
    elif section == "artifact" and len(rest) == 3 and rest[1] in ("req", "data"):
        kind = TopicKind.ARTIFACT_REQUEST if rest[1] == "req" else TopicKind.ARTIFACT_DATA
        return ParsedTopic(
            kind, fleet, sha256=check_sha256(rest[0]), node=check_id(rest[2], "node")
        )
    elif section == "artifact" and len(rest) == 2 and rest[1] == "data":
        return ParsedTopic(TopicKind.ARTIFACT_BROADCAST, fleet, sha256=check_sha256(rest[0]))
    elif section == "controller" and rest == ["state"]:
        return ParsedTopic(TopicKind.CONTROLLER_STATE, fleet)
    elif section == "controller" and len(rest) == 2 and rest[0] == "state":
        return ParsedTopic(
            TopicKind.CONTROLLER_REPLICA_STATE, fleet, client=check_id(rest[1], "controller")
        )
    elif section == "ctl" and rest == ["request"]:
        return ParsedTopic(TopicKind.CTL_REQUEST, fleet)
    elif section == "ctl" and len(rest) == 2 and rest[0] == "reply":
        return ParsedTopic(TopicKind.CTL_REPLY, fleet, client=check_id(rest[1], "client"))
    raise TopicError(f"not an EdgeFleet topic: {topic!r}")
