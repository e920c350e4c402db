"""fleetctl's operator client (fleet_controller.api.CtlClient) against a controller on the
in-memory broker: results, refusals with their exit codes, time-outs, a missing broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet_io.memory import MemoryBroker
from fleet_controller.api import CtlClient, OperationError, OperatorIdentity
from shared.envelope import SigningKey
from shared.errors import BrokerUnavailableError, RequestTimeoutError
from tests.unit.fleet_controller.kit import FLEET, Clock, controller, run


def test_calls_return_results_and_refusals_carry_their_exit_code(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        # CtlClient dates its requests by the wall clock: so does this controller.
        async with controller(tmp_path, keys, clock=Clock(time.time())) as ctl_side:
            transport = ctl_side.broker.transport()
            alice = OperatorIdentity.load(keys, "alice")
            async with CtlClient(transport, fleet=FLEET, identity=alice, timeout_s=5) as ctl:
                assert await ctl.call("nodes.list") == []
                with pytest.raises(OperationError, match="unknown rollout nope") as failed:
                    await ctl.call("rollout.status", {"rollout_id": "nope"})
                assert failed.value.code == 1
                with pytest.raises(OperationError, match=r"invalid rollout\.start: model") as bad:
                    await ctl.call("rollout.start", {"model": "no-version"})
                assert bad.value.code == 2

    run(scenario)


def test_no_controller_is_a_timeout_and_no_broker_is_unavailable() -> None:
    alice = OperatorIdentity("alice", SigningKey.generate())

    async def scenario() -> None:
        broker = MemoryBroker()
        async with CtlClient(broker.transport(), fleet=FLEET, identity=alice, timeout_s=0.2) as ctl:
            with pytest.raises(RequestTimeoutError, match="is `fleetctl serve` running"):
                await ctl.call("nodes.list")
        broker.stop()
        with pytest.raises(BrokerUnavailableError, match="cannot reach the broker"):
            async with CtlClient(broker.transport(), fleet=FLEET, identity=alice):
                pass

    run(scenario)
