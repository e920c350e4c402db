"""The one door from the controller into the node: checking a model as a node would.

``fleetctl model add`` and the controller's registry must refuse exactly the
models a node would refuse, so they use the node's own code for it. This module
is the only part of :mod:`edge_node` that :mod:`fleet_controller` may import
(besides the demo, which runs whole agents): everything else in the node is
free to change shape without the controller noticing.

What it offers:

* :func:`read_signature`: a model file's inputs and outputs as onnxruntime
  reports them, in the wire's :class:`~shared.messages.TensorSpec` form (the
  same conversion a node applies when it checks a model against its manifest);
* :func:`validate_model`: load, signature check and warm-up inference exactly
  as a node's runtime does before it serves a model;
* :func:`check_provider_names`: execution provider names as this onnxruntime
  knows them (and, for a node's own settings, as this machine offers them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from edge_node.inference_core import CPU_PROVIDER, check_providers, first_line, spec_from_ort
from edge_node.runtime import ModelLoadError, ModelRuntime, SessionOptionsConfig
from shared.messages import ModelManifest, TensorSpec

__all__ = ["ModelLoadError", "check_provider_names", "read_signature", "validate_model"]


def check_provider_names(names: Sequence[str], *, on_this_machine: bool = False) -> tuple[str, ...]:
    """``names`` if each is an onnxruntime execution provider (``on_this_machine``:
    also one this machine's onnxruntime can use).

    A manifest's providers are preferences for a whole fleet (a node skips those
    it lacks); a node's own ``--providers`` must all be usable where it runs.

    Raises:
        UsageError: see :func:`~edge_node.inference_core.check_providers`.
    """
    available = ort.get_available_providers() if on_this_machine else None
    return check_providers(names, known=ort.get_all_providers(), available=available)


def read_signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """``(inputs, outputs)`` of the ONNX model at ``path``.

    Raises:
        ModelLoadError: onnxruntime cannot open the file (one-line reason).
    """
    try:
        session = ort.InferenceSession(str(path), providers=[CPU_PROVIDER])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported types
        raise ModelLoadError(
            f"{path.name} is not a loadable ONNX model: {first_line(exc)}"
        ) from None
    inputs = tuple(spec_from_ort(i.name, i.type, i.shape) for i in session.get_inputs())
    outputs = tuple(spec_from_ort(o.name, o.type, o.shape) for o in session.get_outputs())
    return inputs, outputs


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
