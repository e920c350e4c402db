"""Deploy and rollback jobs: download, verify, load, activate, each step reported.

A job's statuses follow :mod:`edge_node.job_states`: the runner applies one
event per step and reports the status the table names, so the order of what
the controller hears is the table's, whatever the asyncio code does.

Invariants:

* the node runs one job at a time; a new deploy or rollback supersedes one
  still in progress (which ends ``canceled``);
* a failed download, load or warm-up never replaces the working model: the
  runtime swaps only after the new model loaded and warmed up, and
  ``state.json`` names the new model (and keeps the old as ``previous``) only
  after that swap;
* a deploy job ends at ``activated``: health is the controller's to judge;
  a rollback job ends at ``rolled_back``;
* a job stopped with the node is *interrupted*: it stays persisted as pending
  and resumes on the next start (:mod:`edge_node.repeats` decides how); every
  other ending clears the pending record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_node.artifacts import ArtifactError, ArtifactStore
from edge_node.context import ServingModel
from edge_node.disk import DiskFullError
from edge_node.downloads import Downloader
from edge_node.job_states import (
    JobEvent,
    JobKind,
    JobStep,
    apply_job_event,
    can_apply,
    is_final,
    status_of,
)
from edge_node.repeats import JobStart, job_kind, plan_job
from edge_node.runtime import ModelRuntime
from edge_node.sender import OutboxSender
from edge_node.state import StateKeeper
from shared import topics
from shared.errors import EdgeFleetError, TrustError
from shared.messages import (
    Command,
    DeployAction,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeStatus,
    RollbackAction,
    encode,
)

__all__ = ["Job", "JobRunner", "StatusReporter"]

log = logging.getLogger(__name__)

_STOP_WAIT_S = 5.0  # how long a stop waits for a cancelled job to close its download


class StatusReporter:
    """Queues :class:`NodeStatus` messages in the outbox (sent and re-sent until acked)."""

    def __init__(
        self, sender: OutboxSender, *, node_id: str, fleet: str, clock: Callable[[], float]
    ) -> None:
        self._sender = sender
        self._node_id = node_id
        self._topic = topics.status(fleet, node_id)
        self._clock = clock

    async def report(
        self,
        state: NodeRolloutState,
        command: Command | None,
        *,
        code: str | None = None,
        reason: str | None = None,
        progress: float | None = None,
        model: ModelRef | None = None,
        duplicate: bool = False,
    ) -> None:
        def build(seq: int) -> bytes:
            return encode(
                NodeStatus(
                    node=self._node_id,
                    seq=seq,
                    command_id=command.command_id if command else None,
                    rollout_id=command.rollout_id if command else None,
                    state=state,
                    code=code,
                    reason=reason[:500] if reason else None,
                    progress=progress,
                    model=model,
                    duplicate=duplicate,
                    ts=self._clock(),
                )
            )

        await self._sender.put("status", self._topic, build)


class Job:
    """One deploy or rollback: its command, model and step, and the task running it."""

    def __init__(
        self,
        command: Command,
        body: DeployAction | RollbackAction,
        manifest: ModelManifest,
        start: JobStart,
        reporter: StatusReporter,
    ) -> None:
        self.command = command
        self.body = body
        self.manifest = manifest
        self.kind: JobKind = job_kind(command)
        self.step = start.step
        self.finish_only = start.finish_only
        self.task: asyncio.Task[None] | None = None
        self._reporter = reporter

    def allows(self, event: JobEvent) -> bool:
        return can_apply(self.kind, self.step, event)

    async def advance(
        self,
        event: JobEvent,
        *,
        code: str | None = None,
        reason: str | None = None,
        progress: float | None = None,
    ) -> None:
        """Apply ``event`` and report the status of the step it leads to.

        The step moves only once the status is stored: a job stopped while
        reporting is still where it was, and resumes from there.

        Raises:
            IllegalJobMoveError: the runner asked for a move the table forbids.
        """
        step = apply_job_event(self.kind, self.step, event)
        state = status_of(step)
        if state is not None:
            await self._reporter.report(
                state,
                self.command,
                model=self.manifest.ref,
                code=code,
                reason=reason,
                progress=progress,
            )
        self.step = step


class JobRunner:
    """Runs the node's one deploy or rollback job at a time."""

    def __init__(
        self,
        *,
        keeper: StateKeeper,
        artifacts: ArtifactStore,
        runtime: ModelRuntime,
        serving: ServingModel,
        downloader: Downloader,
        reporter: StatusReporter,
        announce: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
        clock: Callable[[], float],
    ) -> None:
        self._keeper = keeper
        self._artifacts = artifacts
        self._runtime = runtime
        self._serving = serving
        self._downloader = downloader
        self._reporter = reporter
        self._announce = announce
        self._stopping = stopping
        self._clock = clock
        self.current: Job | None = None

    # ----- starting, cancelling, stopping ---------------------------------------

    async def start(
        self,
        command: Command,
        body: DeployAction | RollbackAction,
        manifest: ModelManifest,
        *,
        resumed: bool = False,
    ) -> None:
        """Make ``command`` the node's one job, superseding one still in progress."""
        running = self.current
        if running is not None and running.task is not None and not running.task.done():
            log.info("superseding %s with %s", running.command.command_id, command.command_id)
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.task
        start = plan_job(resumed=resumed, manifest=manifest, active=self._keeper.state.active)
        job = Job(command, body, manifest, start, self._reporter)
        job.task = asyncio.get_running_loop().create_task(
            self._run(job), name=f"job-{command.command_id}"
        )
        self.current = job

    def cancel(self, command: Command) -> bool:
        """Cancel the job of ``command``'s rollout if it may still be cancelled."""
        job = self.current
        if (
            job is None
            or job.task is None
            or job.command.rollout_id != command.rollout_id
            or not job.allows(JobEvent.CANCEL)
        ):
            return False
        job.task.cancel()
        return True

    async def shutdown(self) -> None:
        """Interrupt the running job (it stays pending) and let it close its download.

        A job past its last step is only closing its record: it is let finish.
        """
        job = self.current
        if job is not None and job.task is not None and not job.task.done():
            if not is_final(job.kind, job.step):
                job.task.cancel()
            await asyncio.wait((job.task,), timeout=_STOP_WAIT_S)

    # ----- running --------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        """Carry the job to its end, reporting each step; never raises but cancellation."""
        try:
            await self._steps(job)
        except asyncio.CancelledError:
            await self._cancelled(job)
            raise
        except DiskFullError as exc:
            await self._fail(job, DiskFullError.code, exc)
        except (TrustError, ArtifactError) as exc:
            await self._fail(job, exc.code if isinstance(exc, TrustError) else "artifact", exc)
        except EdgeFleetError as exc:
            await self._fail(job, "error", exc)
        finally:
            if self.current is job:
                self.current = None
            if job.step is not JobStep.INTERRUPTED:
                try:
                    await self._clear_pending(job.command.command_id)
                except EdgeFleetError as exc:  # stays pending: the next start ends it again
                    log.error("job %s not cleared: %s", job.command.command_id, exc)

    async def _steps(self, job: Job) -> None:
        if job.finish_only:  # activated before a restart: only the last steps are left
            await self._finish(job)
            return
        if job.allows(JobEvent.QUEUE):
            await job.advance(JobEvent.QUEUE)
        manifest = job.manifest
        path = await self._obtain(job)
        await job.advance(JobEvent.VERIFY)
        await asyncio.to_thread(
            self._artifacts.save_manifest, manifest.sha256, job.body.manifest.to_bytes()
        )
        body = job.body
        if isinstance(body, DeployAction) and body.activate_at is not None:
            # A plain sleep: a stop cancels the job (it stays pending) rather
            # than cutting the wait short and activating early.
            await asyncio.sleep(max(0.0, body.activate_at - self._clock()))
        await job.advance(JobEvent.LOAD)
        active = self._keeper.state.active
        if active is None or active.sha256 != manifest.sha256:
            await self._install(manifest, path)
        await self._finish(job)

    async def _obtain(self, job: Job) -> Path:
        """The verified blob on disk: already present, else downloaded with resume.

        Progress (throttled by the store, PROGRESS_INTERVAL_S) is reported in order
        by one reporter task, so no ``downloading`` status overtakes ``downloaded``.
        """
        manifest = job.manifest
        if self._artifacts.has(manifest.sha256, manifest.size):
            return self._artifacts.path(manifest.sha256)
        updates: asyncio.Queue[float | None] = asyncio.Queue()

        def progress(done: int, total: int) -> None:
            updates.put_nowait(round(100.0 * done / total, 1) if total else 100.0)

        async def reporter() -> None:
            while (percent := await updates.get()) is not None:
                await job.advance(JobEvent.DOWNLOAD, progress=percent)

        await job.advance(JobEvent.DOWNLOAD, progress=0.0)
        reporting = asyncio.get_running_loop().create_task(reporter())
        try:
            path = await self._downloader.download(manifest, job.body.url, progress)
        finally:
            updates.put_nowait(None)
            await reporting
        await job.advance(JobEvent.DOWNLOADED, progress=100.0)
        return path

    async def _install(self, manifest: ModelManifest, path: Path) -> None:
        """Swap the runtime to the new model, then record it (keeping the old as previous)."""
        old, before = self._serving.manifest, self._keeper.state
        await self._runtime.activate(path, manifest)
        previous = before.active
        try:
            await self._keeper.update(active=manifest.ref, previous=previous)
        except EdgeFleetError:
            # Not recorded, so not installed: serve the old model again.
            self._keeper.state = self._keeper.state.model_copy(
                update={"active": before.active, "previous": before.previous}
            )
            if old is not None:
                await self._runtime.activate(self._artifacts.path(old.sha256), old)
            raise
        keep = [ref.sha256 for ref in (manifest.ref, previous) if ref is not None]
        await asyncio.to_thread(self._artifacts.retain, keep)
        self._serving.set(manifest)

    async def _finish(self, job: Job) -> None:
        """The active model's last steps: announce it, ``activated``, and a rollback's end."""
        await self._announce()
        await job.advance(JobEvent.ACTIVATE)
        if job.kind is JobKind.ROLLBACK:
            await job.advance(JobEvent.FINISH_ROLLBACK)

    # ----- endings --------------------------------------------------------------

    async def _cancelled(self, job: Job) -> None:
        if self._stopping.is_set():
            if job.allows(JobEvent.INTERRUPT):
                await job.advance(JobEvent.INTERRUPT)  # stays pending: the next start resumes it
        elif job.allows(JobEvent.CANCEL):
            await job.advance(JobEvent.CANCEL)

    async def _fail(self, job: Job, code: str, exc: EdgeFleetError) -> None:
        log.error("command %s failed: %s", job.command.command_id, exc)
        if job.allows(JobEvent.FAIL):
            await job.advance(JobEvent.FAIL, code=code, reason=str(exc))

    async def _clear_pending(self, command_id: str) -> None:
        """Forget the persisted job of ``command_id`` (a newer one that replaced it stays)."""
        pending = self._keeper.state.pending
        if pending is not None and pending.command_id == command_id:
            await self._keeper.update(pending=None)
