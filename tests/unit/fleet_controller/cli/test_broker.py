"""``fleetctl broker init`` and ``node enroll`` checks (:mod:`fleet_controller.cli.broker`).

What they do to a running Mosquitto is tested against a real one in
``tests/integration/test_dynsec.py``.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.unit.fleet_controller.cli._kit import one_line, run


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_broker_init_writes_a_tls_only_dynsec_broker_and_refuses_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = tmp_path / "broker"
    code, out, _ = run(
        capsys, "broker", "init", "--dir", str(directory), "--host", "broker.example",
        "--operators", "alice,bob", "--controllers", "ctl-a,ctl-b", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert sorted(result["credentials"]) == ["alice", "bob", "broker-admin", "ctl-a", "ctl-b"]
    assert result["broker"] == "mqtts://broker.example:8883"
    conf = (directory / "secure.conf").read_text()
    assert f"plugin_opt_config_file {directory / 'dynamic-security.json'}\n" in conf
    assert f"cafile {directory / 'tls' / 'ca.crt'}\n" in conf
    assert "\nrequire_certificate true\n" in conf
    assert "password_file" not in conf
    assert "acl_file" not in conf
    dynsec = json.loads((directory / "dynamic-security.json").read_text())
    assert {c["username"] for c in dynsec["clients"]} == set(result["credentials"])
    assert dynsec["defaultACLAccess"]["subscribe"] is False
    for secret in (
        directory / "dynamic-security.json",
        directory / "tls" / "ca.key",
        directory / "tls" / "broker.key",
        directory / "credentials" / "alice" / "password",
        directory / "credentials" / "alice" / "client.key",
    ):
        assert _mode(secret) == 0o600, secret
    assert _mode(directory / "credentials") == 0o700
    password = (directory / "credentials" / "alice" / "password").read_text()
    assert password.strip() not in out  # secrets are written, never printed

    code, _, err = run(capsys, "broker", "init", "--dir", str(directory))
    assert code == 1
    assert "--force" in one_line(err)


@pytest.mark.parametrize(
    ("flag", "names"),
    [("--operators", "a,a"), ("--operators", "a/b"), ("--controllers", "x+y")],
)
def test_broker_init_refuses_bad_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, names: str
) -> None:
    code, _, err = run(capsys, "broker", "init", "--dir", str(tmp_path / "b"), flag, names)
    assert code == 2
    one_line(err)
    assert not (tmp_path / "b").exists()


def test_an_operator_named_like_the_broker_admin_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "broker", "init", "--dir", str(tmp_path / "b"), "--operators", "broker-admin"
    )
    assert code == 2
    assert "named twice" in one_line(err)


@pytest.mark.parametrize(
    "node", ["controller", "Controller", "operator", "operator-alice", "OPERATOR-x", "a/b", "a+b"]
)
def test_node_enroll_refuses_reserved_and_invalid_ids_before_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, node: str, closed_broker: str
) -> None:
    code, out, err = run(
        capsys, "node", "enroll", node, "--out", str(tmp_path / "bundle"),
        "--ca-dir", str(tmp_path), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 2
    assert out == ""
    one_line(err)
    assert not (tmp_path / "bundle").exists()


def test_node_enroll_needs_the_fleet_ca_and_an_empty_bundle_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, closed_broker: str
) -> None:
    common = ["--keys", str(keys), "--broker", closed_broker]
    code, _, err = run(
        capsys, "node", "enroll", "n1", "--out", str(tmp_path / "b"), "--ca-dir", str(tmp_path),
        *common,
    )  # fmt: skip
    assert code == 2
    assert "cannot load the fleet CA" in one_line(err)
    run(capsys, "broker", "init", "--dir", str(tmp_path / "broker"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    code, _, err = run(
        capsys, "node", "enroll", "n1", "--out", str(full),
        "--ca-dir", str(tmp_path / "broker" / "tls"), *common,
    )  # fmt: skip
    assert code == 2
    assert "is not empty" in one_line(err)
