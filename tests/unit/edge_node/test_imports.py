"""What ``edge-node run`` loads: the agent and onnxruntime, but no rich, no PEM
serialization, no database layer, no schema generation and nothing of the controller.

A fresh interpreter parses a ``run`` command line, builds the agent's settings,
checks the trust list and constructs the :class:`~edge_node.agent.NodeAgent`
exactly as ``edge-node run`` does before it connects, then lists what it
loaded. The memory this saves is measured by benchmarks/bench_memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from shared.envelope import SigningKey
from shared.trust import Role, TrustList, sign_trust_list
from tests.support.broker import free_port

#: What a node never needs.
NOT_FOR_A_NODE = frozenset(
    {
        "rich",
        "sqlalchemy",
        "sqlmodel",
        "psycopg",
        "onnx",  # the model-building package; the node runs models with onnxruntime
        "cryptography.hazmat.primitives.serialization",  # PEM: a node holds no private key
        "shared.operations",
        "shared.schemas",
        "fleet_controller",
    }
)

_RUN = """
import json, sys
from edge_node.cli import build_config, build_parser, check_trust
argv = json.loads(sys.argv[1])
config = build_config(build_parser(argv).parse_args(argv))
check_trust(config.data_dir, config.trust_file)
from edge_node.agent import NodeAgent
NodeAgent(config)
print(json.dumps(sorted(sys.modules)))
"""


def test_a_running_node_loads_only_what_it_uses(tmp_path: Path) -> None:
    root = SigningKey.generate()
    trust = TrustList.build(
        version=1,
        expires_at=time.time() + 86_400,
        roles={Role.ROOT: [root], Role.RELEASE: [root], Role.ROLLOUT: [root]},
    )
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(sign_trust_list(trust, [root]).to_bytes())
    argv = [
        "run",
        "--id",
        "n1",
        "--data",
        str(tmp_path / "node"),
        "--trust",
        str(trust_file),
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(argv)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert {"edge_node.agent", "onnxruntime", "edgefleet_io.mqtt"} <= modules
    found = {
        n for n in NOT_FOR_A_NODE if n in modules or any(m.startswith(f"{n}.") for m in modules)
    }
    assert found == set()
