"""Real EdgeFleet processes for end-to-end tests: controller, nodes, operator CLI.

A :class:`Fleet` belongs to one test. It holds one broker URL, one fleet id and
one working directory, and starts the programs exactly as an operator would
(each process on the fleet's broker URL, or on its own ``broker_url``: another
member of a clustered broker):

* ``fleetctl keys init`` (:meth:`Fleet.init_keys`), then ``fleetctl serve``
  with a database URL (:meth:`Fleet.serve`);
* ``edge-node simulate`` (many nodes in one process) and ``edge-node run``
  (one node) with the fleet's ``trust.json`` (:meth:`Fleet.simulate`,
  :meth:`Fleet.node`);
* ``fleetctl ... --json`` for every operator action, parsed
  (:meth:`Fleet.fleetctl`).

Every process writes stdout and stderr to its own log file in the working
directory; :meth:`Fleet.diagnostics` returns the tail of each, for assertion
messages. :meth:`Fleet.close` (also the context manager's exit) kills every
process still running: call it in ``finally``.

Waiting is polling against a deadline (:meth:`Fleet.wait_until`), asking the
controller over the operator API (an in-process :class:`CtlClient`, cheaper than
a ``fleetctl`` process per poll); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.keys import operator_key_path
from shared.broker import parse_broker_url
from shared.errors import EdgeFleetError
from tests.support.stored import model_of

__all__ = [
    "ACTIVE_STATES",
    "Fleet",
    "FleetError",
    "Proc",
    "program",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]

ACTIVE_STATES = frozenset({"pending", "running", "paused", "rolling_back"})
OPERATOR = "e2e-operator"
LOG_TAIL_LINES = 30
_POLL_S = 0.25
_STOP_TIMEOUT_S = 10.0
_CLI_TIMEOUT_S = 60.0


class FleetError(AssertionError):
    """A process failed or a condition was not reached in time; carries the logs' tails."""


