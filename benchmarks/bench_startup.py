"""Start-up of the command lines: ``fleetctl nodes --json`` against ``python -c pass``.

An operator's script runs ``fleetctl ... --json`` many times; each run pays
the interpreter's start, the imports and one request to the controller. This
starts Mosquitto (``broker_config/dev.conf`` on a free port on 127.0.0.1),
``fleetctl keys init``, ``fleetctl serve`` (SQLite in a temp dir) and
``edge-node simulate --count N --source none`` (N nodes online, so the answer
holds N rows), then times, in interleaved rounds (each round runs every command
once, in turn):

* ``python -c pass`` with the same interpreter: **the limit** (a bare start);
* ``fleetctl nodes --json``: connects, signs the request with the operator's
  Ed25519 key (loaded from its PEM file), waits for the controller's answer and
  decodes it strictly; the output must be one JSON list of the N nodes;
* ``fleetctl --help`` and ``edge-node --help``;
* what loading the operator's PEM key costs: a fresh interpreter that imports
  Ed25519 and loads the PEM file with ``load_pem_private_key``, against one that
  imports Ed25519 alone.

It prints the median over the rounds of the wall time and the CPU time
(user + system of the child) of each, and each one's ratio to ``python -c
pass``, with the load average (a shared 2-core machine is noisy).

    .venv/bin/python benchmarks/bench_startup.py [--rounds 5] [--nodes 20]

Runs in about 30 s with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.broker import Broker  # noqa: E402 - needs ROOT on sys.path
from tests.support.fleet import OPERATOR, Fleet, program  # noqa: E402

FLEET = "bench"
COMMAND_TIMEOUT_S = 120.0

_ED25519 = "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey"
_PEM = (
    f"{_ED25519}\n"
    "from cryptography.hazmat.primitives.serialization import load_pem_private_key\n"
    "import sys\n"
    "load_pem_private_key(open(sys.argv[1], 'rb').read(), password=None)"
)


@dataclass(frozen=True)
class Case:
    """One command line to time; ``check`` validates its stdout."""

    name: str
    argv: list[str]
    expect_rows: int | None = None  # the output must be a JSON list of this many rows


@dataclass
class Samples:
    wall: list[float]
    cpu: list[float]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(case: Case, env: dict[str, str]) -> tuple[float, float]:
    """Run ``case`` once: (wall seconds, CPU seconds). Raises RuntimeError if it failed."""
    cpu0 = children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        case.argv,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        env=env,
    )
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{case.name} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    if case.expect_rows is not None:
        rows = json.loads(done.stdout)
        if not isinstance(rows, list) or len(rows) != case.expect_rows:
            raise RuntimeError(f"{case.name} printed {done.stdout[:200]!r}")
    return wall, cpu


def measure(cases: Sequence[Case], env: dict[str, str], rounds: int) -> dict[str, Samples]:
    """``rounds`` interleaved rounds, after one untimed warm-up round (disk cache)."""
    samples = {case.name: Samples([], []) for case in cases}
    for index in range(rounds + 1):
        for case in cases:
            wall, cpu = time_once(case, env)
            if index > 0:
                samples[case.name].wall.append(wall)
                samples[case.name].cpu.append(cpu)
    return samples


def report(samples: dict[str, Samples], limit: str) -> None:
    base_wall = statistics.median(samples[limit].wall)
    base_cpu = statistics.median(samples[limit].cpu)
    print(f"\n{'command':<34} {'wall, ms':>9} {'x limit':>8} {'CPU, ms':>9} {'x limit':>8}")
    for name, s in samples.items():
        wall, cpu = statistics.median(s.wall), statistics.median(s.cpu)
        print(
            f"{name:<34} {wall * 1e3:9.0f} {wall / base_wall:8.1f} "
            f"{cpu * 1e3:9.0f} {cpu / base_cpu:8.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--nodes", type=int, default=20, help="simulated nodes listed (20)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        (root / "broker").mkdir()
        with (
            Broker(root / "broker") as broker,
            Fleet(root, broker_url=broker.url, fleet_id=FLEET) as fleet,
        ):
            fleet.init_keys()
            fleet.serve(f"sqlite:///{root / 'controller.db'}")
            ids = [f"sim-{i:04d}" for i in range(1, args.nodes + 1)]
            fleet.start(
                "simulate",
                [
                    *program("edge-node"),
                    "simulate",
                    f"--count={args.nodes}",
                    "--data",
                    str(root / "nodes"),
                    "--trust",
                    str(fleet.trust_file),
                    "--source",
                    "none",
                ],
            )
            fleet.wait_nodes(ids, timeout_s=120.0)
            key = fleet.env["FLEET_OPERATOR_KEY"]
            python = sys.executable
            cases = [
                Case("python -c pass (the limit)", [python, "-c", "pass"]),
                Case(
                    "fleetctl nodes --json",
                    [*program("fleetctl"), "nodes", "--json"],
                    expect_rows=args.nodes,
                ),
                Case("fleetctl --help", [*program("fleetctl"), "--help"]),
                Case("edge-node --help", [*program("edge-node"), "--help"]),
                Case("python: import Ed25519", [python, "-c", _ED25519]),
                Case("python: + load the PEM key", [python, "-c", _PEM, key]),
            ]
            print(
                f"{args.nodes} simulated nodes online; operator {OPERATOR}; "
                f"{args.rounds} interleaved rounds after a warm-up round"
            )
            samples = measure(cases, fleet.env, args.rounds)
    report(samples, cases[0].name)
    pem = statistics.median(samples[cases[5].name].wall) - statistics.median(
        samples[cases[4].name].wall
    )
    print(f"\nloading the operator's PEM key (import + load_pem_private_key): {pem * 1e3:.0f} ms")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
