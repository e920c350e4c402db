"""Infer-request round trips through `edge-node run`, each reply behind a durable result,
against a bare echo of the same requests.

Everything runs on this machine: Mosquitto (the tests' broker config on a free
port), a real ``fleetctl serve`` on SQLite, and the node as a real
``edge-node run --source mqtt`` process, deployed the real way (``fleetctl
model add`` and a one-wave rollout). A requester process (raw paho) keeps
``--window`` requests in flight against one node, a new one as each reply
arrives (closed loop), each request one [1, 8] float32 row of the tests'
classifier, published at QoS 1; replies come back at QoS 1.

The limit, measured in the same run: **a bare echo** in its own process, raw
paho on the same broker, the same request topic: it decodes each request
with ``json.loads``, runs ``session.run`` on the same model file (onnxruntime
defaults, one thread) and publishes the reply with ``json.dumps``: the same
work with no pipeline and no durability. Also **the bare echo that fsyncs**:
the same, and before each reply the result is appended to a file and
``os.fsync``'d, one fsync per reply (no group commit): what a naive durable
reply costs. The node instead releases a reply only after its outbox
committed (fsync'd) the result, many results per commit.

Rounds interleave node, bare, bare+fsync (``--rounds``, median of 3). Printed
per round and as medians: replies/s, CPU µs per reply of the answering
process (``/proc/PID/stat`` over the window; the node's or the echo's, not the
broker's nor the requester's), and the node ÷ limit ratios.

    .venv/bin/python benchmarks/bench_replies.py [--seconds S] [--rounds R] [--window W]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.broker import Broker  # noqa: E402 - needs ROOT on sys.path
from tests.support.fleet import Fleet, Proc  # noqa: E402
from tests.support.models import make_classifier  # noqa: E402

FLEET = "bench"
NODE = "reply-node"
# The bare echo answers on topics of its own: requests sent to the node's topic
# while it is stopped would wait in its persistent session for its next round.
BARE = "bare-echo"
MODEL = "classifier@1.0.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The requester: closed loop, WINDOW requests in flight, prints replies counted in the window.
REQUESTER = r"""
import json, sys, threading, time, uuid
import paho.mqtt.client as mqtt
host, port, fleet, node, window, warm, seconds = sys.argv[1:8]
port, window, warm, seconds = int(port), int(window), float(warm), float(seconds)
client_id = "bench-" + uuid.uuid4().hex[:6]
req_topic = f"fleet/v1/{fleet}/node/{node}/infer/request"
rep_topic = f"fleet/v1/{fleet}/node/{node}/infer/reply/{client_id}"
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                protocol=mqtt.MQTTv5)
count = [0]
number = [0]
errors = {}
ready = threading.Event()
def send():
    n = number[0]; number[0] += 1
    data = [n + i / 8 for i in range(8)]
    c.publish(req_topic, json.dumps({"v": 1, "type": "infer_request", "id": f"q{n}",
        "client": client_id, "inputs": [{"name": "input", "dtype": "float32",
        "shape": [1, 8], "data": data}]}), qos=1)
def on_message(c, u, m):
    reply = json.loads(m.payload)
    if reply.get("ok"):
        count[0] += 1
    else:
        errors[reply.get("error")] = errors.get(reply.get("error"), 0) + 1
    send()
def on_subscribe(c, u, mid, rc, p):
    ready.set()
c.on_message = on_message
c.on_subscribe = on_subscribe
c.connect(host, port)
c.subscribe(rep_topic, qos=1)
c.loop_start()
if not ready.wait(10):
    sys.exit("no SUBACK")
for _ in range(window):
    send()
time.sleep(warm)
start, first = time.monotonic(), count[0]
print("start", flush=True)
time.sleep(seconds)
print(json.dumps({"replies": count[0] - first, "seconds": time.monotonic() - start,
                  "errors": errors}))
