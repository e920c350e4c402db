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


@pytest.mark.parametrize("days", ["-5", "0", "3651", "1.5", "ten", "nan"])
@pytest.mark.parametrize("action", [["init"], ["rotate", "--role", "rollout"]])
def test_valid_days_must_be_from_1_to_3650(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, action: list[str], days: str
) -> None:
    keys = tmp_path / "keys"
    code, _, err = run(capsys, "keys", *action, "--dir", str(keys), "--valid-days", days)
    assert code == 2
    line = one_line(err)
    assert "--valid-days" in line
    assert "from 1 to 3650" in line
    assert not keys.exists()


def test_valid_days_sets_the_expiry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(
        capsys, "keys", "init", "--dir", str(tmp_path / "keys"), "--valid-days", "3650", "--json"
    )
    assert code == 0
    first = json.loads(out)
    code, out, _ = run(
        capsys,
        "keys",
        "rotate",
        "--role",
        "rollout",
        "--dir",
        str(tmp_path / "keys"),
        "--valid-days",
        "1",
        "--json",
    )
    assert code == 0
    rotated = json.loads(out)
    assert 3648 * 86_400 < first["expires_at"] - rotated["expires_at"] <= 3649 * 86_400
