"""Which inbox lane each topic a node or a controller subscribes to lands in."""

from __future__ import annotations

import pytest

from edge_node.link import CONTROL, DATA, JUNK, sort_node_topic
from fleet_controller import link as controller
from shared import topics

SHA = "a" * 64
F = "f1"


@pytest.mark.parametrize(
    ("topic", "lane"),
    [
        (topics.node_cmd(F, "n1"), CONTROL),
        (topics.ack(F, "n1"), CONTROL),
        (topics.rollout_cmd(F, "r1"), CONTROL),
        (topics.controller_state(F), CONTROL),
        (topics.artifact_broadcast(F, SHA), DATA),
        (topics.artifact_data(F, SHA, "n1"), DATA),
        (topics.infer_request(F, "n1"), DATA),
        (topics.controller_replica_state(F, "c1"), JUNK),
        (topics.status(F, "n1"), JUNK),
        (f"{topics.PREFIX}/{F}/controller", JUNK),
        ("x", JUNK),
    ],
)
def test_node_lanes(topic: str, lane: int) -> None:
    assert sort_node_topic(topic)[0] == lane


@pytest.mark.parametrize(
    ("topic", "lane", "key"),
    [
        (topics.ctl_request(F), controller.CONTROL, "ctl/request"),
        (topics.controller_state(F), controller.CONTROL, "controller"),
        (topics.state(F, "n1"), controller.CONTROL, "n1"),
        (topics.status(F, "n1"), controller.INGEST, "n1"),
        (topics.results(F, "n2"), controller.INGEST, "n2"),
        (topics.telemetry(F, "n3"), controller.INGEST, "n3"),
        (topics.artifact_request(F, SHA, "n4"), controller.INGEST, "n4"),
        (topics.controller_replica_state(F, "c1"), controller.JUNK, None),
        (topics.node_cmd(F, "n1"), controller.JUNK, None),
        ("fleet/v1", controller.JUNK, None),
    ],
)
def test_controller_lanes(topic: str, lane: int, key: str | None) -> None:
    assert controller.sort_controller_topic(topic) == (lane, key)
