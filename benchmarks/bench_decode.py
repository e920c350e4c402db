"""The strict decoders against bare parsers on the same bytes.

* ``decode_results`` (a columnar ``ResultBatch`` v2: typed msgspec decode, the
  canonical-form check and the column checks) against a bare, untyped
  ``msgspec.json.decode`` and against ``json.loads`` of the same payload, for
  batches of 100 and 1,000 results; ``encode_results`` beside them.
* ``codec.decode_json`` (every other message kind) against ``json.loads`` on
  hostile input: a megabyte of nested brackets, 300,000 empty arrays, a
  256 KiB string (an old artifact chunk), 33 levels of nesting; and on a
  telemetry message.

Each figure is the median of ``--rounds`` interleaved rounds of the time per
call (CPU time; the machine is shared). Prints the limit (the bare parser),
EdgeFleet's figure and the ratio.

Usage::

    .venv/bin/python benchmarks/bench_decode.py
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.codec import decode_json  # noqa: E402
from shared.errors import DecodeError  # noqa: E402
from shared.messages import InferenceResult, ModelRef, TopK  # noqa: E402
from shared.result_batch import batch_of, decode_results, encode_results  # noqa: E402

MODEL = ModelRef(name="resnet18", version="1.4.0", sha256="ab" * 32)


def result_batch(n: int) -> bytes:
    results = [
        InferenceResult(
            seq=i + 1,
            model=MODEL,
            input_digest=f"{i:016x}",
            latency_ms=2.5 + i % 7 * 0.125,
            ts=1_700_000_000.0 + i * 0.01,
            topk=tuple(TopK(index=k, label=f"class_{k}", score=0.9 / (k + 1)) for k in range(3)),
            corner_case=i % 17 == 0,
            source="camera0",
        )
        for i in range(n)
    ]
    return encode_results(batch_of("node-0001", 1, results))


def per_call_us(fn: Callable[[], object], budget_s: float = 0.2) -> float:
    """CPU microseconds per call of ``fn`` (errors count as calls: refusing is the work)."""
    calls = 0
    start = time.process_time()
    while True:
        with contextlib.suppress(DecodeError, ValueError, RecursionError, msgspec.DecodeError):
            fn()
        calls += 1
        spent = time.process_time() - start
        if spent >= budget_s:
            return spent / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    big = 2 * 1024 * 1024
    hostile = {
        "1 MiB of nested brackets": b"[" * (512 * 1024) + b"]" * (512 * 1024),
        "300,000 empty arrays": b"[" + b",".join([b"[]"] * 300_000) + b"]",
        "a 256 KiB string": json.dumps({"data": base64.b64encode(os.urandom(192 * 1024)).decode()})
        .replace(" ", "")
        .encode(),
        "33 levels of nesting": b"[" * 33 + b"]" * 33,
        "a telemetry message": (
            b'{"errors":0,"inferences":5,"latency":{"p50_ms":1.0,"p95_ms":2.0,"p99_ms":3.0},'
            b'"node":"n1","ts":1.5,"type":"telemetry","v":1}'
        ),
    }
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = []
    for n in (100, 1000):
        raw = result_batch(n)
        batch = decode_results(raw)
        plain = msgspec.json.decode(raw)
        cases += [
            (
                f"decode_results, {n} results ({len(raw):,} B) vs msgspec untyped",
                partial(decode_results, raw),
                partial(msgspec.json.decode, raw),
            ),
            (
                f"decode_results, {n} results vs json.loads",
                partial(decode_results, raw),
                partial(json.loads, raw),
            ),
            (
                f"encode_results, {n} results vs msgspec untyped encode",
                partial(encode_results, batch),
                partial(msgspec.json.encode, plain),
            ),
        ]
    for label, payload in hostile.items():
        cases.append(
            (
                f"decode_json, {label} vs json.loads",
                partial(decode_json, payload, max_bytes=big),
                partial(json.loads, payload),
            )
        )
    ours: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    bare: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(args.rounds):
        for label, mine, baseline in cases:
            bare[label].append(per_call_us(baseline))
            ours[label].append(per_call_us(mine))
    print(f"load average {os.getloadavg()[0]:.1f}; CPU us per call, median of {args.rounds} rounds")
    print()
    print("| what | limit (bare), us | EdgeFleet, us | ratio |")
    print("|---|---|---|---|")
    for label, _, _ in cases:
        b, o = statistics.median(bare[label]), statistics.median(ours[label])
        print(f"| {label} | {b:,.1f} | {o:,.1f} | {o / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
