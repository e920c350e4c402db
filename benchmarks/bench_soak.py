"""Soak: simulated nodes, repeated rollouts and broker restarts for a long while (not CI).

Real processes: Mosquitto (``dev.conf``, one free loopback port kept across
restarts, no persistence: every restart loses sessions and retained
messages), ``fleetctl serve`` on SQLite, and ``edge-node simulate --count N``
(synthetic traffic). For ``--duration`` seconds it rolls the fleet forward to
a new release again and again (``fleetctl model add`` of ``clf@N.0.0``, then
``fleetctl rollout start``, one rollout at a time, every ``--rollout-every``
seconds once the last one ended; only a rollback may go back to an older
version) and restarts the
broker every ``--broker-every`` seconds. Every 30 s it prints the RSS of the
controller and the simulator. At the end it stops the nodes cleanly, lets
the controller drain, and prints the conservation check:

* every node's outbox is empty: every result it made was acknowledged, i.e.
  stored (the store's key, node and result number, stores each once);
* results stored, and every node on one verified model (the last rollout's);
* every rollout in a final state.

    .venv/bin/python benchmarks/bench_soak.py [--nodes 100] [--duration 3600]

Uses the project's test support (``tests/support/fleet.py``) to drive the
processes exactly as the end-to-end tests do: run it from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_config import config_path
from edge_node.outbox import read_depths
from fleet_controller.demo import build_classifier
from shared.errors import EdgeFleetError
from tests.support.fleet import ACTIVE_STATES, Fleet
from tests.support.stored import model_of

FLEET = "soak"


class Mosquitto:
    """One Mosquitto on a fixed port, restartable."""

    def __init__(self, workdir: Path, port: int) -> None:
        executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        lines = [
            f"listener {port} 127.0.0.1" if line.startswith("listener ") else line
            for line in config_path("dev.conf").read_text().splitlines()
        ]
        self.config = workdir / "mosquitto.conf"
        self.config.write_text("\n".join([*lines, "user root"]) + "\n")
        self.args = [executable, "-c", str(self.config)]
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # no readiness signal from mosquitto; nodes reconnect anyway

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


def free_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def soak_fleet(root: Path) -> Iterator[tuple[Fleet, Mosquitto]]:
    port = free_port()
    broker = Mosquitto(root, port)
    broker.start()
    fleet = Fleet(root, broker_url=f"mqtt://127.0.0.1:{port}", fleet_id=FLEET)
    try:
        yield fleet, broker
    finally:
        fleet.close()
        broker.stop()


def run(root: Path, args: argparse.Namespace) -> None:
    with soak_fleet(root) as (fleet, broker):
        fleet.init_keys()
        controller = fleet.serve(str(root / "fleet.db"), tick="0.5s")
        sim = fleet.simulate(args.nodes, rate_hz=args.rate)
        ids = [f"sim-{index:04d}" for index in range(1, args.nodes + 1)]
        fleet.wait_nodes(ids, timeout_s=120.0)
        started = time.monotonic()
        next_broker = started + args.broker_every
        next_rss = started
        rollouts: list[str] = []
        release = 1  # the next version to register and roll out: RELEASE.0.0
        current: str | None = None
        print(f"{args.nodes} nodes, {args.duration:.0f} s; RSS in MiB (controller, simulator)")
        while time.monotonic() - started < args.duration:
            now = time.monotonic()
            if now >= next_rss:
                print(
                    f"  t={now - started:6.0f} s  controller {rss_mib(controller.pid):6.1f}  "
                    f"simulator {rss_mib(sim.pid):6.1f}  rollouts {len(rollouts)}  "
                    f"broker restarts {broker.restarts}",
                    flush=True,
                )
                next_rss = now + 30
            if now >= next_broker:
                broker.restart()
                next_broker = now + args.broker_every
            if current is None or _ended(fleet, current):
                current = f"soak-{len(rollouts) + 1}"
                try:  # a new release each time: only a rollback may go back to an older one
                    _register(fleet, root, release)
                    fleet.fleetctl(
                        "rollout", "start", f"clf@{release}.0.0", "--id", current,
                        "--waves", "10,100", "--health-window", "1s",
                    )  # fmt: skip
                except (AssertionError, EdgeFleetError) as exc:  # the broker restarting, say
                    print(f"  rollout {current} not started: {str(exc).splitlines()[0]}")
                    current = None  # tried again at the next round
                else:
                    rollouts.append(current)
                    release += 1
            time.sleep(args.rollout_every)
        final = _settle(fleet, rollouts)
        sim.terminate(timeout_s=60.0)
        time.sleep(5.0)  # the controller stores what the nodes sent on their way out
        depths = [read_depths(root / "nodes" / node / "outbox.db")[0] for node in ids]
        report = fleet.call("report")
        nodes = fleet.nodes()
        models = {model_of(row) for row in nodes if row["node_id"] in ids}
        print(f"after {time.monotonic() - started:.0f} s:")
        print(f"  rollouts {len(rollouts)}: {final}")
        print(f"  broker restarts {broker.restarts}")
        print(f"  results stored {report['totals']['results']}; unacked in outboxes {sum(depths)}")
        print(f"  models on the nodes: {sorted(m or '-' for m in models)}")
        ok = sum(depths) == 0 and len(models) == 1 and None not in models
        ok = ok and all(state not in ACTIVE_STATES for state in final)
        print(f"  conservation: {'held' if ok else 'VIOLATED'}")


def _register(fleet: Fleet, root: Path, release: int) -> None:
    """``clf@RELEASE.0.0`` registered (a classifier of its own weights), unless it is."""
    path = root / f"clf-{release}.0.0.onnx"
    if path.exists():
        return  # registered on an earlier try whose rollout did not start
    build_classifier(path.with_suffix(".tmp"), seed=release)
    fleet.fleetctl(
        "model", "add", str(path.with_suffix(".tmp")), "--name", "clf",
        "--version", f"{release}.0.0", "--keys", str(fleet.keys_dir),
    )  # fmt: skip
    path.with_suffix(".tmp").rename(path)


def _ended(fleet: Fleet, rollout_id: str) -> bool:
    try:
        return fleet.rollout_status(rollout_id)["state"] not in ACTIVE_STATES
    except (AssertionError, EdgeFleetError):
        return False  # not started (the broker was restarting) or not reachable now


def _settle(fleet: Fleet, rollouts: list[str]) -> dict[str, int]:
    """Wait for the last rollout to end; count the rollouts' final states."""
    if rollouts:
        fleet.wait_rollout(rollouts[-1], timeout_s=300.0)
    states: dict[str, int] = {}
    for rollout_id in rollouts:
        state = fleet.rollout_status(rollout_id)["state"]
        states[state] = states.get(state, 0) + 1
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds")
    parser.add_argument("--broker-every", type=float, default=180.0, help="seconds")
    parser.add_argument("--rollout-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--rate", type=float, default=2.0, help="inferences/s per node")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args)


if __name__ == "__main__":
    main()
