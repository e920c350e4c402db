"""The code's shape stays put: no Python module in the repository over
:data:`MODULE_LINES_MAX` lines, no class over :data:`CLASS_LINES_MAX` lines.

docs/architecture.md says why. The other structural rules are checked by
``scripts/check`` with the tools made for them: the import contracts in
pyproject.toml by ``lint-imports`` (layers, the one door from the controller
into the node, aiomqtt only behind the transport seam, pure cores free of I/O)
and function complexity by ruff (C901 at 12, PLR0912, PLR0915).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_LINES_MAX = 600
CLASS_LINES_MAX = 400
SKIPPED_DIRS = {".venv", ".git", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache"}


def python_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = set(path.relative_to(ROOT).parts[:-1])
        if not parts & SKIPPED_DIRS and not any(p.endswith(".egg-info") for p in parts):
            files.append(path)
    return files


FILES = python_files()


def test_the_walk_sees_the_packages() -> None:
    names = {p.relative_to(ROOT).parts[0] for p in FILES}
    assert {"shared", "edgefleet_io", "edge_node", "fleet_controller", "tests"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_class_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    assert lines <= MODULE_LINES_MAX, f"{lines} lines: split this module by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= CLASS_LINES_MAX, f"class {node.name} has {size} lines"
