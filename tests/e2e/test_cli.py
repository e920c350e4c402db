"""End to end: the real ``fleetctl`` and ``edge-node`` processes.

Every command runs as a subprocess (``python -m fleet_controller``,
``python -m edge_node``: the console scripts' entry points) with a clean
environment (no ``FLEET_*`` variables leak in from the developer's shell). A
node talks to a real Mosquitto; the controller's side of the wire is the
test's :class:`~tests.support.harness.Harness`, which only needs the broker URL
and the fleet. Output goes to files, so no pipe can fill up; every process is
killed in ``finally``. Waiting is on harness events or polling against a
deadline, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from shared.envelope import Envelope
from shared.messages import NodeState
from shared.trust import Role, TrustStore
from tests.support.broker import Broker
from tests.support.fleet import Fleet
from tests.support.harness import Harness

pytestmark = pytest.mark.e2e

EXIT_DEADLINE_S = 20.0  # a stopped process must be gone by then
COMMAND_TIMEOUT_S = 60.0  # a one-shot command (keys, status, usage errors)
EVENT_TIMEOUT_S = 45.0  # births, deploys, deaths (process start-up included)
PASSPHRASE = "correct horse battery staple"

_counter = itertools.count(1)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["COLUMNS"] = "200"  # rich tables: no wrapping of the rows the tests read
    env.update(extra)
    return env


class Cli:
    """One ``python -m MODULE ARGS...`` process with stdout and stderr in files."""

    def __init__(
        self, logs: Path, module: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.name = f"{module} {' '.join(args[:2])}"
        logs.mkdir(parents=True, exist_ok=True)
        index = next(_counter)
        self._out = logs / f"{index:03d}.stdout"
        self._err = logs / f"{index:03d}.stderr"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env if env is not None else _clean_env(),
            )

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def wait(self, timeout_s: float = COMMAND_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout_s}s; stderr:\n{self.stderr[-3000:]}"
            ) from None

    async def exited(self, timeout_s: float = EXIT_DEADLINE_S) -> int:
        return await asyncio.to_thread(self.wait, timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Cli:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def run(logs: Path, module: str, *args: str, env: dict[str, str] | None = None) -> Cli:
    """Run a one-shot command to completion."""
    with Cli(logs, module, *args, env=env) as cli:
        cli.wait()
    return cli


def run_all(logs: Path, *commands: tuple[str, ...]) -> list[Cli]:
    """Run several one-shot commands at once (start-up dominates; overlap it)."""
    with contextlib.ExitStack() as stack:
        clis = [stack.enter_context(Cli(logs, *command)) for command in commands]
        for cli in clis:
            cli.wait()
    return clis


def assert_ok(cli: Cli) -> None:
    assert cli.proc.returncode == 0, f"{cli.name} exited {cli.proc.returncode}: {cli.stderr}"
    assert "Traceback" not in cli.stderr


def assert_one_line_error(cli: Cli, code: int, *words: str) -> str:
    """Exit ``code`` with exactly one line on stderr naming ``words``, no traceback."""
    stderr = cli.stderr
    assert "Traceback" not in stderr, stderr
    assert cli.proc.returncode == code, f"{cli.name} exited {cli.proc.returncode}: {stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


async def wait_until(
    harness: Harness,
    predicate: Callable[[], object],
    *,
    what: str,
    procs: tuple[Cli, ...] = (),
    timeout_s: float = EVENT_TIMEOUT_S,
) -> None:
    """Wait for ``predicate`` on harness events; fail early if a process dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for cli in procs:
            if cli.proc.poll() is not None:
                raise AssertionError(
                    f"{cli.name} exited {cli.proc.returncode} while waiting for {what}:\n"
                    f"{cli.stderr[-3000:]}"
                )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        with contextlib.suppress(AssertionError):  # the harness's own timeout: poll again
            await harness.wait_for(
                lambda: bool(predicate()), timeout_s=min(0.5, remaining), what=what
            )


def states_of(harness: Harness, node: str, *, online: bool) -> list[NodeState]:
    return [s for s in harness.states if s.node == node and s.online is online]


