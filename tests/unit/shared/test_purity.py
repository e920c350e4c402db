"""``shared/`` is pure: it pulls in no network, broker, database, runtime or filesystem code."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import shared

SHARED_DIR = Path(shared.__file__).resolve().parent

# The brief's modules first, then every other module that lives in shared/.
NAMED_MODULES = [
    "shared",
    "shared.messages",
    "shared.trust",
    "shared.topics",
    "shared.envelope",
    "shared.codec",
    "shared.waves",
    "shared.version",
    "shared.errors",
]
ALL_MODULES = NAMED_MODULES + sorted(
    f"shared.{m.name}"
    for m in pkgutil.iter_modules([str(SHARED_DIR)])
    if f"shared.{m.name}" not in NAMED_MODULES
)

# Never loaded, by us or by anything we import.
FORBIDDEN_AT_RUNTIME = {
    "asyncio",
    "aiomqtt",
    "paho",
    "onnxruntime",
    "sqlmodel",
    "sqlalchemy",
    "sqlite3",
    "psycopg",
    "ssl",
    "urllib.request",
    "http.client",
    # Not "socket" or "selectors": pydantic imports them, not us. Building any model
    # runs pydantic.plugin._loader, which imports importlib.metadata -> email.message
    # -> email.utils -> socket (-> selectors). test_shared_source_imports_nothing_impure
    # below still forbids our own code from importing them.
}

# Never imported by a module in shared/ itself (the source is checked, not sys.modules).
FORBIDDEN_IN_SOURCE = FORBIDDEN_AT_RUNTIME | {
    "socket",
    "selectors",
    "http",
    "urllib.request",
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "subprocess",
    "threading",
    "multiprocessing",
    "concurrent",
}


def _loaded_modules(modules: list[str]) -> set[str]:
    code = f"import {', '.join(modules)}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def _hits(loaded: set[str]) -> list[str]:
    return sorted(
        m for m in loaded for bad in FORBIDDEN_AT_RUNTIME if m == bad or m.startswith(bad + ".")
    )


def test_named_shared_modules_load_nothing_impure() -> None:
    loaded = _loaded_modules(NAMED_MODULES)
    assert set(NAMED_MODULES) <= loaded
    assert _hits(loaded) == []


def test_every_shared_module_loads_nothing_impure() -> None:
    assert len(ALL_MODULES) >= len(NAMED_MODULES)
    assert _hits(_loaded_modules(ALL_MODULES)) == []


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_shared_source_imports_nothing_impure() -> None:
    sources = sorted(SHARED_DIR.glob("*.py"))
    assert SHARED_DIR / "codec.py" in sources
    offenders = {
        f"{path.name}: {name}"
        for path in sources
        for name in _imports(path)
        for bad in FORBIDDEN_IN_SOURCE
        if name == bad or name.startswith(bad + ".")
    }
    assert sorted(offenders) == []


def test_the_import_checker_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import socket\nfrom urllib import request\nfrom os import path\n")
    assert {"socket", "urllib.request", "os", "os.path"} <= _imports(probe)


def test_socket_is_loaded_by_pydantic_itself() -> None:
    # Canary for the exemption above: if pydantic stops loading socket, put "socket"
    # and "selectors" back into FORBIDDEN_AT_RUNTIME.
    code = (
        "import sys, pydantic\n"
        "class M(pydantic.BaseModel):\n    x: int = 0\n"
        "print('socket' in sys.modules and 'shared' not in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.stdout.strip() == "True", done.stderr
