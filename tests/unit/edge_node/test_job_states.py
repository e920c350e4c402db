"""The node's job states: every allowed move, every refused one, and whole job paths."""

from __future__ import annotations

import pytest

from edge_node.job_states import (
    JOB_TRANSITIONS,
    IllegalJobMoveError,
    JobEvent,
    JobKind,
    JobStep,
    apply_job_event,
    can_apply,
    is_final,
    status_of,
)
from shared.messages import NodeRolloutState

K = JobKind
S = JobStep
V = JobEvent

# (kind, step, event, next step): the moves a job makes.
ALLOWED = [
    (K.DEPLOY, S.ACCEPTED, V.QUEUE, S.QUEUED),
    (K.DEPLOY, S.QUEUED, V.DOWNLOAD, S.DOWNLOADING),
    (K.DEPLOY, S.RESUMED, V.DOWNLOAD, S.DOWNLOADING),
    (K.DEPLOY, S.DOWNLOADING, V.DOWNLOAD, S.DOWNLOADING),
    (K.DEPLOY, S.DOWNLOADING, V.DOWNLOADED, S.DOWNLOADED),
    (K.DEPLOY, S.QUEUED, V.VERIFY, S.VERIFYING),
    (K.DEPLOY, S.RESUMED, V.VERIFY, S.VERIFYING),
    (K.DEPLOY, S.DOWNLOADED, V.VERIFY, S.VERIFYING),
    (K.DEPLOY, S.VERIFYING, V.LOAD, S.LOADING),
    (K.DEPLOY, S.LOADING, V.ACTIVATE, S.ACTIVATED),
    (K.DEPLOY, S.RESUMED, V.ACTIVATE, S.ACTIVATED),
    (K.DEPLOY, S.DOWNLOADING, V.FAIL, S.FAILED),
    (K.DEPLOY, S.LOADING, V.FAIL, S.FAILED),
    (K.DEPLOY, S.RESUMED, V.FAIL, S.FAILED),
    (K.DEPLOY, S.ACCEPTED, V.CANCEL, S.CANCELED),
    (K.DEPLOY, S.VERIFYING, V.CANCEL, S.CANCELED),
    (K.DEPLOY, S.DOWNLOADING, V.INTERRUPT, S.INTERRUPTED),
    (K.DEPLOY, S.RESUMED, V.INTERRUPT, S.INTERRUPTED),
    (K.ROLLBACK, S.LOADING, V.ACTIVATE, S.ACTIVATED),
    (K.ROLLBACK, S.ACTIVATED, V.FINISH_ROLLBACK, S.ROLLED_BACK),
    (K.ROLLBACK, S.ACTIVATED, V.INTERRUPT, S.INTERRUPTED),
    (K.ROLLBACK, S.QUEUED, V.FAIL, S.FAILED),
]

# (kind, step, event): moves the table refuses, with why.
REFUSED = [
    pytest.param(K.DEPLOY, S.ACTIVATED, V.FINISH_ROLLBACK, id="deploy-ends-at-activated"),
    pytest.param(K.DEPLOY, S.ACTIVATED, V.FAIL, id="deploy-activated-cannot-fail"),
    pytest.param(K.DEPLOY, S.ACTIVATED, V.CANCEL, id="deploy-activated-cannot-cancel"),
    pytest.param(K.DEPLOY, S.ACTIVATED, V.INTERRUPT, id="deploy-activated-has-ended"),
    pytest.param(K.ROLLBACK, S.ACTIVATED, V.CANCEL, id="rollback-activated-cannot-cancel"),
    pytest.param(K.ROLLBACK, S.ACTIVATED, V.FAIL, id="rollback-activated-cannot-fail"),
    pytest.param(K.DEPLOY, S.RESUMED, V.QUEUE, id="resumed-does-not-queue-again"),
    pytest.param(K.DEPLOY, S.QUEUED, V.QUEUE, id="queued-once"),
    pytest.param(K.DEPLOY, S.ACCEPTED, V.DOWNLOAD, id="queued-first"),
    pytest.param(K.DEPLOY, S.QUEUED, V.ACTIVATE, id="no-activation-without-loading"),
    pytest.param(K.DEPLOY, S.DOWNLOADING, V.VERIFY, id="verify-after-the-download"),
    pytest.param(K.DEPLOY, S.VERIFYING, V.ACTIVATE, id="load-before-activating"),
    pytest.param(K.DEPLOY, S.FAILED, V.QUEUE, id="failed-is-final"),
    pytest.param(K.DEPLOY, S.CANCELED, V.FAIL, id="canceled-is-final"),
    pytest.param(K.DEPLOY, S.INTERRUPTED, V.ACTIVATE, id="interrupted-is-final-here"),
    pytest.param(K.ROLLBACK, S.ROLLED_BACK, V.ACTIVATE, id="rolled-back-is-final"),
]


