"""``fleetctl broker init`` and ``node enroll|revoke`` (:mod:`fleet_controller.cli.broker`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet_controller.cli import broker
from tests.unit.fleet_controller.cli._kit import one_line, run


def test_broker_init_writes_files_and_refuses_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = tmp_path / "broker"
    code, out, _ = run(
        capsys, "broker", "init", "--dir", str(directory),
        "--operators", "operator-alice,operator-bob", "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["operators"] == ["operator-alice", "operator-bob"]
    conf = (directory / "secure.conf").read_text()
    assert f"password_file {(directory / 'passwd').absolute()}\n" in conf
    assert f"acl_file {(directory / 'acl').absolute()}\n" in conf
    assert "listener 8883" in conf
    acl = (directory / "acl").read_text()
    assert "\nuser operator-alice\n" in acl
    assert "topic read fleet/v1/+/ctl/reply/operator-bob\n" in acl
    assert "{operator}" not in acl.replace("#@ ", "").split("# operator operator-alice")[1]
    assert (directory / "passwd").read_text() == ""

    (directory / "passwd").write_text("node-1:$7$hash\n")
    code, _, err = run(capsys, "broker", "init", "--dir", str(directory))
    assert code == 1
    assert "--force" in one_line(err)
    code, _, _ = run(capsys, "broker", "init", "--dir", str(directory), "--force")
    assert code == 0
    assert (directory / "passwd").read_text() == "node-1:$7$hash\n"  # credentials kept
    assert "user operator-alice" not in (directory / "acl").read_text()


@pytest.mark.parametrize("operators", ["alice", "operator-a,operator-a", "operator/x"])
def test_broker_init_refuses_bad_operator_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, operators: str
) -> None:
    code, _, err = run(capsys, "broker", "init", "--dir", str(tmp_path), "--operators", operators)
    assert code == 2
    one_line(err)
    assert not (tmp_path / "acl").exists()


@pytest.mark.parametrize("action", ["enroll", "revoke"])
@pytest.mark.parametrize(
    "node", ["controller", "Controller", "operator", "operator-alice", "OPERATOR-x", "a/b", "a+b"]
)
def test_node_credentials_refuse_reserved_and_invalid_ids(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    node: str,
) -> None:
    def never(arguments: Any) -> None:
        raise AssertionError("mosquitto_passwd must not run")

    monkeypatch.setattr(broker, "_mosquitto_passwd", never)
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    code, out, err = run(capsys, "node", action, node, "--passwd-file", str(passwd))
    assert code == 2
    assert out == ""
    one_line(err)


def test_node_enroll_and_revoke(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    runs: list[list[str]] = []

    def fake_passwd(arguments: list[str]) -> None:  # what mosquitto_passwd does to the file
        runs.append(list(arguments))
        if arguments[0] == "-b":
            passwd.write_text(f"{arguments[2]}:$7$hash\n")
        else:
            passwd.write_text("")

    monkeypatch.setattr(broker, "_mosquitto_passwd", fake_passwd)
    code, out, _ = run(capsys, "node", "enroll", "node-1", "--passwd-file", str(passwd), "--json")
    assert code == 0
    issued = json.loads(out)
    assert issued["username"] == "node-1"
    assert len(issued["password"]) >= 24
    assert runs == [["-b", str(passwd), "node-1", issued["password"]]]

    code, _, err = run(capsys, "node", "enroll", "node-1", "--passwd-file", str(passwd))
    assert code == 1
    assert "already enrolled" in one_line(err)

    code, out, _ = run(capsys, "node", "revoke", "node-1", "--passwd-file", str(passwd))
    assert code == 0
    assert "kill -HUP" in out
    assert runs[-1] == ["-D", str(passwd), "node-1"]
    code, _, err = run(capsys, "node", "revoke", "node-1", "--passwd-file", str(passwd))
    assert code == 1
    assert "not enrolled" in one_line(err)


def test_node_enroll_needs_the_password_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "node", "enroll", "node-1", "--passwd-file", str(tmp_path / "no"))
    assert code == 2
    assert "fleetctl broker init" in one_line(err)
