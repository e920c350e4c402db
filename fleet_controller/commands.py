"""What the controller sends for a rollout action: one pure builder, no I/O.

:func:`plan_command` turns an engine action (:class:`~fleet_controller.rollout_core.SendWave`
or :class:`~fleet_controller.rollout_core.SendNode`) into the command's target
and body; :func:`plan_trust_update` does the same for a rotated trust list.
The shell (:mod:`fleet_controller.actions`) only draws a sequence number,
signs the plan and publishes it on :meth:`CommandPlan.topic`.

Rules kept here and nowhere else:

* A wave goes out as ONE retained broadcast on ``rollout/{id}/cmd`` with a
  :class:`~shared.messages.WaveTarget` (the rollout's selector and the wave's
  bucket limit); a per-node deploy, rollback or cancel goes to
  ``node/{id}/cmd`` with a :class:`~shared.messages.NodeTarget`, not retained.
* A deploy carries the rollout model's release-signed manifest, the rollout's
  activation time and, when the HTTP artifact server is on, the blob's URL.
  It never sets ``health_window_s``: the health window is the controller's
  (the rollout spec's); the field stays at its default so older commands
  still verify, and nodes ignore it.
* A rollback carries the manifest of the model the node ran before, and the
  rollout's reason; without a previous model there is nothing to send.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet_controller.rollout_core import RolloutRecord, SendNode, SendWave
from shared import topics
from shared.envelope import Envelope
from shared.errors import EdgeFleetError
from shared.messages import (
    CancelAction,
    DeployAction,
    NodeTarget,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
)
from shared.waves import BUCKETS

__all__ = [
    "Body",
    "CommandPlan",
    "MissingManifestError",
    "artifact_url",
    "manifests_needed",
    "plan_command",
    "plan_trust_update",
]

Body = DeployAction | RollbackAction | CancelAction | TrustUpdateAction


class MissingManifestError(EdgeFleetError):
    """A command needs the manifest of a model that is not registered."""


@dataclass(frozen=True, slots=True)
class CommandPlan:
    """A command to sign: whom it targets and what it says."""

    target: WaveTarget | NodeTarget
    body: Body

    @property
    def retained(self) -> bool:
        """A broadcast is retained, so nodes that connect later still get it."""
        return isinstance(self.target, WaveTarget)

    def topic(self, fleet: str, rollout_id: str) -> str:
        if isinstance(self.target, WaveTarget):
            return topics.rollout_cmd(fleet, rollout_id)
        return topics.node_cmd(fleet, self.target.node)


def artifact_url(base: str | None, sha256: str) -> str | None:
    """The blob's URL on the HTTP artifact server (None: nodes use the MQTT transfer)."""
    return f"{base.rstrip('/')}/artifacts/{sha256}" if base else None


def manifests_needed(record: RolloutRecord, action: SendWave | SendNode) -> tuple[str, ...]:
    """The sha256 of every manifest :func:`plan_command` needs for ``action``."""
    if isinstance(action, SendWave) or action.kind == "deploy":
        return (record.spec.model.sha256,)
    if action.kind == "rollback" and action.target is not None:
        return (action.target.sha256,)
    return ()


def _manifest(manifests: Mapping[str, Envelope], sha256: str) -> Envelope:
    try:
        return manifests[sha256]
    except KeyError:
        raise MissingManifestError(f"no registered model with sha256 {sha256[:12]}") from None


def plan_command(
    record: RolloutRecord,
    action: SendWave | SendNode,
    manifests: Mapping[str, Envelope],
    artifact_base: str | None,
) -> CommandPlan | None:
    """The command carrying out ``action`` (None: nothing to send).

    ``manifests`` maps sha256 to release-signed manifest envelopes (at least
    those :func:`manifests_needed` names); ``artifact_base`` is the HTTP
    artifact server's base URL, if it runs.

    Raises:
        MissingManifestError: a needed manifest is not in ``manifests``.
    """
    spec = record.spec
    if isinstance(action, SendWave):
        target: WaveTarget | NodeTarget = WaveTarget(
            selector=spec.selector,
            exclude=action.exclude,
            bucket_limit=action.bucket_limit,
            wave=action.wave,
        )
    else:
        target = NodeTarget(node=action.node_id)
    if isinstance(action, SendWave) or action.kind == "deploy":
        sha = spec.model.sha256
        deploy = DeployAction(
            manifest=_manifest(manifests, sha),
            activate_at=spec.activate_at,
            url=artifact_url(artifact_base, sha),
        )
        return CommandPlan(target, deploy)
    if action.kind == "cancel":
        return CommandPlan(target, CancelAction())
    if action.kind == "rollback" and action.target is not None:
        sha = action.target.sha256
        rollback = RollbackAction(
            manifest=_manifest(manifests, sha),
            reason=record.reason or "rollback",
            url=artifact_url(artifact_base, sha),
        )
        return CommandPlan(target, rollback)
    return None


def plan_trust_update(trust: Envelope) -> CommandPlan:
    """A rotated trust list for every node of the fleet (a broadcast: all buckets)."""
    return CommandPlan(WaveTarget(bucket_limit=BUCKETS, wave=0), TrustUpdateAction(trust=trust))
