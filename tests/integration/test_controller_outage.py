"""A controller that is away: nodes hold their requests and backlog, and resume at once.

Real Mosquitto, the real controller service (in process, stopped and started
again on the same database), real agents on a real small model. A bystander
client on the broker (:class:`Wire`) records, in the order the broker handed
them out, every artifact request, every result batch a node published and
every ``controller/state``: what the assertions count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_node.agent import AgentConfig
from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import publish, sign_release
from fleet_controller.registry import describe_model
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.broker import BrokerAddress, parse_broker_url
from shared.messages import ControllerState, decode
from shared.result_batch import decode_results
from shared.trust import Role
from tests.support.broker import Broker
from tests.support.harness import RunningNode

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0  # far below the 30 s a stalled chunk request used to cost


@dataclass
class Wire:
    """A bystander subscribed to requests, results and the controller's state."""

    address: BrokerAddress
    fleet: str
    events: list[tuple[str, Any]] = field(default_factory=list)
    """("request", node) | ("results", (node, slot)) | ("controller", online)
    | ("command", rollout), in the order the broker handed them out."""

    def __post_init__(self) -> None:
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Wire:
        self._task = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(DEADLINE_S):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        base = f"{topics.PREFIX}/{self.fleet}"
        transport = MqttTransport(self.address)
        async with transport.connect(Session(client_id=f"wire-{self.fleet}")) as link:
            await link.subscribe(
                [
                    (f"{base}/artifact/+/req/+", 1),
                    (f"{base}/node/+/results", 1),
                    (topics.controller_state(self.fleet), 1),
                    (topics.rollout_cmd_filter(self.fleet), 1),
                ]
            )
            self._ready.set()
            async for message in link.messages():
                parsed = topics.parse_topic(message.topic)
                if parsed.kind is topics.TopicKind.ARTIFACT_REQUEST:
                    self.events.append(("request", parsed.node))
                elif parsed.kind is topics.TopicKind.ROLLOUT_CMD:
                    self.events.append(("command", parsed.rollout))
                elif parsed.kind is topics.TopicKind.RESULTS:
                    slot = decode_results(message.payload).seq
                    self.events.append(("results", (parsed.node, slot)))
                elif message.payload:
                    self.events.append(
                        ("controller", decode(ControllerState, message.payload).online)
                    )

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, kind: str) -> list[Any]:
        return [value for what, value in self.events[mark:] if what == kind]


class Controller:
    """A controller service running as a task; :meth:`stop` is a clean stop (offline state)."""

    def __init__(self, config: ControllerConfig) -> None:
        self.service = ControllerService(config)
        self.task = asyncio.get_running_loop().create_task(self.service.run())

    async def started(self) -> Controller:
        async with asyncio.timeout(DEADLINE_S):
            await self.service.connected.wait()
        return self

    async def stop(self) -> None:
        self.service.stop()
        async with asyncio.timeout(30):
            await self.task


