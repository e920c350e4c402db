"""``fleetctl`` without a broker: flag parsers, exit codes, local checks, ``top``'s view.

Every command that could reach a broker points ``--broker`` at a closed port,
so a check that wrongly runs after connecting shows up as exit code 1 and a
"cannot reach the broker" line instead of the expected answer.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fleet_controller import cli
from fleet_controller.api import OperationError
from fleet_controller.console import FleetView, NodeRow, format_value, records_table
from fleet_controller.keys import init_keys
from shared.errors import DecodeError, EdgeFleetError
from shared.messages import (
    LatencyStats,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    Telemetry,
    encode,
)
from tests.support.broker import free_port
from tests.support.models import make_classifier, make_failing_warmup_model

NOW = 1_800_000_000.0
SHA = "ab" * 32


@pytest.fixture
def closed_broker() -> str:
    """A broker URL nothing listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ----- parsers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("2d", 172_800.0),
        (" 60s ", 60.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "5x", "-5s", "5 m", "5M", "nan", "inf", "1e3", "1_000", "\u0663s", "5m-", "9" * 80],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(cli.UsageError, match="invalid duration"):
        cli.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "fraction"),
    [
        ("10%", 0.10),
        ("0.1", 0.10),
        ("12.5%", 0.125),
        ("0", 0.0),
        ("0%", 0.0),
        ("1", 1.0),
        ("100%", 1.0),
    ],
)
def test_parse_fraction(text: str, fraction: float) -> None:
    assert cli.parse_fraction(text) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "write 10% for a percentage"),
        ("101%", "more than 100%"),
        ("-5%", "invalid percentage"),
        ("abc", "invalid percentage"),
        ("", "invalid percentage"),
        ("nan", "invalid percentage"),
        ("1e-1", "invalid percentage"),
        ("10%%", "invalid percentage"),
    ],
)
def test_parse_fraction_refuses(text: str, message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_fraction(text)


def test_parse_fraction_without_maximum_takes_large_regressions() -> None:
    assert cli.parse_fraction("200%", maximum=None) == pytest.approx(2.0)
    assert cli.parse_fraction("3", maximum=None) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("text", "waves"),
    [
        ("1,10,50,100", [1.0, 10.0, 50.0, 100.0]),
        ("100", [100.0]),
        ("5%, 100%", [5.0, 100.0]),
        ("0.5,25,50", [0.5, 25.0, 50.0]),
    ],
)
def test_parse_waves(text: str, waves: list[float]) -> None:
    assert cli.parse_waves(text) == waves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10,5", "waves must grow"),
        ("1,1", "waves must grow"),
        ("0,100", r"must be in \(0, 100\]"),
        ("150", r"must be in \(0, 100\]"),
        ("", "invalid wave"),
        ("1,,2", "invalid wave"),
        ("a", "invalid wave"),
        ("-1,100", "invalid wave"),
    ],
)
def test_parse_waves_refuses(text: str, message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_waves(text)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        ("site=a", "site=a"),
        ("site=a,hw=jetson", "hw=jetson,site=a"),
        (" site = a , hw=pi ", "hw=pi,site=a"),
    ],
)
def test_parse_select(text: str, canonical: str) -> None:
    assert cli.parse_select(text) == canonical


@pytest.mark.parametrize("text", ["site", "site=a,site=b", "si te=a", "site=a/b", "site=+"])
def test_parse_select_refuses(text: str) -> None:
    with pytest.raises(DecodeError):
        cli.parse_select(text)


