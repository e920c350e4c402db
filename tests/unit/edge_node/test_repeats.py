"""What a node answers to a repeated command, and how an interrupted job starts again."""

from __future__ import annotations

import pytest

from edge_node.job_states import JobKind, JobStep
from edge_node.repeats import DuplicateAnswer, JobStart, answer_duplicate, job_kind, plan_job
from shared.envelope import SigningKey
from shared.messages import (
    CancelAction,
    Command,
    DeployAction,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeTarget,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
)
from tests.support.shared_kit import command, manifest, sign_manifest

N = NodeRolloutState

V1 = manifest(version="1.0.0", sha256="a1" * 32)
V2 = manifest(version="2.0.0", sha256="b2" * 32)
ENVELOPE = sign_manifest([SigningKey.generate()], V2)
WAVE = WaveTarget(bucket_limit=10_000, wave=1)


def deploy(*, rollout: str | None = "r2", wave: bool = False) -> Command:
    target = WAVE if wave else NodeTarget(node="n1")
    return command(rollout_id=rollout, target=target, body=DeployAction(manifest=ENVELOPE))


def rollback(*, rollout: str | None = "rb") -> Command:
    return command(rollout_id=rollout, body=RollbackAction(manifest=ENVELOPE))


def trust_update(*, wave: bool) -> Command:
    target = WAVE if wave else NodeTarget(node="n1")
    return command(rollout_id="trust-v2" if wave else None, target=target,
                   body=TrustUpdateAction(trust=ENVELOPE))  # fmt: skip


# (duplicate command, its manifest, the running job's command, the active model, answer)
DUPLICATES = [
    pytest.param(
        deploy(), V2, None, V2.ref, DuplicateAnswer(N.ACTIVATED, V2.ref), id="deploy-of-the-active"
    ),
    pytest.param(
        deploy(wave=True), V2, None, V2.ref, DuplicateAnswer(N.ACTIVATED, V2.ref),
        id="later-wave-of-the-active",
    ),
    pytest.param(
        deploy(), V2, None, V1.ref, DuplicateAnswer(N.FAILED, V2.ref), id="deploy-not-active"
    ),
    pytest.param(deploy(), V2, None, None, DuplicateAnswer(N.FAILED, V2.ref), id="nothing-active"),
    pytest.param(
        rollback(), V2, None, V2.ref, DuplicateAnswer(N.ROLLED_BACK, V2.ref),
        id="rollback-to-the-active",
    ),
    pytest.param(
        rollback(), V2, None, V1.ref, DuplicateAnswer(N.FAILED, V2.ref), id="rollback-not-active"
    ),
    pytest.param(deploy(), V2, deploy(), V1.ref, None, id="same-rollout-still-running"),
    pytest.param(
        deploy(rollout=None), V2, deploy(rollout=None), V1.ref, None,
        id="same-no-rollout-still-running",
    ),
    pytest.param(
        deploy(), V2, deploy(rollout="other"), V1.ref, DuplicateAnswer(N.FAILED, V2.ref),
        id="another-rollout-running",
    ),
    pytest.param(
        trust_update(wave=False), None, None, V1.ref, DuplicateAnswer(N.SUCCEEDED, None),
        id="trust-update-to-the-node",
    ),
    pytest.param(trust_update(wave=True), None, None, V1.ref, None, id="retained-trust-broadcast"),
    pytest.param(
        command(body=CancelAction()), None, None, None, DuplicateAnswer(N.SUCCEEDED, None),
        id="cancel",
    ),
    pytest.param(
        trust_update(wave=False), None, deploy(), V1.ref, DuplicateAnswer(N.SUCCEEDED, None),
        id="trust-update-while-a-job-runs",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("repeated", "model", "running", "active", "answer"), DUPLICATES)
def test_duplicate_answers(
    repeated: Command,
    model: ModelManifest | None,
    running: Command | None,
    active: ModelRef | None,
    answer: DuplicateAnswer | None,
) -> None:
    assert answer_duplicate(repeated, model, running=running, active=active) == answer


def test_a_rollout_step_is_never_answered_succeeded() -> None:
    for repeated in (deploy(), deploy(wave=True), rollback()):
        for active in (None, V1.ref, V2.ref):
            answer = answer_duplicate(repeated, V2, running=None, active=active)
            assert answer is not None
            assert answer.state is not N.SUCCEEDED


# (resumed?, the job's model, the active model, where it starts)
STARTS = [
    pytest.param(False, V2, None, JobStart(JobStep.ACCEPTED, finish_only=False), id="new"),
    pytest.param(
        False, V2, V2.ref, JobStart(JobStep.ACCEPTED, finish_only=False), id="new-already-active"
    ),
    pytest.param(
        True, V2, V1.ref, JobStart(JobStep.RESUMED, finish_only=False), id="resumed-before-swap"
    ),
    pytest.param(
        True, V2, None, JobStart(JobStep.RESUMED, finish_only=False), id="resumed-nothing-active"
    ),
    pytest.param(
        True, V2, V2.ref, JobStart(JobStep.RESUMED, finish_only=True), id="resumed-after-swap"
    ),
]


@pytest.mark.parametrize(("resumed", "model", "active", "start"), STARTS)
def test_where_a_job_starts(
    resumed: bool, model: ModelManifest, active: ModelRef | None, start: JobStart
) -> None:
    assert plan_job(resumed=resumed, manifest=model, active=active) == start


@pytest.mark.parametrize(
    ("made", "kind"),
    [
        (deploy(), JobKind.DEPLOY),
        (deploy(wave=True), JobKind.DEPLOY),
        (rollback(), JobKind.ROLLBACK),
    ],
)
def test_job_kind(made: Command, kind: JobKind) -> None:
    assert job_kind(made) is kind
