"""The node's decision modules load no event loop, runtime, database or broker client.

What they *import* is checked by the import contracts (``lint-imports``, see
pyproject.toml); this checks what importing them actually loads, externals
included.
"""

from __future__ import annotations

import json
import subprocess
import sys

PURE = [
    "job_states",
    "repeats",
    "numbering",
    "core",
    "inference_core",
    "results_core",
    "batches_core",
    "chunk_core",
    "presence_core",
]


def test_the_decision_modules_load_no_event_loop_runtime_or_broker() -> None:
    modules = ", ".join(f"edge_node.{m}" for m in PURE)
    code = f"import {modules}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert not {"asyncio", "onnxruntime", "sqlite3", "aiomqtt", "paho"} & loaded