@pytest.mark.parametrize(
    ("text", "name", "shape", "fill"),
    [
        ("input=1x8", "input", (1, 8), 0.0),
        ("input=[1,8]", "input", (1, 8), 0.0),
        ("input=[1, 3, 224, 224]:0.5", "input", (1, 3, 224, 224), 0.5),
        ("sample_rate=[]:16000", "sample_rate", (), 16000.0),
        ("offset=[]:-1", "offset", (), -1.0),
        ("length=4", "length", (4,), 0.0),
        ("input:0=1x8", "input:0", (1, 8), 0.0),
    ],
)
def test_parse_warmup_input(text: str, name: str, shape: tuple[int, ...], fill: float) -> None:
    warmup = cli.parse_warmup_input(text)
    assert (warmup.name, warmup.shape, warmup.fill, warmup.values) == (name, shape, fill, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input", "use NAME=SHAPE"),
        ("=1x8", "use NAME=SHAPE"),
        ("input=1xa", "invalid shape"),
        ("input=1x-8", "invalid shape"),
        ("input=[1,8", "invalid shape"),
        ("input=1x8:abc", "is not a number"),
        ("input=1x8:nan", "is not a number"),
        ("input=1x8:inf", "is not a number"),
        ("input=1x99999999", "invalid shape"),
        ("input=1x2000000", "less than or equal to 1000000"),
    ],
)
def test_parse_warmup_input_refuses(text: str, message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_warmup_input(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1900000000", 1_900_000_000.0),
        ("+30m", NOW + 1800),
        ("+90", NOW + 90),
        ("2030-01-01T00:00:00Z", 1_893_456_000.0),
        ("2030-01-01T01:00:00+01:00", 1_893_456_000.0),
    ],
)
def test_parse_activate_at(text: str, expected: float) -> None:
    assert cli.parse_activate_at(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2030-01-01T00:00:00", "has no time zone"),
        ("tomorrow", "invalid time"),
        ("1700000000", "in the past"),
        ("2020-01-01T00:00:00Z", "in the past"),
        ("+5x", "invalid duration"),
    ],
)
def test_parse_activate_at_refuses(text: str, message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_activate_at(text, now=NOW)


@pytest.mark.parametrize(
    ("text", "ref"),
    [("classifier@1.2.0", ("classifier", "1.2.0")), ("c@1.0.0-rc.1", ("c", "1.0.0-rc.1"))],
)
def test_parse_model_ref(text: str, ref: tuple[str, str]) -> None:
    assert cli.parse_model_ref(text) == ref


@pytest.mark.parametrize("text", ["classifier", "classifier@1", "@1.0.0", "a/b@1.0.0", "c@v1.0.0"])
def test_parse_model_ref_refuses(text: str) -> None:
    with pytest.raises(DecodeError):
        cli.parse_model_ref(text)


# ----- exit codes and one-line errors --------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["rollout", "start", "c@1.0.0", "--waves", "10,5"],
        ["rollout", "start", "c@1.0.0", "--max-failures", "10"],
        ["rollout", "start", "c@1.0.0", "--wave-timeout", "5x"],
        ["rollout", "start", "c@1.0.0", "--wave-timeout", "0"],
        ["rollout", "start", "c@1.0.0", "--health-window", "soon"],
        ["rollout", "start", "c@1.0.0", "--max-latency-regression", "lots"],
        ["rollout", "start", "c@1.0.0", "--activate-at", "2030-01-01T00:00:00"],
        ["rollout", "start", "c@1.0.0", "--retry-backoff", "-1s"],
        ["rollout", "start", "c@1.0.0", "--max-retries", "-1"],
        ["rollout", "start", "c@1.0.0", "--select", "site"],
        ["rollout", "start", "c@1.0.0", "--id", "has/slash"],
        ["rollout", "start", "c@1.0.0", "--max-retries", "two"],
        ["rollout", "start", "c@one"],
        ["rollout", "start", "c"],
        ["rollout", "start"],
        ["rollout", "status", "bad id"],
        ["rollout", "pause", "a+b"],
        ["rollout", "explode", "r1"],
        ["nodes", "--select", "k"],
        ["nodes", "--bogus"],
        ["audit", "--limit", "0"],
        ["model", "list", "--timeout", "soon"],
        ["model", "list", "--fleet", "a/b"],
        ["top", "--json"],
        ["top", "--once", "--interval", "0"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], closed_broker: str, argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv, *(["--broker", closed_broker] if argv else []))
    assert code == 2
    assert out == ""
    assert one_line(err).startswith("fleetctl")


def test_bad_broker_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "model", "list", "--broker", "http://example.com")
    assert code == 2
    assert "invalid broker URL" in one_line(err)


def test_unreachable_broker_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], closed_broker: str
) -> None:
    code, out, err = run(capsys, "model", "list", "--json", "--broker", closed_broker)
    assert code == 1
    assert out == ""
    assert "cannot reach the broker" in one_line(err)


def test_operation_error_exits_with_its_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(settings: cli.Settings, op: str, args: Any = None) -> Any:
        raise OperationError("rollout r1 exists already", 2)

    monkeypatch.setattr(cli, "_call", refuse)
    code, _, err = run(capsys, "rollout", "start", "c@1.0.0", "--id", "r1")
    assert code == 2
    assert one_line(err) == "fleetctl: rollout r1 exists already\n"


