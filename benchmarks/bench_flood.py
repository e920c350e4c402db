"""Flood: a real controller and a real node under 100k malformed messages.

Mosquitto (``broker_config/dev.conf`` on a free port: anonymous, so the flood
clients may write every topic; its 2 MiB ``message_size_limit`` is far above
the junk sent), a real ``fleetctl serve`` (SQLite) and a real ``edge-node run``
serving a small classifier (deployed the real way: ``fleetctl model add`` and a
rollout) at ``--rate`` inferences a second, its results flowing to the store.

Then two publisher processes (this script with ``--publish``, raw paho, QoS 0
by default, as fast as the broker takes it) send ``--messages`` malformed
messages between them: half on topics the controller reads (results, status,
telemetry, state and chunk requests of made-up nodes), half on the node's
topics (its command and ack topics, rollout commands, artifact chunks). The
payloads are short junk, invalid JSON, 4 KiB of brackets, random bytes and
envelope-shaped objects. ``ctl/request`` is not flooded: the broker's ACLs
leave it to operators, who are authenticated.

While it runs and for ``--after`` seconds after, an operator request
(``nodes.list`` over the operator API from this process, a fresh connection
each time, as ``fleetctl`` makes) goes out every 0.5 s and is timed; one
``fleetctl nodes --json`` process is timed in the middle of the flood. RSS of
the controller and the node (``/proc/PID/status``) is sampled every 0.2 s;
"before" is the median over 3 s before the flood, "after" the median over 3 s
once ``--after`` seconds have passed, "peak" the highest sample. Results
stored (``results`` rows in the SQLite file) are counted before, during and
after the flood.

Goals (issue 11): RSS growth under 50 MB for each process, every operator
request answered within 2 s, results stored during the flood. It also prints
the strict decoder's time for 1 MiB of brackets (``shared.codec``) and the
controller's inbox counters (its ``report``).

    .venv/bin/python benchmarks/bench_flood.py [--messages 100000] [--qos 0]

Runs in about a minute on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import topics  # noqa: E402
from shared.codec import decode_json  # noqa: E402
from shared.errors import DecodeError, EdgeFleetError  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.fleet import Fleet, Proc, program  # noqa: E402
from tests.support.models import make_classifier  # noqa: E402

FLEET = "bench"
NODE = "n1"
MODEL = "clf@1.0.0"
RSS_GOAL_MB = 50.0
ANSWER_GOAL_S = 2.0
SHA = "ab" * 32


# ----- the publishers (each in its own process) -------------------------------------


def junk_payloads() -> list[bytes]:
    return [
        b"x",
        b'{"a":1,"a":2}',
        b"[" * 4096,
        os.urandom(200),
        b'{"payloadType":"application/vnd.edgefleet.command+json","payload":"!","signatures":[]}',
        b'{"v":1,"type":"status","node":"zz"',
    ]


def junk_topics(side: str) -> list[str]:
    if side == "controller":
        made_up = [f"junk-{k}" for k in range(16)]
        return [
            *(topics.results(FLEET, n) for n in made_up),
            *(topics.status(FLEET, n) for n in made_up),
            *(topics.telemetry(FLEET, n) for n in made_up),
            *(topics.state(FLEET, n) for n in made_up),
            *(topics.artifact_request(FLEET, SHA, n) for n in made_up),
        ]
    return [
        topics.node_cmd(FLEET, NODE),
        topics.ack(FLEET, NODE),
        topics.rollout_cmd(FLEET, "junk"),
        topics.artifact_data(FLEET, SHA, NODE),
        f"{topics.PREFIX}/{FLEET}/artifact/{SHA}/data",
    ]


def publish(host: str, port: int, side: str, count: int, qos: int) -> None:
    """Print ``ready``, wait for ``go`` on stdin, publish, print the seconds it took."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{side}")
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(100)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    names, payloads = junk_topics(side), junk_payloads()
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    info = None
    for n in range(count):
        info = client.publish(names[n % len(names)], payloads[n % len(payloads)], qos=qos)
    if info is not None:
        info.wait_for_publish(timeout=600)
    print(f"{time.monotonic() - started:.3f}", flush=True)
    client.loop_stop()
    client.disconnect()


