"""The health gate end to end, on a loaded machine: 50 simulated nodes in one process,
a CPU hog on every core, and the controller judging each wave against the nodes
still on the previous model over the same window.

A same-speed upgrade must pass every wave; a release three times slower, and one
that fails on a tenth of its inputs, must halt in the first wave and roll back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.rollout_kit import (
    ROLLOUT_DEADLINE_S,
    assert_all_on,
    bring_up,
    deploy,
    final_status,
    pick_rollout_id,
    sqlite_url,
    start_rollout,
)
from tests.support.fleet import Fleet
from tests.support.load import cpu_hogs
from tests.support.models import make_flaky_model, make_slow_model

pytestmark = pytest.mark.e2e

FLEET_SIZE = 50
RATE_HZ = 8.0
WAVES = (10.0, 50.0, 100.0)
WORK = 48  # layers of the base model: about half a millisecond per run here
# Telemetry periods of simulated nodes are 5 s: the window spans two of them, and
# 40 runs a node (5 s at 8 Hz) are enough for a verdict.
GATE = ["--min-samples", "40", "--breach-evaluations", "2", "--max-failures", "10%"]
BASE = "scorer@1.0.0"


@dataclass(frozen=True)
class GateModels:
    base: Path  # WORK layers
    same: Path  # WORK layers, other weights: the same speed
    slower: Path  # 3 * WORK layers: three times the work
    flaky: Path  # fails on about 10% of inputs


@pytest.fixture(scope="module")
def gate_models(tmp_path_factory: pytest.TempPathFactory) -> GateModels:
    folder = tmp_path_factory.mktemp("gate-models")
    return GateModels(
        base=make_slow_model(folder / "base.onnx", work=WORK, seed=1),
        same=make_slow_model(folder / "same.onnx", work=WORK, seed=2),
        slower=make_slow_model(folder / "slower.onnx", work=3 * WORK, seed=3),
        flaky=make_flaky_model(folder / "flaky.onnx", error_rate=0.1, seed=4),
    )


@pytest.fixture
def loaded() -> Iterator[None]:
    """A CPU hog on every core for the whole test, fleet start-up included."""
    with cpu_hogs():
        yield


def first_wave_of_some(membership: dict[str, int | None]) -> bool:
    """A first wave of three to seven nodes, and every node in some wave."""
    first = sum(1 for w in membership.values() if w == 0)
    return 3 <= first <= 7 and None not in membership.values()


def upgrade(
    fleet: Fleet, models: GateModels, new: Path, ref: str
) -> tuple[dict[str, Any], list[str]]:
    """50 nodes on BASE, then a rollout of ``new`` as ``ref`` in three waves; its final status."""
    db_url = sqlite_url(fleet)
    ids = bring_up(fleet, db_url, FLEET_SIZE, [(models.base, BASE), (new, ref)], rate_hz=RATE_HZ)
    deploy(fleet, BASE, "r-base", ids)
    rollout_id, _ = pick_rollout_id("r-gate", ids, WAVES, first_wave_of_some)
    start_rollout(
        fleet, ref, rollout_id, waves=WAVES, health_window="10s", wave_timeout="90s", extra=GATE
    )
    fleet.wait_rollout(rollout_id, timeout_s=3 * ROLLOUT_DEADLINE_S)
    return final_status(fleet, rollout_id), ids


def test_a_same_speed_upgrade_passes_every_wave_under_load(
    fleet: Fleet, gate_models: GateModels, loaded: None
) -> None:
    status, ids = upgrade(fleet, gate_models, gate_models.same, "scorer@1.1.0")
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "succeeded", context
    assert status["counts"] == {"succeeded": FLEET_SIZE}, context
    for node in status["nodes"]:
        assert node["reason"].startswith("healthy"), context
    assert_all_on(fleet, ids, "scorer@1.1.0")


@pytest.mark.parametrize(
    ("which", "ref", "why"),
    [
        pytest.param("slower", "scorer@2.0.0", "median latency", id="3x-slower"),
        pytest.param("flaky", "scorer@2.1.0", "error rate", id="10%-errors"),
    ],
)
def test_a_bad_release_halts_in_the_first_wave_and_rolls_back_under_load(
    fleet: Fleet, gate_models: GateModels, loaded: None, which: str, ref: str, why: str
) -> None:
    status, ids = upgrade(fleet, gate_models, getattr(gate_models, which), ref)
    context = f"{status}\n{fleet.diagnostics()}"
    assert status["state"] == "rolled_back", context
    assert status["wave"] == 1, context
    unhealthy = [n for n in status["nodes"] if n["code"] == "unhealthy"]
    assert unhealthy, context
    for node in unhealthy:
        assert why in node["reason"], context
        assert "control group" in node["reason"], context
    assert all(n["state"] == "rolled_back" for n in status["nodes"]), context
    assert_all_on(fleet, ids, BASE)
