"""Rollout of a 2.3 MB model against a bare paho fan-out of the same bytes, same run.

For each fleet size (``--nodes 50,1000``) on one Mosquitto (``dev.conf``,
``sys_interval 1``) on this machine:

* **EdgeFleet**: a real ``fleetctl serve`` (its own process and GIL, SQLite in
  a temp dir, tick 1 s), waited for until it logs that it serves, and N
  simulated nodes in ``--node-procs`` (1) ``edge-node simulate`` processes
  (source ``none``). Each round rolls a new version of a ~2.3 MB ONNX MLP out
  to all of them in one wave with no health window, and times **start ->
  every node succeeded** (``rollout.start`` to the rollout ``succeeded`` in the
  controller's store, read from this process every 0.1 s): command,
  verification, the broadcast download, hashing and writing, session load and
  warm-up, statuses stored. A round stops with an error when the controller
  and nodes hold more than ``--max-rss-gb`` together (nodes that fall behind
  the broadcast queue its frames in memory, and so does the broker).
* **Bare fan-out**: a separate Python process with N paho subscribers (QoS 0,
  as the nodes subscribe to a broadcast) and one paho publisher (QoS 1, as the
  controller publishes) driven by one ``selectors`` loop; the publisher sends
  the model file's bytes in chunks of the controller's size, and the time runs
  from the first publish until every subscriber has every byte.

The simulated nodes keep their data (model store, outbox, state) in
``--node-data``, by default a temp dir in ``/dev/shm``: a real fleet has a disk
per node, fsyncing in parallel, while a thousand simulated nodes on one disk
queue some 25 fsyncs each behind one another; the controller's database stays
on disk. ``--node-data /tmp`` measures that single-disk case.

Rounds alternate (bare, EdgeFleet, bare, EdgeFleet, ...) and the medians of
``--rounds`` (3) are compared. Beside wall time it prints CPU time (the bare
process; the controller's and the node processes'; the broker's), the bytes
the broker sent and received (``$SYS``), and what the controller sent
(``chunks_sent``, ``chunk_bytes_sent``, from its ``report``). ``--profile
FILE`` samples the controller and each node process with py-spy during the
first EdgeFleet round of the largest fleet (raw stacks in ``FILE.controller``,
``FILE.nodes0``, ...).

    .venv/bin/python benchmarks/bench_fanout.py [--nodes 50,1000] [--rounds 3] [--node-procs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from sys_counters import SysCounters

from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.artifacts import CHUNK_BYTES
from fleet_controller.demo import local_mosquitto
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import prepare_manifest, publish, sign_release
from fleet_controller.store import Store
from shared.broker import BrokerAddress
from shared.trust import Role

FLEET = "bench"
POLL_S = 0.1
SYS_TOPICS = {
    "bytes_sent": "$SYS/broker/bytes/sent",
    "bytes_received": "$SYS/broker/bytes/received",
    "messages_sent": "$SYS/broker/publish/messages/sent",
}


# ----- the model --------------------------------------------------------------------


def build_model(path: Path, seed: int) -> Path:
    """A float32 [N,16] -> [N,4] MLP of ~2.3 MB (two hidden layers, 768 and 736 wide)."""
    import onnx  # noqa: PLC0415 - only building models needs onnx
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    shapes = {"w1": (16, 768), "w2": (768, 736), "w3": (736, 4)}
    weights = [
        numpy_helper.from_array((rng.standard_normal(s) / 32).astype(np.float32), name)
        for name, s in shapes.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "bench-mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


# ----- the broker: $SYS counters and its CPU time ------------------------------------


def broker_cpu_s(config: Path) -> float:
    """CPU seconds (user + system) of the Mosquitto started with ``config``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(config).encode() in (entry / "cmdline").read_bytes():
                return proc_cpu_s(int(entry.name))
    raise RuntimeError("the benchmark's mosquitto is gone")


# ----- the bare fan-out (in its own process) --------------------------------------------