c.loop_stop()
"""

#: The bare echo: json + session.run + json; with FSYNC, append and fsync before each reply.
ECHO = r"""
import json, os, sys
import numpy as np, onnxruntime as ort
import paho.mqtt.client as mqtt
host, port, fleet, node, model, sink = sys.argv[1:7]
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if sink != "-" else None
prefix = f"fleet/v1/{fleet}/node/{node}/infer/"
def on_message(c, u, m):
    request = json.loads(m.payload)
    tensor = request["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    probs = session.run(None, {tensor["name"]: x})[0]
    reply = json.dumps({"v": 1, "type": "infer_reply", "id": request["id"], "ok": True,
                        "result": {"probs": probs.ravel().tolist()}}).encode()
    if fd is not None:
        os.write(fd, reply + b"\n"); os.fsync(fd)
    c.publish(prefix + "reply/" + request["client"], reply, qos=1)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-echo", protocol=mqtt.MQTTv5)
c.on_message = on_message
c.connect(host, int(port))
c.subscribe(prefix + "request", qos=1)
print("ready", flush=True)
c.loop_forever()
"""


@dataclass(frozen=True)
class Figure:
    per_s: float  # replies per second
    cpu_us: float  # CPU µs of the answering process per reply


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def request_round(broker: Broker, node: str, pid: int, args: argparse.Namespace) -> Figure:
    """Run the requester against ``node``'s topics; replies/s and the answerer's (``pid``) CPU."""
    requester = subprocess.Popen(
        [sys.executable, "-c", REQUESTER, "127.0.0.1", str(broker.port), FLEET, node,
         str(args.window), str(args.warm_up), str(args.seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    # The CPU window: from the requester's "start" (after its warm-up) to its figure.
    assert requester.stdout is not None
    if requester.stdout.readline().strip() != "start":
        raise RuntimeError("the requester did not start")
    cpu_start = cpu_seconds(pid)
    out = requester.stdout.readline()
    cpu = cpu_seconds(pid) - cpu_start
    requester.wait(timeout=60)
    counted = json.loads(out.strip().splitlines()[-1])
    if counted["errors"]:
        raise RuntimeError(f"error replies: {counted['errors']}")
    replies = max(counted["replies"], 1)
    return Figure(replies / counted["seconds"], cpu / replies * 1e6)


def bare_round(broker: Broker, model: Path, sink: str, args: argparse.Namespace) -> Figure:
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO, "127.0.0.1", str(broker.port), FLEET, BARE, str(model), sink],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare echo did not start")
        return request_round(broker, BARE, echo.pid, args)
    finally:
        echo.kill()
        echo.wait()


def node_round(fleet: Fleet, broker: Broker, args: argparse.Namespace) -> Figure:
    node = start_node(fleet)
    try:
        return request_round(broker, NODE, node.pid, args)
    finally:
        node.terminate()
        fleet.wait_nodes([NODE], online=False, timeout_s=60.0)


def start_node(fleet: Fleet) -> Proc:
    node = fleet.node(NODE, source="mqtt")
    fleet.wait_nodes([NODE], model=MODEL, timeout_s=120.0)
    return node


def deploy(fleet: Fleet, model: Path) -> None:
    fleet.fleetctl(
        "model", "add", str(model), "--name", "classifier", "--version", "1.0.0",
        "--keys", str(fleet.keys_dir),
    )  # fmt: skip
    node = fleet.node(NODE, source="mqtt")
    try:
        fleet.wait_nodes([NODE], timeout_s=120.0)
        fleet.fleetctl(
            "rollout", "start", MODEL, "--id", "replies", "--waves", "100",
            "--health-window", "0s",
        )  # fmt: skip
        done = fleet.wait_rollout("replies", timeout_s=180.0)
        if done["state"] != "succeeded":
            raise RuntimeError(f"the rollout ended {done['state']}: {fleet.diagnostics()}")
        fleet.wait_nodes([NODE], model=MODEL, timeout_s=60.0)
    finally:
        node.terminate()
    fleet.wait_nodes([NODE], online=False, timeout_s=60.0)


def median(figures: Sequence[Figure]) -> Figure:
    return Figure(
        statistics.median(f.per_s for f in figures), statistics.median(f.cpu_us for f in figures)
    )


def show(name: str, figure: Figure) -> str:
    return f"{name:>12}: {figure.per_s:8.0f} replies/s, {figure.cpu_us:7.0f} µs CPU per reply"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window (5)")
    parser.add_argument("--warm-up", type=float, default=1.0, help="before the window (1)")
    parser.add_argument("--window", type=int, default=8, help="requests in flight (8)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-replies-") as tmp:
        root = Path(tmp)
        model = make_classifier(root / "classifier.onnx", seed=1)
        with (
            Broker(root / "broker") as broker,
            Fleet(root, broker_url=broker.url, fleet_id=FLEET) as fleet,
        ):
            fleet.init_keys()
            fleet.serve(f"sqlite:///{root / 'controller.db'}")
            deploy(fleet, model)
            rows: dict[str, list[Figure]] = {"node": [], "bare": [], "bare+fsync": []}
            for index in range(args.rounds):
                rows["node"].append(node_round(fleet, broker, args))
                rows["bare"].append(bare_round(broker, model, "-", args))
                rows["bare+fsync"].append(bare_round(broker, model, str(root / "sink"), args))
                print(f"round {index + 1}:")
                for name, figures in rows.items():
                    print("  " + show(name, figures[-1]))
                sys.stdout.flush()
            medians = {name: median(figures) for name, figures in rows.items()}
    print(f"medians of {args.rounds}, window {args.window}, load {os.getloadavg()[0]:.1f}:")
    for name, figure in medians.items():
        print("  " + show(name, figure))
    node = medians["node"]
    for limit in ("bare", "bare+fsync"):
        ratio = node.per_s / medians[limit].per_s
        print(f"  node ÷ {limit}: {ratio:.2f}x replies/s, CPU per reply {node.cpu_us:.0f} µs "
              f"vs {medians[limit].cpu_us:.0f} µs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
