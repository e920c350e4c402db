"""`edge-node run` against a bare `session.run` loop, and hot swaps by real rollouts.

Everything runs on this machine: Mosquitto (``broker_config/dev.conf`` on a
free port on 127.0.0.1), a :class:`ControllerService` with SQLite in a temp
dir (in this process), and the node as a real ``edge-node run`` process
(synthetic source flat out, ``--batch-interval 0.2 --batch-max 1000``,
telemetry every second, default micro-batching and session options),
deployed the real way: published, signed, rolled out.

For each model it runs, interleaved, ``--rounds`` times (medians printed):

* the node for ``--seconds`` after a warm-up: inferences/s from the node's own
  telemetry (its ``ts`` and cumulative ``inferences``; the store may lag
  behind a node flat out), CPU time from ``/proc/<pid>/stat`` of the node
  process over the same window; then the controller catches up (the store
  stops growing) before the next measurement;
* a bare ``session.run`` loop in its own process, same model file, same
  session options (the node's defaults, so the same intra-op threads), one
  request per run; and, for a model with a dynamic batch dimension, the
  same loop at the node's micro-batch size, the fairer limit for a batching
  node.

Models: a tiny MLP 64->64->10 (also with ``--micro-batch 1``); SqueezeNet 1.0
from the ``onnx`` wheel (``light_squeezenet.onnx``: the model zoo's graph,
weights by ``ConstantOfShape``; [1, 3, 224, 224], ~2.6 ms); a small CNN on
[N, 3, 48, 192].

Then hot swaps: the node serves SqueezeNet at ``--swap-rate`` inputs/s; per
round, ``--swap-window`` seconds without swaps, then ``--swaps`` real
rollouts (each a new version, waves [100], no health window, the gate's
``min_samples`` 1), 1.5 s apart: a swap drops the node's telemetry period under
way, and the next rollout's gate needs the previous model's runs. It prints
the p99 of the stored results' ``latency_ms`` in both windows, the ratio,
and failed inferences (the node's telemetry ``errors``).

    .venv/bin/python benchmarks/bench_node.py [--seconds S] [--rounds R] [--only ROWS]  # ~8 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import itertools
import json
import logging
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.demo import local_mosquitto, running
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import prepare_manifest, publish, sign_release
from fleet_controller.service import ControllerConfig, ControllerService
from shared.broker import BrokerAddress
from shared.envelope import SigningKey
from shared.trust import Role

FLEET = "bench"
NODE = "bench-node"
MICRO_BATCH = 32  # edge-node's default
CLK_TCK = os.sysconf("SC_CLK_TCK")

BARE = """
import json, sys, time
import numpy as np
import onnxruntime as ort
from edge_node.sessions import SessionOptionsConfig
path, rows, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
options = SessionOptionsConfig()
session = ort.InferenceSession(path, sess_options=options.session_options(),
                               providers=["CPUExecutionProvider"])
