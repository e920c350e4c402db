"""The node's decision modules are pure: no event loop, no runtime, no disk, no broker."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edge_node

NODE_DIR = Path(edge_node.__file__).resolve().parent

PURE = ["job_states", "repeats", "numbering", "core", "inference_core", "results_core"]

FORBIDDEN = {
    "asyncio",
    "aiomqtt",
    "paho",
    "onnxruntime",
    "sqlite3",
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "threading",
    "socket",
    "edgefleet_io",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_decision_module_imports_nothing_impure(module: str) -> None:
    imported = _imports(NODE_DIR / f"{module}.py")
    bad = sorted(
        name for name in imported for f in FORBIDDEN if name == f or name.startswith(f + ".")
    )
    assert bad == []
    # Decisions may use other decisions, never the node's shells.
    shells = {"agent", "link", "sender", "jobs", "commands", "pipeline", "downloads", "runtime"}
    assert not {f"edge_node.{s}" for s in shells} & imported


def test_the_new_decision_modules_load_no_event_loop_or_runtime() -> None:
    modules = ", ".join(f"edge_node.{m}" for m in ("job_states", "repeats", "numbering"))
    code = f"import {modules}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert not {"asyncio", "onnxruntime", "sqlite3", "aiomqtt"} & loaded
