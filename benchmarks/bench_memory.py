"""Node memory: RSS of ``edge-node run`` with a model vs a bare python holding the same session.

The limit is what the model itself costs: a bare ``python`` that imports
onnxruntime and numpy, builds the same session (same file, the node's session
options: onnxruntime's thread pools, graph optimization "extended", the CPU
provider), warms it up once and then runs it. EdgeFleet's figure is the RSS of
a real ``edge-node run`` process holding that model, deployed the real way:
Mosquitto (``broker_config/dev.conf`` on a free port), ``fleetctl keys init``,
``fleetctl serve`` (SQLite in a temp dir), ``fleetctl model add`` (signed with
the release key) and a one-wave rollout.

Both are measured **idle** (the model loaded, no inference: the node runs
``--source none``) and **running** (``--rate`` inputs per second of random
float32 data shaped like the model's input: the node's synthetic source, the
bare process a loop at the same rate), in interleaved rounds: in each round
the bare process, then the node idle, then the node running (a fresh process
each time, restarted on the same data directory, so it loads the deployed
model at start). RSS is sampled from ``/proc/PID/status`` every 0.25 s over
``--sample`` seconds after ``--settle`` seconds; the median sample counts. The
script prints the medians over the rounds, the difference (the goal: at most
15 MiB), the split into anonymous and file-backed pages, and the CPU time of
each process per inference while running.

Then it profiles the difference: a fresh interpreter holding the bare session
imports what the node imports, layer by layer, and prints what each layer
adds to its RSS.

The model is ``light_squeezenet.onnx`` from the ``onnx`` wheel's backend test
data (SqueezeNet 1.0's real graph, 1x3x224x224 -> 1000 classes, its weights
filled in by ConstantOfShape), or ``--model FILE`` (float32 inputs only).

    .venv/bin/python benchmarks/bench_memory.py [--rounds 3] [--rate 10]

Runs in about 90 s with the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.broker import Broker  # noqa: E402 - needs ROOT on sys.path
from tests.support.fleet import Fleet, Proc, program  # noqa: E402

FLEET = "bench"
NODE = "mem-node"
MODEL = "squeezenet@1.0.0"
SAMPLE_EVERY_S = 0.25
MIB = 1024.0

#: The bare process: the node's session options, one warm-up, idle until told to
#: run, then ``rate`` runs per second on fresh random inputs for ``seconds``.
BARE = """
import sys, time
import numpy as np
import onnxruntime as ort

path, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = 0
options.inter_op_num_threads = 0
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
shapes = {}
for spec in session.get_inputs():
    if spec.type != "tensor(float)":
        raise SystemExit(f"input {spec.name} is {spec.type}: this baseline feeds float32 only")
    shapes[spec.name] = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
session.run(None, {name: np.zeros(shape, np.float32) for name, shape in shapes.items()})
print("idle", flush=True)
sys.stdin.readline()
rng = np.random.default_rng(0)
runs, start = 0, time.monotonic()
cpu0 = time.process_time()
while time.monotonic() - start < seconds:
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    session.run(None, feeds)
    runs += 1
    time.sleep(max(0.0, start + runs / rate - time.monotonic()))
print(f"done {runs} {time.process_time() - cpu0}", flush=True)
sys.stdin.readline()
"""

#: What ``edge-node run`` imports, in layers, for the profile of the difference.
LAYERS = (
    ("asyncio (the event loop)", "asyncio"),
    ("cryptography (Ed25519 verification)", "cryptography.hazmat.primitives.asymmetric.ed25519"),
    ("pydantic", "pydantic"),
    ("shared.messages (the wire models, pydantic)", "shared.messages"),
    ("shared.trust (trust list models)", "shared.trust"),
    ("aiomqtt + paho (edgefleet_io.mqtt)", "edgefleet_io.mqtt"),
    ("the outbox (sqlite3)", "edge_node.outbox"),
    ("the rest of edge_node.agent", "edge_node.agent"),
    ("edge_node.cli (settings)", "edge_node.cli"),
)

PROFILE = """
import importlib, sys
import numpy as np
import onnxruntime as ort

