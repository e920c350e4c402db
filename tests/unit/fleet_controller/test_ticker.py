"""The rollout ticker (fleet_controller.ticker): one rollout's failure stays its own.

A tick that raises, or a record that cannot be decoded, fails that rollout
with the reason and clears its retained broadcast; the other rollouts keep
ticking and the controller keeps answering. A passing store error only
postpones the tick.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edgefleet_io.transport import Session
from fleet_controller import rollout_core, ticker
from fleet_controller.rollout_core import RolloutRecord, RolloutSpec
from fleet_controller.store import RecordError, StoreError
from shared import topics
from shared.messages import ModelRef, RolloutState
from tests.unit.fleet_controller.kit import FLEET, Controller, blob, controller, eventually, run


def start(ctl: Controller, rollout_id: str, model: ModelRef) -> None:
    spec = RolloutSpec(rollout_id=rollout_id, model=model, waves=(100.0,))
    ctl.store.rollouts.create(RolloutRecord(spec=spec), "alice", ctl.clock())


def state_of(ctl: Controller, rollout_id: str) -> tuple[RolloutState, str | None]:
    info = next(i for i in ctl.store.rollouts.list() if i.rollout_id == rollout_id)
    return info.state, info.reason


async def retain_old_broadcast(ctl: Controller, rollout_id: str) -> str:
    topic = topics.rollout_cmd(FLEET, rollout_id)
    async with ctl.broker.transport().connect(Session(client_id="old")) as link:
        await link.publish(topic, b"an old wave command", retain=True)
    return topic


def test_a_tick_that_raises_fails_its_rollout_only(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_tick = rollout_core.tick

    def exploding(record: RolloutRecord, fleet: Any, *, now: float, excluded: Any) -> Any:
        if record.spec.rollout_id == "bad":
            raise RuntimeError("boom")
        return real_tick(record, fleet, now=now, excluded=excluded)

    monkeypatch.setattr(rollout_core, "tick", exploding)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            model = ctl.register(blob())
            topic = await retain_old_broadcast(ctl, "bad")
            start(ctl, "bad", model)
            start(ctl, "good", model)
            await eventually("bad fails", lambda: state_of(ctl, "bad")[0] is RolloutState.FAILED)
            assert state_of(ctl, "bad") == (
                RolloutState.FAILED,
                "internal error: RuntimeError: boom",
            )
            assert ctl.broker.retained(topic) is None  # its broadcast is cleared
            await eventually(
                "good succeeds", lambda: state_of(ctl, "good")[0] is RolloutState.SUCCEEDED
            )
            assert ctl.service.metrics["rollouts_failed_internally"] == 1
            # The failed record agrees with the listing.
            record = ctl.store.rollouts.load("bad")
            assert (record.state, record.reason) == (
                RolloutState.FAILED,
                "internal error: RuntimeError: boom",
            )
            async with ctl.operator() as op:
                status = await op.call("rollout.status", {"rollout_id": "bad"})
                assert status["state"] == "failed"

    run(scenario)


def test_a_corrupt_record_fails_its_rollout_once(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys, tick_s=3600) as ctl:
            model = ctl.register(blob())
            start(ctl, "broken", model)
            start(ctl, "fine", model)
            with sqlite3.connect(ctl.db) as db:
                db.execute("UPDATE rollouts SET record_json = '{' WHERE rollout_id = 'broken'")
            topic = await retain_old_broadcast(ctl, "broken")
            await ctl.service.ticker.tick_all()
            state, reason = state_of(ctl, "broken")
            assert state is RolloutState.FAILED
            assert reason is not None
            assert reason.startswith("rollout broken: stored record unreadable")
            assert ctl.broker.retained(topic) is None
            assert state_of(ctl, "fine")[0] is RolloutState.SUCCEEDED
            # Not active any more: the next tick leaves it alone.
            await ctl.service.ticker.tick_all()
            assert ctl.service.metrics["rollouts_failed_internally"] == 1
            with pytest.raises(RecordError):
                ctl.store.rollouts.load("broken")
            async with ctl.operator() as op:
                reply = await op.request("rollout.status", {"rollout_id": "broken"})
                assert (reply.code, reply.error) == (1, reason)

    run(scenario)


def test_a_passing_store_error_only_postpones_the_tick(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys, tick_s=3600) as ctl:
            model = ctl.register(blob())
            start(ctl, "r1", model)
            step = ctl.store.rollouts.step
            away = StoreError("away")
            monkeypatch.setattr(
                ctl.store.rollouts, "step", lambda *a, **k: (_ for _ in ()).throw(away)
            )
            await ctl.service.ticker.tick_all()
            assert state_of(ctl, "r1") == (RolloutState.PENDING, None)
            monkeypatch.setattr(ctl.store.rollouts, "step", step)
            await ctl.service.ticker.tick_all()
            assert state_of(ctl, "r1")[0] is RolloutState.SUCCEEDED
            assert ctl.service.metrics["rollouts_failed_internally"] == 0

    run(scenario)


def test_pruning_that_raises_is_logged_and_tried_again(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ticker, "PRUNE_EVERY_S", 0.001)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl:
            calls: list[float] = []

            def prune(telemetry_before: float, results_before: float) -> tuple[int, int]:
                calls.append(telemetry_before)
                if len(calls) == 1:
                    raise RuntimeError("disk on fire")
                return 0, 0

            monkeypatch.setattr(ctl.store.results, "prune", prune)
            await eventually("pruning runs again", lambda: len(calls) >= 2)
            assert calls[0] == ctl.clock() - 30 * 86_400

    run(scenario)
