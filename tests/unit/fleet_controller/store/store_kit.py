"""Messages and records for the store's tests, built with an explicit clock."""

from __future__ import annotations

from dataclasses import replace

from fleet_controller.rollout_core import HealthSample, NodeProgress, RolloutRecord, RolloutSpec
from shared.histogram import bucket_of
from shared.labels import parse_selector
from shared.messages import (
    Capabilities,
    InferenceResult,
    LatencyStats,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    PeriodStats,
    Telemetry,
    TensorData,
    TensorSpec,
    TopK,
)
from shared.result_batch import ResultBatch, batch_of

NOW = 1_700_000_000.0  # UNIX seconds: every call gets this explicit clock (or an offset)
SHA1 = "a1" * 32
SHA2 = "b2" * 32
REF1 = ModelRef(name="det", version="1.0.0", sha256=SHA1)
REF2 = ModelRef(name="det", version="1.1.0", sha256=SHA2)
N = NodeRolloutState


# ----- message builders ----------------------------------------------------------------


def result(
    seq: int, *, ts: float = NOW, corner: bool = False, model: ModelRef = REF1
) -> InferenceResult:
    return InferenceResult(
        seq=seq,
        model=model,
        input_digest=f"{seq:016x}",
        latency_ms=2.0 + seq % 3,
        ts=ts,
        topk=(TopK(index=1, label="cat", score=0.9), TopK(index=0, label=None, score=0.1)),
        tensors=(TensorData(name="probs", shape=(2,), data=(0.1, 0.9)),) if seq % 2 else None,
        corner_case=corner,
        source="camera0",
    )


def batch(node: str, slot: int, seqs: range | list[int], *, ts: float = NOW) -> ResultBatch:
    return batch_of(node, slot, [result(s, ts=ts) for s in seqs])


def status(node: str, slot: int, state: NodeRolloutState = N.DOWNLOADING) -> NodeStatus:
    return NodeStatus(
        node=node,
        seq=slot,
        command_id="c1",
        rollout_id="r1",
        state=state,
        progress=50.0,
        ts=NOW,
    )


def telemetry(
    node: str, ts: float, *, inferences: int = 100, errors: int = 1, p95: float = 7.5
) -> Telemetry:
    return Telemetry(
        node=node,
        ts=ts,
        uptime_s=60.0,
        inferences=inferences,
        errors=errors,
        skips=2,
        queue_depth=0,
        outbox_depth=3,
        latency=LatencyStats(p50_ms=3.0, p95_ms=p95, p99_ms=9.0),
        cpu_percent=12.5,
        memory_bytes=2**33,
        model=REF1,
        period=PeriodStats(
            since=ts - 1,
            inferences=inferences,
            errors=errors,
            latency=((bucket_of(p95), inferences),),
        ),
    )


def state(
    node: str,
    *,
    online: bool,
    session: int,
    labels: dict[str, str] | None = None,
    model: ModelRef | None = REF1,
    ts: float = NOW,
    agent_version: str = "0.1.0",
) -> NodeState:
    """A birth or death, sent at ``ts`` (by the node's clock)."""
    return NodeState(
        node=node,
        online=online,
        session=session,
        agent_version=agent_version,
        model=model,
        previous_model=REF2 if model is not None else None,
        labels=labels or {},
        capabilities=Capabilities(
            providers=("CPUExecutionProvider",), cpus=4, memory_bytes=2**32, disk_free_bytes=2**34
        ),
        ts=ts,
    )


def manifest(version: str, sha: str = SHA1, name: str = "det") -> ModelManifest:
    spec = TensorSpec(name="input", dtype="float32", shape=("N", 8))
    return ModelManifest(
        name=name,
        version=version,
        sha256=sha,
        size=1234,
        inputs=(spec,),
        outputs=(TensorSpec(name="probs", dtype="float32", shape=("N", 4)),),
        created_at=NOW,
    )


def record(nodes: dict[str, NodeProgress] | None = None, **changes: object) -> RolloutRecord:
    spec = RolloutSpec(rollout_id="r1", model=REF2, selector=parse_selector("site=a"))
    base = RolloutRecord(spec=spec, nodes=nodes or {})
    return replace(base, **changes)  # type: ignore[arg-type]


def health_sample(
    ts: float, *, inferences: int = 100, errors: int = 1, p95: float = 7.5
) -> HealthSample:
    """The health sample :func:`telemetry` with the same arguments is stored as."""
    return HealthSample(ts, SHA1, inferences, errors, ((bucket_of(p95), inferences),))
