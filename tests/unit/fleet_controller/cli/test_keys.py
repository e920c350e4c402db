"""``fleetctl keys`` (:mod:`fleet_controller.cli.keys`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.fleet_controller.cli._kit import one_line, run


def test_keys_commands_still_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "keys", "init", "--dir", str(tmp_path / "keys"), "--json")
    assert code == 0
    assert json.loads(out)["trust_version"] == 1
    code, _, err = run(capsys, "keys", "init", "--dir", str(tmp_path / "keys"))
    assert code == 1
    assert "--force" in one_line(err)