# ----- measuring ---------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def stored_results(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])


@dataclass
class Samples:
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name: (t, MB)
    answers: list[tuple[float, float | None]] = field(default_factory=list)  # (t, s or None)
    results: list[tuple[float, int]] = field(default_factory=list)


def sample_rss(procs: dict[str, Proc], samples: Samples, stop: threading.Event) -> None:
    while not stop.is_set():
        now = time.monotonic()
        for name, proc in procs.items():
            samples.rss.setdefault(name, []).append((now, rss_mb(proc.pid)))
        stop.wait(0.2)


def ask(fleet: Fleet, samples: Samples, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            fleet.call("nodes.list", {"select": ""}, timeout_s=30.0)
            samples.answers.append((started, time.monotonic() - started))
        except EdgeFleetError:
            samples.answers.append((started, None))
        stop.wait(max(0.0, 0.5 - (time.monotonic() - started)))


def count_results(db: Path, samples: Samples, stop: threading.Event) -> None:
    while not stop.is_set():
        samples.results.append((time.monotonic(), stored_results(db)))
        stop.wait(0.5)


def median_between(values: list[tuple[float, float]], start: float, end: float) -> float:
    return statistics.median(v for t, v in values if start <= t <= end)


def codec_brackets_s() -> float:
    payload = b"[" * 2**20
    times = []
    for _ in range(5):
        started = time.perf_counter()
        with contextlib.suppress(DecodeError):
            decode_json(payload)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def deploy(fleet: Fleet, model: Path) -> Proc:
    name, _, version = MODEL.partition("@")
    fleet.fleetctl(
        "model", "add", str(model), "--name", name, "--version", version,
        "--keys", str(fleet.keys_dir),
    )  # fmt: skip
    node = fleet.node(NODE, rate_hz=20.0)
    fleet.wait_nodes([NODE], timeout_s=120.0)
    fleet.fleetctl(
        "rollout", "start", MODEL, "--id", "r1", "--waves", "100", "--health-window", "0s",
    )  # fmt: skip
    done = fleet.wait_rollout("r1", timeout_s=180.0)
    if done["state"] != "succeeded":
        raise RuntimeError(f"the rollout ended {done['state']}: {fleet.diagnostics()}")
    fleet.wait_nodes([NODE], model=MODEL, timeout_s=60.0)
    return node


def start_publishers(broker: Broker, args: argparse.Namespace) -> list[subprocess.Popen[str]]:
    host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
    to_node = round(args.messages * args.node_share)
    halves = {"controller": args.messages - to_node, "node": to_node}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--publish", host, port, side, str(n), str(args.qos)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for side, n in halves.items()
        if n
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a publisher did not start")
    return procs


def run(args: argparse.Namespace) -> int:
    brackets_s = codec_brackets_s()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        root = Path(tmp)
        (root / "broker").mkdir()
        db = root / "controller.db"
        with (
            Broker(root / "broker") as broker,
            Fleet(root, broker_url=broker.url, fleet_id=FLEET) as fleet,
        ):
            fleet.init_keys()
            controller = fleet.serve(f"sqlite:///{db}")
            node = deploy(fleet, make_classifier(root / "clf.onnx"))
            procs = {"controller": controller, "node": node}
            samples, stop = Samples(), threading.Event()
            threads = [
                threading.Thread(target=target, args=(*extra, samples, stop), daemon=True)
                for target, extra in (
                    (sample_rss, (procs,)),
                    (ask, (fleet,)),
                    (count_results, (db,)),
                )
            ]
            for thread in threads:
                thread.start()
            time.sleep(3.0)  # the "before" window, sampled by the threads
            before_end = time.monotonic()
            publishers = start_publishers(broker, args)
            flood_start = time.monotonic()
            for proc in publishers:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            time.sleep(0.5)
            cli_started = time.monotonic()
            listing = subprocess.run(
                [*program("fleetctl"), "nodes", "--json"],
                env=fleet.env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            cli_s = time.monotonic() - cli_started
            publish_s = []
            for proc in publishers:
                out, _ = proc.communicate(timeout=600)
                publish_s.append(float(out.split()[-1]))
            flood_end = time.monotonic()
            time.sleep(args.after)
            after_start = time.monotonic()
            time.sleep(3.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            report = fleet.call("report")
            alive = {name: proc.running for name, proc in procs.items()}
    return show(
        args, samples, brackets_s=brackets_s, cli=(listing.returncode, cli_s),
        publish_s=max(publish_s), windows=(before_end, flood_start, flood_end, after_start),
        metrics=report.get("controller", {}), alive=alive,
    )  # fmt: skip


def show(
    args: argparse.Namespace,
    samples: Samples,
    *,
    brackets_s: float,
    cli: tuple[int, float],
    publish_s: float,
    windows: tuple[float, float, float, float],
    metrics: dict[str, int],
    alive: dict[str, bool],
) -> int:
    before_end, flood_start, flood_end, after_start = windows
    print(
        f"\n{args.messages:,} malformed messages (QoS {args.qos}), "
        f"{1 - args.node_share:.0%} to the controller, {args.node_share:.0%} to node {NODE}; "
        f"published in {publish_s:.1f} s "
        f"({args.messages / publish_s:,.0f} msg/s); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"strict decoder, 1 MiB of brackets: {brackets_s * 1e3:.1f} ms (refused)")
    print(f"\n{'process':<11} {'before':>8} {'peak':>8} {'after':>8} {'growth':>8}  goal < 50 MB")
    ok = True
    for name, values in samples.rss.items():
        before = median_between(values, before_end - 3.0, before_end)
        after = median_between(values, after_start, after_start + 3.5)
        peak = max(v for _, v in values)
        met = after - before < RSS_GOAL_MB and peak - before < RSS_GOAL_MB
        ok &= met and alive[name]
        print(
            f"{name:<11} {before:>7.1f}M {peak:>7.1f}M {after:>7.1f}M {after - before:>+7.1f}M"
            f"  {'met' if met else 'NOT met'} (peak {peak - before:+.1f}M)"
            f"{'' if alive[name] else '  EXITED'}"
        )
    during = [s for t, s in samples.answers if flood_start <= t <= flood_end]
    later = [s for t, s in samples.answers if flood_end < t < after_start]
    for label, answers in (("during the flood", during), ("after it", later)):
        done = [s for s in answers if s is not None]
        worst = max(done) if done else float("nan")
        met = len(done) == len(answers) > 0 and worst <= ANSWER_GOAL_S
        ok &= met
        print(
            f"operator requests {label}: {len(done)}/{len(answers)} answered, "
            f"median {statistics.median(done) if done else float('nan'):.3f} s, "
            f"worst {worst:.3f} s; goal every one within {ANSWER_GOAL_S:g} s: "
            f"{'met' if met else 'NOT met'}"
        )
    print(
        f"`fleetctl nodes --json` during the flood: exit {cli[0]}, {cli[1]:.2f} s "
        "(its process start included)"
    )
    counts = samples.results

    def stored_at(when: float) -> int:
        return max((n for t, n in counts if t <= when), default=0)

    flowing = stored_at(flood_end) - stored_at(flood_start)
    span = flood_end - flood_start
    rate_before = (stored_at(before_end) - stored_at(before_end - 3.0)) / 3.0
    ok &= flowing > 0
    print(
        f"results stored: {rate_before:.1f}/s before; {flowing} during the {span:.1f} s flood "
        f"({flowing / span:.1f}/s); {stored_at(after_start + 3.5) - stored_at(flood_end)} in the "
        f"{after_start + 3.5 - flood_end:.1f} s after; goal: they keep flowing: "
        f"{'met' if flowing > 0 else 'NOT met'}"
    )
    inbox = {k: v for k, v in sorted(metrics.items()) if k.startswith("inbox_") or k == "malformed"}
    print(f"controller counters: {inbox}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument(
        "--node-share", type=float, default=0.5, help="part sent to the node's topics (0.5)"
    )
    parser.add_argument("--after", type=float, default=10.0, help="seconds watched after (10)")
    parser.add_argument("--publish", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        host, port, side, count, qos = args.publish
        publish(host, int(port), side, int(count), int(qos))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