def node_args(
    harness: Harness, node: str, data: Path, *extra: str, trust: Path | None = None
) -> tuple[str, ...]:
    """``edge-node run`` for ``node`` against the harness's broker, fleet and trust file."""
    return (
        *("edge_node", "run", "--id", node, "--data", str(data)),
        *("--trust", str(trust or harness.trust_file)),
        *("--broker", harness.broker_url, "--fleet", harness.fleet),
        *extra,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----- fleetctl keys ------------------------------------------------------------


def test_keys_init_force_passphrase_and_rotate(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    plain, locked = tmp_path / "plain", tmp_path / "locked"
    with_passphrase = _clean_env(FLEET_KEY_PASSPHRASE=PASSPHRASE)
    wrong_passphrase = _clean_env(FLEET_KEY_PASSPHRASE="not it")
    keys = ("root.pem", "release.pem", "rollout.pem")

    # Two independent directories, first steps overlapped to save start-up time.
    with (
        Cli(logs, "fleet_controller", "keys", "init", "--dir", str(plain)) as init,
        Cli(
            logs,
            "fleet_controller",
            *("keys", "init", "--dir", str(locked), "--json"),
            env=with_passphrase,
        ) as locked_init,
    ):
        init.wait()
        locked_init.wait()
    assert_ok(init)
    assert_ok(locked_init)
    for name in keys:
        assert _mode(plain / name) == 0o600, name
        assert "ENCRYPTED" not in (plain / name).read_text()
        assert _mode(locked / name) == 0o600, name
        assert "ENCRYPTED" in (locked / name).read_text(), name
    first = TrustStore.bootstrap((plain / "trust.json").read_bytes(), now=time.time())
    assert first.version == 1
    assert json.loads(locked_init.stdout)["trust_version"] == 1

    again = run(logs, "fleet_controller", "keys", "init", "--dir", str(plain))
    assert_one_line_error(again, 1, "--force")
    assert TrustStore.bootstrap((plain / "trust.json").read_bytes(), now=time.time()).trust == (
        first.trust
    ), "a refused init must leave the keys alone"

    forced = run(logs, "fleet_controller", "keys", "init", "--dir", str(plain), "--force", "--json")
    assert_ok(forced)
    report = json.loads(forced.stdout)
    assert report["trust_version"] == 1
    assert {row["role"] for row in report["roles"]} == {"root", "release", "rollout"}
    replaced = TrustStore.bootstrap((plain / "trust.json").read_bytes(), now=time.time())
    assert replaced.trust.roles[Role.ROOT].keyids != first.trust.roles[Role.ROOT].keyids
    assert [row["keyids"] for row in report["roles"] if row["role"] == "root"] == [
        list(replaced.trust.roles[Role.ROOT].keyids)
    ]

    # Rotation: a store holding v1 accepts the v2 trust.json the command writes.
    v1_bytes = (locked / "trust.json").read_bytes()
    rotated = run(
        logs,
        "fleet_controller",
        *("keys", "rotate", "--role", "rollout", "--dir", str(locked), "--json"),
        env=with_passphrase,
    )
    assert_ok(rotated)
    assert json.loads(rotated.stdout)["trust_version"] == 2
    v1 = TrustStore.bootstrap(v1_bytes, now=time.time())
    v2 = v1.rotate(Envelope.from_bytes((locked / "trust.json").read_bytes()), now=time.time())
    assert v2.version == 2
    assert v2.trust.roles[Role.ROLLOUT].keyids != v1.trust.roles[Role.ROLLOUT].keyids
    assert v2.trust.roles[Role.RELEASE].keyids == v1.trust.roles[Role.RELEASE].keyids
    assert v2.trust.roles[Role.ROOT].keyids == v1.trust.roles[Role.ROOT].keyids
    assert "ENCRYPTED" in (locked / "rollout.pem").read_text()
    assert _mode(locked / "rollout.pem") == 0o600

    v2_bytes = (locked / "trust.json").read_bytes()
    key_bytes = (locked / "rollout.pem").read_bytes()
    refused = run(
        logs,
        "fleet_controller",
        *("keys", "rotate", "--role", "rollout", "--dir", str(locked)),
        env=wrong_passphrase,
    )
    assert_one_line_error(refused, 1, "key")
    assert (locked / "trust.json").read_bytes() == v2_bytes, "a failed rotation changes nothing"
    assert (locked / "rollout.pem").read_bytes() == key_bytes


# ----- edge-node run: birth, deploy, SIGTERM, status ------------------------------


def test_run_deploy_sigterm_then_status(
    broker: Broker, fleet_id: str, tmp_path: Path, classifier_v1: Path
) -> None:
    logs, data = tmp_path / "logs", tmp_path / "n1"

    async def scenario() -> NodeState:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            model = harness.register(classifier_v1, "clf", "1.0.0")
            args = node_args(harness, "n1", data, "--label", "site=lab", "--batch-interval", "0.2")
            with Cli(logs, *args) as node:
                await wait_until(
                    harness,
                    lambda: states_of(harness, "n1", online=True),
                    what="the birth of n1",
                    procs=(node,),
                )
                birth = states_of(harness, "n1", online=True)[0]
                assert birth.labels == {"site": "lab"}
                assert birth.model is None
                assert birth.capabilities is not None

                command = await harness.deploy("n1", model)
                await wait_until(
                    harness,
                    lambda: "activated" in harness.states_of(command),
                    what=f"deploy to reach activated (seen {harness.states_of(command)})",
                    procs=(node,),
                )
                # The synthetic source now feeds the new model; its results arrive.
                await wait_until(
                    harness,
                    lambda: harness.results.get("n1"),
                    what="inference results from n1",
                    procs=(node,),
                )
                assert all(r.model == model.manifest.ref for r in harness.results["n1"].values())

                node.proc.send_signal(signal.SIGTERM)
                assert await node.exited() == 0, node.stderr
                await wait_until(
                    harness,
                    lambda: states_of(harness, "n1", online=False),
                    what="the death of n1",
                )
                assert "Traceback" not in node.stderr
            death = states_of(harness, "n1", online=False)[-1]
            assert death.session == birth.session
            assert death.model == model.manifest.ref
            return death

    death = asyncio.run(scenario())
    assert death.model is not None

    as_json, as_table = run_all(
        logs,
        ("edge_node", "status", "--data", str(data), "--json"),
        ("edge_node", "status", "--data", str(data)),
    )
    assert_ok(as_json)
    report = json.loads(as_json.stdout)
    assert report["active"]["name"] == "clf"
    assert report["active"]["version"] == "1.0.0"
    assert report["active"]["sha256"] == death.model.sha256
    assert report["previous"] is None
    assert report["last_command_seq"] == 1
    assert_ok(as_table)
    row = next(line for line in as_table.stdout.splitlines() if "active model" in line)
    assert f"clf 1.0.0 ({death.model.sha256[:12]})" in row
    assert "last command seq" in as_table.stdout


# ----- edge-node run --config, and failing closed without a trust file -------------


def test_config_file_and_missing_trust_file(broker: Broker, fleet_id: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:
            config = tmp_path / "node.toml"
            config.write_text(
                "# settings of one node\n"
                "[node]\n"
                'id = "cfg-1"\n'
                f"trust = {json.dumps(str(harness.trust_file))}\n"
                f"data = {json.dumps(str(tmp_path / 'cfg-1'))}\n"
                f"broker = {json.dumps(broker.url)}\n"
                f"fleet = {json.dumps(fleet_id)}\n"
                'source = "none"\n'
                "telemetry-interval = 5.0\n"  # flag spelling works in the file too
                'labels = { site = "lab", tier = "edge" }\n'
                'log_format = "json"\n'
            )
            no_trust = node_args(
                harness,
                "closed-1",
                tmp_path / "closed-1",
                *("--source", "none"),
                trust=tmp_path / "nowhere" / "trust.json",
            )
            with (
                Cli(logs, "edge_node", "run", "--config", str(config)) as configured,
                Cli(logs, *no_trust) as closed,
            ):
                # Fail closed: without a trust list the node does not start at all.
                assert await closed.exited() == 2
                assert_one_line_error(closed, 2, "trust", "nowhere", "--trust")
                await wait_until(
                    harness,
                    lambda: states_of(harness, "cfg-1", online=True),
                    what="the birth of cfg-1",
                    procs=(configured,),
                )
                birth = states_of(harness, "cfg-1", online=True)[0]
                assert birth.labels == {"site": "lab", "tier": "edge"}
                assert not [s for s in harness.states if s.node == "closed-1"]

                configured.proc.send_signal(signal.SIGTERM)
                assert await configured.exited() == 0, configured.stderr
                # log_format = "json": every line on stderr is one JSON object.
                entries = [json.loads(line) for line in configured.stderr.splitlines()]
                assert any(
                    e["logger"] == "edge_node.link" and e["message"].startswith("connected to")
                    for e in entries
                ), entries
                assert {e["level"] for e in entries} <= {"info", "warning"}
            assert not (tmp_path / "closed-1" / "state.json").exists()

    asyncio.run(scenario())


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    logs, data = tmp_path / "logs", tmp_path / "data"
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text(f'[node]\nid = "n1"\ndata = {json.dumps(str(data))}\ncolour = "red"\n')
    wrong_type = tmp_path / "wrong-type.toml"
    wrong_type.write_text(f'[node]\nid = "n1"\ndata = {json.dumps(str(data))}\nrate = [1]\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    base = ("edge_node", "run", "--data", str(data), "--broker", "mqtt://127.0.0.1:1")
    cases: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        "unknown key": (("edge_node", "run", "--config", str(unknown_key)), ("colour",)),
        "wrong type": (("edge_node", "run", "--config", str(wrong_type)), ("rate",)),
        "bad broker": (
            ("edge_node", "run", "--id", "n1", "--data", str(data), "--broker", "http://x:1"),
            ("broker",),
        ),
        "bad node id": ((*base, "--id", "a/b"), ("node id", "a/b")),
        "bad label": ((*base, "--id", "n1", "--label", "nolabel"), ("nolabel",)),
        "data is a file": (
            ("edge_node", "run", "--id", "n1", "--data", str(a_file)),
            ("not a directory",),
        ),
        "no status dir": (("edge_node", "status", "--data", str(tmp_path / "none")), ("none",)),
        "bad count": (
            ("edge_node", "simulate", "--count", "0", "--data", str(data), "--trust", "t.json"),
            ("count",),
        ),
        "simulate without trust": (
            ("edge_node", "simulate", "--count", "1", "--data", str(data)),
            ("--trust",),
        ),
    }
    clis = run_all(logs, *(command for command, _ in cases.values()))
    for (case, (_, words)), cli in zip(cases.items(), clis, strict=True):
        try:
            assert_one_line_error(cli, 2, *words)
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None
    assert not (data / "state.json").exists(), "a refused start touches nothing"


# ----- fleetctl serve: one store per fleet ----------------------------------------------


def test_serve_refuses_a_second_store_and_admits_a_replica(fleet: Fleet, tmp_path: Path) -> None:
    fleet.serve(f"sqlite:///{tmp_path}/a/fleet.db")
    env = _clean_env(
        FLEET_BROKER=fleet.broker_url, FLEET_FLEET=fleet.fleet_id, FLEET_KEYS=str(fleet.keys_dir)
    )
    refused = run(
        tmp_path / "cli-logs",
        *("fleet_controller", "serve", "--db", f"sqlite:///{tmp_path}/b/fleet.db"),
        env=env,
    )
    assert_one_line_error(refused, 2, "is live on this fleet with store", "--db")
    with Cli(
        tmp_path / "cli-logs",
        *("fleet_controller", "serve", "--db", f"sqlite:///{tmp_path}/a/fleet.db"),
        *("--log-format", "json"),
        env=env,
    ) as replica:

        def serving() -> list[dict[str, object]] | None:
            assert replica.proc.poll() is None, replica.stderr
            text = replica.stderr
            complete = text[: text.rfind("\n") + 1]  # not a line still being written
            entries = [json.loads(line) for line in complete.splitlines()]
            joined = any(str(e["message"]).startswith("controller ") for e in entries)
            return entries if joined else None

        entries = fleet.wait_until(serving, timeout_s=EVENT_TIMEOUT_S, what="the replica")
        assert {e["logger"] for e in entries} >= {"fleet_controller.link"}
        replica.proc.send_signal(signal.SIGTERM)
        assert replica.wait() == 0, replica.stderr


# ----- edge-node simulate ---------------------------------------------------------


def test_simulate_five_nodes_then_sigint(broker: Broker, fleet_id: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    expected = {f"sim-{index:04d}" for index in range(1, 6)}

    async def scenario() -> None:
        async with Harness(broker.url, fleet_id, tmp_path) as harness:

            def seen(*, online: bool) -> dict[str, NodeState]:
                return {s.node: s for s in harness.states if s.online is online}

            with Cli(
                logs,
                *("edge_node", "simulate", "--count", "5", "--data", str(tmp_path / "sim")),
                *("--trust", str(harness.trust_file), "--broker", broker.url),
                *("--fleet", fleet_id),
            ) as simulation:
                await wait_until(
                    harness,
                    lambda: set(seen(online=True)) == expected,
                    what=f"5 births (seen {sorted(seen(online=True))})",
                    procs=(simulation,),
                )
                births = seen(online=True)
                assert {b.labels["sim-group"] for b in births.values()} == {"a", "b"}

                simulation.proc.send_signal(signal.SIGINT)
                assert await simulation.exited() == 0, simulation.stderr
                await wait_until(
                    harness,
                    lambda: set(seen(online=False)) == expected,
                    what=f"5 deaths (seen {sorted(seen(online=False))})",
                )
                assert "Traceback" not in simulation.stderr
            deaths = seen(online=False)
            for node in expected:
                assert deaths[node].session == births[node].session, node
            for node in expected:
                assert (tmp_path / "sim" / node / "state.json").is_file()

    asyncio.run(scenario())