def program(name: str) -> list[str]:
    """The command line of console script ``name`` (``fleetctl`` or ``edge-node``).

    The script installed beside this interpreter (the project's virtualenv),
    else ``python -m`` of its package, so the tests run the code under test.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {"fleetctl": "fleet_controller", "edge-node": "edge_node"}[name]
    return [sys.executable, "-m", module]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Proc:
    """One child process with its output in ``log``."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log, lines)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout_s: float = _STOP_TIMEOUT_S) -> int:
        """SIGTERM (a clean stop: death message, final flush), SIGKILL after ``timeout_s``."""
        if self.running:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL, as a crash or a power loss would."""
        if self.running:
            self.popen.kill()
        self.popen.wait()
        return self.popen.returncode


class Fleet:
    """One test's broker URL, fleet id, keys and processes. Close it in ``finally``."""

    def __init__(
        self, root: Path, *, broker_url: str, fleet_id: str, keys_dir: Path | None = None
    ) -> None:
        self.root = root
        self.broker_url = broker_url
        self.fleet_id = fleet_id
        self.keys_dir = keys_dir if keys_dir is not None else root / "keys"
        self.trust_file = self.keys_dir / "trust.json"
        self.logs_dir = root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self._counts: dict[str, int] = {}
        self.env = {
            **os.environ,
            "FLEET_BROKER": broker_url,
            "FLEET_FLEET": fleet_id,
            "FLEET_OPERATOR": OPERATOR,
            "FLEET_OPERATOR_KEY": str(operator_key_path(self.keys_dir, OPERATOR)),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
            # The packages of this checkout, before any installed copy: a
            # virtualenv installed editable from another checkout would
            # otherwise run that checkout's code in the child processes.
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        for name in ("FLEET_DB", "FLEET_KEYS", "FLEET_KEY_PASSPHRASE", "FLEET_CA_FILE"):
            self.env.pop(name, None)

    # ----- processes ---------------------------------------------------------------

    def start(self, name: str, args: Sequence[str], *, cwd: Path | None = None) -> Proc:
        """Start ``args`` with output to ``logs/NAME.log`` (``NAME-2.log`` on a restart)."""
        count = self._counts.get(name, 0) + 1
        self._counts[name] = count
        log = self.logs_dir / (f"{name}.log" if count == 1 else f"{name}-{count}.log")
        with log.open("ab") as handle:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.root,
                env=self.env,
            )
        proc = Proc(name=name, args=list(args), log=log, popen=popen)
        self.procs.append(proc)
        return proc

    def serve(
        self,
        db_url: str,
        *,
        name: str = "controller",
        tick: str = "0.5s",
        broker_url: str | None = None,
        extra: Sequence[str] = (),
    ) -> Proc:
        """``fleetctl serve`` on ``db_url`` (with ``extra`` flags); returns once the
        controller answers the operator API."""
        proc = self.start(
            name,
            [
                *program("fleetctl"),
                "serve",
                "--db",
                db_url,
                "--keys",
                str(self.keys_dir),
                "--tick",
                tick,
                "--log-level",
                "info",
                *_broker_flag(broker_url),
                *extra,
            ],
        )

        def answering() -> bool:
            if not proc.running:
                raise FleetError(f"fleetctl serve exited with {proc.popen.returncode}")
            try:
                self.call("model.list", timeout_s=2.0)
            except EdgeFleetError:
                return False
            return True

        self.wait_until(answering, timeout_s=30.0, what="the controller to answer")
        return proc

    def simulate(
        self,
        count: int,
        *,
        prefix: str = "sim",
        rate_hz: float = 5.0,
        labels: Mapping[str, str] | None = None,
        name: str = "simulate",
        source: str = "synthetic",
        broker_url: str | None = None,
        telemetry_interval_s: float | None = None,
    ) -> Proc:
        """``edge-node simulate``: nodes ``PREFIX-0001``... with synthetic traffic, each
        sending telemetry every ``telemetry_interval_s`` (None: the simulator's 10 s)."""
        args = [
            *program("edge-node"),
            "simulate",
            "--count",
            str(count),
            "--prefix",
            prefix,
            "--data",
            str(self.root / "nodes"),
            "--trust",
            str(self.trust_file),
            "--source",
            source,
            "--rate",
            str(rate_hz),
            "--log-level",
            "info",
            *_broker_flag(broker_url),
        ]
        if telemetry_interval_s is not None:
            args += ["--telemetry-interval", str(telemetry_interval_s)]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        return self.start(name, args)

    def node(
        self,
        node_id: str,
        *,
        rate_hz: float = 5.0,
        labels: Mapping[str, str] | None = None,
        telemetry_interval_s: float = 5.0,
        resend_after_s: float = 5.0,
        source: str = "synthetic",
        broker_url: str | None = None,
        data: Path | None = None,
    ) -> Proc:
        """``edge-node run`` for one node, its data in ``data`` (default ``nodes/NODE_ID``,
        kept across runs); ``source`` as ``--source`` takes it (``mqtt``: infer requests)."""
        args = [
            *program("edge-node"),
            "run",
            "--id",
            node_id,
            "--trust",
            str(self.trust_file),
            "--data",
            str(data if data is not None else self.root / "nodes" / node_id),
            "--source",
            source,
            "--rate",
            str(rate_hz),
            "--telemetry-interval",
            str(telemetry_interval_s),
            "--resend-after",
            str(resend_after_s),
            "--log-level",
            "info",
            *_broker_flag(broker_url),
        ]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        return self.start(node_id, args)

    def close(self) -> None:
        """Kill every process still running (nodes first, then controllers)."""
        errors: list[BaseException] = []
        for proc in sorted(self.procs, key=lambda p: p.name.startswith("controller")):
            try:
                proc.kill()
            except Exception as exc:  # kill the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----- operator ------------------------------------------------------------------

    def init_keys(self) -> dict[str, Any]:
        """``fleetctl keys init --dir keys --json``, then ``fleetctl operator add``
        :data:`OPERATOR` as an admin."""
        result = self.fleetctl("keys", "init", "--dir", str(self.keys_dir))
        assert isinstance(result, dict), result
        self.fleetctl("operator", "add", OPERATOR, "--role", "admin", "--dir", str(self.keys_dir))
        return result

    def fleetctl(self, *args: str, as_json: bool = True, expect_rc: int | None = 0) -> Any:
        """Run ``fleetctl ARGS [--json]``; the parsed JSON (or the completed process).

        Raises:
            FleetError: the exit code is not ``expect_rc`` (None: any), or the
                output is not one JSON document.
        """
        return self.fleetctl_many([args], as_json=as_json, expect_rc=expect_rc)[0]

    def fleetctl_many(
        self,
        commands: Sequence[Sequence[str]],
        *,
        as_json: bool = True,
        expect_rc: int | None = 0,
    ) -> list[Any]:
        """Run several ``fleetctl`` commands at once (say, two ``model add``); their results.

        Raises:
            FleetError: as :meth:`fleetctl`, for the first command that failed.
        """
        running = [
            (
                list(args),
                subprocess.Popen(
                    [*program("fleetctl"), *args, *(["--json"] if as_json else [])],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=self.env,
                    cwd=self.root,
                ),
            )
            for args in commands
        ]
        outputs: list[tuple[list[str], int, str, str]] = []
        try:
            for args, popen in running:
                stdout, stderr = popen.communicate(timeout=_CLI_TIMEOUT_S)
                outputs.append((args, popen.returncode, stdout, stderr))
        finally:
            for _, popen in running:
                if popen.poll() is None:
                    popen.kill()
                    popen.communicate()
        results: list[Any] = []
        for args, rc, stdout, stderr in outputs:
            shown = " ".join(args)
            if expect_rc is not None and rc != expect_rc:
                raise FleetError(
                    f"`fleetctl {shown}` exited {rc} (expected {expect_rc}):\n"
                    f"stdout: {stdout.strip()[-2000:]}\nstderr: {stderr.strip()[-2000:]}\n"
                    + self.diagnostics()
                )
            if not as_json:
                results.append(subprocess.CompletedProcess(args, rc, stdout, stderr))
                continue
            try:
                results.append(json.loads(stdout))
            except ValueError:
                raise FleetError(
                    f"`fleetctl {shown} --json` printed no JSON document:\n"
                    f"stdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
                ) from None
        return results

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0) -> Any:
        """One operator API call from this process (a fresh connection each time).

        Raises:
            EdgeFleetError: the broker or the controller failed or refused.
        """

        async def run() -> Any:
            address = parse_broker_url(self.broker_url)
            async with CtlClient(
                MqttTransport(address),
                fleet=self.fleet_id,
                identity=OperatorIdentity.load(self.keys_dir, OPERATOR),
                timeout_s=timeout_s,
            ) as ctl:
                return await ctl.call(op, args)

        return asyncio.run(run())

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        status = self.call("rollout.status", {"rollout_id": rollout_id})
        assert isinstance(status, dict)
        return status

    def nodes(self) -> list[dict[str, Any]]:
        rows = self.call("nodes.list", {"select": ""})
        assert isinstance(rows, list)
        return rows

    # ----- waiting ---------------------------------------------------------------------

    def wait_until(
        self,
        probe: Callable[[], T | None],
        *,
        timeout_s: float,
        what: str,
        describe: Callable[[], str] | None = None,
    ) -> T:
        """:func:`poll_until`, adding the processes' log tails to a timeout."""
        return poll_until(
            probe, timeout_s=timeout_s, what=what, describe=describe, logs=self.diagnostics
        )

    def wait_nodes(
        self,
        node_ids: Iterable[str],
        *,
        timeout_s: float = 60.0,
        online: bool = True,
        model: str | None = None,
        what: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Wait until the controller lists each of ``node_ids`` with ``online`` and
        (when given) running ``model`` (``NAME@VERSION``); their rows by id."""
        wanted = set(node_ids)
        last: dict[str, dict[str, Any]] = {}

        def ready() -> dict[str, dict[str, Any]] | None:
            nonlocal last
            last = {n["node_id"]: n for n in self.nodes()}
            for node_id in wanted:
                row = last.get(node_id)
                if row is None or row["online"] is not online:
                    return None
                if model is not None and model_of(row) != model:
                    return None
            return {k: v for k, v in last.items() if k in wanted}

        def describe() -> str:
            missing = sorted(wanted - set(last))
            rows = [
                f"{k}: online={v['online']} model={model_of(v)}"
                for k, v in sorted(last.items())
                if k in wanted
            ]
            return f"missing: {missing}\n" + "\n".join(rows)

        label = what or f"{len(wanted)} nodes online={online} model={model}"
        return self.wait_until(ready, timeout_s=timeout_s, what=label, describe=describe)

    def wait_rollout(
        self,
        rollout_id: str,
        *,
        timeout_s: float = 90.0,
        until: Callable[[dict[str, Any]], bool] | None = None,
        what: str | None = None,
    ) -> dict[str, Any]:
        """Poll ``rollout.status`` until ``until(status)`` (default: the rollout ended)."""
        last: dict[str, Any] = {}
        condition = until or (lambda s: s["state"] not in ACTIVE_STATES)

        def probe() -> dict[str, Any] | None:
            nonlocal last
            last = self.rollout_status(rollout_id)
            return last if condition(last) else None

        return self.wait_until(
            probe,
            timeout_s=timeout_s,
            what=what or f"rollout {rollout_id} to end",
            describe=lambda: "last status: " + json.dumps(last, indent=1)[-4000:],
        )

    # ----- diagnostics -----------------------------------------------------------------

    def diagnostics(self, lines: int = LOG_TAIL_LINES) -> str:
        """The tail of every process's log, for assertion messages."""
        parts = []
        for proc in self.procs:
            state = "running" if proc.running else f"exited {proc.popen.returncode}"
            parts.append(f"----- {proc.log.name} ({state}) -----\n{proc.tail(lines)}")
        return "\n".join(parts)


def poll_until(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    describe: Callable[[], str] | None = None,
    logs: Callable[[], str] = str,
) -> T:
    """Poll ``probe`` until it returns something truthy; that value.

    A probe that raises :class:`EdgeFleetError` (say, the controller is
    restarting) counts as "not yet".

    Raises:
        FleetError: the deadline passed; with ``describe()`` and ``logs()``.
    """
    deadline = time.monotonic() + timeout_s
    last_error: str | None = None
    while True:
        value: T | None = None
        try:
            value = probe()
        except EdgeFleetError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe() if describe is not None else ""
            raise FleetError(
                f"timed out after {timeout_s:g}s waiting for {what}"
                + (f"\nlast error: {last_error}" if last_error else "")
                + (f"\n{detail}" if detail else "")
                + "\n"
                + logs()
            )
        time.sleep(_POLL_S)  # polling against the deadline, not synchronisation


def _broker_flag(broker_url: str | None) -> list[str]:
    """``--broker URL`` for a process on its own broker (None: the fleet's)."""
    return [] if broker_url is None else ["--broker", broker_url]
