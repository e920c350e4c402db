"""``fleetctl model add|list``: register ONNX models with the controller.

``model add`` does every check it can on this machine first (flags, the file,
warm-up inputs, the sample and labels, loading and warming up the model,
quantizing, the release key) and contacts the broker last. The release key is
the operator's: manifests are signed here and the controller never sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import first_error, parse_warmup_input
from fleet_controller.keys import key_path, load_key
from shared.errors import EdgeFleetError, UsageError
from shared.messages import ModelManifest, WarmupInput
from shared.operations import MODEL_ADD, MODEL_LIST
from shared.topics import check_id
from shared.trust import Role
from shared.version import SemVer

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.progress import Progress, TaskID

__all__ = ["register"]

_MODEL_COLUMNS = ("name", "version", "sha256", "size", "added_by", "added_at")


def _load_sample(path: Path) -> list[WarmupInput]:
    """One warm-up input per array of an ``.npz`` file, with its values.

    Raises:
        UsageError: unreadable, not an ``.npz``, or arrays that are not finite numbers.
    """
    import numpy as np  # numpy only for --sample

    try:
        with np.load(path, allow_pickle=False) as sample:
            arrays = {name: sample[name] for name in sample.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read sample {path}: {common.first_line(exc)}") from None
    except AttributeError:  # np.load returned one array: an .npy, not an .npz
        raise UsageError(f"sample {path} is not an .npz archive") from None
    inputs = []
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise UsageError(f"sample array {name!r} holds {array.dtype}, not numbers")
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise UsageError(f"sample array {name!r} holds NaN or infinity")
        try:
            inputs.append(
                WarmupInput(
                    name=name,
                    shape=tuple(int(d) for d in array.shape),
                    values=tuple(values.ravel().tolist()),
                )
            )
        except ValidationError as exc:
            raise UsageError(f"sample array {name!r}: {first_error(exc)}") from None
    return inputs


def _read_labels(path: Path) -> list[str]:
    """Class labels, one per line, in class-index order (trailing blank lines dropped).

    Raises:
        UsageError: the file cannot be read as UTF-8.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels {path}: {common.first_line(exc)}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _quantize(source: Path, target: Path) -> Path:
    """Write an int8 dynamically quantized copy of ``source`` to ``target``.

    Raises:
        EdgeFleetError: the quantizer is missing (it needs the ``onnx`` package) or fails.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # only for --quantize
    except ImportError as exc:
        raise EdgeFleetError(
            f"--quantize needs the onnx package ({common.first_line(exc)}): pip install onnx"
        ) from None
    # The quantizer logs advice ("consider pre-processing") on the root logger.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise many unexported types
        raise EdgeFleetError(f"cannot quantize {source.name}: {common.first_line(exc)}") from None
    finally:
        logging.disable(logging.NOTSET)
    return target


def _progress(total_bytes: int) -> Progress:
    from rich.console import Console
    from rich.progress import (  # progress bars only while uploading
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    disabled = not sys.stdout.isatty() or os.environ.get("CI", "").lower() in ("1", "true")
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disabled or total_bytes <= 0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _ModelAdd:
    """A checked ``model add`` request (``int8_path`` set with ``--quantize``)."""

    path: Path
    name: str
    version: str
    warmup: tuple[WarmupInput, ...]
    labels: tuple[str, ...]
    keys_dir: Path
    int8_path: Path | None
    providers: tuple[str, ...]


async def _model_add_async(request: _ModelAdd, settings: common.Settings) -> list[dict[str, Any]]:
    """Validate everything locally, then upload and register (the broker comes last).

    Raises:
        EdgeFleetError / DecodeError: a local check failed, or the controller refused.
    """
    from fleet_controller.publish import (  # loads onnxruntime
        prepare_manifest,
        sign_release,
        upload_blob,
    )

    now = time.time()

    async def prepare(path: Path, name: str) -> ModelManifest:
        return await prepare_manifest(
            path,
            name=name,
            version=request.version,
            warmup=request.warmup,
            labels=request.labels,
            operator=settings.operator,
            now=now,
            providers=request.providers,
        )

    releases = [(request.path, await prepare(request.path, request.name))]
    if request.int8_path is not None:
        int8 = await asyncio.to_thread(_quantize, request.path, request.int8_path)
        releases.append((int8, await prepare(int8, f"{request.name}-int8")))
    # The release key is the operator's; the controller never sees it.
    if not key_path(request.keys_dir, Role.RELEASE).is_file():
        raise UsageError(
            f"no release key {key_path(request.keys_dir, Role.RELEASE)}: pass --keys DIR "
            f"(env {common.KEYS_ENV}) or create keys with `fleetctl keys init`"
        )
    release_key = load_key(request.keys_dir, Role.RELEASE, common.passphrase())
    signed = [sign_release(path, m, release_key) for path, m in releases]
    adds = [common.checked(MODEL_ADD, {"envelope": r.envelope_text}, now=now) for r in signed]
    rows = []
    async with common.controller(settings) as ctl:
        with _progress(sum(r.manifest.size for r in signed)) as progress:
            for release, add in zip(signed, adds, strict=True):
                m = release.manifest
                task = progress.add_task(f"{m.name} {m.version}", total=m.size)

                def advance(received: int, task: TaskID = task) -> None:
                    progress.update(task, completed=received)

                await upload_blob(ctl, release.path, m, advance)
                answer = await ctl.call(MODEL_ADD.name, add)
                rows.append(common.mapping(answer, MODEL_ADD.name))
    return rows


def _warmup_inputs(args: argparse.Namespace) -> list[WarmupInput]:
    """``--warmup-input`` flags and the ``--sample`` arrays. Raises: UsageError."""
    warmup = [parse_warmup_input(t) for t in args.warmup_input or ()]
    if args.sample:
        warmup += _load_sample(Path(args.sample))
    names = [w.name for w in warmup]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"warm-up input {repeated[0]!r} is given twice")
    return warmup


def _providers(text: str | None) -> tuple[str, ...]:
    """``--providers P1,P2``: the manifest's preferred providers (default CPU only).

    Raises: UsageError naming ``--providers`` (a name onnxruntime does not know).
    """
    from fleet_controller.registry import DEFAULT_PROVIDERS, check_providers  # loads onnxruntime

    if text is None:
        return DEFAULT_PROVIDERS
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        return check_providers(names)
    except UsageError as exc:
        raise UsageError(f"--providers: {exc}") from None


def _model_add(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such model file: {path}")
    name = check_id(args.name, "model name")
    SemVer.parse(args.version)
    warmup = _warmup_inputs(args)
    labels = _read_labels(Path(args.label_file)) if args.label_file else []
    if args.quantize:
        check_id(f"{name}-int8", "model name")
    common.quiet_onnxruntime()
    providers = _providers(args.providers)
    with tempfile.TemporaryDirectory(prefix="fleetctl-") as tmp:
        request = _ModelAdd(
            path=path,
            name=name,
            version=args.version,
            warmup=tuple(warmup),
            labels=tuple(labels),
            keys_dir=common.keys_dir(args.keys),
            int8_path=Path(tmp) / f"{name}-int8.onnx" if args.quantize else None,
            providers=providers,
        )
        rows = asyncio.run(_model_add_async(request, settings))
    common.emit(
        args, rows if args.quantize else rows[0], lambda _: _models_table(rows, "model added")
    )
    return 0


def _models_table(rows: Any, title: str) -> RenderableType:
    from fleet_controller import console as view

    return view.records_table(rows, title=title, columns=_MODEL_COLUMNS)


def _model_list(args: argparse.Namespace) -> int:
    settings = common.settings_from(args)
    answer = asyncio.run(common.call(settings, MODEL_LIST))
    rows = common.rows(answer, MODEL_LIST.name)
    common.emit(args, rows, lambda r: _models_table(r, "models"))
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``model`` and its actions to ``commands``."""
    model = commands.add_parser("model", help=help_of("model"))
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    add = common.add_command(
        actions,
        "add",
        _model_add,
        "inspect, warm up, sign and upload an ONNX model",
        parents.with_json,
        description="Signs with the release key from --keys (never sent to the controller). "
        "--json prints the model row (a list of two rows with --quantize).",
    )
    add.add_argument("file", help="the .onnx file")
    add.add_argument("--name", required=True, help="model name ([A-Za-z0-9_.-])")
    add.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    add.add_argument(
        "--warmup-input",
        action="append",
        metavar="NAME=SHAPE[:VALUE]",
        help="warm-up input, e.g. input=1x8 or sample_rate=[]:16000 (repeatable)",
    )
    add.add_argument("--sample", metavar="FILE.npz", help="warm-up inputs with values, by name")
    add.add_argument("--label-file", metavar="FILE", help="class labels, one per line")
    add.add_argument(
        "--quantize", action="store_true", help="also register an int8 variant as NAME-int8"
    )
    add.add_argument(
        "--providers",
        metavar="P1,P2",
        help="execution providers nodes should prefer, in order, e.g. "
        "CUDAExecutionProvider,CPUExecutionProvider (default CPUExecutionProvider); "
        "a node skips those it lacks",
    )
    add.add_argument("--keys", help=f"key directory with release.pem (env {common.KEYS_ENV})")
    common.add_command(actions, "list", _model_list, "list registered models", parents.with_json)
