"""Helpers for running ``fleetctl`` in-process and checking its one-line errors."""

from __future__ import annotations

import pytest

from fleet_controller.cli import main

NOW = 1_800_000_000.0
SHA = "ab" * 32
EVENTS = [  # a rollout.events answer: one node's state changes, oldest first
    {
        "id": 1,
        "rollout_id": "r1",
        "node_id": "n1",
        "state": "downloading",
        "code": None,
        "reason": None,
        "ts": 1_800_000_000.0,
    },
    {
        "id": 2,
        "rollout_id": "r1",
        "node_id": "n1",
        "state": "failed",
        "code": "model_invalid",
        "reason": "warm-up failed",
        "ts": 1_800_000_005.0,
    },
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err