class BareFanout:
    """N paho subscribers and one publisher on one selectors loop; see the module docstring."""

    def __init__(self, host: str, port: int, count: int, size: int) -> None:
        self._host, self._port, self._size = host, port, size
        self.topic = f"bare/{os.getpid()}/data"
        self.received = [0] * count
        self.subscribed = 0
        self.complete = 0
        self._selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []

    def _on_message(self, _client: mqtt.Client, index: int, message: mqtt.MQTTMessage) -> None:
        self.received[index] += len(message.payload)
        if self.received[index] == self._size:
            self.complete += 1

    def _on_subscribe(self, *_: object) -> None:
        self.subscribed += 1

    def client(self, name: str, index: int) -> mqtt.Client:
        made = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=name,
            protocol=mqtt.MQTTv5,
            userdata=index,
        )
        made.on_message = self._on_message
        made.on_subscribe = self._on_subscribe
        made.connect(self._host, self._port, keepalive=120)
        sock = made.socket()
        assert isinstance(sock, socket.socket)
        self._selector.register(sock, selectors.EVENT_READ, made)
        self.clients.append(made)
        return made

    def pump(self, until: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("the bare fan-out did not finish")
            for each in self.clients:
                if each.want_write():
                    each.loop_write()
            for key, _ in self._selector.select(0.01):
                key.data.loop_read()


def bare_worker(host: str, port: int, count: int, model: Path, chunk: int) -> dict[str, float]:
    data = model.read_bytes()
    fanout = BareFanout(host, port, count, len(data))
    for index in range(count):
        fanout.client(f"bare-{os.getpid()}-{index}", index).subscribe(fanout.topic, qos=0)
    fanout.pump(lambda: fanout.subscribed >= count, 120)
    publisher = fanout.client(f"bare-{os.getpid()}-publisher", count)
    fanout.pump(publisher.is_connected, 30)
    wall, cpu = time.perf_counter(), time.process_time()
    for offset in range(0, len(data), chunk):
        publisher.publish(fanout.topic, data[offset : offset + chunk], qos=1)
    fanout.pump(lambda: fanout.complete >= count, 600)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for each in fanout.clients:
        each.disconnect()
    return {"wall_s": wall, "cpu_s": cpu}


async def bare_round(
    broker: BrokerAddress, count: int, model: Path, counters: SysCounters, config: Path
) -> Round:
    before = await counters.fresh()
    cpu_before = broker_cpu_s(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--bare-worker",
        json.dumps([broker.host, broker.port, count, str(model), CHUNK_BYTES]),
        stdout=subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the bare fan-out failed with exit code {process.returncode}")
    figures = json.loads(out.decode().strip().splitlines()[-1])
    broker_cpu = broker_cpu_s(config) - cpu_before
    after = await counters.fresh()
    return Round("bare", figures["wall_s"], figures["cpu_s"], broker_cpu, before, after, Counter())


# ----- EdgeFleet -------------------------------------------------------------------------


@dataclass
class Round:
    kind: str
    wall_s: float
    cpu_s: float
    broker_cpu_s: float
    sys_before: dict[str, int]
    sys_after: dict[str, int]
    metrics: Counter[str]
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # state: half, all
    nodes_cpu_s: float = 0.0  # EdgeFleet: the nodes' processes (cpu_s: the controller's)

    def sys(self, name: str) -> int:
        return self.sys_after[name] - self.sys_before[name]


async def wait_online(ctl: CtlClient, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = await ctl.call("nodes.list")
        if sum(1 for n in nodes if n["online"]) >= count:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the {count} nodes did not all come online in {timeout_s:g} s")


def proc_rss_gb(pid: int) -> float:
    """Resident memory of process ``pid``, in GB."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 1e9


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Processes:
    """The ``fleetctl serve`` and ``edge-node simulate`` processes of one fleet."""

    controller: subprocess.Popen[bytes]
    nodes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds so far: the controller's, all node processes' together."""
        return proc_cpu_s(self.controller.pid), sum(proc_cpu_s(p.pid) for p in self.nodes)

    def check(self, max_rss_gb: float) -> None:
        """Raise when one exited or they hold over ``max_rss_gb`` GB (see the docstring)."""
        procs = [self.controller, *self.nodes]
        for proc, log in zip(procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{log.stem} exited {proc.returncode}: {tail}")
        rss = sum(proc_rss_gb(p.pid) for p in procs)
        if rss > max_rss_gb:
            raise RuntimeError(f"controller and nodes hold {rss:.1f} GB (--max-rss-gb)")


@contextlib.contextmanager
def profiled(pids: dict[str, int], out: str | None) -> Iterator[None]:
    """Sample each of ``pids`` with py-spy (raw stacks in ``{out}.{name}``) during the block."""
    if out is None:
        yield
        return
    record = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking"]
    spies = [
        subprocess.Popen(
            [
                *record,
                *("--rate", "100", "--format", "raw", "--pid", str(pid), "-o", f"{out}.{name}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)
        print(f"  py-spy stacks of this round in {out}.{{{','.join(pids)}}}")


async def rollout_round(  # noqa: PLR0917 - one round's settings, in the order they are known
    ctl: CtlClient,
    store: Store,
    model: str,
    procs: Processes,
    counters: SysCounters,
    config: Path,
    max_rss_gb: float,
) -> Round:
    before = await counters.fresh()
    metrics_before = Counter((await ctl.call("report"))["controller"])
    (controller_before, nodes_before), broker_before = procs.cpu_s(), broker_cpu_s(config)
    started, started_at = time.perf_counter(), time.time()
    reply = await ctl.call(
        "rollout.start",
        {"model": model, "waves": [100], "health_window_s": 0.0, "wave_timeout_s": 600.0},
    )
    rollout_id = reply["rollout_id"]
    shown = started
    while True:
        # The controller's store, read from here: what an operator would see.
        listed = await asyncio.to_thread(store.rollouts.list)
        info = next(r for r in listed if r.rollout_id == rollout_id)
        if info.state.value in ("succeeded", "failed", "aborted", "rolled_back"):
            break
        try:
            procs.check(max_rss_gb)
        except RuntimeError:
            sent = Counter((await ctl.call("report"))["controller"])
            sent.subtract(metrics_before)
            print(f"    given up: {dict(info.node_counts)}, {sent['chunks_sent']} chunks sent")
            raise
        if time.perf_counter() - shown > 10:  # a sign of life on long rollouts
            shown = time.perf_counter()
            print(f"    {shown - started:.0f} s: {dict(info.node_counts)}", file=sys.stderr)
        await asyncio.sleep(POLL_S)
    wall = time.perf_counter() - started
    controller_cpu, nodes_cpu = procs.cpu_s()
    broker_cpu = broker_cpu_s(config) - broker_before
    if info.state.value != "succeeded":
        raise RuntimeError(f"rollout of {model} ended {info.state.value}: {info.node_counts}")
    metrics = Counter((await ctl.call("report"))["controller"])
    metrics.subtract(metrics_before)
    after = await counters.fresh()
    events = await asyncio.to_thread(store.rollouts.events, rollout_id)
    reached: dict[str, dict[str, float]] = {}
    for event in events:
        reached.setdefault(event.state.value, {}).setdefault(event.node_id, event.ts - started_at)
    phases = {
        state: (statistics.median(times.values()), max(times.values()))
        for state, times in reached.items()
    }
    return Round(
        "edgefleet",
        wall,
        controller_cpu - controller_before,
        broker_cpu,
        before,
        after,
        metrics,
        phases,
        nodes_cpu - nodes_before,
    )


def start_processes(
    root: Path, nodes_dir: Path, broker: BrokerAddress, count: int, node_procs: int
) -> Processes:
    """``fleetctl serve`` (waited for until it serves) and the simulated nodes."""
    url = f"mqtt://{broker.host}:{broker.port}"
    logs = [root / "controller.log"]
    with logs[0].open("wb") as log:
        db, keys = str(root / "controller" / "fleet.db"), str(root / "keys")
        serve = ["serve", "--broker", url, "--fleet", FLEET, "--db", db, "--keys", keys]
        controller = subprocess.Popen(
            [sys.executable, "-m", "fleet_controller", *serve, "--log-level", "info"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while "serving fleet" not in logs[0].read_text(errors="replace"):
        if controller.poll() is not None or time.monotonic() > deadline:
            controller.kill()
            raise RuntimeError(f"fleetctl serve did not start: {logs[0].read_text()[-2000:]}")
        time.sleep(0.1)
    nodes = []
    for index in range(node_procs):
        share = count // node_procs + (index < count % node_procs)
        logs.append(root / f"nodes-{index}.log")
        with logs[-1].open("wb") as log:
            simulate = ["simulate", "--count", str(share), "--prefix", f"sim{index}"]
            simulate += ["--data", str(nodes_dir), "--trust", str(root / "keys" / "trust.json")]
            simulate += ["--broker", url, "--fleet", FLEET, "--source", "none"]
            command = [sys.executable, "-m", "edge_node", *simulate]
            nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    return Processes(controller, nodes, logs)


def stop_processes(procs: Processes) -> None:
    """SIGTERM (a clean stop) to the nodes, then the controller; SIGKILL after 60 s."""
    for group in (procs.nodes, [procs.controller]):
        for proc in group:
            proc.terminate()
        for proc in group:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def fleet(
    root: Path, nodes_dir: Path, broker: BrokerAddress, count: int, args: argparse.Namespace
) -> None:
    config = root / "mosquitto.conf"
    keys = root / "keys"
    init_keys(keys, now=time.time(), force=True)
    models = []
    for index in range(args.rounds):
        path = build_model(root / f"mlp-{index}.onnx", seed=index)
        version = f"1.{index}.0"
        manifest = await prepare_manifest(path, name="mlp", version=version, now=time.time())
        models.append(
            (
                path,
                f"mlp@{version}",
                sign_release(path, manifest, load_key(keys, Role.RELEASE, None)),
            )
        )
    (root / "controller").mkdir()
    procs = start_processes(root, nodes_dir, broker, count, args.node_procs)
    store = Store.open(str(root / "controller" / "fleet.db"))
    try:
        identity = OperatorIdentity.load(keys)
        async with (
            CtlClient(MqttTransport(broker), fleet=FLEET, identity=identity) as ctl,
            SysCounters(broker, SYS_TOPICS) as counters,
        ):
            for _, _, release in models:
                await publish(ctl, release)
            started = time.perf_counter()
            await wait_online(ctl, count, timeout_s=60 + count * 0.2)
            print(f"\n{count} nodes online in {time.perf_counter() - started:.1f} s")
            rounds: list[Round] = []
            for index, (path, name, _) in enumerate(models):
                rounds.append(await bare_round(broker, count, path, counters, config))
                report_round(index + 1, rounds[-1], count)
                profiled_round = args.profile and index == 0 and count == max(args.nodes)
                pids = {"controller": procs.controller.pid} | {
                    f"nodes{i}": p.pid for i, p in enumerate(procs.nodes)
                }
                with profiled(pids, args.profile if profiled_round else None):
                    rounds.append(
                        await rollout_round(
                            ctl, store, name, procs, counters, config, args.max_rss_gb
                        )
                    )
                report_round(index + 1, rounds[-1], count)
            summarise(rounds, count, models[0][0].stat().st_size)
    finally:
        await asyncio.to_thread(stop_processes, procs)


def report_round(index: int, measured: Round, count: int) -> None:
    extra, nodes = "", ""
    if measured.kind == "edgefleet":
        m, per_node = measured.metrics, measured.nodes_cpu_s / count * 1e3
        nodes = f" controller + {measured.nodes_cpu_s:6.2f} s nodes ({per_node:.1f} ms per node)"
        extra = (
            f"; controller sent {m['chunks_sent']} chunks ({m['chunk_bytes_sent'] / 1e6:.1f} MB), "
            f"{m['stored']} messages stored\n    node states stored, s after the start "
            "(half of the nodes / all): "
            + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in measured.phases.items())
        )
    print(
        f"  round {index} {measured.kind:9s}: {measured.wall_s:6.2f} s wall, "
        f"{measured.cpu_s:6.2f} s CPU ({measured.cpu_s / count * 1e3:.1f} ms per node){nodes}, "
        f"broker {measured.broker_cpu_s:5.2f} s CPU, "
        f"{measured.sys('bytes_sent') / 1e6:,.0f} MB sent by the broker{extra}"
    )


def summarise(rounds: list[Round], count: int, size: int) -> None:
    def median(kind: str, pick: Callable[[Round], float]) -> float:
        return float(statistics.median(pick(r) for r in rounds if r.kind == kind))

    bare = median("bare", lambda r: r.wall_s)
    edge = median("edgefleet", lambda r: r.wall_s)
    load1, _, _ = os.getloadavg()
    print(
        f"{count} nodes, model {size / 1e6:.2f} MB, medians of {len(rounds) // 2} rounds "
        f"(load average {load1:.1f}):\n"
        f"  limit (bare paho fan-out)  {bare:7.2f} s wall, "
        f"{median('bare', lambda r: r.cpu_s):6.2f} s CPU + broker "
        f"{median('bare', lambda r: r.broker_cpu_s):.2f} s, "
        f"{median('bare', lambda r: r.sys('bytes_sent')) / 1e6:,.0f} MB through the broker\n"
        f"  EdgeFleet start->succeeded {edge:7.2f} s wall, "
        f"{median('edgefleet', lambda r: r.cpu_s):6.2f} s CPU controller + "
        f"{median('edgefleet', lambda r: r.nodes_cpu_s):6.2f} s nodes + broker "
        f"{median('edgefleet', lambda r: r.broker_cpu_s):.2f} s, "
        f"{median('edgefleet', lambda r: r.sys('bytes_sent')) / 1e6:,.0f} MB through the broker\n"
        f"  ratio EdgeFleet / bare: {edge / bare:.2f}x wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nodes", type=lambda text: [int(p) for p in text.split(",")], default=[50, 1000]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="py-spy stacks of one round in PROFILE.*")
    parser.add_argument("--node-procs", type=int, default=1, help="edge-node simulate processes")
    parser.add_argument(
        "--node-data",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where the simulated nodes keep their data (default /dev/shm: see the docstring)",
    )
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="see the docstring")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        host, port, count, model, chunk = json.loads(args.bare_worker)
        print(json.dumps(bare_worker(host, port, count, Path(model), chunk)))
        return
    load1, _, _ = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs (load average {load1:.1f}); chunks of {CHUNK_BYTES // 1024} KiB; "
        f"fleets of {', '.join(map(str, args.nodes))} nodes; {args.rounds} rounds each"
    )
    print(f"simulated nodes' data in {args.node_data or tempfile.gettempdir()}")
    for count in args.nodes:
        with (
            tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
            tempfile.TemporaryDirectory(prefix="bench-nodes-", dir=args.node_data) as nodes,
            local_mosquitto(Path(tmp), ["sys_interval 1"]) as broker,
        ):
            asyncio.run(fleet(Path(tmp), Path(nodes), broker, count, args))


if __name__ == "__main__":
    main()