def test_keys_commands_still_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "keys", "init", "--dir", str(tmp_path / "keys"), "--json")
    assert code == 0
    assert json.loads(out)["trust_version"] == 1
    code, _, err = run(capsys, "keys", "init", "--dir", str(tmp_path / "keys"))
    assert code == 1
    assert "--force" in one_line(err)


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
        (["--tick", "0"], "--tick must be above zero"),
        (["--tick", "soon"], "invalid duration"),
        (["--retention-days", "0"], "--retention-days must be above zero"),
        (["--log-level", "loud"], "invalid choice"),
    ],
)
def test_serve_refuses_bad_settings(
    capsys: pytest.CaptureFixture[str], keys: Path, extra: list[str], message: str
) -> None:
    code, _, err = run(capsys, "serve", "--keys", str(keys), *extra)
    assert code == 2
    assert message in one_line(err)


# ----- requests sent to the controller (a fake in place of the MQTT client) ---------------


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record operator API calls; answer like the controller would."""
    seen: list[tuple[str, dict[str, Any]]] = []
    rollout = {
        "rollout_id": "r1",
        "model": "c@1.0.0",
        "sha256": SHA,
        "state": "pending",
        "wave": 1,
        "waves": [1.0, 100.0],
        "selector": "site=a",
        "reason": None,
        "nodes_total": 0,
        "counts": {},
    }

    async def fake(settings: cli.Settings, op: str, args: Any = None) -> Any:
        seen.append((op, dict(args or {})))
        if op == "nodes.list":
            return [{"node_id": "n1", "online": True, "labels": {"site": "a"}, "model": None}]
        return rollout

    monkeypatch.setattr(cli, "_call", fake)
    return seen


def test_rollout_start_sends_parsed_arguments(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    before = time.time()
    code, out, _ = run(
        capsys,
        "rollout",
        "start",
        "c@1.0.0",
        "--select",
        "site=a,hw=pi",
        "--waves",
        "1,100",
        "--max-failures",
        "20%",
        "--wave-timeout",
        "2m",
        "--health-window",
        "30s",
        "--max-latency-regression",
        "150%",
        "--no-auto-rollback",
        "--activate-at",
        "+1h",
        "--max-retries",
        "3",
        "--retry-backoff",
        "5s",
        "--id",
        "r1",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["rollout_id"] == "r1"
    [(op, args)] = calls
    assert op == "rollout.start"
    activate_at = args.pop("activate_at")
    assert before + 3600 <= activate_at <= time.time() + 3600
    assert args == {
        "model": "c@1.0.0",
        "select": "hw=pi,site=a",
        "waves": [1.0, 100.0],
        "max_failures": pytest.approx(0.2),
        "wave_timeout_s": 120.0,
        "health_window_s": 30.0,
        "max_latency_regression": pytest.approx(1.5),
        "min_latency_regression_ms": 1.0,
        "auto_rollback": False,
        "max_retries": 3,
        "retry_backoff_s": 5.0,
        "rollout_id": "r1",
    }


def test_rollout_start_defaults(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    code, out, _ = run(capsys, "rollout", "start", "c@1.0.0")
    assert code == 0
    assert "rollout r1" in out
    [(_, args)] = calls
    assert args["waves"] == [1.0, 10.0, 50.0, 100.0]
    assert args["max_failures"] == pytest.approx(0.1)
    assert (args["wave_timeout_s"], args["health_window_s"]) == (300.0, 60.0)
    assert args["auto_rollback"] is True
    assert args["activate_at"] is None
    assert args["rollout_id"] == ""


@pytest.mark.parametrize(
    ("argv", "op", "args"),
    [
        (["rollout", "pause", "r1"], "rollout.pause", {"rollout_id": "r1"}),
        (["rollout", "resume", "r1"], "rollout.resume", {"rollout_id": "r1"}),
        (["rollout", "abort", "r1"], "rollout.abort", {"rollout_id": "r1"}),
        (["rollout", "rollback", "r1"], "rollout.rollback", {"rollout_id": "r1"}),
        (["rollout", "status", "r1", "--watch"], "rollout.status", {"rollout_id": "r1"}),
    ],
)
def test_rollout_actions_print_json(
    capsys: pytest.CaptureFixture[str],
    calls: list[tuple[str, dict[str, Any]]],
    argv: list[str],
    op: str,
    args: dict[str, Any],
) -> None:
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    assert json.loads(out)["state"] == "pending"
    assert calls == [(op, args)]


def test_nodes_json_is_the_only_output(
    capsys: pytest.CaptureFixture[str], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    code, out, err = run(capsys, "nodes", "--select", "site=a", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)[0]["node_id"] == "n1"
    assert calls == [("nodes.list", {"select": "site=a"})]


# ----- model add: every local check before the broker ------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    init_keys(directory, now=time.time())
    return directory


def test_model_add_unloadable_file_exits_1_before_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, closed_broker: str
) -> None:
    model = tmp_path / "garbage.onnx"
    model.write_bytes(b"this is not a model")
    code, out, err = run(
        capsys,
        "model",
        "add",
        str(model),
        "--name",
        "c",
        "--version",
        "1.0.0",
        "--keys",
        str(keys),
        "--broker",
        closed_broker,
    )
    assert code == 1
    assert out == ""
    assert "garbage.onnx is not a loadable ONNX model" in one_line(err)


def test_model_add_failing_warmup_exits_1_before_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, closed_broker: str
) -> None:
    model = make_failing_warmup_model(tmp_path / "fails.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0",
        "--keys", str(keys), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 1
    assert "validation failed" in one_line(err)


def test_model_add_warmup_input_of_wrong_shape_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, closed_broker: str
) -> None:
    model = make_classifier(tmp_path / "c.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0",
        "--warmup-input", "input=1x9", "--keys", str(keys), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 1
    assert "dimension 1 is 9, the model expects 8" in one_line(err)


def test_model_add_valid_model_gets_as_far_as_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, closed_broker: str
) -> None:
    model = make_classifier(tmp_path / "c.onnx")
    sample = tmp_path / "sample.npz"
    np.savez(sample, input=np.ones((2, 8), dtype=np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n\n", encoding="utf-8")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0",
        "--sample", str(sample), "--label-file", str(labels),
        "--keys", str(keys), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 1
    assert "cannot reach the broker" in one_line(err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--version", "1.0"], "invalid version"),
        (["--version", "1.0.0", "--name", "a/b"], "invalid model name"),
        (["--version", "1.0.0", "--warmup-input", "input"], "use NAME=SHAPE"),
        (
            ["--version", "1.0.0", "--warmup-input", "input=1x8", "--warmup-input", "input=2x8"],
            "given twice",
        ),
        (["--version", "1.0.0", "--sample", "missing.npz"], "cannot read sample"),
        (["--version", "1.0.0", "--label-file", "missing.txt"], "cannot read labels"),
    ],
)
def test_model_add_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    closed_broker: str,
    extra: list[str],
    message: str,
) -> None:
    model = make_classifier(tmp_path / "c.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", *extra, "--broker", closed_broker
    )
    assert code == 2
    assert message in one_line(err)


def test_model_add_missing_file_and_missing_key_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, closed_broker: str
) -> None:
    code, _, err = run(
        capsys, "model", "add", str(tmp_path / "none.onnx"), "--name", "c", "--version", "1.0.0"
    )
    assert code == 2
    assert "no such model file" in one_line(err)
    model = make_classifier(tmp_path / "c.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0",
        "--keys", str(tmp_path / "nokeys"), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 2
    assert "no release key" in one_line(err)


# ----- top: the pure aggregation -------------------------------------------------------


def _state(node: str, *, online: bool, session: int, model: ModelRef | None = None) -> NodeState:
    return NodeState(node=node, online=online, session=session, model=model, ts=NOW)


def _telemetry(node: str, *, ts: float, inferences: int, errors: int = 0) -> Telemetry:
    return Telemetry(
        node=node,
        ts=ts,
        uptime_s=ts - NOW + 1,
        inferences=inferences,
        errors=errors,
        skips=0,
        queue_depth=0,
        outbox_depth=3,
        latency=LatencyStats(p50_ms=1.0, p95_ms=4.5, p99_ms=9.0),
        cpu_percent=10.0,
        memory_bytes=1 << 20,
        model=ModelRef(name="c", version="1.0.0", sha256=SHA),
    )


def test_top_rates_come_from_counter_deltas() -> None:
    view = FleetView("f")
    assert view.apply(_state("n1", online=True, session=1), NOW)
    view.apply(_telemetry("n1", ts=NOW, inferences=100, errors=1), NOW)
    [row] = view.rows(NOW + 1)
    assert row.inferences_per_s is None  # one sample is no rate
    view.apply(_telemetry("n1", ts=NOW + 10, inferences=350, errors=2), NOW + 10)
    [row] = view.rows(NOW + 12)
    assert row == NodeRow(
        node="n1",
        online=True,
        model="c@1.0.0",
        inferences_per_s=25.0,
        p95_ms=4.5,
        errors=2,
        outbox_depth=3,
        status=None,
        age_s=2.0,
    )


def test_top_counter_reset_and_old_samples() -> None:
    view = FleetView("f")
    view.apply(_telemetry("n1", ts=NOW, inferences=100), NOW)
    view.apply(_telemetry("n1", ts=NOW + 10, inferences=200), NOW)
    assert not view.apply(_telemetry("n1", ts=NOW + 5, inferences=150), NOW)  # out of order
    assert view.rows(NOW)[0].inferences_per_s == 10.0
    view.apply(_telemetry("n1", ts=NOW + 20, inferences=5), NOW)  # the agent restarted
    assert view.rows(NOW)[0].inferences_per_s is None
    view.apply(_telemetry("n1", ts=NOW + 30, inferences=55), NOW)
    assert view.rows(NOW)[0].inferences_per_s == 5.0


def test_top_ignores_a_late_death_of_an_older_session() -> None:
    view = FleetView("f")
    view.apply(_state("n1", online=True, session=2), NOW)
    assert not view.apply(_state("n1", online=False, session=1), NOW)
    assert view.rows(NOW)[0].online is True
    assert view.apply(_state("n1", online=False, session=2), NOW)
    assert view.rows(NOW)[0].online is False


def test_top_feed_decodes_checks_topics_and_counts_malformed() -> None:
    view = FleetView("f")
    state = encode(_state("n1", online=True, session=1))
    status = NodeStatus(
        node="n2", seq=1, rollout_id="r1", state=NodeRolloutState.DOWNLOADING, ts=NOW
    )
    assert view.feed("fleet/v1/f/node/n1/state", state, NOW)
    assert view.feed("fleet/v1/f/node/n2/status", encode(status), NOW)
    assert not view.feed("fleet/v1/other/node/n3/state", state, NOW)  # another fleet
    assert not view.feed("fleet/v1/f/node/n9/state", state, NOW)  # names n1 on n9's topic
    assert not view.feed("fleet/v1/f/node/n1/telemetry", b"{not json", NOW)
    assert not view.feed("fleet/v1/f/node/n1/results", state, NOW)  # not a leaf top reads
    assert not view.feed("not/an/edgefleet/topic", state, NOW)
    assert view.malformed == 2
    rows = {r.node: r for r in view.rows(NOW)}
    assert set(rows) == {"n1", "n2"}
    assert rows["n2"].status == "downloading r1"
    assert rows["n2"].online is None
    assert view.feed("fleet/v1/f/node/n1/state", b"", NOW)  # retained birth cleared
    assert [r.node for r in view.rows(NOW)] == ["n2"]


def test_top_snapshot_is_json() -> None:
    view = FleetView("f")
    view.apply(_state("n1", online=True, session=1), NOW)
    view.apply(_state("n2", online=False, session=1), NOW)
    view.apply(_telemetry("n1", ts=NOW, inferences=0), NOW)
    view.apply(_telemetry("n1", ts=NOW + 2, inferences=40), NOW + 2)
    snapshot = json.loads(json.dumps(view.snapshot(NOW + 2)))
    assert snapshot["summary"] == {"nodes": 2, "online": 1, "inferences_per_s": 20.0, "errors": 0}
    assert [n["node"] for n in snapshot["nodes"]] == ["n1", "n2"]


def test_table_cells_are_not_markup() -> None:
    assert format_value("sha256", SHA) == SHA[:12]
    assert format_value("model", {"name": "c", "version": "1.0.0", "sha256": SHA}) == "c@1.0.0"
    assert format_value("size", 2048) == "2.0 KiB"
    assert format_value("online", None) == "-"
    out = io.StringIO()
    table = records_table([{"reason": "[bold]x[/bold]"}], columns=("reason",))
    Console(file=out, width=80).print(table)
    assert "[bold]x[/bold]" in out.getvalue()


# ----- broker init, node enroll and revoke ---------------------------------------------------


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


def test_render_acl_needs_an_operator_block() -> None:
    with pytest.raises(EdgeFleetError, match="no operator block"):
        cli.render_acl("user controller\n", ["operator-a"])
    assert cli.render_acl("x\n#@ user {operator}\n", ["operator-a"]).endswith("\nuser operator-a\n")


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

    monkeypatch.setattr(cli, "_mosquitto_passwd", never)
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

    monkeypatch.setattr(cli, "_mosquitto_passwd", fake_passwd)
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
