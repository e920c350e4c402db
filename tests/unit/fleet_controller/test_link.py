"""The controller's broker link (fleet_controller.link) on the in-memory broker."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from edgefleet_io.memory import MemoryBroker
from edgefleet_io.transport import Message, Session
from fleet_controller.link import (
    ControllerLink,
    RawResults,
    Routes,
    StoreConflictError,
    check_peer,
    decode_incoming,
    open_results,
)
from shared import topics
from shared.envelope import PAYLOAD_REQUEST, Envelope, SigningKey, sign_envelope
from shared.errors import BrokerUnavailableError, DecodeError
from shared.messages import (
    ArtifactRequest,
    ControllerState,
    NodeRolloutState,
    NodeStatus,
    OperatorRequest,
    decode,
    encode,
)
from tests.unit.fleet_controller.kit import (
    DEADLINE_S,
    FLEET,
    NOW,
    Clock,
    controller,
    eventually,
    make_service,
    result_batch,
    run,
    running,
)

SHA = "ab" * 32
STATUS = NodeStatus(
    node="n1", seq=1, command_id="c1", rollout_id="r1", state=NodeRolloutState.QUEUED, ts=NOW
)
CHUNK = ArtifactRequest(node="n1", sha256=SHA, ranges=((0, 10),), ts=0.0)
REQUEST = sign_envelope(
    encode(
        OperatorRequest(
            id="i1", operator="alice", nonce="0" * 32, op="report", issued_at=NOW, expires_at=NOW
        )
    ),
    PAYLOAD_REQUEST,
    [SigningKey.generate()],
)


@pytest.mark.parametrize(
    ("topic", "message", "expected"),
    [
        (topics.status(FLEET, "n1"), STATUS, STATUS),
        (topics.artifact_request(FLEET, SHA, "n1"), CHUNK, CHUNK),
        (topics.ctl_request(FLEET), REQUEST, REQUEST),  # the signed envelope, as it came
        (topics.node_cmd(FLEET, "n1"), STATUS, None),  # not a topic the controller reads
    ],
)
def test_incoming_messages_are_decoded_by_topic(
    topic: str, message: NodeStatus | ArtifactRequest | Envelope, expected: object
) -> None:
    data = message.to_bytes() if isinstance(message, Envelope) else encode(message)
    assert decode_incoming(topic, data) == expected


def test_result_batches_are_decoded_off_the_loop_and_strictly() -> None:
    topic = topics.results(FLEET, "n1")
    good = result_batch("n1", 1, [1, 2])
    raw = decode_incoming(topic, good.payload)
    assert raw == good  # handed on as it arrived
    assert isinstance(raw, RawResults)
    assert open_results(raw).result_seq == [1, 2]
    # What does not even begin like a batch of the topic's node is refused at once.
    for junk in [encode(STATUS), result_batch("n2", 1, [1]).payload, b"[[[[", b"\xff"]:
        with pytest.raises(DecodeError, match="not a canonical result batch of node n1"):
            decode_incoming(topic, junk)
    truncated = decode_incoming(topic, b'{"v":2,"type":"results","node":"n1"}')
    assert isinstance(truncated, RawResults)  # looks like one: the writer's thread decides
    with pytest.raises(DecodeError, match="invalid ResultBatch"):
        open_results(truncated)
    with pytest.raises(DecodeError, match="payload names node 'n2', topic 'n1'"):
        open_results(RawResults("n1", result_batch("n2", 1, [1]).payload))
    with pytest.raises(DecodeError, match="exceeds the 1048576-byte limit"):
        decode_incoming(topic, b" " * (1024 * 1024 + 1))  # refused before it is queued


@pytest.mark.parametrize(
    ("topic", "message", "error"),
    [
        (topics.status(FLEET, "n2"), STATUS, "payload names node 'n1', topic 'n2'"),
        (topics.artifact_request(FLEET, SHA, "n2"), CHUNK, "payload names node 'n1'"),
        (topics.artifact_request(FLEET, "cd" * 32, "n1"), CHUNK, "request names blob abababababab"),
        ("elsewhere/n1/status", STATUS, "not an EdgeFleet topic"),
    ],
)
def test_malformed_or_misaddressed_messages_are_refused(
    topic: str, message: NodeStatus | ArtifactRequest, error: str
) -> None:
    with pytest.raises(DecodeError, match=error):
        decode_incoming(topic, encode(message))


def test_a_route_that_raises_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics: Counter[str] = Counter()
    link = ControllerLink(
        MemoryBroker().transport(),
        fleet=FLEET,
        controller_id="c1",
        store_id="s1",
        clock=Clock(),
        metrics=metrics,
    )

    def explode(*_: object) -> None:
        raise RuntimeError("route broke")

    routes = Routes(ingest=explode, artifact=explode, operator=explode)
    link.route(Message(topics.status(FLEET, "n1"), encode(STATUS)), routes)
    link.route(Message(topics.status(FLEET, "n1"), b"{"), routes)
    link.route(Message(topics.status(FLEET, "n1"), b""), routes)  # a cleared retained topic
    assert (metrics["route_errors"], metrics["malformed"]) == (1, 1)
    assert any(r.exc_info for r in caplog.records if "failed" in r.getMessage())


def test_controller_state_is_retained_with_a_will_and_cleared_on_stop(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        service = make_service(tmp_path, keys, broker, Clock())
        state_topic = topics.controller_state(FLEET)
        async with running(service):
            online = decode(ControllerState, broker.retained(state_topic) or b"")
            assert (online.online, online.session, online.controller_id) == (True, 1, "ctl-1")
            # The network goes: the Will says offline; the controller comes back.
            assert broker.drop("ctl-1")
            await eventually("it reconnects", lambda: broker.connected("ctl-1"))
            await eventually(
                "it is online again",
                lambda: decode(ControllerState, broker.retained(state_topic) or b"").online,
            )
            assert decode(ControllerState, broker.retained(state_topic) or b"").session == 2
        offline = decode(ControllerState, broker.retained(state_topic) or b"")
        assert (offline.online, offline.session) == (False, 2)

    run(scenario)


def test_the_controller_survives_a_broker_outage(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            ctl.broker.stop()
            await eventually("it notices", lambda: not ctl.service.connected.is_set())
            with pytest.raises(BrokerUnavailableError):
                await ctl.service.link.publish("x", b"y")
            ctl.broker.start()
            async with asyncio.timeout(DEADLINE_S):
                await ctl.service.connected.wait()
            async with ctl.operator() as op:
                assert await op.call("nodes.list") == []

    run(scenario)


def test_the_link_subscribes_shared_except_for_node_states(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            # A second replica on the same database shares the work; both get every node state.
            other = make_service(
                tmp_path / "b",
                keys,
                ctl.broker,
                ctl.clock,
                controller_id="ctl-2",
                db_url=str(ctl.db),
            )
            replicas = (ctl.service, other)
            async with running(other, leading=False), ctl.node("n1") as node:
                await node.birth()
                await eventually(
                    "both store the birth", lambda: all(s.metrics["stored"] == 1 for s in replicas)
                )
                async with ctl.broker.transport().connect(Session(client_id="n2")) as n2:
                    await n2.subscribe([(topics.ack(FLEET, "n2"), 1)])
                    for slot in (1, 2):
                        status = STATUS.model_copy(update={"node": "n2", "seq": slot})
                        await n2.publish(topics.status(FLEET, "n2"), encode(status))
                    await eventually(
                        "each replica stored one status",
                        lambda: [s.metrics["stored"] for s in replicas] == [2, 2],
                    )
                assert ctl.store.results.table_counts()["statuses"] == 2

    run(scenario)


# ----- the store's identity in controller/state -------------------------------------------


def _state(*, online: bool = True, store_id: str = "s-other") -> ControllerState:
    return ControllerState(
        controller_id="ctl-9", online=online, session=1, store_id=store_id, ts=NOW
    )


@pytest.mark.parametrize(
    ("peer", "refused"),
    [
        pytest.param(None, False, id="nothing-retained"),
        pytest.param(_state(online=False), False, id="offline-controller"),
        pytest.param(_state(store_id=""), False, id="controller-naming-no-store"),
        pytest.param(_state(store_id="s-mine"), False, id="replica-on-the-same-store"),
        pytest.param(_state(), True, id="live-controller-on-another-store"),
    ],
)
def test_check_peer(peer: ControllerState | None, refused: bool) -> None:
    if not refused:
        check_peer(peer, store_id="s-mine")
        return
    with pytest.raises(StoreConflictError) as caught:
        check_peer(peer, store_id="s-mine")
    message = str(caught.value)
    assert "ctl-9" in message
    assert "s-other" in message
    assert "s-mine" in message
    assert "\n" not in message


def test_read_peer_returns_what_is_retained_and_none_at_once_without(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        link = ControllerLink(
            broker.transport(),
            fleet=FLEET,
            controller_id="c1",
            store_id="s1",
            clock=Clock(),
            metrics=Counter(),
        )
        # Nothing retained: the marker comes back first, long before the wait ends.
        started = asyncio.get_running_loop().time()
        assert await link.read_peer(wait_s=DEADLINE_S) is None
        assert asyncio.get_running_loop().time() - started < DEADLINE_S / 2
        async with broker.transport().connect(Session(client_id="other")) as other:
            await other.publish(topics.controller_state(FLEET), encode(_state()), retain=True)
        assert await link.read_peer(wait_s=DEADLINE_S) == _state()
        # The probe left nothing behind: the retained state is untouched.
        assert broker.retained(topics.controller_state(FLEET)) == encode(_state())

    run(scenario)


def test_the_store_identity_is_published_and_another_store_is_refused(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            retained = ctl.broker.retained(topics.controller_state(FLEET)) or b""
            store_id = ctl.store.store_id
            assert decode(ControllerState, retained).store_id == store_id
            stranger = make_service(tmp_path / "b", keys, ctl.broker, ctl.clock, controller_id="x")
            assert stranger.store.store_id != store_id
            with pytest.raises(StoreConflictError, match=f"ctl-1 .* {store_id}"):
                await stranger.run()
            assert not ctl.broker.connected("x")
            assert (
                decode(
                    ControllerState, ctl.broker.retained(topics.controller_state(FLEET)) or b""
                ).controller_id
                == "ctl-1"
            )
            # Once the first controller has stopped cleanly (offline), another store may serve.
        later = make_service(tmp_path / "b", keys, ctl.broker, ctl.clock, controller_id="y")
        async with running(later):
            assert later.connected.is_set()

    run(scenario)


# ----- replicas: the fleet's state, each replica's, and the leader ---------------------------


def test_each_replica_retains_its_state_and_the_fleet_stays_online_while_one_is_up(
    tmp_path: Path, keys: Path
) -> None:
    def retained(broker: MemoryBroker, topic: str) -> ControllerState | None:
        payload = broker.retained(topic)
        return None if not payload else decode(ControllerState, payload)

    async def scenario() -> None:
        async with controller(tmp_path, keys, lease_s=1.0) as ctl:
            fleet_topic = topics.controller_state(FLEET)
            first, second = (topics.controller_replica_state(FLEET, c) for c in ("ctl-1", "ctl-2"))
            other = make_service(
                tmp_path / "b", keys, ctl.broker, ctl.clock, controller_id="ctl-2",
                db_url=str(ctl.db), lease_s=1.0,
            )  # fmt: skip
            async with running(other, leading=False):
                await eventually(
                    "ctl-1 leads, ctl-2 follows, both online",
                    lambda: (
                        [
                            (s.online, s.leader, s.term)
                            for s in (retained(ctl.broker, first), retained(ctl.broker, second))
                            if s is not None
                        ]
                        == [(True, True, 1), (True, False, 0)]
                    ),
                )
                state = retained(ctl.broker, fleet_topic)
                assert state is not None
                assert (state.online, state.v) == (True, 2)
                ctl.service.stop()  # a clean stop: it says offline, ctl-2 says online again
                await eventually(
                    "ctl-2 took over and the fleet reads online",
                    lambda: (
                        (s := retained(ctl.broker, fleet_topic)) is not None
                        and (s.controller_id, s.online, s.leader, s.term)
                        == ("ctl-2", True, True, 2)
                    ),
                )
                gone = retained(ctl.broker, first)
                assert gone is not None
                assert not gone.online
                assert other.leadership.term == 2
            state = retained(ctl.broker, fleet_topic)
            assert state is not None
            assert (state.controller_id, state.online) == ("ctl-2", False)  # the last one left

    run(scenario)
