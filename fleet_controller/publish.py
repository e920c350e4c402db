"""Publishing a model: inspect, validate as a node would, sign, upload, register.

Signing uses the operator's release key, loaded on the operator's machine; the
controller only ever receives the signed manifest and the blob, and checks the
signature against the trust list itself.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_controller.api import CtlClient
from fleet_controller.registry import (
    DEFAULT_PROVIDERS,
    describe_model,
    sign_manifest,
    validate_model,
)
from shared.envelope import SigningKey
from shared.errors import EdgeFleetError
from shared.messages import ModelManifest, WarmupInput

__all__ = [
    "UPLOAD_CHUNK_BYTES",
    "Release",
    "prepare_manifest",
    "publish",
    "sign_release",
    "upload_blob",
]

UPLOAD_CHUNK_BYTES = 512 * 1024  # raw bytes per model.upload call (~700 kB as base64)
_UPLOAD_STALLS_MAX = 3  # answers in a row that do not move the upload forward

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Release:
    """A model file with its signed manifest, ready to hand to the controller."""

    path: Path
    manifest: ModelManifest
    envelope_text: str


async def prepare_manifest(
    path: Path,
    *,
    name: str,
    version: str,
    now: float,
    warmup: Sequence[WarmupInput] = (),
    labels: Sequence[str] = (),
    operator: str = "",
    providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> ModelManifest:
    """Inspect ``path`` and warm it up exactly as a node will (nothing is signed yet).

    Raises:
        ModelFileError: onnxruntime cannot open it.
        DecodeError: name, version, warm-up declarations or labels do not fit a manifest.
        EdgeFleetError: the model fails to load or warm up as a node would.
    """
    manifest = await asyncio.to_thread(
        describe_model,
        path,
        name=name,
        version=version,
        now=now,
        warmup=warmup,
        class_labels=labels,
        created_by=operator,
        providers=providers,
    )
    try:
        await validate_model(path, manifest)
    except EdgeFleetError as exc:
        raise EdgeFleetError(f"validation failed (nodes would refuse it): {exc}") from None
    return manifest


def sign_release(path: Path, manifest: ModelManifest, release_key: SigningKey) -> Release:
    """Sign ``manifest`` with the operator's release key."""
    return Release(path, manifest, sign_manifest(manifest, release_key).to_bytes().decode())


def _received(answer: Any, size: int) -> tuple[int, bool]:
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("received"), int)
        or not 0 <= answer["received"] <= size
    ):
        raise EdgeFleetError("unexpected answer from the controller to model.upload")
    return answer["received"], bool(answer.get("complete"))


async def upload_blob(
    ctl: CtlClient, path: Path, manifest: ModelManifest, progress: Progress | None = None
) -> None:
    """Send the blob in ``model.upload`` chunks, resuming where the controller is.

    Raises:
        EdgeFleetError: the controller's answers make no progress or make no sense.
    """
    sha, size = manifest.sha256, manifest.size
    # An empty first chunk asks how much the controller already holds (resume).
    answer = await ctl.call("model.upload", {"sha256": sha, "offset": 0, "size": size, "data": ""})
    stalls = 0
    with path.open("rb") as handle:
        while True:
            received, complete = _received(answer, size)
            if progress is not None:
                progress(received)
            if complete:
                return
            handle.seek(received)
            chunk = await asyncio.to_thread(handle.read, UPLOAD_CHUNK_BYTES)
            if not chunk:
                raise EdgeFleetError(f"{path} is shorter than when it was hashed")
            answer = await ctl.call(
                "model.upload",
                {
                    "sha256": sha,
                    "offset": received,
                    "size": size,
                    "data": base64.b64encode(chunk).decode("ascii"),
                },
            )
            stalls = stalls + 1 if _received(answer, size)[0] <= received else 0
            if stalls >= _UPLOAD_STALLS_MAX:
                raise EdgeFleetError(
                    f"upload of {sha[:12]} makes no progress: is another upload of it running?"
                )


async def publish(
    ctl: CtlClient, release: Release, progress: Progress | None = None
) -> dict[str, Any]:
    """Upload the blob and register the signed manifest; returns the model row.

    Raises:
        EdgeFleetError / OperationError: the upload or the registration failed.
    """
    await upload_blob(ctl, release.path, release.manifest, progress)
    row = await ctl.call("model.add", {"envelope": release.envelope_text})
    if not isinstance(row, dict):
        raise EdgeFleetError("unexpected answer from the controller to model.add")
    return row
