"""Controller store ingest throughput: results/s for 100-result batches.

Each ingest call is one transaction (SQLite: one fsync with the default
``synchronous=FULL``), as the service's batching writer makes them. Figures for
one batch per call and ten batches per call (what a busy controller's writer
drains at once), plus a re-send of already-stored batches (the dedupe path).
Messages are built before the clock starts, so only the store is timed.

SQLite always (a file under ``--dir``, default a temp dir: run it on the
controller's real disk to size it); PostgreSQL when ``EDGEFLEET_TEST_PG_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) is reachable,
in a throw-away schema that is dropped afterwards.

    .venv/bin/python benchmarks/bench_store.py [--dir DIR] [--seconds S]

Runs in well under 30 s with the defaults.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

from fleet_controller.store import Store, StoreError
from shared.messages import InferenceResult, ModelRef, TopK
from shared.result_batch import batch_of, decode_results, encode_results

PG_URL = os.environ.get(
    "EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RESULTS_PER_BATCH = 100
NODES = 20
MODEL = ModelRef(name="resnet18", version="1.4.0", sha256="ab" * 32)
NOW = 1_700_000_000.0


class Fleet:
    """Result batches of ``NODES`` nodes, each node's slots and result seqs contiguous."""

    def __init__(self) -> None:
        self.template = [
            InferenceResult(
                seq=i + 1,
                model=MODEL,
                input_digest=f"{i:016x}",
                latency_ms=3.25,
                ts=NOW + i,
                topk=tuple(
                    TopK(index=k, label=f"class_{k}", score=0.9 / (k + 1)) for k in range(5)
                ),
                corner_case=i % 17 == 0,
                source="camera0",
            )
            for i in range(RESULTS_PER_BATCH)
        ]
        self.made = 0

    def batches(self, count: int) -> list[bytes]:
        """``count`` result batches as they arrive on the wire."""
        made = []
        for n in range(self.made, self.made + count):
            node, slot = f"node-{n % NODES:03d}", 1 + n // NODES
            base = (slot - 1) * RESULTS_PER_BATCH
            results = [r.model_copy(update={"seq": base + r.seq}) for r in self.template]
            made.append(encode_results(batch_of(node, slot, results)))
        self.made += count
        return made


def run(store: Store, chunks: Iterator[list[bytes]], seconds: float) -> float:
    """Decode and ingest chunk after chunk (one call each) until ``seconds`` of
    that time: results/s. Building the messages is not timed.
    """
    spent = 0.0
    done = 0
    for chunk in chunks:
        start = time.perf_counter()
        store.ingest.write([], [decode_results(raw) for raw in chunk], [], NOW)
        spent += time.perf_counter() - start
        done += len(chunk) * RESULTS_PER_BATCH
        if spent >= seconds:
            break
    return done / spent if spent else 0.0


def bench(label: str, store: Store, seconds: float) -> None:
    print(f"{label}:")
    fleet = Fleet()
    sent: list[list[bytes]] = []

    def fresh(per_call: int) -> Iterator[list[bytes]]:
        while True:
            chunk = fleet.batches(per_call)
            sent.append(chunk)
            yield chunk

    for per_call in (1, 10):
        rate = run(store, fresh(per_call), seconds)
        print(f"  {per_call:>2} batch(es)/call      {rate:>10,.0f} results/s")
    rate = run(store, iter(sent), seconds)
    print(f"  re-sent, already stored {rate:>10,.0f} results/s")
    counts = store.results.table_counts()
    print(f"  stored: {counts['results']:,} results, {counts['stored_slots']} slots parked")


@contextmanager
def postgres_schema() -> Iterator[str | None]:
    """A fresh schema name on the test server, dropped afterwards; None if unreachable."""
    engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    name = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
        print(f"PostgreSQL: skipped ({first})")
        engine.dispose()
        yield None
        return
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite file goes")
    parser.add_argument("--seconds", type=float, default=1.5, help="of ingest per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for sync in ("FULL", "NORMAL"):
            path = Path(tmp) / f"bench-{sync}.db"
            with Store.open(str(path), sqlite_synchronous=sync) as store:
                bench(f"SQLite (WAL, synchronous={sync}) {path}", store, args.seconds)
    with postgres_schema() as schema:
        if schema is not None:
            try:
                with Store.open(PG_URL, schema=schema) as store:
                    bench(f"PostgreSQL {store!r}", store, args.seconds)
            except StoreError as exc:
                print(f"PostgreSQL: {exc}")


if __name__ == "__main__":
    main()
