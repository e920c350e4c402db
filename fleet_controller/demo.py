"""``fleetctl demo``: a whole fleet on one machine, end to end, in about a minute.

It starts Mosquitto (the project's development config, on a free port) unless
``--broker`` names one, creates keys, runs the controller and a dozen
simulated nodes in this process, builds three small ONNX models, and then shows
what EdgeFleet is for: a first rollout, a staged upgrade in three waves, and a
bad release (much slower than its predecessor) that halts at its first wave and
rolls back by itself. It ends with the fleet, the rollouts and the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from broker_config import config_path
from edge_node.agent import AgentConfig, NodeAgent
from edge_node.sessions import SessionOptionsConfig
from edgefleet_io.mqtt import MqttTransport
from fleet_controller.api import CtlClient, OperatorIdentity
from fleet_controller.keys import init_keys, load_key
from fleet_controller.publish import prepare_manifest, publish, sign_release
from fleet_controller.service import ControllerConfig, ControllerService
from shared.broker import BrokerAddress, parse_broker_url
from shared.errors import EdgeFleetError
from shared.trust import Role

__all__ = ["DemoError", "build_classifier", "local_mosquitto", "run_demo", "running"]

FLEET = "demo"
LABELS = ("cat", "dog", "bird", "fish")
N_IN = 16
_WIDE = 1024  # width of the slow model's hidden layers
SLOW_LAYERS = 40  # the bad release's extra 1024x1024 products


class DemoError(EdgeFleetError):
    """The demo could not set itself up (no Mosquitto, no free port, ...)."""


# ----- models --------------------------------------------------------------------


def build_classifier(path: Path, *, seed: int, slow_layers: int = 0) -> Path:
    """A float32 ``input`` [N, 16] -> ``probs`` [N, 4] classifier.

    ``slow_layers`` prepends that many 1024x1024 matrix products (same outputs'
    shape, much more work): the "bad release" of the demo.
    """
    import onnx  # noqa: PLC0415 - only the demo builds models
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415 - onnx only to build demo models

    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current = "input"
    width = N_IN
    if slow_layers:
        expand = rng.standard_normal((N_IN, _WIDE)).astype(np.float32) / 8
        square = rng.standard_normal((_WIDE, _WIDE)).astype(np.float32) / 32
        shrink = rng.standard_normal((_WIDE, N_IN)).astype(np.float32) / 32
        initializers += [
            numpy_helper.from_array(expand, "expand"),
            numpy_helper.from_array(square, "square"),
            numpy_helper.from_array(shrink, "shrink"),
        ]
        nodes.append(helper.make_node("MatMul", [current, "expand"], ["h0"]))
        current = "h0"
        for layer in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [current, "square"], [f"h{layer + 1}"]))
            current = f"h{layer + 1}"
        nodes.append(helper.make_node("MatMul", [current, "shrink"], ["back"]))
        current = "back"
    weights = rng.standard_normal((width, len(LABELS))).astype(np.float32)
    bias = rng.standard_normal(len(LABELS)).astype(np.float32)
    initializers += [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    nodes += [
        helper.make_node("MatMul", [current, "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", N_IN])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# ----- infrastructure ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_mosquitto(workdir: Path, extra_lines: Sequence[str] = ()) -> Iterator[BrokerAddress]:
    """Mosquitto with the project's ``dev.conf`` (plus ``extra_lines``) on a free
    loopback port, its files in ``workdir``; stopped on exit.

    Raises:
        DemoError: mosquitto is missing or does not start.
    """
    executable = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if executable is None:
        raise DemoError("mosquitto is not installed (apt-get install mosquitto) or pass --broker")
    port = _free_port()
    lines = [
        f"listener {port} 127.0.0.1" if line.startswith("listener ") else line
        for line in config_path("dev.conf").read_text().splitlines()
    ]
    lines += [*extra_lines, *(["user root"] if _is_root() else [])]
    config = workdir / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    log = (workdir / "mosquitto.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - our own binary and config
        [executable, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"mosquitto did not start (see {workdir / 'mosquitto.log'})")
            time.sleep(0.05)
        yield BrokerAddress(host="127.0.0.1", port=port, tls=False)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process.poll() is None:
            process.kill()
        log.close()


def _is_root() -> bool:
    import os  # noqa: PLC0415 - only when starting a local broker

    return os.geteuid() == 0


@contextlib.asynccontextmanager
async def running(coro_owner: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(coro_owner.run())
    try:
        yield task
    finally:
        coro_owner.stop()
        # A part that has not stopped within 30 s (a very busy machine) is
        # cancelled by wait_for: the story's outcome stands either way.
        with contextlib.suppress(asyncio.CancelledError, EdgeFleetError, TimeoutError):
            await asyncio.wait_for(task, 30)


# ----- the story -------------------------------------------------------------------------


async def _wait_rollout(ctl: CtlClient, rollout_id: str, console: Console) -> dict[str, Any]:
    last = ""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = await ctl.call("rollout.status", {"rollout_id": rollout_id})
        counts = ", ".join(f"{k} {v}" for k, v in sorted(status["counts"].items()))
        line = f"  {status['state']:<12} wave {status['wave']}/{len(status['waves'])}  {counts}"
        if line != last:
            console.print(line)
            last = line
        if status["state"] not in ("pending", "running", "paused", "rolling_back"):
            return dict(status)
        await asyncio.sleep(0.5)
    raise DemoError(f"rollout {rollout_id} did not finish in time")


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(title="fleet")
    for column in ("node", "online", "site", "model"):
        table.add_column(column)
    for node in nodes:
        model = node.get("model")
        table.add_row(
            node["node_id"],
            "yes" if node["online"] else "no",
            node["labels"].get("site", ""),
            f"{model['name']} {model['version']}" if model else "-",
        )
    return table


async def _story(
    ctl: CtlClient, workdir: Path, keys: Path, console: Console, node_count: int
) -> None:
    release_key = load_key(keys, Role.RELEASE, None)
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    releases = {}
    # 2.0.0's extra work must stay well beyond the gate's 1 ms floor of a latency
    # regression on an idle machine too: 40 layers are some 3 ms more per run here.
    for version, seed, slow in (("1.0.0", 1, 0), ("1.1.0", 2, 0), ("2.0.0", 3, SLOW_LAYERS)):
        path = build_classifier(models / f"classifier-{version}.onnx", seed=seed, slow_layers=slow)
        manifest = await prepare_manifest(
            path,
            name="classifier",
            version=version,
            now=time.time(),
            labels=LABELS,
            operator="demo",
        )
        row = await publish(ctl, sign_release(path, manifest, release_key))
        releases[version] = row
        console.print(
            f"registered classifier {version} ({row['sha256'][:12]}, {row['size']} bytes)"
        )

    async def wait_nodes() -> list[dict[str, Any]]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes: list[dict[str, Any]] = await ctl.call("nodes.list")
            if sum(1 for n in nodes if n["online"]) >= node_count:
                return nodes
            await asyncio.sleep(0.3)
        raise DemoError("the simulated nodes did not all come online")

    console.print(_nodes_table(await wait_nodes()))
    plan = (
        ("first rollout of 1.0.0 to every node", "classifier@1.0.0", [50, 100], "succeeded"),
        ("staged upgrade to 1.1.0 in three waves", "classifier@1.1.0", [20, 60, 100], "succeeded"),
        (
            "a bad release, 2.0.0: much slower per inference",
            "classifier@2.0.0",
            [20, 60, 100],
            "rolled_back",
        ),
    )
    outcomes: list[tuple[str, str, str]] = []
    for title, model, waves, expected in plan:
        console.rule(title)
        started = await ctl.call(
            "rollout.start",
            {
                "model": model,
                "waves": waves,
                # Four telemetry periods of 1 s, some 40 runs a node (10 Hz): the
                # gate compares each wave with the nodes still on the old model.
                "health_window_s": 4.0,
                "wave_timeout_s": 60.0,
                "min_samples": 30,
                "breach_evaluations": 2,
                "max_failures": 0.1,
            },
        )
        final = await _wait_rollout(ctl, started["rollout_id"], console)
        outcomes.append((model, expected, final["state"]))
        if final.get("reason"):
            console.print(f"  -> {final['state']}: {final['reason']}")
        detail = await ctl.call("rollout.status", {"rollout_id": started["rollout_id"]})
        for node in detail["nodes"]:  # every node's outcome, and the gate's reason
            outcome = node["state"] + (f" ({node['code']})" if node["code"] else "")
            console.print(f"     {node['node']}: {outcome}: {node['reason'] or ''}")
    console.rule("where the fleet ended")
    console.print(_nodes_table(await ctl.call("nodes.list")))
    audit = Table(title="audit log")
    for column in ("when", "operator", "action", "outcome"):
        audit.add_column(column)
    for entry in reversed(await ctl.call("audit.list", {"limit": 20})):
        when = time.strftime("%H:%M:%S", time.localtime(entry["ts"]))
        audit.add_row(when, entry["operator"], entry["action"], entry["outcome"])
    console.print(audit)
    _check_outcomes(outcomes, console)


def _check_outcomes(outcomes: Sequence[tuple[str, str, str]], console: Console) -> None:
    """Say whether every rollout ended as the story intends.

    Raises:
        DemoError: one did not (the demo then exits 1, which the demo benchmark counts).
    """
    wrong = [
        f"{model} {got} (expected {expected})"
        for model, expected, got in outcomes
        if got != expected
    ]
    if wrong:
        raise DemoError(f"the demo did not end as designed: {'; '.join(wrong)}")
    console.print(
        "the demo ended as designed: the good upgrade succeeded, the bad release rolled back"
    )


async def run_demo(
    *, nodes: int = 12, broker_url: str | None = None, keep: Path | None = None
) -> None:
    """Run the demo. Raises: DemoError (and EdgeFleetError) with a one-line reason."""
    console = Console()
    with contextlib.ExitStack() as stack:
        workdir = keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-demo-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        address = (
            parse_broker_url(broker_url)
            if broker_url
            else stack.enter_context(local_mosquitto(workdir))
        )
        console.print(f"EdgeFleet demo in {workdir}, broker {address}")
        keys = workdir / "keys"
        init_keys(keys, now=time.time(), force=True)
        controller = ControllerService(
            ControllerConfig(
                broker=address,
                db_url=str(workdir / "controller" / "fleet.db"),
                keys_dir=keys,
                fleet=FLEET,
                tick_s=0.5,
            )
        )
        agents = [
            NodeAgent(
                AgentConfig(
                    node_id=f"cam-{index:02d}",
                    data_dir=workdir / "nodes" / f"cam-{index:02d}",
                    trust_file=keys / "trust.json",
                    broker=address,
                    fleet=FLEET,
                    labels={"site": "berlin" if index % 2 else "lyon"},
                    source="synthetic",
                    rate_hz=10.0,
                    telemetry_interval_s=1.0,
                    batch_interval_s=0.5,
                    # Twelve devices share this machine: one onnxruntime thread each.
                    session_options=SessionOptionsConfig(intra_op_threads=1),
                )
            )
            for index in range(1, nodes + 1)
        ]
        async with contextlib.AsyncExitStack() as services:
            await services.enter_async_context(running(controller))
            for agent in agents:
                await services.enter_async_context(running(agent))
            try:
                async with asyncio.timeout(60):
                    await controller.connected.wait()
            except TimeoutError:
                raise DemoError("the controller did not reach the broker within 60 s") from None
            # The controller shares this process with twelve nodes: on a busy
            # machine an answer can take longer than an operator's usual 10 s.
            async with CtlClient(
                MqttTransport(address),
                fleet=FLEET,
                identity=OperatorIdentity.load(keys),
                timeout_s=30.0,
            ) as ctl:
                await _story(ctl, workdir, keys, console, nodes)
