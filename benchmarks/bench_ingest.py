"""Controller ingest against a bare paho subscriber, through one real Mosquitto.

Each round runs, interleaved:

1. **bare**: a paho subscriber that only counts the messages on
   ``node/+/results`` (QoS 1), while a publisher process sends them;
2. **EdgeFleet**: ``fleetctl serve`` processes (``--replicas``; with two they
   split ingest through ``$share``) storing the same messages in a fresh
   database, the publisher waiting until every node's last slot is
   acknowledged (signed acks, sent only after the commit).

The publisher (this script with ``--publish``, in its own process) connects one
paho client per simulated node, pre-encodes every result batch (columnar
``ResultBatch`` v2, ``--per-batch`` results with a top-3 each), waits for
``go`` and then publishes everything at QoS 1 as fast as the broker takes it.
Time runs from ``go`` to the last message counted (bare) or the last ack
received (EdgeFleet). CPU is the subscriber's (bare: this process) or the
controllers' (EdgeFleet: every ``fleetctl serve``, from ``/proc``), over the
same window. After each EdgeFleet run the database must hold every result
exactly once (0 lost, 0 duplicated) or the script fails.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py                 # SQLite, 1 replica
    .venv/bin/python benchmarks/bench_ingest.py --db postgres --replicas 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fleet_controller.demo import local_mosquitto  # noqa: E402
from shared import topics  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.messages import Ack, InferenceResult, ModelRef, TopK, decode  # noqa: E402
from shared.result_batch import batch_of, encode_results  # noqa: E402

FLEET = "bench"
PG_URL = os.environ.get(
    "EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MODEL = ModelRef(name="resnet18", version="1.4.0", sha256="ab" * 32)
LABELS = [f"class_{k}" for k in range(10)]


# ----- the publisher (its own process) ----------------------------------------------


def _batches(node: str, index: int, count: int, per_batch: int) -> list[bytes]:
    """``node``'s result batches: inferences 10 ms apart, the nodes' clocks 0.1 ms apart."""
    made = []
    for slot in range(1, count + 1):
        base = (slot - 1) * per_batch
        results = [
            InferenceResult(
                seq=base + i + 1,
                model=MODEL,
                input_digest=f"{base + i:016x}",
                latency_ms=2.5 + (i % 7) * 0.1,
                ts=1_700_000_000.0 + (base + i) * 0.01 + index * 1e-4,
                topk=tuple(
                    TopK(index=(i + k) % 10, label=LABELS[(i + k) % 10], score=0.9 / (k + 1))
                    for k in range(3)
                ),
                corner_case=i % 17 == 0,
                source="camera0",
            )
            for i in range(per_batch)
        ]
        made.append(encode_results(batch_of(node, slot, results)))
    return made


def _connect(client_id: str, port: int, subscribe: str | None) -> paho.Client:
    """A connected paho client (network thread running), subscribed when asked."""
    ready = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)

    def on_connect(c: paho.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if subscribe is None:
            ready.set()
        else:
            c.subscribe(subscribe, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_args: ready.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not ready.wait(10):
        raise SystemExit(f"{client_id}: no connection to the broker")
    return client


def publish(port: int, nodes: list[str], count: int, per_batch: int, wait_acks: bool) -> None:
    """Connect, pre-encode, print ``ready``; on ``go`` publish; print ``done SECONDS``."""
    payloads = {node: _batches(node, i, count, per_batch) for i, node in enumerate(nodes)}
    acked = dict.fromkeys(nodes, 0)
    all_acked = threading.Event()
    lock = threading.Lock()

    def on_ack(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        # The controller signs acks; the publisher only reads the mark (not a node).
        ack = decode(Ack, Envelope.from_bytes(bytes(message.payload)).payload_bytes())
        with lock:
            acked[ack.node] = max(acked[ack.node], ack.seq)
            if all(seq >= count for seq in acked.values()):
                all_acked.set()

    clients = []
    for node in nodes:
        client = _connect(f"pub-{node}", port, topics.ack(FLEET, node) if wait_acks else None)
        client.on_message = on_ack
        clients.append(client)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    # Slot by slot across the fleet, as nodes that run at the same time send them.
    infos = [
        client.publish(topics.results(FLEET, node), payloads[node][slot], qos=1)
        for slot in range(count)
        for client, node in zip(clients, nodes, strict=True)
    ]
    for info in infos:
        info.wait_for_publish()
    if wait_acks:
        all_acked.wait()
    print(f"done {time.perf_counter() - start:.6f}", flush=True)
    for client in clients:
        client.loop_stop()
        client.disconnect()


# ----- the measuring side -------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    seconds: float
    cpu_s: float
    messages: int
    results: int

    @property
    def msg_rate(self) -> float:
        return self.messages / self.seconds

    @property
    def result_rate(self) -> float:
        return self.results / self.seconds

    @property
    def cpu_us_per_result(self) -> float:
        return self.cpu_s / self.results * 1e6


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _publisher(
    port: int, nodes: list[str], count: int, per_batch: int, *, wait_acks: bool
) -> Iterator[subprocess.Popen[str]]:
    args = [sys.executable, __file__, "--publish", str(port), ",".join(nodes)]
    args += [str(count), str(per_batch), "1" if wait_acks else "0"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the publisher did not start")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _go(proc: subprocess.Popen[str]) -> float:
    """Start the publisher; return its time from ``go`` to done."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline().split()
    if not line or line[0] != "done":
        raise SystemExit("the publisher failed")
    return float(line[1])


