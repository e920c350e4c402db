"""Outbox throughput: puts/s, send bookkeeping and acks/s, 1-result vs 100-result batches.

Every put is one durable SQLite commit (WAL, synchronous=FULL: one fsync), so
the figures depend on the disk under ``--dir``; run it on the device's real data
disk to size an edge node. Payloads are real ``ResultBatch`` JSON; the seq is
spliced into a pre-encoded template so only the outbox is timed, not pydantic.

    .venv/bin/python benchmarks/bench_outbox.py [--dir DIR] [--seconds S]

Runs in well under 20 s with the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edge_node.outbox import Outbox
from shared.messages import InferenceResult, ModelRef, TopK
from shared.result_batch import batch_of, encode_results

TOPIC = "fleet/v1/default/node/bench-node/results"
_SENTINEL = 987_654_321  # a seq that appears nowhere else in the encoded batch


def batch_template(n_results: int) -> tuple[bytes, bytes]:
    """A ResultBatch of ``n_results`` encoded, split around its top-level ``seq``."""
    model = ModelRef(name="resnet18", version="1.4.0", sha256="ab" * 32)
    results = [
        InferenceResult(
            seq=i + 1,
            model=model,
            input_digest=f"{i:016x}",
            latency_ms=3.25,
            ts=1_700_000_000.0 + i,
            topk=tuple(TopK(index=k, label=f"class_{k}", score=0.9 / (k + 1)) for k in range(5)),
            corner_case=i % 17 == 0,
            source="camera0",
        )
        for i in range(n_results)
    ]
    raw = encode_results(batch_of("bench-node", _SENTINEL, results))
    head, sep, tail = raw.partition(b'"seq":%d' % _SENTINEL)
    assert sep, "sentinel seq not found in the encoded batch"
    return head + b'"seq":', tail


def timed(seconds: float, max_ops: int, op: Callable[[], object]) -> tuple[int, float]:
    """Run ``op`` until ``seconds`` elapsed or ``max_ops`` done; (ops, elapsed)."""
    start = time.perf_counter()
    done = 0
    while done < max_ops:
        op()
        done += 1
        if done % 16 == 0 and time.perf_counter() - start >= seconds:
            break
    return done, time.perf_counter() - start


def bench(label: str, n_results: int, root: Path, seconds: float) -> None:
    head, tail = batch_template(n_results)

    def make(seq: int) -> bytes:
        return head + str(seq).encode() + tail

    size = len(make(1))
    path = root / f"outbox-{n_results}.sqlite"
    with Outbox(path) as ob:
        puts, elapsed = timed(seconds, 50_000, lambda: ob.put("results", TOPIC, make))
        put_rate = puts / elapsed
        print(
            f"{label}: entry {size:,} B | put {put_rate:,.0f} entries/s "
            f"= {put_rate * n_results:,.0f} results/s, {put_rate * size / 1e6:.1f} MB/s "
            f"({puts:,} puts, {elapsed * 1e3 / puts:.2f} ms each)"
        )

        start = time.perf_counter()
        sent = 0
        now = 1.0
        while batch := ob.due(now, resend_after_s=60.0, limit=256):
            ob.mark_sent([e.seq for e in batch], now)
            sent += len(batch)
        elapsed = time.perf_counter() - start
        print(f"{label}: due+mark_sent {sent / elapsed:,.0f} entries/s (windows of 256)")

        last = ob.last_seq()
        one_by_one = min(last, max(1, puts // 2))
        start = time.perf_counter()
        for seq in range(1, one_by_one + 1):
            ob.ack(seq)
        elapsed = time.perf_counter() - start
        print(
            f"{label}: ack one seq at a time {one_by_one / elapsed:,.0f} acks/s "
            f"({elapsed * 1e3 / one_by_one:.2f} ms each)"
        )

        rest = ob.depth()
        start = time.perf_counter()
        removed = ob.ack(last)
        elapsed = time.perf_counter() - start
        assert removed == rest, (removed, rest)
        print(
            f"{label}: one ack of {removed:,} entries in {elapsed * 1e3:.1f} ms "
            f"= {removed / elapsed:,.0f} entries/s"
        )
        assert ob.depth() == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go")
    parser.add_argument(
        "--seconds", type=float, default=2.5, help="time spent on puts per batch size"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"outbox files in {root} (synchronous=FULL: one fsync per put)")
        started = time.perf_counter()
        bench("1-result batch  ", 1, root, args.seconds)
        bench("100-result batch", 100, root, args.seconds)
        print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