feed = {}
for arg in session.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in arg.shape]
    shape[0] = rows if not isinstance(arg.shape[0], int) else shape[0]
    feed[arg.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
for _ in range(20):
    session.run(None, feed)
runs, cpu0, start = 0, time.process_time(), time.perf_counter()
while time.perf_counter() - start < seconds:
    session.run(None, feed)
    runs += 1
wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
print(json.dumps({"inferences": runs * rows, "wall": wall, "cpu": cpu}))
"""


@dataclass(frozen=True)
class Figure:
    """Per inference: wall and CPU microseconds."""

    wall_us: float
    cpu_us: float


@dataclass(frozen=True)
class Row:
    name: str
    path: Path
    labels: tuple[str, ...]
    _: KW_ONLY
    dynamic: bool
    micro_batch: int = MICRO_BATCH


# ----- models ------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def tiny_mlp(path: Path) -> Path:
    """float32 [N, 64] -> MatMul/Add/Relu -> [N, 64] -> MatMul/Add -> Softmax [N, 10].

    The file's name is its doc string, so two copies are two releases.
    """
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.normal(size=(64, 64)) / 8).astype(np.float32), "W0"),
        numpy_helper.from_array(np.zeros(64, np.float32), "B0"),
        numpy_helper.from_array((rng.normal(size=(64, 10)) / 8).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(10, np.float32), "B1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W0"], ["m0"]),
        helper.make_node("Add", ["m0", "B0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "B1"], ["a1"]),
        helper.make_node("Softmax", ["a1"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = path.name
    return _save(model, path)


def small_cnn(path: Path) -> Path:
    """float32 [N, 3, 48, 192] -> 2 strided convs -> global pool -> Gemm -> Softmax [N, 10]."""
    rng = np.random.default_rng(2)

    def weights(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    inits = [
        weights("C0", 8, 3, 3, 3),
        weights("C1", 16, 8, 3, 3),
        weights("G", 16, 10),
        numpy_helper.from_array(np.zeros(10, np.float32), "GB"),
    ]
    conv: dict[str, Any] = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "C0"], ["c0"], **conv),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "C1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "GB"], ["g"]),
        helper.make_node("Softmax", ["g"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 48, 192])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def squeezenet_source() -> Path:
    """SqueezeNet 1.0 as the ``onnx`` wheel ships it in its backend test data."""
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    found = glob.glob(str(root / "light_squeezenet.onnx"))
    if not found:
        raise SystemExit(f"light_squeezenet.onnx not found under {root}")
    return Path(found[0])


def squeezenet_variant(path: Path, index: int) -> Path:
    """The same graph with its own bytes (a distinct release for each rollout)."""
    model = onnx.load(str(squeezenet_source()))
    model.doc_string = f"edgefleet bench variant {index}"
    path.write_bytes(model.SerializeToString())
    return path


# ----- the controller side -------------------------------------------------------


async def wait_for(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Fleet:
    """The controller, an operator client and the release key."""

    def __init__(
        self, root: Path, controller: ControllerService, ctl: CtlClient, key: SigningKey
    ) -> None:
        self.root = root
        self.controller = controller
        self.ctl = ctl
        self.key = key
        self.db = root / "controller" / "fleet.db"

    async def release(self, path: Path, name: str, version: str, labels: tuple[str, ...]) -> None:
        manifest = await prepare_manifest(
            path, name=name, version=version, now=time.time(), labels=labels
        )
        await publish(self.ctl, sign_release(path, manifest, self.key))

    async def roll_out(self, model: str) -> None:
        """Roll ``model`` out to the node and wait until it succeeded."""

        async def online() -> bool:
            nodes = await self.ctl.call("nodes.list")
            return any(n["node_id"] == NODE and n["online"] for n in nodes)

        await wait_for("the node to come online", online)
        started = await self.ctl.call(
            # Swaps a second or two apart leave the previous model fewer runs
            # than the health gate's default 100 a side: any run is enough here.
            "rollout.start",
            {"model": model, "waves": [100], "health_window_s": 0.0, "min_samples": 1},
        )

        async def done() -> bool:
            status = await self.ctl.call("rollout.status", {"rollout_id": started["rollout_id"]})
            if status["state"] in ("failed", "aborted", "rolled_back"):
                raise RuntimeError(f"rollout ended {status['state']}: {status['reason']}")
            return bool(status["state"] == "succeeded")

        await wait_for(f"the rollout of {model}", done, timeout_s=180.0)

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as db:
            rows: list[tuple[Any, ...]] = db.execute(sql, args).fetchall()
            return rows

    def last_seq(self) -> int:
        ((top,),) = self.query("select coalesce(max(seq), 0) from results where node_id = ?", NODE)
        return int(top)

    def latencies(self, since: float, until: float) -> list[float]:
        rows = self.query(
            "select latency_ms from results where node_id = ? and ts >= ? and ts < ?",
            NODE,
            since,
            until,
        )
        return [float(r[0]) for r in rows]

    def node_errors(self) -> int:
        rows = self.query(
            "select errors from telemetry where node_id = ? order by ts desc limit 1", NODE
        )
        return int(rows[0][0]) if rows else 0

    def inference_rate(self, since: float, until: float) -> float:
        """Inferences/s between the node's telemetry points inside [since, until]."""
        rows = self.query(
            "select ts, inferences from telemetry where node_id = ? and ts >= ? and ts <= ? "
            "order by ts",
            NODE,
            since,
            until,
        )
        if len(rows) < 2:
            raise RuntimeError("the node sent too little telemetry in the window")
        (t0, n0), (t1, n1) = rows[0], rows[-1]
        return float(n1 - n0) / float(t1 - t0)

    async def caught_up(self, timeout_s: float = 60.0) -> None:
        """Wait until the store stops growing: the bare loop then runs on a quiet machine."""
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline:
            top = await asyncio.to_thread(self.last_seq)
            if top == last:
                return
            last = top
            await asyncio.sleep(1.0)


# ----- the node process ----------------------------------------------------------


def node_command(root: Path, broker: BrokerAddress, *, rate: float, micro_batch: int) -> list[str]:
    options = {
        "--id": NODE,
        "--trust": str(root / "keys" / "trust.json"),
        "--data": str(root / "node"),
        "--broker": f"mqtt://{broker.host}:{broker.port}",
        "--fleet": FLEET,
        "--source": "synthetic",
        "--rate": str(rate),
        "--micro-batch": str(micro_batch),
        "--batch-interval": "0.2",
        "--batch-max": "1000",
        "--telemetry-interval": "1",
        "--log-level": os.environ.get("EDGEFLEET_BENCH_NODE_LEVEL", "warning"),
    }
    return [sys.executable, "-m", "edge_node", "run", *itertools.chain(*options.items())]


@contextlib.contextmanager
def node_process(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """``edge-node run``, its log appended to ``$EDGEFLEET_BENCH_NODE_LOG`` when set."""
    log_path = os.environ.get("EDGEFLEET_BENCH_NODE_LOG")
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(Path(log_path).open("ab")) if log_path else None
        process = stack.enter_context(_terminating(subprocess.Popen(command, stderr=log_file)))
        yield process


@contextlib.contextmanager
def _terminating(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def measure_node(fleet: Fleet, command: list[str], seconds: float) -> Figure:
    """The node's inferences from its own telemetry (``ts``, cumulative ``inferences``):
    the store may lag behind a node flat out, the node's count does not.

    The node starts with an empty outbox: a node flat out makes results faster
    than this machine's controller stores them, and a full outbox would pause
    it (back-pressure, as designed) and measure the controller instead.
    """
    for stale in (fleet.root / "node").glob("outbox.db*"):
        stale.unlink()
    with node_process(command) as process:
        first = fleet.last_seq()

        async def inferring() -> bool:
            return await asyncio.to_thread(fleet.last_seq) > first

        await wait_for("the node's first results", inferring)
        await asyncio.sleep(1.0)  # warm-up: pool, outbox, acks in a steady state
        cpu0, t0 = cpu_seconds(process.pid), time.time()
        await asyncio.sleep(seconds)
        cpu1, t1 = cpu_seconds(process.pid), time.time()

        async def covered() -> bool:
            rows = await asyncio.to_thread(
                fleet.query, "select max(ts) from telemetry where node_id = ?", NODE
            )
            return rows[0][0] is not None and float(rows[0][0]) >= t1 - 1.0

        await wait_for("telemetry covering the window", covered)
    rate = max(1e-9, await asyncio.to_thread(fleet.inference_rate, t0, t1))
    await fleet.caught_up()
    return Figure(1e6 / rate, (cpu1 - cpu0) / (t1 - t0) / rate * 1e6)


def measure_bare(path: Path, rows: int, seconds: float) -> Figure:
    done = subprocess.run(
        [sys.executable, "-c", BARE, str(path), str(rows), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(done.stdout)
    return Figure(out["wall"] / out["inferences"] * 1e6, out["cpu"] / out["inferences"] * 1e6)


def median(figures: list[Figure]) -> Figure:
    return Figure(
        statistics.median(f.wall_us for f in figures), statistics.median(f.cpu_us for f in figures)
    )


async def throughput_row(
    fleet: Fleet, broker: BrokerAddress, row: Row, version: str, args: argparse.Namespace
) -> None:
    await fleet.release(row.path, row.name, version, row.labels)
    # Deployed at 10/s: flat out, its statuses would queue behind result batches.
    with node_process(node_command(fleet.root, broker, rate=10, micro_batch=row.micro_batch)):
        await fleet.roll_out(f"{row.name}@{version}")
    command = node_command(fleet.root, broker, rate=0, micro_batch=row.micro_batch)
    batched = row.dynamic and row.micro_batch > 1
    nodes, bares, batches = [], [], []
    for _ in range(args.rounds):
        nodes.append(await measure_node(fleet, command, args.seconds))
        bares.append(await asyncio.to_thread(measure_bare, row.path, 1, args.seconds))
        if batched:
            batches.append(
                await asyncio.to_thread(measure_bare, row.path, row.micro_batch, args.seconds)
            )
    node, bare = median(nodes), median(bares)
    load1, _, _ = os.getloadavg()
    print(f"\n== {row.name}, micro-batch {row.micro_batch} (load average {load1:.1f})")
    print(f"{'':34}{'wall us/inf':>12}{'CPU us/inf':>12}")
    print(f"{'bare session.run, 1 per run':34}{bare.wall_us:12.1f}{bare.cpu_us:12.1f}")
    if batched:
        batch = median(batches)
        print(
            f"{f'bare session.run, {row.micro_batch} per run':34}"
            f"{batch.wall_us:12.1f}{batch.cpu_us:12.1f}"
        )
    print(f"{'edge-node run':34}{node.wall_us:12.1f}{node.cpu_us:12.1f}")
    print(
        f"node / bare (1 per run): {bare.wall_us / node.wall_us:.3f} wall, "
        f"{bare.cpu_us / node.cpu_us:.3f} CPU; added {node.wall_us - bare.wall_us:+.1f} us wall, "
        f"{node.cpu_us - bare.cpu_us:+.1f} us CPU per inference"
    )
    if batched:
        print(
            f"node / bare ({row.micro_batch} per run): {batch.wall_us / node.wall_us:.3f} wall, "
            f"{batch.cpu_us / node.cpu_us:.3f} CPU; added {node.cpu_us - batch.cpu_us:+.1f} us "
            "CPU per inference"
        )
    rounds = ", ".join(f"{b.cpu_us / n.cpu_us:.2f}" for n, b in zip(nodes, bares, strict=True))
    print(f"rounds, node / bare CPU: {rounds}")


async def swap_row(fleet: Fleet, broker: BrokerAddress, args: argparse.Namespace) -> None:
    versions = (f"1.0.{i}" for i in itertools.count())
    labels = tuple(f"class{i}" for i in range(1000))
    workdir = fleet.root / "swaps"
    workdir.mkdir()
    paths = [
        squeezenet_variant(workdir / f"v{i}.onnx", i) for i in range(args.rounds * args.swaps + 1)
    ]
    releases = [(path, next(versions)) for path in paths]
    for path, version in releases:
        await fleet.release(path, "squeezenet-swap", version, labels)
    command = node_command(fleet.root, broker, rate=args.swap_rate, micro_batch=MICRO_BATCH)
    quiet, swapping, swap_s = [], [], []
    with node_process(command):
        await fleet.roll_out(f"squeezenet-swap@{releases[0][1]}")
        first = fleet.last_seq()

        async def inferring() -> bool:
            return await asyncio.to_thread(fleet.last_seq) > first

        await wait_for("the node's first results", inferring)
        await asyncio.sleep(2.0)
        errors0 = await asyncio.to_thread(fleet.node_errors)
        pending = iter(releases[1:])
        for _ in range(args.rounds):
            t0 = time.time()
            await asyncio.sleep(args.swap_window)
            t1 = time.time()
            for _ in range(args.swaps):
                _, version = next(pending)
                await fleet.roll_out(f"squeezenet-swap@{version}")
                # Each model serves a whole telemetry period (a swap drops the
                # period under way), or the next rollout's gate has no reference.
                await asyncio.sleep(1.5)
            t2 = time.time()
            await asyncio.sleep(1.0)  # the last results reach the store
            quiet.append(_p99(await asyncio.to_thread(fleet.latencies, t0, t1)))
            swapping.append(_p99(await asyncio.to_thread(fleet.latencies, t1, t2)))
            swap_s.append(t2 - t1)
        await asyncio.sleep(2.0)  # telemetry covering the last round
        failed = await asyncio.to_thread(fleet.node_errors) - errors0
    load1, _, _ = os.getloadavg()
    ratios = [s / q for s, q in zip(swapping, quiet, strict=True)]
    print(
        f"\n== hot swap: squeezenet at {args.swap_rate:g} inputs/s, {args.swaps} rollouts per "
        f"round (load average {load1:.1f})"
    )
    print(
        f"p99 latency_ms without swaps   {statistics.median(quiet):8.2f} ms  (rounds: "
        + ", ".join(f"{q:.2f}" for q in quiet)
        + ")"
    )
    print(
        f"p99 latency_ms during swaps    {statistics.median(swapping):8.2f} ms  (rounds: "
        + ", ".join(f"{s:.2f}" for s in swapping)
        + ")"
    )
    print(
        f"during / without: {statistics.median(ratios):.2f}x (rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"); {args.swaps} rollouts took {statistics.median(swap_s):.1f} s; "
        f"failed inferences {failed}"
    )


async def bench(root: Path, broker: BrokerAddress, args: argparse.Namespace) -> None:
    keys = root / "keys"
    init_keys(keys, now=time.time(), force=True)
    controller = ControllerService(
        ControllerConfig(
            broker=broker,
            db_url=str(root / "controller" / "fleet.db"),
            keys_dir=keys,
            fleet=FLEET,
            tick_s=0.2,
        )
    )
    models = root / "models"
    models.mkdir()
    imagenet = tuple(f"class{i}" for i in range(1000))
    rows = {
        "tiny": Row("tiny-mlp", tiny_mlp(models / "tiny.onnx"), (), dynamic=True),
        "tiny1": Row("tiny-mlp", tiny_mlp(models / "tiny1.onnx"), (), dynamic=True, micro_batch=1),
        "image": Row("squeezenet", squeezenet_source(), imagenet, dynamic=False),
        "small": Row("small-cnn", small_cnn(models / "small.onnx"), (), dynamic=True),
    }
    async with running(controller):
        async with asyncio.timeout(30):
            await controller.connected.wait()
        async with CtlClient(
            MqttTransport(broker), fleet=FLEET, identity=OperatorIdentity.load(keys)
        ) as ctl:
            fleet = Fleet(root, controller, ctl, load_key(keys, Role.RELEASE, None))
            for index, name in enumerate(args.only):
                if name == "swap":
                    await swap_row(fleet, broker, args)
                else:
                    await throughput_row(fleet, broker, rows[name], f"2.0.{index}", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--swaps", type=int, default=20, help="rollouts per swap round")
    parser.add_argument("--swap-rate", type=float, default=100.0, help="inputs/s while swapping")
    parser.add_argument("--swap-window", type=float, default=10.0, help="seconds without swaps")
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=["tiny", "tiny1", "image", "small", "swap"],
        help="comma-separated rows: tiny, tiny1, image, small, swap",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load1, _, _ = os.getloadavg()
    print(
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs (load average {load1:.1f}); "
        f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s"
    )
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-node-") as tmp,
        local_mosquitto(Path(tmp)) as broker,
    ):
        asyncio.run(bench(Path(tmp), broker, args))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


if __name__ == "__main__":
    main()
