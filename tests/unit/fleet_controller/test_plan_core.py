"""The plan of ``rollout start``: waves, offline nodes, refusals, overlaps, and when
the controller refuses to start at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from fleet_controller.plan_core import Plan, plan_rollout, refusal
from fleet_controller.rollout_core import NodeProgress, RolloutRecord, RolloutSpec, wave_of
from shared.labels import parse_selector
from shared.messages import Capabilities, ModelManifest, ModelRef, RolloutState, TensorSpec
from tests.support.shared_kit import manifest

NEW = manifest(name="det", version="2.0.0", sha256="b" * 64, size=1000)
REF = ModelRef(name="det", version="2.0.0", sha256="b" * 64)


def ref(version: str, sha: str = "a" * 64, name: str = "det") -> ModelRef:
    return ModelRef(name=name, version=version, sha256=sha)


@dataclass(frozen=True)
class Node:
    node_id: str
    online: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    model: ModelRef | None = None
    capabilities: Capabilities | None = None


def caps(*providers: str, disk: int = 10**9) -> Capabilities:
    return Capabilities(providers=providers, cpus=2, memory_bytes=10**9, disk_free_bytes=disk)


OLD_MANIFEST = manifest(name="det", version="1.0.0", sha256="a" * 64)


@pytest.mark.parametrize(
    ("node", "new", "running", "why"),
    [
        pytest.param(Node("n", model=ref("1.0.0")), NEW, OLD_MANIFEST, None, id="upgrade"),
        pytest.param(Node("n"), NEW, None, None, id="first-install"),
        pytest.param(Node("n", model=REF), NEW, None, None, id="already-running"),
        pytest.param(Node("n", model=ref("3.0.0")), NEW, None, "downgrade", id="downgrade"),
        pytest.param(Node("n", model=ref("2.0.0")), NEW, None, "downgrade", id="same-version"),
        pytest.param(Node("n", model=ref("9.0.0", name="other")), NEW, None, None, id="other-name"),
        pytest.param(
            Node("n", capabilities=caps("CPUExecutionProvider")),
            manifest(sha256="b" * 64, providers=("CUDAExecutionProvider",)),
            None,
            "no execution provider",
            id="accelerator-only",
        ),
        pytest.param(
            Node("n", capabilities=caps("CPUExecutionProvider")),
            manifest(sha256="b" * 64, providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
            None,
            None,
            id="cpu-fallback-allowed",
        ),
        pytest.param(
            Node("n", model=ref("1.0.0")),
            NEW,
            manifest(
                name="det",
                version="1.0.0",
                sha256="a" * 64,
                inputs=(TensorSpec(name="other", dtype="float32", shape=(1, 3)),),
            ),
            "inputs differ",
            id="input-spec",
        ),
        pytest.param(Node("n", capabilities=caps(disk=999)), NEW, None, "bytes free", id="disk"),
    ],
)
def test_refusal(
    node: Node, new: ModelManifest, running: ModelManifest | None, why: str | None
) -> None:
    found = refusal(new, node, running)
    if why is None:
        assert found is None
    else:
        assert found is not None
        assert why in found


SPEC = RolloutSpec(rollout_id="r-new", model=REF, waves=(10.0, 100.0))


def test_plan_puts_nodes_in_their_waves_and_names_offline_and_refusing_ones() -> None:
    nodes = [
        Node(f"n{k}", online=k != 3, model=ref("3.0.0") if k == 5 else ref("1.0.0"))
        for k in range(20)
    ]
    plan = plan_rollout(SPEC, NEW, nodes, {"a" * 64: OLD_MANIFEST}, [])
    assert sorted(plan.nodes) == sorted(n.node_id for n in nodes)
    for index, members in enumerate(plan.waves):
        assert all(wave_of(SPEC, n) == index for n in members)
    assert plan.offline == ("n3",)
    assert set(plan.refusing) == {"n5"}
    assert plan.refusal() is None
    shown = plan.to_dict(SPEC)
    assert [w["percent"] for w in shown["waves"]] == [10.0, 100.0]
    assert shown["refusing"] == [{"node": "n5", "reason": plan.refusing["n5"]}]


def test_a_rollout_every_node_would_refuse_is_refused_even_forced() -> None:
    nodes = [Node(f"n{k}", model=ref("3.0.0")) for k in range(3)]
    plan = plan_rollout(SPEC, NEW, nodes, {}, [])
    for force in (False, True):
        why = plan.refusal(force=force)
        assert why is not None
        assert why.startswith("every selected node (3) would refuse it, e.g. n0: downgrade")


def test_overlap_with_an_active_rollout_is_refused_unless_forced() -> None:
    nodes = [Node(f"n{k}", labels={"site": "a" if k < 5 else "b"}) for k in range(10)]
    other = RolloutRecord(
        spec=RolloutSpec(rollout_id="r-old", model=ref("1.5.0"), selector=parse_selector("site=a")),
        state=RolloutState.RUNNING,
        nodes={"n7": NodeProgress(node_id="n7", wave=0)},  # enrolled before a relabel
    )
    plan = plan_rollout(SPEC, NEW, nodes, {}, [other])
    assert plan.overlapping == {"r-old": ("n0", "n1", "n2", "n3", "n4", "n7")}
    why = plan.refusal()
    assert why is not None
    assert why.startswith("rollout r-old is active on 6 of these nodes (n0, n1, n2, ...)")
    assert plan.refusal(force=True) is None


def test_a_disjoint_active_rollout_is_no_overlap() -> None:
    nodes = [Node("n1", labels={"site": "b"})]
    other = RolloutRecord(
        spec=RolloutSpec(rollout_id="r-old", model=ref("1.5.0"), selector=parse_selector("site=a"))
    )
    assert plan_rollout(SPEC, NEW, nodes, {}, [other]).overlapping == {}


def test_an_empty_plan_refuses_nothing() -> None:
    assert Plan(waves=((), ()), offline=()).refusal() is None
