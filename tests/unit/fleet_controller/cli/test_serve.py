"""``fleetctl serve``'s local checks (:mod:`fleet_controller.cli.serve`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fleet_controller.cli._kit import one_line, run


def test_serve_without_keys_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, closed_broker: str
) -> None:
    code, _, err = run(
        capsys,
        "serve",
        "--keys",
        str(tmp_path / "nokeys"),
        "--db",
        f"sqlite:///{tmp_path}/db/fleet.db",
        "--broker",
        closed_broker,
    )
    assert code == 2
    assert "rollout.pem is missing" in one_line(err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--db", "nosuchdriver+x:///db"], "invalid database URL"),
        (["--tick", "0"], "--tick: duration '0' must be above zero and at most 1m"),
        (["--tick", "2m"], "at most 1m"),
        (["--tick", "soon"], "invalid duration"),
        (["--retention-days", "0"], "--retention-days: expected a number above 0"),
        (["--retention-days", "nan"], "--retention-days: expected a number above 0"),
        (["--retention-days", "-1"], "--retention-days: expected a number above 0"),
        (["--retention-days", "1e9"], "and at most 3650"),
        (["--log-level", "loud"], "invalid choice"),
    ],
)
def test_serve_refuses_bad_settings(
    capsys: pytest.CaptureFixture[str], keys: Path, extra: list[str], message: str
) -> None:
    code, _, err = run(capsys, "serve", "--keys", str(keys), *extra)
    assert code == 2
    assert message in one_line(err)


@pytest.mark.parametrize(
    ("db", "message"),
    [
        pytest.param("garbage:::", "neither a URL", id="garbage"),
        pytest.param("postgres:fleet", "neither a URL", id="url-without-slashes"),
        pytest.param("{tmp}/missing/fleet.db", "does not exist", id="plain-path-no-folder"),
        pytest.param("{tmp}", "is a directory", id="a-folder"),
        pytest.param("sqlite:///{tmp}", "is a directory", id="a-folder-as-url"),
    ],
)
def test_serve_refuses_a_bad_db(
    capsys: pytest.CaptureFixture[str],
    keys: Path,
    tmp_path: Path,
    closed_broker: str,
    monkeypatch: pytest.MonkeyPatch,
    db: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    code, _, err = run(
        capsys,
        *("serve", "--keys", str(keys), "--broker", closed_broker),
        *("--db", db.format(tmp=tmp_path)),
    )
    assert code == 2
    assert message in one_line(err)
    assert sorted(tmp_path.iterdir()) == before  # no database file, no folder created
