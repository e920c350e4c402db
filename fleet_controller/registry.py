"""Turning an ONNX file into a release manifest, and checking it the way nodes will.

``describe_model`` reads the file's inputs and outputs with onnxruntime and
hashes it; ``validate_model`` loads it with the node's own runtime code
(signature check and warm-up), so the registry refuses exactly the models a
node would refuse. Signing happens with the operator's release key, never the
controller's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from edge_node.inference_core import spec_from_ort
from edge_node.runtime import ModelRuntime, SessionOptionsConfig
from shared.envelope import PAYLOAD_MANIFEST, Envelope, SigningKey, sign_envelope
from shared.errors import DecodeError, EdgeFleetError
from shared.messages import ModelManifest, WarmupInput, encode

__all__ = ["ModelFileError", "describe_model", "sha256_file", "sign_manifest", "validate_model"]

_HASH_BLOCK = 1024 * 1024


class ModelFileError(EdgeFleetError):
    """The file is not a model onnxruntime can open."""


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def describe_model(
    path: Path,
    *,
    name: str,
    version: str,
    now: float,
    warmup: Sequence[WarmupInput] = (),
    class_labels: Sequence[str] = (),
    created_by: str = "",
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ModelManifest:
    """The manifest of ``path`` (inputs, outputs, sha256, size).

    Raises:
        ModelFileError: onnxruntime cannot open the file.
        DecodeError: ``name``/``version`` or the warm-up declarations are invalid.
    """
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path.name} is not a loadable ONNX model: {first}") from None
    inputs = tuple(spec_from_ort(i.name, i.type, i.shape) for i in session.get_inputs())
    outputs = tuple(spec_from_ort(o.name, o.type, o.shape) for o in session.get_outputs())
    del session
    sha, size = sha256_file(path)
    try:
        return ModelManifest(
            name=name,
            version=version,
            sha256=sha,
            size=size,
            inputs=inputs,
            outputs=outputs,
            warmup=tuple(warmup),
            providers=tuple(providers),
            class_labels=tuple(class_labels),
            created_at=now,
            created_by=created_by,
        )
    except ValueError as exc:
        raise DecodeError(f"invalid manifest: {str(exc).splitlines()[0]}") from None


async def validate_model(path: Path, manifest: ModelManifest) -> float:
    """Load and warm up ``path`` as a node would; returns the warm-up time in ms.

    Raises:
        ModelLoadError / ModelMismatchError: the node would refuse this model.
    """
    runtime = ModelRuntime(options=SessionOptionsConfig())
    try:
        loaded = await runtime.load(path, manifest)
        loaded.retire()
        return loaded.warmup_ms
    finally:
        await runtime.close()


def sign_manifest(manifest: ModelManifest, release_key: SigningKey) -> Envelope:
    return sign_envelope(encode(manifest), PAYLOAD_MANIFEST, [release_key])
