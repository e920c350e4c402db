"""What a node does with a command it has seen before: pure verdicts, no I/O.

Two cases, both decided here and carried out by :mod:`edge_node.jobs`:

* **A duplicate** (:func:`answer_duplicate`): the verifier says the command was
  already attempted (QoS 1 redelivery, a retained wave command seen again on
  reconnect, a later wave of a rollout the node took part in). It never runs
  again; the node answers once, flagged ``duplicate``, with where it stands:

  - nothing while a job of the same rollout step is still running (that job
    reports its own states), nor for a broadcast trust update (it stays
    retained and is seen on every reconnect);
  - a deploy whose model is the active one: ``activated`` (a rollout step ends
    there on the node; the controller judges health); a rollback whose model is
    active: ``rolled_back``;
  - a deploy or rollback whose model is not active: ``failed`` (that attempt
    did not leave it active);
  - a command without a model (a trust update sent to the node, a cancel):
    ``succeeded``; no rollout step, so nothing for the controller to gate.

* **A resumed job** (:func:`plan_job`): a deploy or rollback interrupted by a stop
  is persisted as pending and taken up again on start. It does not report
  ``queued`` again; if its model became active before the stop it only
  finishes (reports its last steps), otherwise it runs again from the download
  (which resumes from the ``.part``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_node.job_states import JobKind, JobStep
from shared.messages import (
    Command,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
)

__all__ = ["DuplicateAnswer", "JobStart", "answer_duplicate", "job_kind", "plan_job"]


@dataclass(frozen=True, slots=True)
class DuplicateAnswer:
    """The one status that answers a duplicate command (sent with ``duplicate=True``)."""

    state: NodeRolloutState
    model: ModelRef | None


@dataclass(frozen=True, slots=True)
class JobStart:
    """How a job begins: its first step, and whether it only finishes."""

    step: JobStep
    finish_only: bool


def job_kind(command: Command) -> JobKind:
    """The job a deploy or rollback command makes."""
    return JobKind.ROLLBACK if isinstance(command.body, RollbackAction) else JobKind.DEPLOY


def answer_duplicate(
    command: Command,
    manifest: ModelManifest | None,
    *,
    running: Command | None,
    active: ModelRef | None,
) -> DuplicateAnswer | None:
    """The status answering duplicate ``command``; ``None``: say nothing.

    ``running`` is the command of the job in progress (``None`` when idle);
    ``active`` the model the node has installed.
    """
    if running is not None and running.rollout_id == command.rollout_id and manifest:
        return None
    if isinstance(command.body, TrustUpdateAction) and isinstance(command.target, WaveTarget):
        return None
    if manifest is None:
        return DuplicateAnswer(NodeRolloutState.SUCCEEDED, None)
    if active is None or active.sha256 != manifest.sha256:
        return DuplicateAnswer(NodeRolloutState.FAILED, manifest.ref)
    if job_kind(command) is JobKind.ROLLBACK:
        return DuplicateAnswer(NodeRolloutState.ROLLED_BACK, manifest.ref)
    return DuplicateAnswer(NodeRolloutState.ACTIVATED, manifest.ref)


def plan_job(*, resumed: bool, manifest: ModelManifest, active: ModelRef | None) -> JobStart:
    """Where a job for ``manifest`` starts, given the node's ``active`` model."""
    if not resumed:
        return JobStart(JobStep.ACCEPTED, finish_only=False)
    finish_only = active is not None and active.sha256 == manifest.sha256
    return JobStart(JobStep.RESUMED, finish_only=finish_only)
