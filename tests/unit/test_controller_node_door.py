"""The controller reaches into the node only through ``edge_node.validation``.

``fleet_controller/registry.py`` checks models exactly as a node would, through
that one declared module; the demo, which runs whole nodes, may build agents.
Everything else in ``edge_node`` can change shape without the controller noticing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fleet_controller

CONTROLLER_DIR = Path(fleet_controller.__file__).resolve().parent

ALLOWED = {
    "edge_node.validation": None,  # any controller module
    "edge_node.agent": {"demo.py"},
    # Until the controller service moves onto the transport seam (edgefleet_io).
    "edge_node.session": {"service.py"},
}


def _node_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "edge_node")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "edge_node":
                names.update(f"edge_node.{a.name}" for a in node.names)
            elif node.module.startswith("edge_node."):
                names.add(node.module)
    return names


def test_controller_imports_only_the_declared_node_modules() -> None:
    offenders = []
    for path in sorted(CONTROLLER_DIR.glob("*.py")):
        for name in _node_imports(path):
            allowed = ALLOWED.get(name, set())
            if allowed is not None and path.name not in allowed:
                offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_the_registry_uses_the_door() -> None:
    assert _node_imports(CONTROLLER_DIR / "registry.py") == {"edge_node.validation"}
