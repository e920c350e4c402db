"""What ``fleetctl`` loads: a ``--json`` listing only the operator API client, ``--help``
only the standard library.

Each command runs in a fresh interpreter (imports are per process), against a
closed broker port, so it goes through everything before the connection: the
parser, the settings, the request check, the operator's key and the broker
client. Then the interpreter lists what it loaded. This is a functional check
of the import closure (see benchmarks/bench_startup.py for the times).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_controller.cli import build_parser
from fleet_controller.cli.catalog import COMMANDS

#: Never needed to ask the controller a question and print its JSON answer.
HEAVY = frozenset(
    {
        "onnxruntime",
        "onnx",
        "numpy",
        "rich",
        "sqlalchemy",
        "sqlmodel",
        "psycopg",
        "fleet_controller.console",
        "fleet_controller.store",
        "fleet_controller.service",
        "fleet_controller.publish",
        "shared.schemas",
    }
)
#: Not needed to print the list of commands.
NOT_FOR_HELP = HEAVY | {"pydantic", "cryptography", "asyncio", "aiomqtt", "paho", "msgspec"}

_RUN = """
import contextlib, io, json, sys
from {module} import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "modules": sorted(sys.modules)}}))
"""


def loaded_by(module: str, argv: list[str]) -> tuple[int, set[str]]:
    """Run ``module.main(argv)`` in a fresh interpreter: its exit code and every module
    it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN.format(module=module), json.dumps(argv)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    return answer["code"], set(answer["modules"])


def packages(modules: set[str], names: frozenset[str]) -> set[str]:
    """Which of ``names`` (packages or modules) are among ``modules``."""
    return {n for n in names if n in modules or any(m.startswith(f"{n}.") for m in modules)}


@pytest.mark.parametrize(
    "argv",
    [
        ["nodes", "--json", "--select", "site=a"],
        ["audit", "--json"],
        ["report", "--json"],
        ["model", "list", "--json"],
        ["rollout", "list", "--json"],
        ["rollout", "status", "r1", "--json"],
        ["deployment", "list", "--json"],
    ],
)
def test_a_json_listing_loads_only_the_operator_api_client(
    argv: list[str], keys: Path, closed_broker: str
) -> None:
    key = keys / "operators" / "admin.pem"
    code, modules = loaded_by(
        "fleet_controller.cli", [*argv, "--broker", closed_broker, "--operator-key", str(key)]
    )
    assert code == 1  # the broker is closed: everything before the connection ran
    assert {"fleet_controller.api", "shared.operations", "edgefleet_io.mqtt"} <= modules
    assert packages(modules, HEAVY) == set()


@pytest.mark.parametrize("module", ["fleet_controller.cli", "edge_node.cli"])
def test_help_loads_only_the_standard_library_and_the_parsers(module: str) -> None:
    code, modules = loaded_by(module, ["--help"])
    assert code == 0
    assert packages(modules, NOT_FOR_HELP) == set()


def test_the_catalog_lists_exactly_the_commands_the_groups_register() -> None:
    full = build_parser()  # every group in full
    (commands,) = (a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in commands._choices_actions}
    assert list(commands.choices) == list(COMMANDS)
    assert helps == {name: command.help for name, command in COMMANDS.items()}


def test_a_command_parses_the_same_with_only_its_group_registered() -> None:
    argv = ["rollout", "start", "c@1.0.0", "--waves", "10,100", "--json"]
    lean = build_parser(argv).parse_args(argv)
    full = build_parser().parse_args(argv)
    assert vars(lean) == vars(full)