@pytest.mark.parametrize(("kind", "step", "event", "after"), ALLOWED)
def test_allowed_moves(kind: JobKind, step: JobStep, event: JobEvent, after: JobStep) -> None:
    assert can_apply(kind, step, event)
    assert apply_job_event(kind, step, event) is after


@pytest.mark.parametrize(("kind", "step", "event"), REFUSED)
def test_refused_moves_name_kind_step_and_event(
    kind: JobKind, step: JobStep, event: JobEvent
) -> None:
    assert not can_apply(kind, step, event)
    with pytest.raises(IllegalJobMoveError) as raised:
        apply_job_event(kind, step, event)
    message = str(raised.value)
    assert kind.value in message
    assert step.value in message
    assert event.value in message


# Whole jobs: the events the runner applies, and the statuses the controller hears.
PATHS = [
    pytest.param(
        K.DEPLOY,
        S.ACCEPTED,
        [V.QUEUE, V.DOWNLOAD, V.DOWNLOAD, V.DOWNLOADED, V.VERIFY, V.LOAD, V.ACTIVATE],
        ["queued", "downloading", "downloading", "downloaded", "verifying", "loading", "activated"],
        id="deploy-with-download",
    ),
    pytest.param(
        K.DEPLOY,
        S.ACCEPTED,
        [V.QUEUE, V.VERIFY, V.LOAD, V.ACTIVATE],
        ["queued", "verifying", "loading", "activated"],
        id="deploy-of-a-blob-on-disk",
    ),
    pytest.param(
        K.ROLLBACK,
        S.ACCEPTED,
        [V.QUEUE, V.VERIFY, V.LOAD, V.ACTIVATE, V.FINISH_ROLLBACK],
        ["queued", "verifying", "loading", "activated", "rolled_back"],
        id="rollback",
    ),
    pytest.param(
        K.DEPLOY,
        S.RESUMED,
        [V.DOWNLOAD, V.DOWNLOADED, V.VERIFY, V.LOAD, V.ACTIVATE],
        ["downloading", "downloaded", "verifying", "loading", "activated"],
        id="resumed-mid-download",
    ),
    pytest.param(K.DEPLOY, S.RESUMED, [V.ACTIVATE], ["activated"], id="resumed-after-activating"),
    pytest.param(
        K.ROLLBACK,
        S.RESUMED,
        [V.ACTIVATE, V.FINISH_ROLLBACK],
        ["activated", "rolled_back"],
        id="rollback-resumed-after-activating",
    ),
    pytest.param(
        K.DEPLOY,
        S.ACCEPTED,
        [V.QUEUE, V.DOWNLOAD, V.FAIL],
        ["queued", "downloading", "failed"],
        id="failed-download",
    ),
    pytest.param(
        K.DEPLOY,
        S.ACCEPTED,
        [V.QUEUE, V.DOWNLOAD, V.INTERRUPT],
        ["queued", "downloading"],
        id="stopped-mid-download",
    ),
]


@pytest.mark.parametrize(("kind", "start", "events", "reported"), PATHS)
def test_job_paths_report_their_statuses_in_order(
    kind: JobKind, start: JobStep, events: list[JobEvent], reported: list[str]
) -> None:
    step = start
    heard: list[str] = []
    for event in events:
        step = apply_job_event(kind, step, event)
        status = status_of(step)
        if status is not None:
            heard.append(status.value)
    assert heard == reported
    assert is_final(kind, step)


@pytest.mark.parametrize(
    ("kind", "final"),
    [
        (K.DEPLOY, {S.ACTIVATED, S.FAILED, S.CANCELED, S.INTERRUPTED}),
        (K.ROLLBACK, {S.ROLLED_BACK, S.FAILED, S.CANCELED, S.INTERRUPTED}),
    ],
)
def test_final_steps_allow_no_move(kind: JobKind, final: set[JobStep]) -> None:
    assert {step for step in S if is_final(kind, step)} == final
    for step in final:
        assert not any(can_apply(kind, step, event) for event in V)


def test_every_step_but_the_silent_ones_reports_a_status() -> None:
    silent = {step for step in S if status_of(step) is None}
    assert silent == {S.ACCEPTED, S.RESUMED, S.INTERRUPTED}
    assert status_of(S.ACTIVATED) is NodeRolloutState.ACTIVATED
    # The node never reports succeeded for a job: the controller owns health.
    assert all(status_of(step) is not NodeRolloutState.SUCCEEDED for step in S)


def test_every_move_of_the_table_lands_on_a_known_step() -> None:
    for kind, table in JOB_TRANSITIONS.items():
        for (step, event), after in table.items():
            assert apply_job_event(kind, step, event) is after
            assert not is_final(kind, step), (kind, step, event)