async def until(check: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # polling state against the deadline


async def wait_online(ctl: CtlClient, node_id: str, *, online: bool = True) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not any(
        n["node_id"] == node_id and n["online"] is online for n in await ctl.call("nodes.list")
    ):
        assert time.monotonic() < deadline, f"the controller never saw {node_id} {online=}"
        await asyncio.sleep(0.05)  # polling the controller against the deadline


async def stored_results(ctl: CtlClient, node_id: str) -> int:
    nodes = (await ctl.call("report"))["nodes"]
    return sum(int(row["results"]) for row in nodes if row["node_id"] == node_id)


@dataclass
class Setup:
    address: BrokerAddress
    keys: Path
    controller: ControllerConfig

    def ctl(self) -> CtlClient:
        return CtlClient(
            MqttTransport(self.address),
            fleet=self.controller.fleet,
            identity=OperatorIdentity.load(self.keys),
        )

    def node(self, node_id: str, data: Path, **overrides: Any) -> AgentConfig:
        settings: dict[str, Any] = {
            "node_id": node_id,
            "data_dir": data,
            "trust_file": self.keys / "trust.json",
            "broker": self.address,
            "fleet": self.controller.fleet,
            "source": "none",
            "resend_after_s": 0.5,
            "reconnect_max_s": 1.0,
            "chunk_bytes": 4096,
        }
        settings.update(overrides)
        return AgentConfig(**settings)


def setup(broker: Broker, fleet_id: str, tmp_path: Path) -> Setup:
    address = parse_broker_url(broker.url)
    keys = tmp_path / "keys"
    init_keys(keys, now=time.time())
    config = ControllerConfig(
        broker=address,
        db_url=str(tmp_path / "fleet.db"),
        keys_dir=keys,
        fleet=fleet_id,
        tick_s=0.2,
    )
    return Setup(address, keys, config)


def test_a_node_back_before_its_controller_asks_for_chunks_once_the_controller_is_online(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    """Chunk requests sent into the controllers' empty group are dropped by the broker;
    the node waits for the controller's online state and asks at that moment."""

    async def scenario() -> None:
        s = setup(broker, fleet_id, tmp_path)
        data = tmp_path / "n1"
        async with Wire(s.address, fleet_id) as wire:
            first = await Controller(s.controller).started()
            async with s.ctl() as ctl:
                release = load_key(s.keys, Role.RELEASE, None)
                manifest = describe_model(classifier_v1, name="clf", version="1.0.0", now=0.0)
                await publish(ctl, sign_release(classifier_v1, manifest, release))
                async with RunningNode(s.node("n1", data)):
                    await wait_online(ctl, "n1")
                await wait_online(ctl, "n1", online=False)
                # The wave command waits retained on the broker for the node.
                started = await ctl.call(
                    "rollout.start", {"model": "clf@1.0.0", "waves": [100], "health_window_s": 0.5}
                )
                await until(lambda: bool(wire.since(0, "command")), "the wave command")
            await first.stop()
            assert wire.since(0, "controller")[-1] is False

            # The node comes back first: it takes the command and starts the download.
            mark = wire.mark()
            async with RunningNode(s.node("n1", data)):
                await until(
                    lambda: any((data / "models").glob("*.part")), "the node to start downloading"
                )
                assert wire.since(mark, "request") == [], "asked an absent controller"
                online_at = wire.mark()
                second = await Controller(s.controller).started()
                try:
                    async with s.ctl() as ctl:
                        status = {"rollout_id": started["rollout_id"]}
                        deadline = time.monotonic() + DEADLINE_S
                        while (await ctl.call("rollout.status", status))["state"] != "succeeded":
                            assert time.monotonic() < deadline, "the download stalled"
                            await asyncio.sleep(0.1)  # polling the rollout against the deadline
                finally:
                    await second.stop()
            states = wire.since(online_at, "controller")
            assert states[:1] == [True]
            requests = wire.since(online_at, "request")
            assert requests, "the node never asked once the controller was online"
            # Asked when the controller came, not after a back-off: the first
            # request follows its online state.
            assert [w for w, _ in wire.events[online_at:]].index("request") > [
                w for w, _ in wire.events[online_at:]
            ].index("controller")

    asyncio.run(scenario())


def test_resends_while_the_controller_is_away_are_bounded_and_all_results_land_once(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    """A controller outage costs a few probes per node, not the backlog every round;
    when it returns, everything lands, exactly once."""

    async def scenario() -> None:
        s = setup(broker, fleet_id, tmp_path)
        data = tmp_path / "n1"
        config = s.node(
            "n1",
            data,
            source="synthetic",
            rate_hz=40.0,
            batch_interval_s=0.1,
            silent_resend_max_s=60.0,
        )
        async with Wire(s.address, fleet_id) as wire:
            controller = await Controller(s.controller).started()
            async with s.ctl() as ctl:
                release = load_key(s.keys, Role.RELEASE, None)
                manifest = describe_model(classifier_v1, name="clf", version="1.0.0", now=0.0)
                await publish(ctl, sign_release(classifier_v1, manifest, release))
                node = RunningNode(config)
                await node.__aenter__()
                try:
                    await wait_online(ctl, "n1")
                    started = await ctl.call(
                        "rollout.start",
                        {"model": "clf@1.0.0", "waves": [100], "health_window_s": 0.5},
                    )
                    status = {"rollout_id": started["rollout_id"]}
                    deadline = time.monotonic() + DEADLINE_S
                    while (await ctl.call("rollout.status", status))["state"] != "succeeded":
                        assert time.monotonic() < deadline, "the rollout did not finish"
                        await asyncio.sleep(0.1)  # polling the rollout against the deadline
                except BaseException:
                    await node.stop()
                    raise
            agent = node.agent
            try:
                await until(lambda: agent.stats()["inferences"] > 0, "results")
                await controller.stop()
                outage = wire.mark()
                # An outage long enough for 6 re-send rounds of the old schedule.
                depth = agent.outbox_stats().depth
                await until(lambda: agent.outbox_stats().depth >= depth + 40, "a backlog")
                during = wire.since(outage, "results")
                back = wire.mark()
                controller = await Controller(s.controller).started()
                await until(lambda: agent.outbox_stats().depth == 0, "the backlog to drain")
            finally:
                await node.stop()
            produced = agent.stats()["inferences"]
            try:
                async with s.ctl() as ctl:
                    deadline = time.monotonic() + DEADLINE_S
                    while (stored := await stored_results(ctl, "n1")) < produced:
                        assert time.monotonic() < deadline, f"{stored} of {produced} stored"
                        await asyncio.sleep(0.1)  # polling the store against the deadline
            finally:
                await controller.stop()

            # While the controller was away only the oldest entry went out, a few times.
            resent = len(during) - len(set(during))
            assert len(during) <= 8, f"{len(during)} batches sent into an outage: {during}"
            assert resent <= 6
            # After it came back the backlog went out at once.
            assert wire.since(back, "results")
            # Every result the node produced is stored, exactly once.
            assert stored == produced

    asyncio.run(scenario())
