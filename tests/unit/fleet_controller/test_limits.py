"""Size limits and the transport seam of the controller's modules: thin shells stay thin.

No module over 600 lines, no class over 400, every function within
cyclomatic complexity 12 and ruff's branch and statement limits; and none
imports an MQTT library (or edge_node.session): the broker is reached through
:mod:`edgefleet_io.transport` only. The command-line modules (cli.py, api.py,
console.py) are being reworked separately and are not held to this yet.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fleet_controller

PACKAGE = Path(fleet_controller.__file__).parent
NOT_YET = {"cli.py", "api.py", "console.py"}
MODULES = sorted(
    p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in NOT_YET
)
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_modules_and_classes_stay_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name} has {size} lines"


def test_functions_stay_simple() -> None:
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--select",
            "C901,PLR0912,PLR0915",
            "--config",
            "lint.mccabe.max-complexity=12",
            "--output-format",
            "concise",
            *map(str, MODULES),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0, found.stdout + found.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_the_broker_is_reached_only_through_the_transport_seam(path: Path) -> None:
    imported = _imports(path)
    assert not {n for n in imported if n.split(".")[0] in ("aiomqtt", "paho")}
    assert "edge_node.session" not in imported