def rss():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields

options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
providers = ["CPUExecutionProvider"]
session = ort.InferenceSession(sys.argv[1], sess_options=options, providers=providers)
base = previous = rss()
print(f"bare session {base['VmRSS']:.1f}")
for module in sys.argv[2:]:
    importlib.import_module(module)
    now = rss()
    print(module, now["VmRSS"] - previous["VmRSS"], now["RssAnon"] - previous["RssAnon"],
          now["RssFile"] - previous["RssFile"], flush=True)
    previous = now
"""


@dataclass
class Rss:
    """RSS in MiB, total and split into anonymous and file-backed pages."""

    total: float
    anon: float
    file: float


def rss_of(pid: int) -> Rss:
    fields: dict[str, float] = {}
    with Path(f"/proc/{pid}/status").open() as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / MIB
    return Rss(fields["VmRSS"], fields["RssAnon"], fields["RssFile"])


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(pid: int, seconds: float) -> Rss:
    """The median of RSS samples every 0.25 s over ``seconds``."""
    samples: list[Rss] = []
    deadline = time.monotonic() + seconds
    while True:
        samples.append(rss_of(pid))
        if time.monotonic() >= deadline:
            break
        time.sleep(SAMPLE_EVERY_S)
    return Rss(
        statistics.median(s.total for s in samples),
        statistics.median(s.anon for s in samples),
        statistics.median(s.file for s in samples),
    )


@dataclass
class Figures:
    idle: list[Rss] = field(default_factory=list)
    running: list[Rss] = field(default_factory=list)
    cpu_per_run_ms: list[float] = field(default_factory=list)


def read_line(stream: IO[str] | None, what: str) -> str:
    line = stream.readline() if stream is not None else ""
    if not line:
        raise RuntimeError(f"the bare process ended before {what}")
    return line


def bare_round(model: Path, args: argparse.Namespace, figures: Figures) -> None:
    run_s = args.settle + args.sample
    with subprocess.Popen(
        [sys.executable, "-c", BARE, str(model), str(args.rate), str(run_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as bare:
        try:
            read_line(bare.stdout, "it loaded the model")
            time.sleep(args.settle)
            figures.idle.append(sample(bare.pid, args.sample))
            assert bare.stdin is not None
            bare.stdin.write("run\n")
            bare.stdin.flush()
            time.sleep(args.settle)
            figures.running.append(sample(bare.pid, args.sample))
            _, runs, cpu = read_line(bare.stdout, "it ran").split()
            figures.cpu_per_run_ms.append(float(cpu) / int(runs) * 1e3)
        finally:
            bare.kill()


def node_args(fleet: Fleet, source: str, rate: float) -> list[str]:
    return [
        *program("edge-node"),
        "run",
        "--id",
        NODE,
        "--trust",
        str(fleet.trust_file),
        "--data",
        str(fleet.root / "node"),
        "--source",
        source,
        "--rate",
        str(rate),
        "--log-level",
        "warning",
    ]


def node_round(
    fleet: Fleet,
    source: str,
    args: argparse.Namespace,
    measure: Callable[[Proc], None],
) -> None:
    """Start the node with ``source``, wait until it serves the model, ``measure`` it, stop it."""
    proc = fleet.start(NODE, node_args(fleet, source, args.rate))
    try:
        fleet.wait_nodes([NODE], model=MODEL, timeout_s=120.0)
        measure(proc)
    finally:
        proc.terminate()
    fleet.wait_nodes([NODE], online=False, timeout_s=60.0)


def deploy(fleet: Fleet, model: Path, rate: float) -> None:
    """Register ``model`` and roll it out to the node once (it keeps it across restarts)."""
    name, _, version = MODEL.partition("@")
    fleet.fleetctl(
        "model", "add", str(model), "--name", name, "--version", version,
        "--keys", str(fleet.keys_dir),
    )  # fmt: skip
    proc = fleet.start(NODE, node_args(fleet, "none", rate))
    try:
        fleet.wait_nodes([NODE], timeout_s=120.0)
        fleet.fleetctl(
            "rollout", "start", MODEL, "--id", "mem", "--waves", "100", "--health-window", "0s",
        )  # fmt: skip
        done = fleet.wait_rollout("mem", timeout_s=180.0)
        if done["state"] != "succeeded":
            raise RuntimeError(f"the rollout ended {done['state']}: {fleet.diagnostics()}")
        fleet.wait_nodes([NODE], model=MODEL, timeout_s=60.0)
    finally:
        proc.terminate()
    fleet.wait_nodes([NODE], online=False, timeout_s=60.0)


def default_model() -> Path:
    spec = importlib.util.find_spec("onnx")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the onnx package is not installed: pass --model FILE")
    base = Path(next(iter(spec.submodule_search_locations)))
    return base / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def median_rss(values: Sequence[Rss]) -> Rss:
    return Rss(
        statistics.median(v.total for v in values),
        statistics.median(v.anon for v in values),
        statistics.median(v.file for v in values),
    )


def print_row(state: str, bare: Rss, node: Rss) -> None:
    print(
        f"{state:<8} {bare.total:8.1f} {node.total:8.1f} {node.total - bare.total:+9.1f} "
        f"{node.total / bare.total:7.2f}   anon {node.anon - bare.anon:+6.1f}, "
        f"file {node.file - bare.file:+6.1f}"
    )


def profile(model: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROFILE, str(model), *(module for _, module in LAYERS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    print(f"\n== what the node's imports add to a bare python holding the session ({lines[0]} MiB)")
    print(f"{'layer':<46} {'RSS':>7} {'anon':>7} {'file':>7}  MiB")
    total = 0.0
    for (label, _), line in zip(LAYERS, lines[1:], strict=True):
        _, rss, anon, file = line.split()
        total += float(rss)
        print(f"{label:<46} {float(rss):+7.1f} {float(anon):+7.1f} {float(file):+7.1f}")
    print(f"{'all of them':<46} {total:+7.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--rate", type=float, default=10.0, help="inferences per second (10)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before sampling (3)")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds of sampling (2)")
    parser.add_argument("--model", type=Path, help="an ONNX file with float32 inputs")
    args = parser.parse_args(argv)
    source = args.model or default_model()
    bare, node = Figures(), Figures()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        model = root / source.name
        shutil.copyfile(source, model)
        (root / "broker").mkdir()
        with (
            Broker(root / "broker") as broker,
            Fleet(root, broker_url=broker.url, fleet_id=FLEET) as fleet,
        ):
            fleet.init_keys()
            fleet.serve(f"sqlite:///{root / 'controller.db'}")
            deploy(fleet, model, args.rate)

            def idle(proc: Proc) -> None:
                time.sleep(args.settle)
                node.idle.append(sample(proc.pid, args.sample))

            def running(proc: Proc) -> None:
                time.sleep(args.settle)
                cpu0, wall0 = cpu_of(proc.pid), time.monotonic()
                node.running.append(sample(proc.pid, args.sample))
                cpu = cpu_of(proc.pid) - cpu0
                runs = args.rate * (time.monotonic() - wall0)
                node.cpu_per_run_ms.append(cpu / runs * 1e3)

            for _ in range(args.rounds):
                bare_round(model, args, bare)
                node_round(fleet, "none", args, idle)
                node_round(fleet, "synthetic", args, running)
    print(
        f"\nmodel {source.name}; {args.rounds} interleaved rounds; running = {args.rate:g} "
        f"inferences/s; RSS in MiB, medians"
    )
    print(f"{'state':<8} {'bare':>8} {'node':>8} {'node-bare':>9} {'ratio':>7}   of which")
    print_row("idle", median_rss(bare.idle), median_rss(node.idle))
    print_row("running", median_rss(bare.running), median_rss(node.running))
    print(
        f"CPU per inference while running: bare {statistics.median(bare.cpu_per_run_ms):.1f} ms, "
        f"node {statistics.median(node.cpu_per_run_ms):.1f} ms (the node's includes its "
        "source, results, MQTT and outbox)"
    )
    profile(source)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
