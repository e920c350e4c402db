"""The demo as proof: run ``fleetctl demo`` N times on a loaded machine, count the good endings.

The demo's story has a designed ending: the first rollout and the staged
upgrade to 1.1.0 succeed, and the slow 2.0.0 release halts and rolls back.
``fleetctl demo`` checks that itself and exits 1 when a rollout ended
otherwise (a good release rolled back by a noisy health gate, or a bad one let
through). This script runs it ``--runs`` times in a row while ``--hogs``
processes keep every core busy (default: one hog per core), and prints each
run's exit code, wall and CPU time and last line, then how many runs ended as designed.
``--hogs 0`` runs it on an idle machine for comparison.

    .venv/bin/python benchmarks/bench_demo.py [--runs 10] [--hogs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.load import cpu_hogs  # noqa: E402 - needs ROOT on sys.path

DEMO_TIMEOUT_S = 600.0


def fleetctl() -> list[str]:
    beside = Path(sys.executable).with_name("fleetctl")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "fleet_controller"]


def run_once(index: int) -> tuple[int, float, float, str]:
    """One demo: (exit code, wall seconds, CPU seconds, its last non-empty output line)."""
    started = time.perf_counter()
    cpu_before = _children_cpu()
    try:
        done = subprocess.run(
            [*fleetctl(), "demo"],
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
            check=False,
            env={**os.environ, "COLUMNS": "120"},
        )
    except subprocess.TimeoutExpired:
        seconds = time.perf_counter() - started
        return -1, seconds, 0.0, f"run {index}: no end after {DEMO_TIMEOUT_S:g} s"
    seconds = time.perf_counter() - started
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    cpu = _children_cpu() - cpu_before
    return done.returncode, seconds, cpu, lines[-1].strip() if lines else ""


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (the demo runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy processes")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.hogs} CPU hogs, {args.runs} demo runs")
    results = []
    with cpu_hogs(args.hogs):
        for index in range(1, args.runs + 1):
            code, seconds, cpu, last = run_once(index)
            results.append(code)
            load1, _, _ = os.getloadavg()
            print(
                f"  run {index:2d}: exit {code}, {seconds:5.1f} s wall, {cpu:5.1f} s CPU, "
                f"load {load1:4.1f}: {last[:90]}"
            )
    designed = sum(1 for code in results if code == 0)
    print(f"{designed} of {args.runs} runs ended as designed with {args.hogs} CPU hogs")


if __name__ == "__main__":
    main()
