"""Turning an ONNX file into a release manifest, and checking it the way nodes will.

``describe_model`` reads the file's inputs and outputs and hashes it;
``validate_model`` loads it with the node's own runtime code (signature check
and warm-up), so the registry refuses exactly the models a node would refuse;
``check_providers`` accepts the execution provider names onnxruntime knows.
All come through :mod:`edge_node.validation`, the one node module the
controller imports. Signing happens with the operator's release key, never the
controller's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from edge_node.validation import (
    ModelLoadError,
    check_provider_names,
    read_signature,
    validate_model,
)
from shared.envelope import PAYLOAD_MANIFEST, Envelope, SigningKey, sign_envelope
from shared.errors import DecodeError, EdgeFleetError
from shared.messages import ModelManifest, WarmupInput, encode

__all__ = [
    "DEFAULT_PROVIDERS",
    "ModelFileError",
    "check_providers",
    "describe_model",
    "sha256_file",
    "sign_manifest",
    "validate_model",
]

_HASH_BLOCK = 1024 * 1024
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)  # a manifest's, unless the operator says


class ModelFileError(EdgeFleetError):
    """The file is not a model onnxruntime can open."""


def check_providers(names: Sequence[str]) -> tuple[str, ...]:
    """A manifest's preferred execution providers, in order: names onnxruntime knows
    (they need not be available on this machine; nodes skip those they lack).

    Raises: UsageError (an unknown name, a repeat, none, or too many).
    """
    return check_provider_names(names)


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
    providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> ModelManifest:
    """The manifest of ``path`` (inputs, outputs, sha256, size).

    Raises:
        ModelFileError: onnxruntime cannot open the file.
        DecodeError: ``name``/``version`` or the warm-up declarations are invalid.
    """
    try:
        inputs, outputs = read_signature(path)
    except ModelLoadError as exc:
        raise ModelFileError(str(exc)) from None
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


def sign_manifest(manifest: ModelManifest, release_key: SigningKey) -> Envelope:
    return sign_envelope(encode(manifest), PAYLOAD_MANIFEST, [release_key])
