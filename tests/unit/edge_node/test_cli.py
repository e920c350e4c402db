"""``edge-node``'s checks at start (:mod:`edge_node.cli`), run in-process through ``main``.

Every refused start must exit 2 with one line on stderr, before anything
connects: the broker URLs point at a closed port, so a check that wrongly ran
after connecting would hang or fail differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest

from edge_node.cli import build_config, build_parser, check_trust, main
from edge_node.state import NodeStore
from shared.envelope import SigningKey
from shared.errors import UsageError
from shared.trust import Role, TrustList, sign_trust_list
from tests.support.broker import free_port

DAY_S = 86_400.0


def _trust_bytes(
    *,
    expires_in_s: float = DAY_S,
    signer: SigningKey | None = None,
    root: SigningKey | None = None,
    version: int = 1,
) -> bytes:
    root = root or SigningKey.generate()
    trust = TrustList.build(
        version=version,
        expires_at=time.time() + expires_in_s,
        roles={Role.ROOT: [root], Role.RELEASE: [root], Role.ROLLOUT: [root]},
    )
    return sign_trust_list(trust, [signer or root]).to_bytes()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def closed_broker() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"


# ----- no usable trust list -------------------------------------------------------------

TRUST_FILES: dict[str, tuple[Callable[[Path], Path | None], str]] = {
    "missing": (lambda d: d / "nowhere" / "trust.json", "does not exist"),
    "not given": (lambda d: None, "no trust file given"),
    "not json": (lambda d: _write(d / "t.json", b"{not json"), "unreadable"),
    "expired": (lambda d: _write(d / "t.json", _trust_bytes(expires_in_s=-60)), "expired"),
    "bad signature": (
        lambda d: _write(d / "t.json", _trust_bytes(signer=SigningKey.generate())),
        "no usable trust list",
    ),
    "a directory": (lambda d: d, "cannot read trust file"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", TRUST_FILES)
def test_run_without_a_usable_trust_list_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, closed_broker: str, case: str
) -> None:
    make, words = TRUST_FILES[case]
    trust = make(tmp_path)
    data = tmp_path / "node"
    argv = ["run", "--id", "n1", "--data", str(data), "--broker", closed_broker]
    if trust is not None:
        argv += ["--trust", str(trust)]
    code, err = run(capsys, *argv)
    assert code == 2
    line = one_line(err)
    assert words in line
    assert "--trust" in line  # the operator is told what to fix
    assert not (data / "state.json").exists()
    assert not (data / "outbox.db").exists()


def test_a_rotation_chained_from_the_shipped_list_wins_over_its_expiry(tmp_path: Path) -> None:
    root = SigningKey.generate()
    data = tmp_path / "node"
    NodeStore(data)  # makes the data directory
    expired = _write(tmp_path / "shipped.json", _trust_bytes(expires_in_s=-60, root=root))
    rotated = _trust_bytes(version=2, root=root)
    _write(data / "trust.json", rotated)  # what a rotation of an earlier release left behind
    check_trust(data, expired)
    # The same list, not signed by the shipped root, is no rotation: the node stays refused.
    _write(data / "trust.json", _trust_bytes(version=2))
    with pytest.raises(UsageError, match="expired"):
        check_trust(data, expired)
    with pytest.raises(UsageError, match="no trust file given"):
        check_trust(data, None)


def test_simulate_needs_trust(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "simulate", "--count", "2", "--data", str(tmp_path / "sim"))
    assert code == 2
    assert "--trust" in one_line(err)


def test_simulate_refuses_an_expired_trust_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, closed_broker: str
) -> None:
    expired = _write(tmp_path / "t.json", _trust_bytes(expires_in_s=-60))
    code, err = run(
        capsys,
        *("simulate", "--count", "2", "--data", str(tmp_path / "sim")),
        *("--trust", str(expired), "--broker", closed_broker),
    )
    assert code == 2
    assert "expired" in one_line(err)


# ----- execution providers ----------------------------------------------------------------

UNAVAILABLE = next(
    (p for p in ort.get_all_providers() if p not in ort.get_available_providers()), None
)


@pytest.mark.parametrize(
    ("providers", "words"),
    [
        pytest.param("FooExecutionProvider", "unknown execution provider", id="unknown"),
        pytest.param("cpuexecutionprovider", "unknown execution provider", id="misspelt"),
        pytest.param(
            f"{UNAVAILABLE},CPUExecutionProvider",
            "not available on this machine",
            id="unavailable",
            marks=pytest.mark.skipif(UNAVAILABLE is None, reason="every provider is available"),
        ),
        pytest.param(",", "no execution provider", id="empty"),
    ],
)
def test_run_refuses_providers_it_cannot_use(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    closed_broker: str,
    providers: str,
    words: str,
) -> None:
    trust = _write(tmp_path / "t.json", _trust_bytes())
    data = tmp_path / "node"
    code, err = run(
        capsys,
        *("run", "--id", "n1", "--data", str(data), "--trust", str(trust)),
        *("--broker", closed_broker, "--providers", providers),
    )
    assert code == 2
    assert words in one_line(err)
    assert not (data / "outbox.db").exists()


def test_config_file_providers_are_checked_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, closed_broker: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nid = "n1"\ndata = "{tmp_path / "node"}"\nbroker = "{closed_broker}"\n'
        'providers = ["CPUExecutionProvider", "NoSuchExecutionProvider"]\n'
    )
    code, err = run(capsys, "run", "--config", str(config))
    assert code == 2
    assert "'NoSuchExecutionProvider'" in one_line(err)


def test_available_providers_are_kept_in_order(tmp_path: Path) -> None:
    available = ort.get_available_providers()
    args = build_parser().parse_args(
        ["run", "--id", "n1", "--data", str(tmp_path), "--providers", ",".join(available[::-1])]
    )
    config = build_config(args, {})
    assert config.session_options.providers == tuple(available[::-1])


# ----- numeric settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--rate", "-1", "from 0 to 100000"),
        ("--rate", "nan", "from 0 to 100000"),
        ("--rate", "1e9", "from 0 to 100000"),
        ("--concurrency", "0", "whole number from 1 to 256"),
        ("--micro-batch", "1.5", "whole number from 1"),
        ("--threads", "-1", "whole number from 0"),
        ("--corner-threshold", "inf", "from 0 to 1"),
        ("--change-threshold", "-0.1", "from 0"),
        ("--topk", "101", "from 1 to 100"),
        ("--batch-max", "1001", "from 1 to 1000"),  # a result batch holds at most 1000
        ("--batch-interval", "0", "above 0"),
        ("--telemetry-interval", "-5", "above 0"),
        ("--resend-after", "nan", "above 0"),
        ("--chunk-bytes", "600000", "from 1024 to 524288"),  # a chunk request's limit
    ],
)
def test_run_refuses_numeric_flags_out_of_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, value: str, words: str
) -> None:
    code, err = run(capsys, "run", "--id", "n1", "--data", str(tmp_path / "n"), f"{flag}={value}")
    assert code == 2
    line = one_line(err)
    assert f"argument {flag}: expected" in line
    assert words in line


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("rate = -3", "rate: expected a number from 0 to 100000, got -3"),
        ("rate = nan", "rate: expected a number from 0 to 100000, got nan"),
        ("batch_max = 1.5", "batch_max: expected a whole number from 1 to 1000, got 1.5"),
        ('topk = "3"', "topk: expected a whole number from 1 to 100, got '3'"),
        ("telemetry-interval = 0", "telemetry_interval: expected a number above 0"),
        ("concurrency = true", "concurrency: expected a whole number"),
    ],
)
def test_config_file_numbers_are_range_checked_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, setting: str, words: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nid = "n1"\ndata = "{tmp_path / "n"}"\n{setting}\n')
    code, err = run(capsys, "run", "--config", str(config))
    assert code == 2
    assert words in one_line(err)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--count", "0"], "--count: expected a whole number from 1 to 10000"),
        (["--count", "2", "--rate", "-1"], "--rate: expected a number from 0"),
        (["--count", "2", "--telemetry-interval", "0"], "--telemetry-interval: expected"),
    ],
)
def test_simulate_refuses_numbers_out_of_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], words: str
) -> None:
    code, err = run(capsys, "simulate", *args, "--trust", str(tmp_path / "t.json"))
    assert code == 2
    assert words in one_line(err)


def test_simulated_nodes_send_telemetry_every_10_s_unless_told(tmp_path: Path) -> None:
    base = ["simulate", "--count", "2", "--trust", str(tmp_path / "t.json")]
    assert build_parser().parse_args(base).telemetry_interval == 10.0
    told = build_parser().parse_args([*base, "--telemetry-interval", "0.5"])
    assert told.telemetry_interval == 0.5


def test_numbers_in_range_are_taken(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            *("run", "--id", "n1", "--data", str(tmp_path), "--rate", "0"),
            *("--concurrency", "4", "--corner-threshold", "0.25", "--chunk-bytes", "1024"),
        ]
    )
    config = build_config(args, {"batch_max": 1000, "telemetry_interval": 0.5})
    assert config.rate_hz is None  # 0: flat out
    assert (config.concurrency, config.chunk_bytes, config.batch_max) == (4, 1024, 1000)
    assert (config.corner_threshold, config.telemetry_interval_s) == (0.25, 0.5)
    assert isinstance(config.concurrency, int)
