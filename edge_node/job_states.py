"""The states of one deploy or rollback job on a node, as a transition table.

Pure: no asyncio, no clock, no I/O. The job runner (:mod:`edge_node.jobs`)
holds a job's :class:`JobStep` and moves it only with :func:`apply_job_event`;
each step it lands on says which status, if any, goes to the controller
(:func:`status_of`). So the order of a job's statuses is this table, not the
shape of the asyncio code.

Rules:

* A new job starts at ``accepted`` (verified and persisted, nothing reported);
  one resumed after a restart starts at ``resumed`` (its ``queued`` went out in
  an earlier life, so it is not reported again).
* Progress may skip steps: a node that already holds the blob goes from
  ``queued`` (or ``resumed``) straight to ``verifying``; a resumed job whose
  model is already active goes straight to ``activated``.
* A **deploy** job ends at ``activated``: the controller owns the health window
  and decides ``succeeded``. A **rollback** job reports ``activated`` and then
  ends at ``rolled_back``.
* ``failed`` and ``canceled`` end a job from any step before its model became
  active; once activated the outcome is decided and neither is allowed.
* ``interrupted`` (the node stopped) reports nothing: the job stays persisted as
  pending and resumes on the next start. A rollback stopped between
  ``activated`` and ``rolled_back`` is interrupted too, and finishes on resume.
* Every other move raises :class:`IllegalJobMoveError` naming kind, step and event.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from shared.errors import EdgeFleetError
from shared.messages import NodeRolloutState

__all__ = [
    "JOB_TRANSITIONS",
    "IllegalJobMoveError",
    "JobEvent",
    "JobKind",
    "JobStep",
    "apply_job_event",
    "can_apply",
    "is_final",
    "status_of",
]


class IllegalJobMoveError(EdgeFleetError):
    """A job was asked to make a move its table does not allow (a bug in the runner)."""


class JobKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


class JobStep(StrEnum):
    ACCEPTED = "accepted"  # verified and persisted; nothing reported yet
    RESUMED = "resumed"  # restarted after a stop; its `queued` went out before
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVATED = "activated"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"  # the node stopped: stays pending, resumes on start


class JobEvent(StrEnum):
    QUEUE = "queue"  # the job is taken on (a new one; a resumed one skips this)
    DOWNLOAD = "download"  # the blob is missing: the download starts (or progresses)
    DOWNLOADED = "downloaded"  # the blob is complete and verified on disk
    VERIFY = "verify"  # the blob is on disk; its manifest is stored
    LOAD = "load"  # the model is being loaded and warmed up
    ACTIVATE = "activate"  # the model is the active one
    FINISH_ROLLBACK = "finish_rollback"  # a rollback's last step
    FAIL = "fail"
    CANCEL = "cancel"
    INTERRUPT = "interrupt"


S = JobStep
V = JobEvent

_BEFORE_ACTIVE = (S.ACCEPTED, S.RESUMED, S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFYING)
_ENDINGS = {V.FAIL: S.FAILED, V.CANCEL: S.CANCELED, V.INTERRUPT: S.INTERRUPTED}

_DEPLOY: dict[tuple[JobStep, JobEvent], JobStep] = {
    (S.ACCEPTED, V.QUEUE): S.QUEUED,
    (S.QUEUED, V.DOWNLOAD): S.DOWNLOADING,
    (S.RESUMED, V.DOWNLOAD): S.DOWNLOADING,
    (S.DOWNLOADING, V.DOWNLOAD): S.DOWNLOADING,  # progress
    (S.DOWNLOADING, V.DOWNLOADED): S.DOWNLOADED,
    (S.QUEUED, V.VERIFY): S.VERIFYING,  # the blob was already on disk
    (S.RESUMED, V.VERIFY): S.VERIFYING,
    (S.DOWNLOADED, V.VERIFY): S.VERIFYING,
    (S.VERIFYING, V.LOAD): S.LOADING,
    (S.LOADING, V.ACTIVATE): S.ACTIVATED,
    (S.RESUMED, V.ACTIVATE): S.ACTIVATED,  # activated before the restart: only finish
    **{
        (step, event): end
        for step in (*_BEFORE_ACTIVE, S.LOADING)
        for event, end in _ENDINGS.items()
    },
}
_ROLLBACK: dict[tuple[JobStep, JobEvent], JobStep] = {
    **_DEPLOY,
    (S.ACTIVATED, V.FINISH_ROLLBACK): S.ROLLED_BACK,
    (S.ACTIVATED, V.INTERRUPT): S.INTERRUPTED,  # resumes, and only finishes
}

JOB_TRANSITIONS: Mapping[JobKind, Mapping[tuple[JobStep, JobEvent], JobStep]] = {
    JobKind.DEPLOY: _DEPLOY,
    JobKind.ROLLBACK: _ROLLBACK,
}

_FINAL: Mapping[JobKind, frozenset[JobStep]] = {
    JobKind.DEPLOY: frozenset({S.ACTIVATED, S.FAILED, S.CANCELED, S.INTERRUPTED}),
    JobKind.ROLLBACK: frozenset({S.ROLLED_BACK, S.FAILED, S.CANCELED, S.INTERRUPTED}),
}

_STATUS: Mapping[JobStep, NodeRolloutState | None] = {
    S.ACCEPTED: None,
    S.RESUMED: None,
    S.INTERRUPTED: None,
    S.QUEUED: NodeRolloutState.QUEUED,
    S.DOWNLOADING: NodeRolloutState.DOWNLOADING,
    S.DOWNLOADED: NodeRolloutState.DOWNLOADED,
    S.VERIFYING: NodeRolloutState.VERIFYING,
    S.LOADING: NodeRolloutState.LOADING,
    S.ACTIVATED: NodeRolloutState.ACTIVATED,
    S.ROLLED_BACK: NodeRolloutState.ROLLED_BACK,
    S.FAILED: NodeRolloutState.FAILED,
    S.CANCELED: NodeRolloutState.CANCELED,
}


def apply_job_event(kind: JobKind, step: JobStep, event: JobEvent) -> JobStep:
    """The step a ``kind`` job at ``step`` moves to on ``event``.

    Raises:
        IllegalJobMoveError: the table has no such move.
    """
    try:
        return JOB_TRANSITIONS[kind][(step, event)]
    except KeyError:
        raise IllegalJobMoveError(
            f"a {kind.value} job cannot {event.value} while {step.value}"
        ) from None


def can_apply(kind: JobKind, step: JobStep, event: JobEvent) -> bool:
    """Whether :func:`apply_job_event` would accept ``event`` now."""
    return (step, event) in JOB_TRANSITIONS[kind]


def is_final(kind: JobKind, step: JobStep) -> bool:
    """Whether a ``kind`` job at ``step`` has ended (no move is left but none)."""
    return step in _FINAL[kind]


def status_of(step: JobStep) -> NodeRolloutState | None:
    """The status a job reports on reaching ``step``; ``None``: it reports nothing."""
    return _STATUS[step]
