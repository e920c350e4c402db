"""Two controllers on one fleet over a real Mosquitto: one store, or a refusal.

A controller reads the retained ``controller/state`` before it joins: a live
controller naming another store (another SQLite file) makes it refuse to
start; a replica on the same database joins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from fleet_controller.keys import init_keys
from fleet_controller.link import StoreConflictError
from fleet_controller.service import ControllerConfig, ControllerService
from shared import topics
from shared.broker import parse_broker_url
from shared.messages import ControllerState, decode
from tests.support.broker import Broker

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0


def _service(broker: Broker, fleet_id: str, keys: Path, db: Path, name: str) -> ControllerService:
    return ControllerService(
        ControllerConfig(
            broker=parse_broker_url(broker.url),
            db_url=str(db),
            keys_dir=keys,
            fleet=fleet_id,
            controller_id=name,
        )
    )


@asynccontextmanager
async def _running(service: ControllerService) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(service.run())
    try:
        async with asyncio.timeout(DEADLINE_S):
            connected = asyncio.ensure_future(service.connected.wait())
            await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
            connected.cancel()
        if task.done():
            task.result()
        yield task
    finally:
        service.stop()
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(task, return_exceptions=True)


def test_a_second_store_is_refused_and_a_replica_joins(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        keys = tmp_path / "keys"
        init_keys(keys, now=time.time())
        first = _service(broker, fleet_id, keys, tmp_path / "a" / "fleet.db", "ctl-a")
        async with _running(first):
            other = _service(broker, fleet_id, keys, tmp_path / "b" / "fleet.db", "ctl-b")
            with pytest.raises(StoreConflictError) as caught:
                async with asyncio.timeout(DEADLINE_S):
                    await other.run()
            message = str(caught.value)
            assert "ctl-a" in message
            assert first.store.store_id in message
            assert other.store.store_id in message
            # The refused controller published nothing: the first one is still the live one.
            retained = await _retained_state(broker, fleet_id)
            assert (retained.controller_id, retained.online) == ("ctl-a", True)
            assert retained.store_id == first.store.store_id

            replica = _service(broker, fleet_id, keys, tmp_path / "a" / "fleet.db", "ctl-a2")
            assert replica.store.store_id == first.store.store_id
            async with _running(replica):
                assert replica.connected.is_set()
                assert first.connected.is_set()

    asyncio.run(scenario())


async def _retained_state(broker: Broker, fleet_id: str) -> ControllerState:
    transport = MqttTransport(parse_broker_url(broker.url))
    async with transport.connect(Session(client_id="probe")) as probe:
        await probe.subscribe([(topics.controller_state(fleet_id), 1)])
        async with asyncio.timeout(DEADLINE_S):
            async for message in probe.messages():
                return decode(ControllerState, message.payload)
    raise AssertionError("no retained controller state")
