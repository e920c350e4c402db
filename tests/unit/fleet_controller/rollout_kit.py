"""Helpers for the rollout engine's tests: specs, health samples, fleet views, folding.

Everything is pure: a fake fleet (a dict of ``NodeView``) and an explicit ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from fleet_controller.rollout_core import (
    HealthSample,
    NodeProgress,
    NodeView,
    RolloutAction,
    RolloutEvent,
    RolloutRecord,
    RolloutSpec,
    SendNode,
    apply_node_status,
    tick,
    wave_of,
)
from shared.histogram import bucket_of
from shared.messages import ModelRef, NodeRolloutState, RolloutState
from tests.support.shared_kit import NOW

N = NodeRolloutState
R = RolloutState
E = RolloutEvent

OLD = ModelRef(name="detector", version="1.0.0", sha256="a" * 64)
NEW = ModelRef(name="detector", version="2.0.0", sha256="b" * 64)
OTHER = ModelRef(name="detector", version="0.9.0", sha256="c" * 64)
IN_FLIGHT = (N.QUEUED, N.DOWNLOADING, N.DOWNLOADED, N.VERIFYING, N.LOADING)


# ----- helpers ----------------------------------------------------------------------


def make_spec(**changes: Any) -> RolloutSpec:
    """One wave of 100%, no auto-rollback, unless a test says otherwise."""
    fields: dict[str, Any] = {
        "rollout_id": "r-1",
        "model": NEW,
        "waves": (100.0,),
        "auto_rollback": False,
    }
    fields.update(changes)
    return RolloutSpec(**fields)


def sample(
    ts: float, model: ModelRef | None, inferences: int, errors: int = 0, ms: float = 10.0
) -> HealthSample:
    """One telemetry period: ``inferences`` successful runs around ``ms`` (a quarter a
    bucket below, half in its bucket, a quarter a bucket above) and ``errors`` failures."""
    middle = bucket_of(ms)
    quarter = inferences // 4
    spread = {middle - 1: quarter, middle: inferences - 2 * quarter, middle + 1: quarter}
    return HealthSample(
        ts=ts,
        model_sha256=model.sha256 if model is not None else None,
        inferences=inferences,
        errors=errors,
        latency=tuple((b, c) for b, c in sorted(spread.items()) if c),
    )


def view(
    node_id: str,
    *,
    model: ModelRef | None = OLD,
    labels: Mapping[str, str] | None = None,
    online: bool = True,
    samples: Iterable[HealthSample] = (),
) -> NodeView:
    return NodeView(node_id, dict(labels or {}), online, model, tuple(samples))


def fleet_of(*node_ids: str, model: ModelRef | None = OLD) -> dict[str, NodeView]:
    return {node_id: view(node_id, model=model) for node_id in node_ids}


def quiet(fleet: Mapping[str, NodeView]) -> dict[str, NodeView]:
    """``fleet`` with every node reporting no runs of the new model until far ahead:
    each health window is covered by telemetry, and passes on liveness."""
    idle = sample(NOW + 100_000, NEW, 0)
    return {n: replace(v, samples=(*v.samples, idle)) for n, v in fleet.items()}


def ids_in_wave(spec: RolloutSpec, wave: int, count: int) -> list[str]:
    """The first ``count`` ids ``n0, n1, ...`` whose first wave is ``wave``."""
    found: list[str] = []
    for k in range(100_000):
        if wave_of(spec, f"n{k}") == wave:
            found.append(f"n{k}")
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} ids in wave {wave}")


def fold(
    record: RolloutRecord,
    node_ids: Iterable[str],
    state: NodeRolloutState,
    *,
    now: float,
    **kw: Any,
) -> RolloutRecord:
    for node_id in node_ids:
        record = apply_node_status(record, node_id, state, now=now, **kw)
    return record


def node_sends(actions: Iterable[RolloutAction], kind: str | None = None) -> list[SendNode]:
    return [a for a in actions if isinstance(a, SendNode) and (kind is None or a.kind == kind)]


def on_model(fleet: dict[str, NodeView], model: ModelRef | None, *node_ids: str) -> None:
    for node_id in node_ids:
        fleet[node_id] = replace(fleet[node_id], model=model)


def with_node(state: NodeRolloutState, **changes: Any) -> RolloutRecord:
    progress = NodeProgress(node_id="a", wave=0, state=state, sent_at=NOW, from_model=OLD)
    return RolloutRecord(
        spec=make_spec(),
        state=R.RUNNING,
        wave_started_at=NOW,
        nodes={"a": replace(progress, **changes)},
    )


BEFORE = [sample(NOW - 30 + k, OLD, 100, 0, 10.0) for k in range(0, 30, 5)]
"""Node "a"'s telemetry on the old model before the rollout: 600 runs around 10 ms."""


def gated(
    window_samples: Iterable[HealthSample],
    *,
    online: bool = True,
    control: Iterable[HealthSample] | None = None,
    **spec_changes: Any,
) -> tuple[RolloutRecord, dict[str, NodeView], RolloutSpec]:
    """Node "a" enrolled, activated at NOW + 10; its view then carries ``window_samples``
    of the new model after BEFORE. With ``control``, node "c" joins the fleet still on
    the old model with those samples (it is enrolled too, and stays queued)."""
    spec = make_spec(**{"health_window_s": 60.0, "breach_evaluations": 1, **spec_changes})
    fleet = {"a": view("a", samples=BEFORE)}
    record, _ = tick(RolloutRecord(spec=spec), fleet, now=NOW)
    record = apply_node_status(record, "a", N.SUCCEEDED, now=NOW + 10)
    assert record.nodes["a"].state is N.ACTIVATED
    assert record.nodes["a"].activated_at == NOW + 10
    fleet["a"] = view("a", model=NEW, online=online, samples=[*BEFORE, *window_samples])
    if control is not None:
        fleet["c"] = view("c", samples=control)
    return record, fleet, spec


GOOD_WINDOW = [sample(NOW + 20 + k, NEW, 100, 0, 11.0) for k in range(0, 60, 10)]
"""Six periods of the new model, up to the end of "a"'s window (NOW + 70)."""