def bare_round(port: int, nodes: list[str], count: int, per_batch: int) -> Figure:
    expected = len(nodes) * count
    seen = [0]
    finished = threading.Event()
    last = [0.0]

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        seen[0] += 1
        if seen[0] == expected:
            last[0] = time.perf_counter()
            finished.set()

    subscriber = _connect("bare-subscriber", port, topics.node_filter(FLEET, "results"))
    subscriber.on_message = on_message
    try:
        with _publisher(port, nodes, count, per_batch, wait_acks=False) as proc:
            cpu0 = time.process_time()
            start = time.perf_counter()
            _go(proc)
            if not finished.wait(300):
                raise SystemExit(f"bare subscriber saw {seen[0]} of {expected} messages")
            cpu = time.process_time() - cpu0
            return Figure(last[0] - start, cpu, expected, expected * per_batch)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()


def _fleetctl() -> list[str]:
    return [sys.executable, "-m", "fleet_controller"]


def edgefleet_round(  # noqa: PLR0917 - one run's settings, in the order they are known
    port: int,
    workdir: Path,
    db_url: str,
    replicas: int,
    nodes: list[str],
    count: int,
    per_batch: int,
    profile: Path | None,
) -> Figure:
    keys = workdir / "keys"
    if not keys.exists():
        subprocess.run(
            [*_fleetctl(), "keys", "init", "--dir", str(keys)], check=True, capture_output=True
        )
    broker = f"mqtt://127.0.0.1:{port}"
    procs = []
    logs = []
    try:
        for index in range(replicas):
            log = (workdir / f"controller-{index}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        *_fleetctl(),
                        "serve",
                        "--broker",
                        broker,
                        "--fleet",
                        FLEET,
                        "--db",
                        db_url,
                        "--keys",
                        str(keys),
                        "--node-results-rate",
                        "1e7",
                        "--node-bytes-rate",
                        "1e10",
                        "--log-level",
                        "info",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_serving(workdir, procs)
        with (
            _publisher(port, nodes, count, per_batch, wait_acks=True) as proc,
            _profiled(procs[0].pid, profile),
        ):
            cpu0 = sum(_proc_cpu_s(p.pid) for p in procs)
            seconds = _go(proc)
            cpu = sum(_proc_cpu_s(p.pid) for p in procs) - cpu0
        _check_stored(db_url, nodes, count, per_batch)
        return Figure(seconds, cpu, len(nodes) * count, len(nodes) * count * per_batch)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


@contextlib.contextmanager
def _profiled(pid: int, out: Path | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy (collapsed stacks in ``out``) while the block runs."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--threads",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


def _wait_serving(workdir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until every controller logged that it serves (subscribed), or fail."""
    deadline = time.monotonic() + 60
    for index, proc in enumerate(procs):
        log = workdir / f"controller-{index}.log"
        while "serving fleet" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"controller {index} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)


def _check_stored(db_url: str, nodes: list[str], count: int, per_batch: int) -> None:
    """Every result stored exactly once and every slot acked, or fail."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT node_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) "
                    "FROM results GROUP BY node_id"
                )
            ).all()
            acked: dict[str, int] = dict(
                conn.execute(text("SELECT node_id, acked_seq FROM nodes")).all()
            )
    finally:
        engine.dispose()
    want = count * per_batch
    found = {row[0]: tuple(row[1:]) for row in rows}
    for node in nodes:
        if found.get(node) != (want, want, 1, want) or acked.get(node) != count:
            raise SystemExit(
                f"{node}: stored {found.get(node)}, acked {acked.get(node)}; "
                f"expected {want} results once each and slot {count} acked"
            )


@contextlib.contextmanager
def _database(kind: str, workdir: Path, label: str) -> Iterator[str]:
    """A fresh database URL for one run (a SQLite file, or a new PostgreSQL database)."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / label}.db"
        return
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _row(label: str, figures: list[Figure], bare: list[Figure] | None) -> str:
    med = statistics.median
    rate = med(f.msg_rate for f in figures)
    cpu = med(f.cpu_us_per_result for f in figures)
    ratio = "" if bare is None else f"{rate / med(f.msg_rate for f in bare):.2f}x"
    return (
        f"| {label} | {rate:,.0f} | {med(f.result_rate for f in figures):,.0f} | "
        f"{med(f.seconds for f in figures):.2f} | {cpu:.2f} | "
        f"{ratio} | {', '.join(f'{f.msg_rate:,.0f}' for f in figures)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--batches", type=int, default=100, help="messages per node")
    parser.add_argument("--per-batch", type=int, default=100, help="results per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--replicas", default="1", help="comma-separated, e.g. 1,2")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the first controller into this file (raw stacks)"
    )
    parser.add_argument("--publish", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        port, nodes, count, per_batch, wait = args.publish
        publish(int(port), nodes.split(","), int(count), int(per_batch), wait == "1")
        return 0
    replicas = [int(r) for r in args.replicas.split(",")]
    print(
        f"{args.nodes} nodes x {args.batches} messages x {args.per_batch} results "
        f"({args.nodes * args.batches * args.per_batch:,} results per run), db {args.db}, "
        f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}"
    )
    bare: list[Figure] = []
    ours: dict[int, list[Figure]] = {r: [] for r in replicas}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        with local_mosquitto(workdir) as address:
            for round_no in range(args.rounds):
                nodes = [f"node-{round_no}-{i:04d}" for i in range(args.nodes)]
                bare.append(bare_round(address.port, nodes, args.batches, args.per_batch))
                print(f"round {round_no + 1}: bare {bare[-1].msg_rate:,.0f} msg/s", flush=True)
                for r in replicas:
                    label = f"r{round_no}-x{r}"
                    with _database(args.db, workdir, label) as url:
                        figure = edgefleet_round(
                            address.port,
                            workdir,
                            url,
                            r,
                            nodes,
                            args.batches,
                            args.per_batch,
                            args.profile,
                        )
                    ours[r].append(figure)
                    print(
                        f"round {round_no + 1}: EdgeFleet x{r} {figure.msg_rate:,.0f} msg/s "
                        f"= {figure.result_rate:,.0f} results/s, stored once each and acked",
                        flush=True,
                    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    print("| subscriber | msg/s | results/s | wall s | CPU us/result | vs bare | runs, msg/s |")
    print("|---|---|---|---|---|---|---|")
    print(_row("bare paho, counts only", bare, None))
    for r, figures in ours.items():
        print(_row(f"EdgeFleet, {r} replica(s), {args.db}, stored + acked", figures, bare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
