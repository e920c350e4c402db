"""Per-node ingest quotas (fleet_controller.quotas): excess waits in the node's outbox."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fleet_controller.quotas import BURST_S, MAX_KEYS, NodeQuotas, RateLimiter
from tests.unit.fleet_controller.kit import NOW, controller, eventually, run


def test_results_beyond_the_quota_are_refused_unacked_and_counted(
    tmp_path: Path, keys: Path
) -> None:
    async def scenario() -> None:
        # One result a second, with a 30 s burst: 30 results at once, then one a second.
        async with (
            controller(tmp_path, keys, node_results_per_s=1.0) as ctl,
            ctl.node("n1") as node,
        ):
            await node.results(1, list(range(1, 31)))
            assert await node.next_ack() == 1
            await node.results(2, [31, 32])
            metrics = ctl.service.metrics
            await eventually("the refusal", lambda: metrics["quota_refused_results"] == 1)
            assert ctl.store.results.table_counts()["results"] == 30
            ctl.clock.now += 2  # the bucket refills: the resent slot is taken
            await node.results(2, [31, 32])
            assert await node.next_ack() == 2
            assert ctl.store.results.table_counts()["results"] == 32

    run(scenario)


def test_bytes_are_limited_per_node() -> None:
    metrics: Counter[str] = Counter()
    quotas = NodeQuotas(results_per_s=1e6, bytes_per_s=100.0, metrics=metrics)
    burst = int(100 * BURST_S)
    assert quotas.admit("n1", burst, NOW)
    assert not quotas.admit("n1", 1, NOW)
    assert quotas.admit("n2", 10, NOW)  # another node's bucket is its own
    assert quotas.admit("n1", 100, NOW + 1.0)
    assert metrics == Counter({"quota_refused_bytes": 1})


def test_buckets_stay_bounded_under_made_up_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    for index in range(3 * MAX_KEYS):
        limiter.allow(f"made-up-{index}", NOW)
        assert len(limiter._buckets) <= MAX_KEYS + 1
    assert limiter.allow("late", NOW + 1.0)
