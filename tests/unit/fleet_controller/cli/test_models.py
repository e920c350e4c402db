"""``fleetctl model add`` (cli/models.py): every local check comes before the broker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_controller.cli import common
from shared.envelope import Envelope
from shared.messages import ModelManifest, decode
from tests.support.models import make_classifier, make_failing_warmup_model
from tests.unit.fleet_controller.cli._kit import one_line, run


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


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        ("FooExecutionProvider", "--providers: unknown execution provider 'FooExecutionProvider'"),
        ("CPUExecutionProvider,CPUExecutionProvider", "given twice"),
        (",", "--providers: no execution provider given"),
    ],
)
def test_model_add_refuses_unknown_providers(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Path,
    closed_broker: str,
    providers: str,
    message: str,
) -> None:
    model = make_classifier(tmp_path / "c.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0",
        "--providers", providers, "--keys", str(keys), "--broker", closed_broker,
    )  # fmt: skip
    assert code == 2
    assert message in one_line(err)


class _RecordingController:
    """The operator API as ``model add`` uses it: uploads complete at once, adds are kept."""

    def __init__(self) -> None:
        self.added: list[ModelManifest] = []

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "model.upload":
            return {"received": args["size"], "complete": True}
        payload = Envelope.from_bytes(args["envelope"].encode()).payload_bytes()
        manifest = decode(ModelManifest, payload)
        self.added.append(manifest)
        return {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], ("CPUExecutionProvider",)),
        # Known to onnxruntime, whether or not this machine has it: nodes skip what they lack.
        (
            ["--providers", "CUDAExecutionProvider, CPUExecutionProvider"],
            ("CUDAExecutionProvider", "CPUExecutionProvider"),
        ),
    ],
)
def test_model_add_providers_go_into_every_signed_manifest(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    keys: Path,
    flags: list[str],
    expected: tuple[str, ...],
) -> None:
    fake = _RecordingController()

    @contextlib.asynccontextmanager
    async def controller(settings: common.Settings) -> AsyncIterator[_RecordingController]:
        yield fake

    monkeypatch.setattr(common, "controller", controller)
    model = make_classifier(tmp_path / "c.onnx")
    code, _, err = run(
        capsys, "model", "add", str(model), "--name", "c", "--version", "1.0.0", "--quantize",
        *flags, "--keys", str(keys), "--json",
    )  # fmt: skip
    assert code == 0, err
    assert [m.name for m in fake.added] == ["c", "c-int8"]
    assert all(m.providers == expected for m in fake.added)
